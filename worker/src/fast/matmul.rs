//! Weight matrices and the parallel matrix multiply over several activation
//! columns at once (prefill tokens, or one token of each batched sequence).
//!
//! A section splits the rows of one or more matrices that share an input into
//! tasks of a few dozen rows; each task streams its rows once for all columns
//! (see [`super::simd::gemm_q`] for the tiling) and writes its own rows of every
//! output column. Threads therefore write disjoint elements of the output,
//! which is the one `unsafe` claim in this module.
#![allow(unsafe_code)]

use super::arena::Bytes;
use super::pool::Pool;
use super::interleave::{self, Layout, RG};
use super::quant::{self, pack_into, Q8View, Src, WType, QK};
use super::simd::{self, Offset, Sink};

/// One weight matrix: `rows` output features × `cols` input features, each row
/// of type `t` in the packed layout (see [`super::quant`]), interleaved in
/// groups of 16 rows where the build has kernels for that
/// ([`simd::layout`]).
#[derive(Debug)]
pub struct Matrix {
    pub t: WType,
    pub layout: Layout,
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
    pub data: Bytes,
}

impl Matrix {
    /// Takes `rows` GGUF rows of type `src` and repacks them into their own buffer.
    pub fn from_gguf(src: Src, rows: usize, cols: usize, data: &[u8]) -> Result<Self, String> {
        let t = src.packed();
        if data.len() != rows * src.row_bytes(cols) {
            return Err(format!("a {rows}×{cols} {src:?} tensor needs {} bytes", rows * src.row_bytes(cols)));
        }
        let mut packed = vec![0u8; rows * t.row_bytes(cols)];
        pack_matrix(src, data, rows, cols, &mut packed);
        Self::packed(t, rows, cols, Bytes::copy_of(&packed))
    }

    /// A matrix already in `data` (a range of the weight arena) as
    /// [`pack_matrix`] leaves it.
    pub fn packed(t: WType, rows: usize, cols: usize, data: Bytes) -> Result<Self, String> {
        Self::check(t, rows, cols, data.len())?;
        Ok(Self { t, layout: simd::layout(t, rows), rows, cols, row_bytes: t.row_bytes(cols), data })
    }

    /// Whether a `rows × cols` matrix of type `t` can be stored in `len` bytes.
    pub fn check(t: WType, rows: usize, cols: usize, len: usize) -> Result<(), String> {
        if !cols.is_multiple_of(t.block_elems()) || !cols.is_multiple_of(QK) {
            return Err(format!("a {rows}×{cols} {t:?} matrix: {cols} is not a multiple of {QK}"));
        }
        if len != rows * t.row_bytes(cols) {
            return Err(format!("a {rows}×{cols} {t:?} matrix needs {} bytes, got {len}", rows * t.row_bytes(cols)));
        }
        Ok(())
    }

    /// Expands row `r` into f32 (`cols` elements).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let out = &mut out[..self.cols];
        match self.layout {
            Layout::Rows => quant::dequantize_row(self.t, &self.data[r * self.row_bytes..(r + 1) * self.row_bytes], out),
            Layout::Interleaved => {
                let g = r / RG * RG * self.row_bytes;
                interleave::dequantize_interleaved(self.t, &self.data[g..g + RG * self.row_bytes], r % RG, out)
            }
        }
    }
}

/// Repacks `rows` GGUF rows of type `src` into `out` in the layout the
/// kernels read: packed rows, then interleaved if [`simd::layout`] says so.
pub fn pack_matrix(src: Src, gguf: &[u8], rows: usize, cols: usize, out: &mut [u8]) {
    match simd::layout(src.packed(), rows) {
        Layout::Rows => pack_into(src, gguf, rows, cols, out),
        Layout::Interleaved => interleave::pack_interleaved_into(src, gguf, rows, cols, out),
    }
}

