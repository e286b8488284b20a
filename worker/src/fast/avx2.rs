//! The AVX2 + FMA + F16C kernels behind [`super::simd`]: activation
//! quantization, packed-weight × activation tiles, and the f16 vector ops.
//!
//! Only compiled when the build targets those features (the workspace builds
//! with `target-cpu=native`). Every function here is `unsafe` to call only
//! because it reads through raw pointers; [`super::simd`] checks the slice
//! lengths before calling. Pure functions, no shared state.
#![allow(unsafe_code)]
// Tiles index several parallel arrays (rows × columns × blocks) by position.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::interleave::RG;
use super::quant::{Q8View, WType, QK};
use super::simd::Sink;

/// Blocks whose scales one vector holds.
const G: usize = 8;
/// Per-block scale slots of a group (Q8_16 has two scales per block).
const S: usize = 2 * G;

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

#[inline(always)]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)))
}

/// Quantizes one block: its scale `d`, and `d` times the sum of its
/// quants and of their first half (see [`super::quant::Q8Buf`]).
/// SAFETY: `x` points at 32 readable floats, `qs` at 32 writable bytes.
#[inline(always)]
pub unsafe fn quantize_block(x: *const f32, qs: *mut i8) -> (f32, f32, f32) {
    let v = [_mm256_loadu_ps(x), _mm256_loadu_ps(x.add(8)), _mm256_loadu_ps(x.add(16)), _mm256_loadu_ps(x.add(24))];
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_andnot_ps(sign, v[0]);
    for vi in &v[1..] {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vi));
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
    let q: [__m256i; 4] = std::array::from_fn(|i| {
        _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
    });
    let (first, second) = (hsum_i32(_mm256_add_epi32(q[0], q[1])), hsum_i32(_mm256_add_epi32(q[2], q[3])));
    // packs interleave 128-bit lanes; the permute restores element order.
    let p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(qs as *mut __m256i, p);
    (d, d * (first + second) as f32, d * first as f32)
}

/// How far ahead (bytes) the tiles prefetch each weight row: the hardware
/// prefetcher alone leaves single-column (decode) tiles waiting on DRAM
/// (Q8_0 rows streamed at ~7 GB/s without, ~11 GB/s with, on the dev box).
const PREFETCH: usize = 4096;

/// Hints the line at `p` into L1. `wrapping_add` because the hint may point
/// past the matrix (prefetches never fault).
#[inline(always)]
unsafe fn prefetch(p: *const u8, ahead: usize) {
    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead) as *const i8);
}

/// The activation columns of one tile: quants, scales and sums per column.
pub(super) struct Cols<const C: usize> {
    pub q: [*const i8; C],
    pub d: [*const f32; C],
    pub s: [*const f32; C],
    pub h: [*const f32; C],
}

impl<const C: usize> Cols<C> {
    /// Columns `c0..c0 + C` of `y`, `nb` blocks each.
    fn at(y: Q8View<'_>, nb: usize, c0: usize) -> Self {
        Self {
            q: std::array::from_fn(|c| y.qs[(c0 + c) * nb * QK..].as_ptr()),
            d: std::array::from_fn(|c| y.d[(c0 + c) * nb..].as_ptr()),
            s: std::array::from_fn(|c| y.s[(c0 + c) * nb..].as_ptr()),
            h: std::array::from_fn(|c| y.h[(c0 + c) * nb..].as_ptr()),
        }
    }
}

/// The u8×i8 products of `x` and `y`, each 4 neighbours summed into one of
/// 8 i32 lanes: one `vpdpbusd` where the CPU has AVX-VNNI, else `maddubs`
/// then `madd`. The same sums either way: no pair of products reaches
/// `maddubs`'s i16 saturation (at most 2 · 128 · 128 = 32,768 in magnitude,
/// and only as −32,768).
#[inline(always)]
unsafe fn dot4(x_u8: __m256i, y_i8: __m256i) -> __m256i {
    #[cfg(target_feature = "avxvnni")]
    {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), x_u8, y_i8)
    }
    #[cfg(not(target_feature = "avxvnni"))]
    {
        _mm256_madd_epi16(_mm256_maddubs_epi16(x_u8, y_i8), _mm256_set1_epi16(1))
    }
}

/// `Σ cvt(dot4(x, y)) * scale` for one block and one column: the i8×u8
/// products summed to 8 lanes and scaled by the block's `d_w * d_y`.
#[inline(always)]
unsafe fn block_fma(x_u8: __m256i, y_i8: __m256i, scale: *const f32, acc: __m256) -> __m256 {
    _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot4(x_u8, y_i8)), _mm256_broadcast_ss(&*scale), acc)
}

