//! AVX-512 VNNI kernels for row-interleaved weights (see
//! [`super::quant::interleave`]): 16 rows per 512-bit lane set, so each
//! `vpdpbusd` multiplies 4 elements of 16 rows by 4 activation bytes
//! broadcast from one column, and a block ends with one convert and two FMAs
//! per column for all 16 rows. Nothing is summed across lanes.
//!
//! Against the 256-bit packed-row kernels in [`super::avx2`] (one row per
//! vector, a horizontal add per block pair), a block of 16 rows × one column
//! takes about a third of the instructions. The loop over groups and
//! columns, and the prefetching, are `avx2`'s
//! ([`super::avx2::gemm_interleaved`]), shared with its 256-bit kernel for
//! the same layout. Only compiled when
//! the build targets AVX-512F and AVX-512 VNNI. Same contract as `avx2`:
//! `unsafe` only for the raw pointers, lengths checked by [`super::simd`].
#![allow(unsafe_code)]
// Accumulators are indexed by column and chain.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::avx2::{prefetch_ahead, Cols, GroupKernel};
use super::quant::{WType, QK, RG};

/// Four activation bytes at `p`, in every 32-bit lane.
#[inline(always)]
unsafe fn bcast4(p: *const i8) -> __m512i {
    _mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32))
}

/// The 512-bit kernel: every interleaved type.
pub(super) struct Avx512;

impl GroupKernel for Avx512 {
    const Q8_0: bool = true;

    #[inline(always)]
    unsafe fn group<const C: usize>(t: WType, w: *const u8, nb: usize, y: &Cols<C>) -> [[f32; RG]; C] {
        let acc = group::<C>(t, w, nb, y);
        let mut out = [[0f32; RG]; C];
        for (o, a) in out.iter_mut().zip(&acc) {
            _mm512_storeu_ps(o.as_mut_ptr(), *a);
        }
        out
    }
}

/// One interleaved group (16 rows, `nb` blocks) against C columns: the
/// 16 rows' results per column.
/// SAFETY: `w` points at one whole group; each column at `nb` blocks.
#[inline(always)]
unsafe fn group<const C: usize>(t: WType, w: *const u8, nb: usize, y: &Cols<C>) -> [__m512; C] {
    let q = w.add(RG * t.quants_at(nb));
    let (lo_mask, hi_mask) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0xF0u8 as i8));
    let mut acc = [_mm512_setzero_ps(); C];
    for b in 0..nb {
        prefetch_ahead(t, w, nb, b);
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