/// The input of a section: `n` activation columns of `k` features, as f32
/// (for float weights) and quantized (for quantized weights).
#[derive(Clone, Copy, Debug)]
pub struct Acts<'a> {
    pub f: &'a [f32],
    pub q: Q8View<'a>,
    pub n: usize,
    pub k: usize,
}

/// An output buffer that tasks write disjoint elements of.
struct Out {
    ptr: *mut f32,
    len: usize,
}
// SAFETY: shared between the tasks of one section, which write disjoint
// elements (each task owns a row range) and never read; see `set`.
unsafe impl Sync for Out {}

impl Out {
    fn new(s: &mut [f32]) -> Self {
        Self { ptr: s.as_mut_ptr(), len: s.len() }
    }
    /// SAFETY: no other thread writes or reads element `i` during the section.
    #[inline(always)]
    unsafe fn set(&self, i: usize, v: f32) {
        assert!(i < self.len, "matmul output index out of range");
        *self.ptr.add(i) = v;
    }
    /// Elements `i..i + 16`. SAFETY: as [`Self::set`], for each of them.
    #[inline(always)]
    unsafe fn set16(&self, i: usize, v: &[f32; 16]) {
        assert!(i + 16 <= self.len, "matmul output index out of range");
        std::ptr::copy_nonoverlapping(v.as_ptr(), self.ptr.add(i), 16);
    }
    /// SAFETY: no other thread writes element `i` during the section.
    #[inline(always)]
    unsafe fn get(&self, i: usize) -> f32 {
        assert!(i < self.len, "matmul output index out of range");
        *self.ptr.add(i)
    }
    /// Elements `i..i + 16`. SAFETY: as [`Self::get`], for each of them.
    #[inline(always)]
    unsafe fn get16(&self, i: usize) -> [f32; 16] {
        assert!(i + 16 <= self.len, "matmul output index out of range");
        std::ptr::read_unaligned(self.ptr.add(i) as *const [f32; 16])
    }
}

/// One matrix's share of a section's output, `columns × rows` (token `c`'s
/// outputs contiguous). Only built inside a task, for the rows it owns.
struct ColMajor<'a> {
    out: &'a Out,
    rows: usize,
}

impl Sink for ColMajor<'_> {
    #[inline(always)]
    fn one(&mut self, r: usize, c: usize, v: f32) {
        // SAFETY: the task owns row r of every column (see `ColMajor`), and
        // nothing reads the output until the section ends.
        unsafe { self.out.set(c * self.rows + r, v) }
    }
    #[inline(always)]
    fn rows16(&mut self, r0: usize, c: usize, v: &[f32; 16]) {
        // SAFETY: as in `one`, for rows r0..r0 + 16.
        unsafe { self.out.set16(c * self.rows + r0, v) }
    }
}

/// The gate pass of a gated feed-forward: `act(gate) * up` into `out`,
/// reading the up projection the same task wrote into `up` for these rows.
struct Gated<'a> {
    out: &'a Out,
    up: &'a Out,
    rows: usize,
    act: simd::Act,
}

impl Sink for Gated<'_> {
    #[inline(always)]
    fn one(&mut self, r: usize, c: usize, g: f32) {
        let i = c * self.rows + r;
        // SAFETY: the task owns row r of every column in both buffers and
        // wrote `up`'s element before this pass.
        unsafe { self.out.set(i, self.act.one(g) * self.up.get(i)) }
    }
    #[inline(always)]
    fn rows16(&mut self, r0: usize, c: usize, g: &[f32; 16]) {
        let i = c * self.rows + r0;
        let mut h = [0f32; 16];
        // SAFETY: as in `one`, for rows r0..r0 + 16.
        self.act.mul(g, &unsafe { self.up.get16(i) }, &mut h);
        // SAFETY: as in `one`.
        unsafe { self.out.set16(i, &h) }
    }
}


/// Rows per task: enough tasks to balance `threads`, but not so small that the
/// claim overhead shows. Multiples of 16 keep the tile loops and the
/// interleaved groups whole.
fn rows_per_task(total_rows: usize, threads: usize, n: usize) -> usize {
    let target_tasks = threads * if n == 1 { 4 } else { 8 };
    let r = total_rows.div_ceil(target_tasks).next_multiple_of(RG);
    r.clamp(RG, 512)
}