/// Per group of 8 blocks from block `g`: folds the offset term (`m · s`:
/// Q4_0, Q4_1, Q8_1) into `acc` and returns the products `d_w · d_y` per row, column
/// and block, for the per-block FMAs to broadcast. 4-bit types get each
/// product twice in a row (`[s0, s0, s1, s1, ..]`), the lane order of
/// [`pair_q4`]'s sums.
#[inline(always)]
unsafe fn group_scales<const R: usize, const C: usize>(
    t: WType,
    w: *const u8,
    row_bytes: usize,
    (nb, g): (usize, usize),
    y: &Cols<C>,
    acc: &mut [[__m256; C]; R],
) -> [[[f32; S]; C]; R] {
    let mut scale = [[[0f32; S]; C]; R];
    let dy: [__m256; C] = std::array::from_fn(|c| _mm256_loadu_ps(y.d[c].add(g)));
    if t == WType::Q8_16 {
        // Scales of blocks g..g+4 (two each), then g+4..g+8, times each block's d_y.
        let (lo, hi) = (_mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7));
        for r in 0..R {
            let sc = w.add(r * row_bytes + 4 * g);
            let (s0, s1) = (_mm256_cvtph_ps(_mm_loadu_si128(sc as *const __m128i)), _mm256_cvtph_ps(_mm_loadu_si128(sc.add(16) as *const __m128i)));
            for c in 0..C {
                _mm256_storeu_ps(scale[r][c].as_mut_ptr(), _mm256_mul_ps(s0, _mm256_permutevar8x32_ps(dy[c], lo)));
                _mm256_storeu_ps(scale[r][c].as_mut_ptr().add(G), _mm256_mul_ps(s1, _mm256_permutevar8x32_ps(dy[c], hi)));
            }
        }
        return scale;
    }
    for r in 0..R {
        let row = w.add(r * row_bytes);
        let d = _mm256_cvtph_ps(_mm_loadu_si128(row.add(2 * g) as *const __m128i));
        if t != WType::Q8_0 {
            let m = if t == WType::Q4_1 || t == WType::Q8_1 {
                _mm256_cvtph_ps(_mm_loadu_si128(row.add(2 * nb + 2 * g) as *const __m128i))
            } else {
                _mm256_mul_ps(d, _mm256_set1_ps(-8.0))
            };
            for c in 0..C {
                acc[r][c] = _mm256_fmadd_ps(m, _mm256_loadu_ps(y.s[c].add(g)), acc[r][c]);
            }
        }
        for c in 0..C {
            let p = _mm256_mul_ps(d, dy[c]);
            if t == WType::Q8_0 || t == WType::Q8_1 {
                _mm256_storeu_ps(scale[r][c].as_mut_ptr(), p);
            } else {
                let (lo, hi) = (_mm256_unpacklo_ps(p, p), _mm256_unpackhi_ps(p, p));
                _mm256_storeu_ps(scale[r][c].as_mut_ptr(), _mm256_permute2f128_ps(lo, hi, 0x20));
                _mm256_storeu_ps(scale[r][c].as_mut_ptr().add(G), _mm256_permute2f128_ps(lo, hi, 0x31));
            }
        }
    }
    scale
}

/// [`group_scales`] for a last group of `n < 8` blocks, in scalar code (it
/// runs once per row).
#[inline(always)]
unsafe fn tail_scales<const R: usize, const C: usize>(
    t: WType,
    w: *const u8,
    row_bytes: usize,
    (nb, g, n): (usize, usize, usize),
    y: &Cols<C>,
    acc: &mut [[__m256; C]; R],
) -> [[[f32; S]; C]; R] {
    let f16 = |p: *const u8| half::f16::from_bits(std::ptr::read_unaligned(p as *const u16)).to_f32();
    let mut scale = [[[0f32; S]; C]; R];
    for r in 0..R {
        let row = w.add(r * row_bytes);
        for c in 0..C {
            if t == WType::Q8_16 {
                for k in 0..2 * n {
                    scale[r][c][k] = f16(row.add(4 * g + 2 * k)) * *y.d[c].add(g + k / 2);
                }
                continue;
            }
            let mut offset = 0f32;
            for k in 0..n {
                let d = f16(row.add(2 * (g + k)));
                let p = d * *y.d[c].add(g + k);
                if t == WType::Q8_0 || t == WType::Q8_1 {
                    scale[r][c][k] = p;
                } else {
                    // Doubled, as in `group_scales`.
                    (scale[r][c][2 * k], scale[r][c][2 * k + 1]) = (p, p);
                }
                let m = match t {
                    WType::Q4_1 | WType::Q8_1 => f16(row.add(2 * (nb + g + k))),
                    WType::Q4_0 => -8.0 * d,
                    _ => 0.0,
                };
                offset += m * *y.s[c].add(g + k);
            }
            acc[r][c] = _mm256_add_ps(acc[r][c], _mm256_setr_ps(offset, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0));
        }
    }
    scale
}

