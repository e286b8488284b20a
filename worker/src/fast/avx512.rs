//! AVX-512 VNNI kernels for row-interleaved weights (see
//! [`super::quant::interleave`]): 16 rows per 512-bit lane set, so each
//! `vpdpbusd` multiplies 4 elements of 16 rows by 4 activation bytes
//! broadcast from one column, and a block ends with one convert and two FMAs
//! per column for all 16 rows. Nothing is summed across lanes.
//!
//! Against the 256-bit kernels in [`super::avx2`] (one row per vector, a
//! horizontal add per block pair), a block of 16 rows × one column takes
//! about a third of the instructions. Only compiled when the build targets
//! AVX-512F and AVX-512 VNNI. Same contract as `avx2`: `unsafe` only for the
//! raw pointers, lengths checked by [`super::simd`].
#![allow(unsafe_code)]
// Accumulators are indexed by column and chain.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::quant::{Q8View, WType, QK, RG};

/// The activation columns of one tile: quants, scales and sums per column.
struct Cols<const C: usize> {
    q: [*const i8; C],
    d: [*const f32; C],
    s: [*const f32; C],
}

/// Four activation bytes at `p`, in every 32-bit lane.
#[inline(always)]
unsafe fn bcast4(p: *const i8) -> __m512i {
    _mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32))
}

/// How far ahead (bytes, rounded up to whole groups) the kernel prefetches
/// into L2: two groups of the demo model's 576-wide Q4_1 rows, one of its
/// Q8_0 or 1536-wide rows. Into L2 rather than L1: decode ran ~1.4× faster
/// (the L1 hint stalled on full fill buffers); further ahead, or a second
/// hint into L1 one group ahead, measured no better.
const PREFETCH: usize = 8192;

/// One interleaved group (16 rows, `nb` blocks) against C columns: the
/// 16 rows' results per column.
/// SAFETY: `w` points at one whole group; each column at `nb` blocks.
#[inline(always)]
unsafe fn group<const C: usize>(t: WType, w: *const u8, nb: usize, y: &Cols<C>) -> [__m512; C] {
    let q = w.add(RG * t.quants_at(nb));
    let (lo_mask, hi_mask) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0xF0u8 as i8));
    let mut acc = [_mm512_setzero_ps(); C];
    // Each block prefetches its share of the group [`PREFETCH`] bytes on,
    // so the whole matrix streams in ahead of use (the hardware prefetcher
    // alone leaves decode waiting on DRAM, as in `avx2`). `wrapping_add`:
    // the hint may point past the matrix (prefetches never fault).
    let (per_block, group_bytes) = (RG * t.block_bytes(), RG * t.row_bytes(nb * QK));
    let ahead = w.wrapping_add(PREFETCH.div_ceil(group_bytes) * group_bytes);
    for b in 0..nb {
        let p = ahead.wrapping_add(per_block * b);
        for l in (0..per_block).step_by(64) {
            _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(l) as *const i8);
        }
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(w.add(2 * RG * b) as *const __m256i));
        let m = match t {
            WType::Q4_1 => _mm512_cvtph_ps(_mm256_loadu_si256(w.add(2 * RG * (nb + b)) as *const __m256i)),
            WType::Q4_0 => _mm512_mul_ps(d, _mm512_set1_ps(-8.0)),
            _ => _mm512_mul_ps(d, _mm512_set1_ps(-128.0)),
        };
        // Two independent chains per column, so consecutive `vpdpbusd`s do
        // not wait on each other.
        let mut s = [[_mm512_setzero_si512(); 2]; C];
        if t == WType::Q8_0 {
            let qb = q.add(512 * b);
            for j in 0..8 {
                let x = _mm512_loadu_si512(qb.add(64 * j) as *const _);
                for c in 0..C {
                    s[c][j % 2] = _mm512_dpbusd_epi32(s[c][j % 2], x, bcast4(y.q[c].add(QK * b + 4 * j)));
                }
            }
        } else {
            let qb = q.add(256 * b);
            for j in 0..4 {
                let v = _mm512_loadu_si512(qb.add(64 * j) as *const _);
                // High nibbles stay in place (16 × their value); the sum is
                // shifted back once per block and column instead of once per
                // chunk.
                let (lo, hi) = (_mm512_and_si512(v, lo_mask), _mm512_and_si512(v, hi_mask));
                for c in 0..C {
                    s[c][0] = _mm512_dpbusd_epi32(s[c][0], lo, bcast4(y.q[c].add(QK * b + 4 * j)));
                    s[c][1] = _mm512_dpbusd_epi32(s[c][1], hi, bcast4(y.q[c].add(QK * b + 16 + 4 * j)));
                }
            }
        }
        for c in 0..C {
            let sum = if t == WType::Q8_0 {
                _mm512_add_epi32(s[c][0], s[c][1])
            } else {
                _mm512_add_epi32(s[c][0], _mm512_srai_epi32::<4>(s[c][1]))
            };
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(*y.d[c].add(b)));
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[c]);
            acc[c] = _mm512_fmadd_ps(m, _mm512_set1_ps(*y.s[c].add(b)), acc[c]);
        }
    }
    acc
}