/// The row-range tasks of one section over `mats`: `(matrix, first row, end row)`.
fn tasks(mats: &[&Matrix], threads: usize, n: usize, out: &mut Vec<(usize, usize, usize)>) {
    out.clear();
    let total: usize = mats.iter().map(|m| m.rows).sum();
    let per = rows_per_task(total, threads, n);
    for (i, m) in mats.iter().enumerate() {
        let mut r = 0;
        while r < m.rows {
            let e = (r + per).min(m.rows);
            out.push((i, r, e));
            r = e;
        }
    }
}

/// Computes rows `r0..r1` of `m · x` for every column, passing each result to `store`.
fn block<S: Sink>(m: &Matrix, r0: usize, r1: usize, x: &Acts<'_>, store: &mut S) {
    let w = &m.data[r0 * m.row_bytes..r1 * m.row_bytes];
    let mut shifted = Offset { inner: store, dr: r0 };
    match m.t {
        WType::F32 | WType::F16 => {
            simd::gemm_f(m.t, w, m.row_bytes, r1 - r0, (x.f, x.n), &mut |r, c, v| shifted.one(r, c, v))
        }
        _ => simd::gemm_q(m.t, m.layout, w, m.row_bytes, r1 - r0, (x.q, x.n), &mut shifted),
    }
}

/// Matrices one section can multiply (Q, K and V share one).
const MAX_MATS: usize = 4;

/// Reusable bookkeeping for sections (so a forward step does not allocate).
#[derive(Debug, Default)]
pub struct Plan {
    tasks: Vec<(usize, usize, usize)>,
}

/// `outs[i] = mats[i] · x` for every column: `outs[i]` is `x.n × mats[i].rows`,
/// column-major by token (token `c`'s outputs are contiguous). All matrices
/// must take `x.k` inputs.
pub fn matmul(pool: &Pool, plan: &mut Plan, mats: &[&Matrix], outs: &mut [&mut [f32]], x: Acts<'_>) {
    assert_eq!(mats.len(), outs.len());
    for (m, o) in mats.iter().zip(outs.iter()) {
        assert_eq!(m.cols, x.k, "matmul: a {}×{} matrix cannot take {} inputs", m.rows, m.cols, x.k);
        assert!(o.len() >= x.n * m.rows, "matmul: output too short");
    }
    tasks(mats, pool.threads(), x.n, &mut plan.tasks);
    assert!(mats.len() <= MAX_MATS, "matmul: at most {MAX_MATS} matrices per section");
    let mut outs_arr: [Out; MAX_MATS] = std::array::from_fn(|_| Out { ptr: std::ptr::null_mut(), len: 0 });
    for (slot, o) in outs_arr.iter_mut().zip(outs.iter_mut()) {
        *slot = Out::new(o);
    }
    let outs = &outs_arr;
    let task_list = &plan.tasks;
    pool.run(task_list.len(), &|t| {
        let (i, r0, r1) = task_list[t];
        let m = mats[i];
        let o = &outs[i];
        // This task owns rows r0..r1 of matrix i: element (c, r) is written
        // by no other task, and nothing reads until `run` returns.
        block(m, r0, r1, &x, &mut ColMajor { out: o, rows: m.rows });
    });
}

