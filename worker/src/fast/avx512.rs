//! AVX-512 VNNI kernels for row-interleaved weights (see
//! [`super::interleave::interleave`]): 16 rows per 512-bit lane set, so each
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

use super::avx2::{exp_poly, prefetch_ahead, Cols, GroupKernel};
use super::interleave::RG;
use super::quant::{WType, QK};
use super::simd::LANES;

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
        // The second scale slot: a minimum, or Q8_16's second half's scale.
        let second = || _mm512_cvtph_ps(_mm256_loadu_si256(w.add(2 * RG * (nb + b)) as *const __m256i));
        let (d1, m) = match t {
            WType::Q4_1 | WType::Q8_1 => (d, second()),
            WType::Q4_0 => (d, _mm512_mul_ps(d, _mm512_set1_ps(-8.0))),
            WType::Q8_16 => (second(), _mm512_mul_ps(d, _mm512_set1_ps(-128.0))),
            _ => (d, _mm512_mul_ps(d, _mm512_set1_ps(-128.0))),
        };
        // Two independent chains per column, so consecutive `vpdpbusd`s do
        // not wait on each other; for Q8_16 one per half block (chunks 0-3
        // are elements 0-15), taken in turns.
        let mut s = [[_mm512_setzero_si512(); 2]; C];
        let eight_bit = t.is_8_bit();
        if eight_bit {
            let qb = q.add(512 * b);
            for i in 0..8 {
                let (j, chain) = if t == WType::Q8_16 { (i / 2 + 4 * (i % 2), i % 2) } else { (i, i % 2) };
                let x = _mm512_loadu_si512(qb.add(64 * j) as *const _);
                for c in 0..C {
                    s[c][chain] = _mm512_dpbusd_epi32(s[c][chain], x, bcast4(y.q[c].add(QK * b + 4 * j)));
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
        if t == WType::Q8_16 {
            // Offsets -128·d0 on the first half's sum `h`, -128·d1 on the
            // second's `s - h`: -128·d1·s + (-128·(d0 - d1))·h.
            let m1 = _mm512_mul_ps(d1, _mm512_set1_ps(-128.0));
            let dm = _mm512_sub_ps(m, m1);
            for c in 0..C {
                let dy = _mm512_set1_ps(*y.d[c].add(b));
                let halves = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[c][1]), d1, _mm512_mul_ps(_mm512_cvtepi32_ps(s[c][0]), d));
                acc[c] = _mm512_fmadd_ps(halves, dy, acc[c]);
                acc[c] = _mm512_fmadd_ps(m1, _mm512_set1_ps(*y.s[c].add(b)), acc[c]);
                acc[c] = _mm512_fmadd_ps(dm, _mm512_set1_ps(*y.h[c].add(b)), acc[c]);
            }
            continue;
        }
        for c in 0..C {
            let sum = if eight_bit {
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

/// `e^x` for 16 lanes: `avx2`'s `exp8` ([`exp_poly`]), 512 bits wide.
#[inline(always)]
unsafe fn exp16(x: __m512) -> __m512 {
    use exp_poly::*;
    let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-LIMIT)), _mm512_set1_ps(LIMIT));
    let fx = _mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), _mm512_set1_ps(0.5));
    let fx = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(fx);
    let x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(LN2_HI), x);
    let x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(LN2_LO), x);
    let mut y = _mm512_set1_ps(POLY[0]);
    for c in &POLY[1..] {
        y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(*c));
    }
    let y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(x, x), x), _mm512_set1_ps(1.0));
    let pow2n = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)));
    _mm512_mul_ps(y, _mm512_castsi512_ps(pow2n))
}

/// Where one block of attention keys is, for [`attend_block`].
pub struct KeyBlock {
    /// `n` keys, then `n` values, `hd` floats each (room for 64 of each).
    pub k: *const f32,
    pub v: *const f32,
    pub n: usize,
}

/// The queries of [`attend_block`], one per lane, and their running state.
pub struct LaneState {
    /// The queries transposed and scaled: `hd` rows of [`LANES`] floats.
    pub qt: *const f32,
    /// How many of the block's keys each lane may see (0 for unused lanes).
    pub seen: *const i32,
    /// Lanes in use.
    pub nq: usize,
    /// Each lane's largest score and softmax sum so far ([`LANES`] each).
    pub m: *mut f32,
    pub l: *mut f32,
    /// Lane `i`'s unnormalised output, `hd` floats at `o + i · pl`.
    pub o: *mut f32,
    pub pl: usize,
}