/// One group against columns `c0..c0 + C`, results to `store`.
#[inline(always)]
fn group_cols<const C: usize, F: FnMut(usize, usize, f32)>(
    t: WType,
    w: &[u8],
    nb: usize,
    y: Q8View<'_>,
    (r0, c0): (usize, usize),
    store: &mut F,
) {
    let cols = Cols::<C> {
        q: std::array::from_fn(|c| y.qs[(c0 + c) * nb * QK..].as_ptr()),
        d: std::array::from_fn(|c| y.d[(c0 + c) * nb..].as_ptr()),
        s: std::array::from_fn(|c| y.s[(c0 + c) * nb..].as_ptr()),
    };
    // SAFETY: the caller checked `w` is one whole group of `nb` blocks and
    // `y` holds `c0 + C` columns of `nb` blocks.
    let acc = unsafe {
        match t {
            // Separate instances per type, so `t` is a constant inside.
            WType::Q4_1 => group::<C>(WType::Q4_1, w.as_ptr(), nb, &cols),
            WType::Q4_0 => group::<C>(WType::Q4_0, w.as_ptr(), nb, &cols),
            _ => group::<C>(WType::Q8_0, w.as_ptr(), nb, &cols),
        }
    };
    for (c, a) in acc.iter().enumerate() {
        let mut out = [0f32; RG];
        // SAFETY: `out` is 16 floats.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), *a) };
        for (i, &v) in out.iter().enumerate() {
            store(r0 + i, c0 + c, v);
        }
    }
}

/// See [`super::simd::gemm_q`] with interleaved weights; lengths and the
/// whole groups are checked there.
pub fn gemm_interleaved<F: FnMut(usize, usize, f32)>(
    t: WType,
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    nb: usize,
    (y, ncols): (Q8View<'_>, usize),
    store: &mut F,
) {
    // The groups the first one's prefetches skip: a task starts on rows no
    // earlier prefetch reached.
    let group_bytes = RG * row_bytes;
    let first = (PREFETCH.div_ceil(group_bytes) * group_bytes).min(rows * row_bytes);
    for l in (0..first).step_by(64) {
        // SAFETY: `l` is inside `w` (a prefetch would not fault anyway).
        unsafe { _mm_prefetch::<_MM_HINT_T1>(w.as_ptr().add(l) as *const i8) };
    }
    for (g, gw) in w[..rows * row_bytes].chunks_exact(RG * row_bytes).enumerate() {
        let mut c0 = 0;
        while c0 < ncols {
            let n = (ncols - c0).min(4);
            let at = (RG * g, c0);
            match n {
                1 => group_cols::<1, F>(t, gw, nb, y, at, store),
                2 => group_cols::<2, F>(t, gw, nb, y, at, store),
                3 => group_cols::<3, F>(t, gw, nb, y, at, store),
                _ => group_cols::<4, F>(t, gw, nb, y, at, store),
            }
            c0 += n;
        }
    }
}