/// One pair of 4-bit blocks (`b`, `b + 1`, packed into 32 bytes) of R rows
/// against C columns; `k` is `b`'s index in the scale group.
///
/// Both blocks' i8 products share one widening: `hadd` sums neighbouring
/// i16 pairs of both (at most 2 · 2 · 15 · 128 = 7,680, no overflow) into
/// one vector, so each 128-bit half ends up as `[b, b, b+1, b+1]` in i32
/// after one `madd`, and one convert and one FMA against the doubled scales
/// `[s_b, s_b, s_b+1, s_b+1]` finish the pair. That is one multiply, one
/// convert and one FMA fewer per block and column than widening each block
/// on its own, which is what bounds a step of several jobs at once. With
/// AVX-VNNI each block is one `vpdpbusd` to i32 and `hadd` pairs those
/// instead: the same lanes, one `maddubs` per block and the `madd` fewer.
#[inline(always)]
unsafe fn pair_q4<const R: usize, const C: usize>(
    q: *const u8,
    row_bytes: usize,
    b: usize,
    k: usize,
    y: &Cols<C>,
    scale: &[[[f32; S]; C]; R],
    acc: &mut [[__m256; C]; R],
) {
    let mask = _mm256_set1_epi8(0x0F);
    for r in 0..R {
        prefetch(q.add(r * row_bytes + 16 * b), PREFETCH);
        let v = _mm256_loadu_si256(q.add(r * row_bytes + 16 * b) as *const __m256i);
        let lo = _mm256_and_si256(v, mask);
        let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        for c in 0..C {
            let y0 = _mm256_loadu_si256(y.q[c].add(QK * b) as *const __m256i);
            let y1 = _mm256_loadu_si256(y.q[c].add(QK * b + QK) as *const __m256i);
            #[cfg(target_feature = "avxvnni")]
            let sums = _mm256_hadd_epi32(dot4(lo, y0), dot4(hi, y1));
            #[cfg(not(target_feature = "avxvnni"))]
            let sums = {
                let pairs = _mm256_hadd_epi16(_mm256_maddubs_epi16(lo, y0), _mm256_maddubs_epi16(hi, y1));
                _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
            };
            let sc = _mm256_broadcast_ps(&*(scale[r][c].as_ptr().add(2 * k) as *const __m128));
            acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), sc, acc[r][c]);
        }
    }
}

/// One 8-bit block `b` of R rows against C columns; `k` as in [`pair_q4`].
/// `HALVES`: Q8_16, whose two 16-element halves have their own scales.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block_q8<const R: usize, const C: usize, const HALVES: bool>(
    q: *const u8,
    row_bytes: usize,
    b: usize,
    k: usize,
    y: &Cols<C>,
    scale: &[[[f32; S]; C]; R],
    acc: &mut [[__m256; C]; R],
) {
    for r in 0..R {
        prefetch(q.add(r * row_bytes + QK * b), PREFETCH);
        let x = _mm256_loadu_si256(q.add(r * row_bytes + QK * b) as *const __m256i);
        let ax = _mm256_sign_epi8(x, x);
        for c in 0..C {
            let yv = _mm256_loadu_si256(y.q[c].add(QK * b) as *const __m256i);
            if HALVES {
                // Lanes 0-3 sum elements 0-15, lanes 4-7 elements 16-31.
                let p = dot4(ax, _mm256_sign_epi8(yv, x));
                let s = &scale[r][c];
                let sv = _mm256_insertf128_ps(
                    _mm256_castps128_ps256(_mm_broadcast_ss(&s[2 * k])),
                    _mm_broadcast_ss(&s[2 * k + 1]),
                    1,
                );
                acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sv, acc[r][c]);
            } else {
                acc[r][c] = block_fma(ax, _mm256_sign_epi8(yv, x), &scale[r][c][k], acc[r][c]);
            }
        }
    }
}