/// One block of keys (at most 64) against up to [`LANES`] queries at once:
/// the scores, the online-softmax update and the values' weighted sum, with
/// queries along the vector lanes so that nothing is summed across lanes.
/// `V` vectors of 16 lanes (`nq ≤ 16 · V`), `hd = 16 · HD16`.
/// SAFETY: every pointer as its field says; `k` and `v` readable for 64
/// keys (scores past `n` are computed from whatever is there and dropped).
pub unsafe fn attend_block<const HD16: usize, const V: usize>(b: &KeyBlock, st: &LaneState) {
    let hd = 16 * HD16;
    let n = b.n;
    // Scores, keys × lanes; four keys at a time (4 · V independent sums).
    let mut s = [[_mm512_setzero_ps(); V]; 64];
    for j in (0..n).step_by(4) {
        let mut a = [[_mm512_setzero_ps(); V]; 4];
        for d in 0..hd {
            let q: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(st.qt.add(d * LANES + 16 * v)));
            for (t, at) in a.iter_mut().enumerate() {
                let k = _mm512_set1_ps(*b.k.add((j + t) * hd + d));
                for v in 0..V {
                    at[v] = _mm512_fmadd_ps(k, q[v], at[v]);
                }
            }
        }
        s[j..j + 4].copy_from_slice(&a);
    }
    // Online softmax per lane: key `j` counts for lanes that may see it.
    let mut corr_all = [0f32; LANES];
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    for v in 0..V {
        let seen = _mm512_loadu_si512(st.seen.add(16 * v) as *const _);
        let sees = |j: usize| _mm512_cmpgt_epi32_mask(seen, _mm512_set1_epi32(j as i32));
        let m_old = _mm512_loadu_ps(st.m.add(16 * v));
        let mut mx = m_old;
        for j in 0..n {
            mx = _mm512_mask_max_ps(mx, sees(j), mx, s[j][v]);
        }
        // Lanes that have seen no key yet stay empty (m = -inf, nothing added).
        let live = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(mx, ninf);
        let corr = _mm512_mask_blend_ps(live, _mm512_set1_ps(1.0), exp16(_mm512_sub_ps(m_old, mx)));
        let mut sum = _mm512_setzero_ps();
        for (j, sj) in s.iter_mut().take(n).enumerate() {
            let p = _mm512_maskz_mov_ps(sees(j) & live, exp16(_mm512_sub_ps(sj[v], mx)));
            sj[v] = p;
            sum = _mm512_add_ps(sum, p);
        }
        _mm512_storeu_ps(st.m.add(16 * v), mx);
        _mm512_storeu_ps(st.l.add(16 * v), _mm512_fmadd_ps(_mm512_loadu_ps(st.l.add(16 * v)), corr, sum));
        _mm512_storeu_ps(corr_all.as_mut_ptr().add(16 * v), corr);
    }
    // Values: each lane's output rescaled by its `corr`, plus Σ_j p_j · v_j.
    // Two lanes at a time share each value's loads (2 · HD16 sums).
    let p = s.as_ptr() as *const f32;
    let mut i = 0;
    while i < st.nq {
        if i + 1 < st.nq {
            values::<HD16, 2, V>(b, st, p, &corr_all, i);
            i += 2;
        } else {
            values::<HD16, 1, V>(b, st, p, &corr_all, i);
            i += 1;
        }
    }
}

/// Lanes `i..i + Q` of [`attend_block`]'s value pass; `p` is its weights,
/// keys × `16 · V` lanes.
#[inline(always)]
unsafe fn values<const HD16: usize, const Q: usize, const V: usize>(b: &KeyBlock, st: &LaneState, p: *const f32, corr: &[f32; LANES], i: usize) {
    let hd = 16 * HD16;
    let mut acc: [[__m512; HD16]; Q] = std::array::from_fn(|q| {
        let (o, c) = (st.o.add((i + q) * st.pl), _mm512_set1_ps(corr[i + q]));
        std::array::from_fn(|d| _mm512_mul_ps(_mm512_loadu_ps(o.add(16 * d)), c))
    });
    for j in 0..b.n {
        let vj = b.v.add(j * hd);
        let w: [__m512; Q] = std::array::from_fn(|q| _mm512_set1_ps(*p.add(j * 16 * V + i + q)));
        for d in 0..HD16 {
            let vv = _mm512_loadu_ps(vj.add(16 * d));
            for q in 0..Q {
                acc[q][d] = _mm512_fmadd_ps(w[q], vv, acc[q][d]);
            }
        }
    }
    for (q, a) in acc.iter().enumerate() {
        let o = st.o.add((i + q) * st.pl);
        for (d, ad) in a.iter().enumerate() {
            _mm512_storeu_ps(o.add(16 * d), *ad);
        }
    }
}