/// `out = act(gate · x) * (up · x)` for every column (`x.n × gate.rows`),
/// with `up_tmp` (same size) as scratch. Gate and up rows are split together,
/// so the product is formed in the same task, no second section.
pub fn matmul_gated(
    pool: &Pool,
    plan: &mut Plan,
    (gate, up, act): (&Matrix, &Matrix, simd::Act),
    out: &mut [f32],
    up_tmp: &mut [f32],
    x: Acts<'_>,
) {
    assert_eq!(gate.rows, up.rows, "gate and up differ in size");
    assert!(gate.cols == x.k && up.cols == x.k, "swiglu: matrices do not take {} inputs", x.k);
    assert!(out.len() >= x.n * gate.rows && up_tmp.len() >= x.n * gate.rows);
    tasks(&[gate], pool.threads(), x.n, &mut plan.tasks);
    let rows = gate.rows;
    let (o, u) = (Out::new(out), Out::new(up_tmp));
    let task_list = &plan.tasks;
    pool.run(task_list.len(), &|t| {
        let (_, r0, r1) = task_list[t];
        // This task owns rows r0..r1 of every column in both buffers, and
        // reads back only those elements.
        block(up, r0, r1, &x, &mut ColMajor { out: &u, rows });
        block(gate, r0, r1, &x, &mut Gated { out: &o, up: &u, rows, act });
    });
}

#[cfg(test)]
mod tests {
    use super::super::pool::PoolKind;
    use super::super::quant::testing::*;
    use super::super::quant::{quantize_q8_scalar, Q8Buf};
    use super::*;

    #[test]
    fn parallel_matmul_matches_dequantized_reference() {
        let mut rng = Rng(17);
        let k = 96;
        for threads in [1, 2, 3] {
            let pool = Pool::new(threads, PoolKind::Spin).expect("pool");
            let mut plan = Plan::default();
            for (src, t) in [(Src::Q4_1, WType::Q4_1), (Src::Q8_0, WType::Q8_0), (Src::F16, WType::F16)] {
                let a = Matrix::from_gguf(src, 70, k, &random_weights(t, 70, k, &mut rng)).expect("a");
                // 48 rows: interleaved where the build has the kernels for it.
                let b = Matrix::from_gguf(src, 48, k, &random_weights(t, 48, k, &mut rng)).expect("b");
                for n in [1, 3, 9] {
                    let xf = rng.vec(n * k);
                    let mut xq = Q8Buf::default();
                    quantize_q8_scalar(&xf, &mut xq);
                    let x = Acts { f: &xf, q: xq.view(n * k / QK), n, k };
                    let (mut oa, mut ob) = (vec![0f32; n * 70], vec![0f32; n * 48]);
                    matmul(&pool, &mut plan, &[&a, &b], &mut [&mut oa, &mut ob], x);
                    // Exact reference: dequantized weights × the activations
                    // the kernel sees (quantized ones for quantized weights).
                    let mut xs = xf.clone();
                    if t != WType::F16 {
                        for (i, v) in xs.iter_mut().enumerate() {
                            *v = xq.d[i / QK] * xq.qs[i] as f32;
                        }
                    }
                    let mut wrow = vec![0f32; k];
                    for (m, o) in [(&a, &oa), (&b, &ob)] {
                        for r in 0..m.rows {
                            m.dequantize_row(r, &mut wrow);
                            for c in 0..n {
                                let want: f32 = wrow.iter().zip(&xs[c * k..(c + 1) * k]).map(|(p, q)| p * q).sum();
                                let got = o[c * m.rows + r];
                                assert!((want - got).abs() < 1e-4 * (1.0 + want.abs()), "{t:?} {want} {got}");
                            }
                        }
                    }
                    // Packed rows (70) hand results over one by one,
                    // interleaved groups (48 rows, where built) 16 at a time.
                    for ((m, o), act) in [(&a, &oa), (&b, &ob)].into_iter().flat_map(|mo| [(mo, simd::Act::Silu), (mo, simd::Act::GeluTanh)]) {
                        let (mut h, mut tmp) = (vec![0f32; n * m.rows], vec![0f32; n * m.rows]);
                        matmul_gated(&pool, &mut plan, (m, m, act), &mut h, &mut tmp, x);
                        for (hv, av) in h.iter().zip(o.iter()) {
                            let want = act.one(*av) * av;
                            assert!((hv - want).abs() < 1e-4 * (1.0 + want.abs()), "{t:?} {act:?} {hv} vs {want}");
                        }
                    }
                }
            }
        }
    }
}