/// R packed rows × C columns of a quantized type.
/// SAFETY: `w` points at R packed rows of `nb` blocks, `row_bytes` apart;
/// each column pointer at `nb` blocks (quants, scales, sums).
#[inline(always)]
unsafe fn tile<const R: usize, const C: usize>(
    t: WType,
    w: *const u8,
    row_bytes: usize,
    nb: usize,
    y: &Cols<C>,
) -> [[f32; C]; R] {
    let q = w.add(t.quants_at(nb));
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut g = 0;
    // Whole groups of 8 blocks: constant trip counts, so the scale indices
    // are constants and the loop unrolls.
    while g + G <= nb {
        let scale = group_scales::<R, C>(t, w, row_bytes, (nb, g), y, &mut acc);
        if t == WType::Q8_0 || t == WType::Q8_1 {
            for k in 0..G {
                block_q8::<R, C, false>(q, row_bytes, g + k, k, y, &scale, &mut acc);
            }
        } else if t == WType::Q8_16 {
            for k in 0..G {
                block_q8::<R, C, true>(q, row_bytes, g + k, k, y, &scale, &mut acc);
            }
        } else {
            for k in (0..G).step_by(2) {
                pair_q4::<R, C>(q, row_bytes, g + k, k, y, &scale, &mut acc);
            }
        }
        g += G;
    }
    if g < nb {
        let n = nb - g;
        let scale = tail_scales::<R, C>(t, w, row_bytes, (nb, g, n), y, &mut acc);
        if t == WType::Q8_0 || t == WType::Q8_1 {
            for k in 0..n {
                block_q8::<R, C, false>(q, row_bytes, g + k, k, y, &scale, &mut acc);
            }
        } else if t == WType::Q8_16 {
            for k in 0..n {
                block_q8::<R, C, true>(q, row_bytes, g + k, k, y, &scale, &mut acc);
            }
        } else {
            let mut k = 0;
            while k + 1 < n {
                pair_q4::<R, C>(q, row_bytes, g + k, k, y, &scale, &mut acc);
                k += 2;
            }
            if k < n {
                // The odd last block of the row, in GGUF's 16-byte nibble order.
                let b = g + k;
                let mask = _mm256_set1_epi8(0x0F);
                for r in 0..R {
                    let t = _mm_loadu_si128(q.add(r * row_bytes + 16 * b) as *const __m128i);
                    let v = _mm256_insertf128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1);
                    let x = _mm256_and_si256(v, mask);
                    for c in 0..C {
                        let y0 = _mm256_loadu_si256(y.q[c].add(QK * b) as *const __m256i);
                        acc[r][c] = block_fma(x, y0, &scale[r][c][2 * k], acc[r][c]);
                    }
                }
            }
        }
    }
    let mut out = [[0f32; C]; R];
    for r in 0..R {
        for c in 0..C {
            out[r][c] = hsum(acc[r][c]);
        }
    }
    out
}

/// Rows `r0..r1` against columns `c0..c0 + C`, R rows at a time.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_cols<const R: usize, const C: usize, F: Sink>(
    t: WType,
    w: &[u8],
    row_bytes: usize,
    (r0, r1): (usize, usize),
    nb: usize,
    y: Q8View<'_>,
    c0: usize,
    store: &mut F,
) {
    let cols = Cols::<C>::at(y, nb, c0);
    let mut r = r0;
    while r < r1 {
        let whole = r + R <= r1;
        // SAFETY: the caller checked `w` holds all rows and `y` all columns
        // of `nb` blocks; `r + R <= r1 <= rows` (or one row at a time below).
        unsafe {
            let wp = w.as_ptr().add(r * row_bytes);
            if whole {
                let o: [[f32; C]; R] = match t {
                    // Separate instances per type, so `t` is a constant inside.
                    WType::Q4_1 => tile::<R, C>(WType::Q4_1, wp, row_bytes, nb, &cols),
                    WType::Q4_0 => tile::<R, C>(WType::Q4_0, wp, row_bytes, nb, &cols),
                    WType::Q8_16 => tile::<R, C>(WType::Q8_16, wp, row_bytes, nb, &cols),
                    WType::Q8_1 => tile::<R, C>(WType::Q8_1, wp, row_bytes, nb, &cols),
                    _ => tile::<R, C>(WType::Q8_0, wp, row_bytes, nb, &cols),
                };
                for (i, orow) in o.iter().enumerate() {
                    for (c, &v) in orow.iter().enumerate() {
                        store.one(r + i, c0 + c, v);
                    }
                }
            } else {
                let o: [[f32; C]; 1] = match t {
                    WType::Q4_1 => tile::<1, C>(WType::Q4_1, wp, row_bytes, nb, &cols),
                    WType::Q4_0 => tile::<1, C>(WType::Q4_0, wp, row_bytes, nb, &cols),
                    WType::Q8_16 => tile::<1, C>(WType::Q8_16, wp, row_bytes, nb, &cols),
                    WType::Q8_1 => tile::<1, C>(WType::Q8_1, wp, row_bytes, nb, &cols),
                    _ => tile::<1, C>(WType::Q8_0, wp, row_bytes, nb, &cols),
                };
                for (c, &v) in o[0].iter().enumerate() {
                    store.one(r, c0 + c, v);
                }
            }
        }
        r += if whole { R } else { 1 };
    }
}

/// Rows at a time (per column group) the tile loops keep hot in L1.
const ROW_GROUP: usize = 16;

