//! The safe entry points of the hot kernels: activation quantization,
//! packed-weight × activation tiles, and the f32/f16 vector ops attention needs.
//!
//! Each function checks its slice lengths, then picks its implementation at
//! compile time: `avx2` when the build targets AVX2 + FMA + F16C (the
//! workspace builds with `target-cpu=native`), else the portable scalar code
//! in [`super::quant`]. The only `unsafe` here is those checked calls. Pure
//! functions; callers parallelise by handing disjoint rows to threads.
#![allow(unsafe_code)]

use half::f16;

use super::interleave::{self, Layout};
use super::quant::{self, Q8Buf, Q8View, WType, QK};

/// Whether the SIMD kernels are compiled in (else the scalar fallback runs).
pub const SIMD: bool = cfg!(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"));

/// Whether the build has a kernel for interleaved rows of type `t`
/// (AVX-512 VNNI: every interleavable type; AVX2: the 4-bit ones).
fn interleaved_kernel(t: WType) -> bool {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    return super::avx2::takes_interleaved(t);
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c")))]
    {
        let _ = t;
        false
    }
}

/// The layout a `rows`-row matrix of type `t` is kept in: interleaved where
/// the build has a kernel for it and the matrix is
/// [`interleave::interleavable`], else packed rows.
pub fn layout(t: WType, rows: usize) -> Layout {
    if interleaved_kernel(t) && interleave::interleavable(t, rows) {
        Layout::Interleaved
    } else {
        Layout::Rows
    }
}

/// Quantizes `x` (a multiple of 32 long) into the first `x.len() / 32` blocks of `out`.
pub fn quantize_q8(x: &[f32], out: &mut Q8Buf) {
    assert!(x.len().is_multiple_of(QK), "quantize_q8: length is not a multiple of {QK}");
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    {
        out.reserve_blocks(x.len() / QK);
        for (i, xb) in x.chunks_exact(QK).enumerate() {
            let qs = &mut out.qs[i * QK..(i + 1) * QK];
            // SAFETY: `xb` and `qs` are exactly 32 long (chunks_exact, slicing).
            let (d, s, h) = unsafe { super::avx2::quantize_block(xb.as_ptr(), qs.as_mut_ptr()) };
            (out.d[i], out.s[i], out.h[i]) = (d, s, h);
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c")))]
    quant::quantize_q8_scalar(x, out);
}

/// Where a matmul kernel puts its results. Kernels that finish 16
/// consecutive rows of one column at once (the interleaved ones) hand them
/// over together, so an output laid out by column can take them as one copy
/// and SwiGLU's product can be vectorized over them, instead of 16 calls. Any
/// `FnMut(row, column, value)` is a sink.
pub trait Sink {
    fn one(&mut self, r: usize, c: usize, v: f32);
    /// Rows `r0..r0 + 16` of column `c`.
    #[inline(always)]
    fn rows16(&mut self, r0: usize, c: usize, v: &[f32; 16]) {
        for (i, &x) in v.iter().enumerate() {
            self.one(r0 + i, c, x);
        }
    }
}

impl<F: FnMut(usize, usize, f32)> Sink for F {
    #[inline(always)]
    fn one(&mut self, r: usize, c: usize, v: f32) {
        self(r, c, v)
    }
}

/// A sink seen `dr` rows further on (a task's rows of a whole matrix).
pub(crate) struct Offset<'a, S: Sink> {
    pub inner: &'a mut S,
    pub dr: usize,
}

impl<S: Sink> Sink for Offset<'_, S> {
    #[inline(always)]
    fn one(&mut self, r: usize, c: usize, v: f32) {
        self.inner.one(self.dr + r, c, v)
    }
    #[inline(always)]
    fn rows16(&mut self, r0: usize, c: usize, v: &[f32; 16]) {
        self.inner.rows16(self.dr + r0, c, v)
    }
}

/// Multiplies `rows` packed rows of a quantized weight matrix (`w`,
/// `row_bytes` each, see [`quant`]'s module doc; in groups of 16 if
/// `layout` is [`Layout::Interleaved`]) with `ncols` activation columns
/// stored one after another in `y`, and hands each result to `store`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_q<F: Sink>(
    t: WType,
    layout: Layout,
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    (y, ncols): (Q8View<'_>, usize),
    store: &mut F,
) {
    assert!(matches!(t, WType::Q4_0 | WType::Q4_1 | WType::Q8_0 | WType::Q8_1 | WType::Q8_16), "gemm_q: {t:?} is not quantized");
    let nb = row_bytes / t.block_bytes();
    assert_eq!(nb * t.block_bytes(), row_bytes, "gemm_q: ragged rows");
    assert!(w.len() >= rows * row_bytes, "gemm_q: weights shorter than {rows} rows");
    assert!(y.blocks() >= ncols * nb, "gemm_q: activations shorter than {ncols} columns");
    if layout == Layout::Interleaved {
        assert!(interleave::interleavable(t, rows), "gemm_q: {rows} rows of {t:?} are not whole interleaved groups");
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
        if interleaved_kernel(t) {
            return super::avx2::gemm_interleaved(t, w, row_bytes, rows, nb, (y, ncols), store);
        }
        for (g, group) in w[..rows * row_bytes].chunks_exact(interleave::RG * row_bytes).enumerate() {
            for c in 0..ncols {
                for i in 0..interleave::RG {
                    store.one(interleave::RG * g + i, c, interleave::dot_interleaved_scalar(t, group, i, y.range(c * nb, nb)));
                }
            }
        }
        return;
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    super::avx2::gemm_q(t, w, row_bytes, rows, nb, (y, ncols), store);
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c")))]
    for r0 in (0..rows).step_by(16) {
        for c in 0..ncols {
            for r in r0..(r0 + 16).min(rows) {
                store.one(r, c, quant::dot_row_scalar(t, &w[r * row_bytes..(r + 1) * row_bytes], y.range(c * nb, nb)));
            }
        }
    }
}

/// Like [`gemm_q`] for float weights (F32 or F16) and f32 activations.
pub fn gemm_f<F: FnMut(usize, usize, f32)>(
    t: WType,
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    (xs, ncols): (&[f32], usize),
    store: &mut F,
) {
    assert!(w.len() >= rows * row_bytes, "gemm_f: weights shorter than {rows} rows");
    let k = row_bytes / t.block_bytes();
    assert!(xs.len() >= ncols * k, "gemm_f: activations shorter than {ncols} columns");
    for r in 0..rows {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        for (c, x) in xs.chunks_exact(k).take(ncols).enumerate() {
            let v = match t {
                // SAFETY: `row` holds `k == x.len()` f16 values.
                #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
                WType::F16 => unsafe { super::avx2::dot_f16(x.as_ptr(), row.as_ptr(), k) },
                _ => quant::dot_row_float(t, row, x),
            };
            store(r, c, v);
        }
    }
}

/// An element of attention keys and values: the cache's f16, or f32 (a
/// block of the cache converted once for several query rows).
pub trait KvElem: Copy {
    const F16: bool;
    fn to_f32(self) -> f32;
}

impl KvElem for f16 {
    const F16: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl KvElem for f32 {
    const F16: bool = false;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

/// Attention scores: `out[j] = scale · q·k_j` where key `j` is
/// `k[j * stride..][..q.len()]`, for `j < out.len()`.
#[inline]
pub fn scores<E: KvElem>(q: &[f32], k: &[E], stride: usize, scale: f32, out: &mut [f32]) {
    let (hd, n) = (q.len(), out.len());
    assert!(n == 0 || (n - 1) * stride + hd <= k.len(), "scores: keys out of range");
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    {
        use super::avx2::scores as kernel;
        let (qp, kp, op) = (q.as_ptr(), k.as_ptr() as *const u8, out.as_mut_ptr());
        // SAFETY: lengths checked above; each arm matches `hd` and `E`.
        unsafe {
            match (hd, E::F16) {
                (64, true) => return kernel::<8, true>(qp, kp, stride, n, scale, op),
                (64, false) => return kernel::<8, false>(qp, kp, stride, n, scale, op),
                (128, true) => return kernel::<16, true>(qp, kp, stride, n, scale, op),
                (128, false) => return kernel::<16, false>(qp, kp, stride, n, scale, op),
                _ => {}
            }
        }
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = q.iter().zip(&k[j * stride..j * stride + hd]).map(|(a, b)| a * b.to_f32()).sum::<f32>() * scale;
    }
}

/// Attention values: `o += Σ_j p[j] · v_j` where value `j` is
/// `v[j * stride..][..o.len()]`, for `j < p.len()`.
#[inline]
pub fn accumulate<E: KvElem>(o: &mut [f32], p: &[f32], v: &[E], stride: usize) {
    let (hd, n) = (o.len(), p.len());
    assert!(n == 0 || (n - 1) * stride + hd <= v.len(), "accumulate: values out of range");
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    {
        use super::avx2::accumulate as kernel;
        let (op, pp, vp) = (o.as_mut_ptr(), p.as_ptr(), v.as_ptr() as *const u8);
        // SAFETY: lengths checked above; each arm matches `hd` and `E`.
        unsafe {
            match (hd, E::F16) {
                (64, true) => return kernel::<8, true>(op, pp, vp, stride, n),
                (64, false) => return kernel::<8, false>(op, pp, vp, stride, n),
                (128, true) => return kernel::<16, true>(op, pp, vp, stride, n),
                (128, false) => return kernel::<16, false>(op, pp, vp, stride, n),
                _ => {}
            }
        }
    }
    for (j, &pj) in p.iter().enumerate() {
        for (a, b) in o.iter_mut().zip(&v[j * stride..j * stride + hd]) {
            *a += pj * b.to_f32();
        }
    }
}

/// Queries [`attend_lanes`] takes at once, one per vector lane.
pub const LANES: usize = 32;
/// Keys per [`attend_lanes`] call at most.
pub const LANE_KEYS: usize = 64;

/// Whether [`attend_lanes`] has a kernel for head size `hd` in this build
/// (AVX-512; else attention takes one query row at a time).
pub const fn attend_lanes_for(hd: usize) -> bool {
    cfg!(all(target_arch = "x86_64", target_feature = "avx512f", target_feature = "avx512vnni")) && (hd == 64 || hd == 128)
}

/// One block of `n ≤ LANE_KEYS` keys and values (`k`, `v`: `hd` f32 each,
/// room for [`LANE_KEYS`]) against `nq ≤ LANES` queries at once, one per
/// vector lane: `qt` is the queries transposed and scaled (`hd` rows of
/// `LANES`), `seen[i]` how many of the keys lane `i` may see. Updates each
/// lane's online-softmax state: `m`, `l`, and its unnormalised output at
/// `out[i * pl..][..hd]`. Only where [`attend_lanes_for`] says so.
#[allow(clippy::too_many_arguments)]
pub fn attend_lanes(
    qt: &[f32],
    seen: &[i32; LANES],
    nq: usize,
    (k, v, n): (&[f32], &[f32], usize),
    hd: usize,
    (m, l): (&mut [f32; LANES], &mut [f32; LANES]),
    out: &mut [f32],
    pl: usize,
) {
    assert!(attend_lanes_for(hd), "attend_lanes: no kernel for head size {hd} in this build");
    assert!((1..=LANES).contains(&nq) && n <= LANE_KEYS && pl >= hd && out.len() >= (nq - 1) * pl + hd);
    assert!(qt.len() >= hd * LANES && k.len() >= LANE_KEYS * hd && v.len() >= LANE_KEYS * hd);
    assert!(seen.iter().all(|&s| (0..=n as i32).contains(&s)) && seen[nq..].iter().all(|&s| s == 0));
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f", target_feature = "avx512vnni"))]
    {
        use super::avx512::{attend_block, KeyBlock, LaneState};
        let b = KeyBlock { k: k.as_ptr(), v: v.as_ptr(), n };
        let st = LaneState { qt: qt.as_ptr(), seen: seen.as_ptr(), nq, m: m.as_mut_ptr(), l: l.as_mut_ptr(), o: out.as_mut_ptr(), pl };
        // SAFETY: every length checked above; the arm matches `hd` and `nq`.
        unsafe {
            match (hd, nq > 16) {
                (64, false) => attend_block::<4, 1>(&b, &st),
                (64, true) => attend_block::<4, 2>(&b, &st),
                (128, false) => attend_block::<8, 1>(&b, &st),
                _ => attend_block::<8, 2>(&b, &st),
            }
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f", target_feature = "avx512vnni")))]
    let _ = (m, l, out, k, v);
}

/// `s[i] = e^(s[i] - m)` in place; returns the sum (softmax's numerators).
#[inline]
pub fn exp_shift_sum(s: &mut [f32], m: f32) -> f32 {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    // SAFETY: the pointer and length come from one slice.
    return unsafe { super::avx2::exp_shift_sum(s.as_mut_ptr(), s.len(), m) };
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c")))]
    s.iter_mut()
        .map(|v| {
            *v = (*v - m).exp();
            *v
        })
        .sum()
}

/// `x / (1 + e^-x)`, one value at a time (the kernels' tails and packed-row
/// matrices; [`Act::mul`] runs it vectorized).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// The feed-forward's gate activation: `act(gate · x) * (up · x)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// SwiGLU: `x · sigmoid(x)`.
    Silu,
    /// GeGLU with GELU's tanh approximation (Gemma): `x/2 · (1 + tanh(u))`,
    /// `u = √(2/π) · (x + 0.044715 x³)`, computed as `x · sigmoid(2u)`.
    GeluTanh,
}

/// `2√(2/π)` and `2√(2/π) · 0.044715`: GELU (tanh) is `x · sigmoid(x · (A + B x²))`.
pub const GELU_A: f32 = 1.595_769;
pub const GELU_B: f32 = GELU_A * 0.044_715;

/// GELU with the tanh approximation, one value at a time (see [`Act::GeluTanh`]).
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    x / (1.0 + (-x * (GELU_A + GELU_B * x * x)).exp())
}

impl Act {
    /// The activation of one value.
    #[inline(always)]
    pub fn one(self, x: f32) -> f32 {
        match self {
            Act::Silu => silu(x),
            Act::GeluTanh => gelu(x),
        }
    }

    /// The activation of one value in f64, from the textbook constants (GELU's
    /// `√(2/π)` and 0.044715, not [`GELU_A`] and [`GELU_B`]): what tests hold
    /// the kernels to. GELU's `x/2 · (1 + tanh u)` is written `x / (1 + e^-2u)`:
    /// in f64 the first rounds to 0 below x ≈ -8, the second keeps the value.
    #[cfg(test)]
    pub fn reference(self, x: f64) -> f64 {
        match self {
            Act::Silu => x / (1.0 + (-x).exp()),
            Act::GeluTanh => x / (1.0 + (-2.0 * (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).exp()),
        }
    }

    /// `out[i] = act(g[i]) · up[i]`, vectorized where the build can.
    #[inline]
    pub fn mul(self, g: &[f32], up: &[f32], out: &mut [f32]) {
        assert!(g.len() == up.len() && g.len() == out.len(), "act_mul: length mismatch");
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
        // SAFETY: three slices of one length, checked above.
        unsafe {
            match self {
                Act::Silu => super::avx2::silu_mul(g.as_ptr(), up.as_ptr(), out.as_mut_ptr(), g.len()),
                Act::GeluTanh => super::avx2::gelu_mul(g.as_ptr(), up.as_ptr(), out.as_mut_ptr(), g.len()),
            }
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c")))]
        for ((o, &x), &u) in out.iter_mut().zip(g).zip(up) {
            *o = self.one(x) * u;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::quant::testing::*;
    use super::super::quant::{dequantize_row, dot_row_scalar, pack, quantize_q8_scalar, Src};
    use super::*;

    #[test]
    fn quantize_matches_scalar() {
        let mut rng = Rng(3);
        let mut x = rng.vec(32 * 64);
        x[64..96].iter_mut().for_each(|v| *v = 0.0); // an all-zero block
        let (mut a, mut b) = (Q8Buf::default(), Q8Buf::default());
        quantize_q8(&x, &mut a);
        quantize_q8_scalar(&x, &mut b);
        assert_eq!(a.d, b.d);
        for (p, q) in a.s.iter().zip(&b.s).chain(a.h.iter().zip(&b.h)) {
            assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "{p} vs {q}");
        }
        let diff = a.qs.iter().zip(&b.qs).filter(|(u, v)| u != v).count();
        assert!(diff <= 2, "quantized values differ in {diff} places");
    }

    /// `gemm_q` over `w` (`rows` rows of `nb` blocks) against `reference(row,
    /// column)` for column counts 1..=11 (all tile shapes and remainders).
    /// `weights(row)` is the row dequantized: float sums may differ by a
    /// small part of `Σ |w_i · y_i|`, however much the terms cancel.
    fn check_gemm(t: WType, layout: Layout, (w, rows, nb): (&[u8], usize, usize), (reference, weights): Reference<'_>, rng: &mut Rng) {
        for ncols in [1, 2, 3, 4, 5, 7, 8, 11] {
            let mut y = Q8Buf::default();
            quantize_q8(&rng.vec(ncols * nb * QK), &mut y);
            let yv = y.view(ncols * nb);
            let mut got = vec![f32::NAN; rows * ncols];
            gemm_q(t, layout, w, t.row_bytes(nb * QK), rows, (yv, ncols), &mut |r, c, v| got[r * ncols + c] = v);
            for r in 0..rows {
                let wr = weights(r);
                for c in 0..ncols {
                    let yc = yv.range(c * nb, nb);
                    let want = reference(r, yc);
                    let terms: f32 = wr.iter().enumerate().map(|(i, wi)| (wi * yc.d[i / QK] * yc.qs[i] as f32).abs()).sum();
                    let g = got[r * ncols + c];
                    let tol = 1e-4 * (1.0 + want.abs()) + 1e-6 * terms;
                    assert!((want - g).abs() <= tol, "{t:?} {layout:?} nb{nb} r{r} c{c}: {want} vs {g}");
                }
            }
        }
    }

    /// A scalar reference for [`check_gemm`], and row `r` dequantized.
    type Reference<'a> = (&'a dyn Fn(usize, Q8View<'_>) -> f32, &'a dyn Fn(usize) -> Vec<f32>);

    /// Every quantized type, column counts 1..=11 (all tile shapes and
    /// remainders), rows not a multiple of any tile height, and block counts
    /// with whole, partial and odd scale groups.
    #[test]
    fn gemm_matches_scalar_reference() {
        let mut rng = Rng(5);
        let rows = 37;
        for src in [Src::Q4_0, Src::Q4_1, Src::Q8_0, Src::Q6K, Src::Q5_0, Src::Q5_1, Src::Q5K] {
            let t = src.packed();
            for nb in [1, 8, 9, 18, 48] {
                let k = nb * QK;
                let rb = t.row_bytes(k);
                let w = if src == Src::Q6K {
                    // Any block count, for Q8_16's partial scale groups.
                    random_q8_16_rows(rows, k, &mut rng)
                } else if k.is_multiple_of(src.block_elems()) {
                    pack(src, &random_gguf(src, rows, k, &mut rng), rows, k)
                } else {
                    continue; // Q5_K rows come in 256-element super-blocks
                };
                let reference = |r: usize, y: Q8View<'_>| dot_row_scalar(t, &w[r * rb..(r + 1) * rb], y);
                let weights = |r: usize| {
                    let mut out = vec![0f32; k];
                    dequantize_row(t, &w[r * rb..(r + 1) * rb], &mut out);
                    out
                };
                check_gemm(t, Layout::Rows, (&w, rows, nb), (&reference, &weights), &mut rng);
            }
        }
    }

    /// The interleaved layout on whichever path the build has: each type,
    /// column counts 1..=11, block counts with whole, partial and odd scale
    /// groups, two groups of rows.
    #[test]
    fn interleaved_gemm_matches_scalar_reference() {
        let mut rng = Rng(19);
        let rows = 2 * interleave::RG;
        for src in [Src::Q4_0, Src::Q4_1, Src::Q8_0, Src::Q5_0, Src::Q5_1, Src::Q5K, Src::Q6K] {
            let t = src.packed();
            for nb in [1, 8, 9, 18, 48] {
                let k = nb * QK;
                let rb = t.row_bytes(k);
                let mut w = if src == Src::Q6K {
                    random_q8_16_rows(rows, k, &mut rng)
                } else if k.is_multiple_of(src.block_elems()) {
                    pack(src, &random_gguf(src, rows, k, &mut rng), rows, k)
                } else {
                    continue; // Q5_K rows come in 256-element super-blocks
                };
                interleave::interleave(t, rows, k, &mut w);
                let group = |r: usize| &w[r / interleave::RG * interleave::RG * rb..][..interleave::RG * rb];
                let reference = |r: usize, y: Q8View<'_>| interleave::dot_interleaved_scalar(t, group(r), r % interleave::RG, y);
                let weights = |r: usize| {
                    let mut out = vec![0f32; k];
                    interleave::dequantize_interleaved(t, group(r), r % interleave::RG, &mut out);
                    out
                };
                check_gemm(t, Layout::Interleaved, (&w, rows, nb), (&reference, &weights), &mut rng);
            }
        }
    }

    #[test]
    fn float_gemm_and_vector_ops_match_scalar() {
        let mut rng = Rng(9);
        let (rows, k) = (5, 72);
        for t in [WType::F32, WType::F16] {
            let w = random_weights(t, rows, k, &mut rng);
            let x = rng.vec(k);
            let rb = t.row_bytes(k);
            let mut got = vec![0f32; rows];
            gemm_f(t, &w, rb, rows, (&x, 1), &mut |r, _, v| got[r] = v);
            for (r, g) in got.iter().enumerate() {
                let want = quant::dot_row_float(t, &w[r * rb..(r + 1) * rb], &x);
                assert!((want - g).abs() < 1e-4, "{t:?}: {want} vs {g}");
            }
        }
        // Attention's two loops, on the cache's f16 and on converted f32
        // rows, `stride` apart: head sizes with a kernel (64, 128) and without (24).
        for hd in [64, 128, 24] {
            let (n, stride) = (7, hd + 40);
            let q = rng.vec(hd);
            let kf: Vec<f32> = rng.vec(n * stride).into_iter().map(|x| f16::from_f32(x).to_f32()).collect();
            let kh: Vec<f16> = kf.iter().map(|&x| f16::from_f32(x)).collect();
            let p = rng.vec(n);
            let want_s: Vec<f32> = (0..n).map(|j| q.iter().zip(&kf[j * stride..]).map(|(a, b)| a * b).sum::<f32>() * 0.5).collect();
            let mut want_o = q.clone();
            for j in 0..n {
                want_o.iter_mut().zip(&kf[j * stride..]).for_each(|(o, v)| *o += p[j] * v);
            }
            let (mut s16, mut s32) = (vec![0f32; n], vec![0f32; n]);
            scores(&q, &kh, stride, 0.5, &mut s16);
            scores(&q, &kf, stride, 0.5, &mut s32);
            let (mut o16, mut o32) = (q.clone(), q.clone());
            accumulate(&mut o16, &p, &kh, stride);
            accumulate(&mut o32, &p, &kf, stride);
            for (got, want) in [(&s16, &want_s), (&s32, &want_s), (&o16, &want_o), (&o32, &want_o)] {
                for (g, w) in got.iter().zip(want.iter()) {
                    assert!((g - w).abs() < 1e-4, "hd {hd}: {g} vs {w}");
                }
            }
        }
        // Softmax numerators over the range attention scores take (and beyond).
        let mut s: Vec<f32> = (0..203).map(|i| (i as f32 - 150.0) * 0.7).collect();
        let want: Vec<f32> = s.iter().map(|v| (v - 3.0f32).exp()).collect();
        let sum = exp_shift_sum(&mut s, 3.0);
        for (g, w) in s.iter().zip(&want) {
            assert!((g - w).abs() <= 2e-7 * w.abs() + 1e-37, "{g} vs {w}");
        }
        assert!((sum - want.iter().sum::<f32>()).abs() <= 1e-6 * sum);
    }

    /// Both gate products against an f64 reference, over the range gate
    /// values take and far beyond (where e^-x under- or overflows), with a
    /// ragged tail. GELU's tolerance is wider: its exponent `x (A + B x²)` is
    /// rounded before `exp` (|error| up to ~87 ulp-relative near the cut-off).
    #[test]
    fn gate_products_match_reference() {
        // The extremes first, so the vector path sees them, not the tail.
        let g: Vec<f32> = [f32::MAX, -f32::MAX, 0.0, -0.0].into_iter().chain((0..1003).map(|i| (i as f32 - 501.0) * 0.25)).collect();
        let up: Vec<f32> = (0..g.len()).map(|i| (i % 7) as f32 * 0.3 - 0.9).collect();
        for (act, rel) in [(Act::Silu, 1e-6), (Act::GeluTanh, 2e-5)] {
            let mut out = vec![f32::NAN; g.len()];
            act.mul(&g, &up, &mut out);
            for ((&x, &u), &o) in g.iter().zip(&up).zip(&out) {
                let want = (act.reference(x as f64) * u as f64) as f32;
                assert!((o - want).abs() <= rel * want.abs() + 1e-30, "{act:?}({x}) * {u}: {o} vs {want}");
                let one = act.one(x) * u;
                assert!((one - want).abs() <= rel * want.abs() + 1e-30, "{act:?} one ({x}) * {u}: {one} vs {want}");
            }
        }
    }
}