/// See [`super::simd::gemm_q`]; lengths are checked there.
pub fn gemm_q<F: Sink>(
    t: WType,
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    nb: usize,
    (y, ncols): (Q8View<'_>, usize),
    store: &mut F,
) {
    for g0 in (0..rows).step_by(ROW_GROUP) {
        let g = (g0, (g0 + ROW_GROUP).min(rows));
        let mut c0 = 0;
        while c0 < ncols {
            let n = (ncols - c0).min(4);
            match n {
                1 => rows_cols::<4, 1, F>(t, w, row_bytes, g, nb, y, c0, store),
                2 => rows_cols::<2, 2, F>(t, w, row_bytes, g, nb, y, c0, store),
                3 => rows_cols::<2, 3, F>(t, w, row_bytes, g, nb, y, c0, store),
                _ => rows_cols::<2, 4, F>(t, w, row_bytes, g, nb, y, c0, store),
            }
            c0 += n;
        }
    }
}

/// How far ahead (bytes, rounded up to whole groups) the interleaved
/// kernels prefetch into L2: two groups of the demo model's 576-wide Q4_1
/// rows, one of its Q8_0 or 1536-wide rows. Into L2 rather than L1: decode
/// ran ~1.4× faster (the L1 hint stalled on full fill buffers); further
/// ahead, or a second hint into L1 one group ahead, measured no better.
const AHEAD: usize = 8192;

/// [`AHEAD`] rounded up to whole groups of `group_bytes`.
fn ahead(group_bytes: usize) -> usize {
    AHEAD.div_ceil(group_bytes) * group_bytes
}

/// Prefetches block `b`'s share of the group [`AHEAD`] bytes after the one
/// at `w` (`nb` blocks of type `t`), so that a whole matrix streams in ahead
/// of use. `wrapping_add`: the hint may point past the matrix (prefetches
/// never fault).
#[inline(always)]
pub(super) unsafe fn prefetch_ahead(t: WType, w: *const u8, nb: usize, b: usize) {
    let (per_block, group_bytes) = (RG * t.block_bytes(), RG * t.row_bytes(nb * QK));
    let p = w.wrapping_add(ahead(group_bytes) + per_block * b);
    for l in (0..per_block).step_by(64) {
        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(l) as *const i8);
    }
}

/// A kernel for interleaved groups (see [`super::interleave::interleave`]).
pub(super) trait GroupKernel {
    /// Whether it takes the 8-bit types, Q8_0, Q8_1 and Q8_16 (all kernels
    /// take Q4_0 and Q4_1).
    const Q8_0: bool;
    /// One group of 16 rows, `nb` blocks of type `t`, against C columns: the
    /// 16 results per column.
    /// SAFETY: `w` points at one whole group; each column at `nb` blocks.
    unsafe fn group<const C: usize>(t: WType, w: *const u8, nb: usize, y: &Cols<C>) -> [[f32; RG]; C];
}

/// The kernel for interleaved groups this build has: the 512-bit one where
/// it targets AVX-512 VNNI, else the 256-bit one.
#[cfg(all(target_feature = "avx512f", target_feature = "avx512vnni"))]
pub(super) type Interleaved = super::avx512::Avx512;
#[cfg(not(all(target_feature = "avx512f", target_feature = "avx512vnni")))]
pub(super) type Interleaved = Avx2;

/// Whether [`Interleaved`] takes weights of type `t`.
pub(super) fn takes_interleaved(t: WType) -> bool {
    matches!(t, WType::Q4_0 | WType::Q4_1) || (t.is_8_bit() && <Interleaved as GroupKernel>::Q8_0)
}

/// [`gemm_q`] over interleaved groups with the [`Interleaved`] kernel;
/// lengths, whole groups and the type are checked in [`super::simd::gemm_q`].
pub(super) fn gemm_interleaved<F: Sink>(
    t: WType,
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    nb: usize,
    (y, ncols): (Q8View<'_>, usize),
    store: &mut F,
) {
    // A task's first groups, which no earlier prefetch reached.
    let first = ahead(RG * row_bytes).min(rows * row_bytes);
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

/// One group against columns `c0..c0 + C`, results to `store`.
#[inline(always)]
fn group_cols<const C: usize, F: Sink>(
    t: WType,
    w: &[u8],
    nb: usize,
    y: Q8View<'_>,
    (r0, c0): (usize, usize),
    store: &mut F,
) {
    let cols = Cols::<C>::at(y, nb, c0);
    // SAFETY: the caller checked `w` is one whole group of `nb` blocks and
    // `y` holds `c0 + C` columns of `nb` blocks.
    let out = unsafe {
        match t {
            // Separate instances per type, so `t` is a constant inside.
            WType::Q4_1 => Interleaved::group::<C>(WType::Q4_1, w.as_ptr(), nb, &cols),
            WType::Q4_0 => Interleaved::group::<C>(WType::Q4_0, w.as_ptr(), nb, &cols),
            WType::Q8_0 if <Interleaved as GroupKernel>::Q8_0 => Interleaved::group::<C>(WType::Q8_0, w.as_ptr(), nb, &cols),
            WType::Q8_1 if <Interleaved as GroupKernel>::Q8_0 => Interleaved::group::<C>(WType::Q8_1, w.as_ptr(), nb, &cols),
            WType::Q8_16 if <Interleaved as GroupKernel>::Q8_0 => Interleaved::group::<C>(WType::Q8_16, w.as_ptr(), nb, &cols),
            _ => unreachable!("no interleaved kernel for {t:?}"),
        }
    };
    for (c, rows) in out.iter().enumerate() {
        store.rows16(r0, c0 + c, rows);
    }
}

/// The 256-bit kernel for interleaved groups, for builds without the
/// AVX-512 VNNI one in `avx512` (which then takes every interleaved matrix):
/// 4-bit types always, the 8-bit ones (Q8_0, Q8_1, Q8_16) where the build
/// has AVX-VNNI. (Q8_0 is stored as `q + 128`, whose products would saturate
/// `maddubs`; packed 8-bit rows already stream at memory speed for one
/// column without it.)
#[cfg(not(all(target_feature = "avx512f", target_feature = "avx512vnni")))]
pub(super) struct Avx2;

#[cfg(not(all(target_feature = "avx512f", target_feature = "avx512vnni")))]
impl GroupKernel for Avx2 {
    const Q8_0: bool = cfg!(target_feature = "avxvnni");

    /// The group in two 256-bit halves (rows 0-7, 8-15). Without AVX-VNNI,
    /// each half's products stay in i16 for the whole block: a `maddubs`
    /// lane is at most 2 · 15 · 128 = 3,840 in magnitude, and eight of them
    /// sum to 30,720, inside i16; one `madd` per block widens them.
    #[inline(always)]
    unsafe fn group<const C: usize>(t: WType, w: *const u8, nb: usize, y: &Cols<C>) -> [[f32; RG]; C] {
        let q = w.add(RG * t.quants_at(nb));
        let mask = _mm256_set1_epi8(0x0F);
        let bcast4 = |p: *const i8| _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32));
        let mut acc = [[_mm256_setzero_ps(); 2]; C];
        for b in 0..nb {
            prefetch_ahead(t, w, nb, b);
            let scales = |at: usize| [0, 16].map(|h| _mm256_cvtph_ps(_mm_loadu_si128(w.add(at + h) as *const __m128i)));
            let d = scales(32 * b);
            let m = match t {
                WType::Q4_1 | WType::Q8_1 => scales(32 * (nb + b)),
                WType::Q8_0 | WType::Q8_16 => d.map(|dh| _mm256_mul_ps(dh, _mm256_set1_ps(-128.0))),
                _ => d.map(|dh| _mm256_mul_ps(dh, _mm256_set1_ps(-8.0))),
            };
            let mut s = [[_mm256_setzero_si256(); 2]; C];
            // Q8_16: the second half block's sums (chunks 4-7), kept apart
            // for their own scale (written only where the build has AVX-VNNI).
            #[cfg_attr(not(target_feature = "avxvnni"), allow(unused_mut))]
            let mut s1 = [[_mm256_setzero_si256(); 2]; C];
            if t.is_8_bit() {
                // Eight chunks of 4 bytes × 16 rows per block; each half's
                // sums stay in i32 (`vpdpbusd` widens as it adds).
                #[cfg(target_feature = "avxvnni")]
                for j in 0..8 {
                    for h in 0..2 {
                        let x = _mm256_loadu_si256(q.add(512 * b + 64 * j + 32 * h) as *const __m256i);
                        for c in 0..C {
                            let sum = if t == WType::Q8_16 && j >= 4 { &mut s1[c][h] } else { &mut s[c][h] };
                            *sum = _mm256_dpbusd_avx_epi32(*sum, x, bcast4(y.q[c].add(QK * b + 4 * j)));
                        }
                    }
                }
                #[cfg(not(target_feature = "avxvnni"))]
                unreachable!("Q8_0 groups need AVX-VNNI here (GroupKernel::Q8_0)");
            } else {
                for j in 0..4 {
                    for h in 0..2 {
                        let v = _mm256_loadu_si256(q.add(256 * b + 64 * j + 32 * h) as *const __m256i);
                        let (lo, hi) = (_mm256_and_si256(v, mask), _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));
                        for c in 0..C {
                            let (ylo, yhi) = (bcast4(y.q[c].add(QK * b + 4 * j)), bcast4(y.q[c].add(QK * b + 16 + 4 * j)));
                            #[cfg(target_feature = "avxvnni")]
                            {
                                s[c][h] = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(s[c][h], lo, ylo), hi, yhi);
                            }
                            #[cfg(not(target_feature = "avxvnni"))]
                            {
                                let pair = _mm256_add_epi16(_mm256_maddubs_epi16(lo, ylo), _mm256_maddubs_epi16(hi, yhi));
                                s[c][h] = _mm256_add_epi16(s[c][h], pair);
                            }
                        }
                    }
                }
            }
            if t == WType::Q8_16 {
                // As the 512-bit kernel: -128·d1·s + (-128·(d0 - d1))·h.
                let d1 = scales(32 * (nb + b));
                let m1 = d1.map(|dh| _mm256_mul_ps(dh, _mm256_set1_ps(-128.0)));
                for c in 0..C {
                    let dy = _mm256_set1_ps(*y.d[c].add(b));
                    let (sy, hy) = (_mm256_set1_ps(*y.s[c].add(b)), _mm256_set1_ps(*y.h[c].add(b)));
                    for h in 0..2 {
                        let first = _mm256_mul_ps(_mm256_cvtepi32_ps(s[c][h]), d[h]);
                        let halves = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1[c][h]), d1[h], first);
                        acc[c][h] = _mm256_fmadd_ps(halves, dy, acc[c][h]);
                        acc[c][h] = _mm256_fmadd_ps(m1[h], sy, acc[c][h]);
                        acc[c][h] = _mm256_fmadd_ps(_mm256_sub_ps(m[h], m1[h]), hy, acc[c][h]);
                    }
                }
                continue;
            }
            for c in 0..C {
                let (dy, sy) = (_mm256_set1_ps(*y.d[c].add(b)), _mm256_set1_ps(*y.s[c].add(b)));
                for h in 0..2 {
                    #[cfg(target_feature = "avxvnni")]
                    let sum = s[c][h];
                    #[cfg(not(target_feature = "avxvnni"))]
                    let sum = _mm256_madd_epi16(s[c][h], _mm256_set1_epi16(1));
                    acc[c][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(d[h], dy), acc[c][h]);
                    acc[c][h] = _mm256_fmadd_ps(m[h], sy, acc[c][h]);
                }
            }
        }
        let mut out = [[0f32; RG]; C];
        for (o, halves) in out.iter_mut().zip(&acc) {
            _mm256_storeu_ps(o.as_mut_ptr(), halves[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(8), halves[1]);
        }
        out
    }
}

/// SAFETY: `a` points at `n` floats, `b` at `n` little-endian f16 (any alignment).
pub unsafe fn dot_f16(a: *const f32, b: *const u8, n: usize) -> f32 {
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        let b0 = _mm256_cvtph_ps(_mm_loadu_si128(b.add(2 * i) as *const __m128i));
        let b1 = _mm256_cvtph_ps(_mm_loadu_si128(b.add(2 * i + 16) as *const __m128i));
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), b0, acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i + 8)), b1, acc1);
        i += 16;
    }
    let mut s = hsum(_mm256_add_ps(acc0, acc1));
    while i < n {
        let h = half::f16::from_bits(std::ptr::read_unaligned(b.add(2 * i) as *const u16));
        s += *a.add(i) * h.to_f32();
        i += 1;
    }
    s
}

/// Cephes' single-precision `e^x`, shared by [`exp8`] and the 512-bit
/// `avx512::exp16`: inputs are clamped to ±`LIMIT`; `x = n·ln 2 + r` with
/// `ln 2` split in two (`LN2_HI + LN2_LO`); `e^r` is a degree-7 polynomial
/// (`POLY`, highest term first, then `r + r²·p(r) + 1`).
pub(super) mod exp_poly {
    pub const LIMIT: f32 = 88.376_26;
    pub const LN2_HI: f32 = 0.693_359_4;
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    pub const POLY: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];
}

/// `e^x` for 8 lanes ([`exp_poly`], ~1 ulp; `-inf` gives ~1e-38, not 0).
#[inline(always)]
unsafe fn exp8(x: __m256) -> __m256 {
    use exp_poly::*;
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-LIMIT)), _mm256_set1_ps(LIMIT));
    let fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), _mm256_set1_ps(0.5)));
    let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(LN2_HI), x);
    let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(LN2_LO), x);
    let mut y = _mm256_set1_ps(POLY[0]);
    for c in &POLY[1..] {
        y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(*c));
    }
    let y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0));
    let pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n))
}

/// `s[i] = e^(s[i] - m)`; returns `Σ s[i]`. SAFETY: `s` points at `n` writable floats.
pub unsafe fn exp_shift_sum(s: *mut f32, n: usize, m: f32) -> f32 {
    let mv = _mm256_set1_ps(m);
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s.add(i)), mv));
        _mm256_storeu_ps(s.add(i), e);
        acc = _mm256_add_ps(acc, e);
        i += 8;
    }
    let mut sum = hsum(acc);
    while i < n {
        let e = (*s.add(i) - m).exp();
        *s.add(i) = e;
        sum += e;
        i += 1;
    }
    sum
}

/// `out[i] = g[i] / (1 + e^-g[i]) · up[i]` (SwiGLU). SAFETY: `g` and `up`
/// point at `n` readable floats, `out` at `n` writable ones.
pub unsafe fn silu_mul(g: *const f32, up: *const f32, out: *mut f32, n: usize) {
    sigmoid_gate_mul(g, up, out, n, |x| x, super::simd::silu)
}

/// `out[i] = gelu(g[i]) · up[i]`, GELU's tanh approximation written as
/// `x / (1 + e^-z)`, `z = x (A + B x²)` (see [`super::simd::gelu`]). SAFETY:
/// as [`silu_mul`].
pub unsafe fn gelu_mul(g: *const f32, up: *const f32, out: *mut f32, n: usize) {
    let (a, b) = (_mm256_set1_ps(super::simd::GELU_A), _mm256_set1_ps(super::simd::GELU_B));
    let z = |x| _mm256_mul_ps(x, _mm256_fmadd_ps(_mm256_mul_ps(x, x), b, a));
    sigmoid_gate_mul(g, up, out, n, z, super::simd::gelu)
}

/// `out[i] = g[i] / (1 + e^-z(g[i])) · up[i]`, eight at a time, `scalar`
/// for the tail. SAFETY: as [`silu_mul`].
#[inline(always)]
unsafe fn sigmoid_gate_mul(
    g: *const f32,
    up: *const f32,
    out: *mut f32,
    n: usize,
    z: impl Fn(__m256) -> __m256,
    scalar: fn(f32) -> f32,
) {
    let (one, low) = (_mm256_set1_ps(1.0), _mm256_set1_ps(-87.0));
    let mut i = 0;
    while i + 8 <= n {
        let x = _mm256_loadu_ps(g.add(i));
        let zx = z(x);
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), zx));
        // `exp8` clamps its argument, so far below z = -87 the quotient would
        // not tend to 0 as the activation does (below 1e-35 there): zero those
        // lanes. NaN compares false and passes through.
        let s = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(zx, low), _mm256_div_ps(x, _mm256_add_ps(one, e)));
        _mm256_storeu_ps(out.add(i), _mm256_mul_ps(s, _mm256_loadu_ps(up.add(i))));
        i += 8;
    }
    while i < n {
        *out.add(i) = scalar(*g.add(i)) * *up.add(i);
        i += 1;
    }
}

/// Eight consecutive floats at element `i` of `p`, which holds f16 (`F16`)
/// or f32 elements.
#[inline(always)]
unsafe fn load8<const F16: bool>(p: *const u8, i: usize) -> __m256 {
    if F16 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i) as *const __m128i))
    } else {
        _mm256_loadu_ps((p as *const f32).add(i))
    }
}

/// `out[j] = scale · q·k_j` for `n` key rows `stride` elements apart (f16
/// with `F16`, else f32); `q` is `8 · HD8` floats. Four keys at a time, one
/// combined reduction.
/// SAFETY: `q` points at `8 · HD8` floats, `k` at `n` rows of `stride`
/// elements (each with `8 · HD8` readable), `out` at `n` writable floats.
#[inline(always)]
pub unsafe fn scores<const HD8: usize, const F16: bool>(q: *const f32, k: *const u8, stride: usize, n: usize, scale: f32, out: *mut f32) {
    let qv: [__m256; HD8] = std::array::from_fn(|d| _mm256_loadu_ps(q.add(8 * d)));
    let kat = |j: usize, d: usize| load8::<F16>(k, j * stride + 8 * d);
    let sv = _mm_set1_ps(scale);
    let mut j = 0;
    while j + 4 <= n {
        let mut a = [_mm256_setzero_ps(); 4];
        for d in 0..HD8 {
            for (i, ai) in a.iter_mut().enumerate() {
                *ai = _mm256_fmadd_ps(qv[d], kat(j + i, d), *ai);
            }
        }
        let t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        let s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
        _mm_storeu_ps(out.add(j), _mm_mul_ps(s, sv));
        j += 4;
    }
    while j < n {
        let mut a = _mm256_setzero_ps();
        for d in 0..HD8 {
            a = _mm256_fmadd_ps(qv[d], kat(j, d), a);
        }
        *out.add(j) = hsum(a) * scale;
        j += 1;
    }
}

/// `o += Σ_j p[j] · v_j` for `n` value rows `stride` elements apart (f16
/// with `F16`, else f32); `o` is `8 · HD8` floats, kept in registers across
/// the rows.
/// SAFETY: as [`scores`], with `o` writable and `p` `n` floats.
#[inline(always)]
pub unsafe fn accumulate<const HD8: usize, const F16: bool>(o: *mut f32, p: *const f32, v: *const u8, stride: usize, n: usize) {
    let mut acc: [__m256; HD8] = std::array::from_fn(|d| _mm256_loadu_ps(o.add(8 * d)));
    for j in 0..n {
        let pj = _mm256_broadcast_ss(&*p.add(j));
        for (d, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(pj, load8::<F16>(v, j * stride + 8 * d), *a);
        }
    }
    for (d, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(o.add(8 * d), *a);
    }
}
