//! The hot kernels: activation quantization, quantized weight × activation
//! tiles, and the f32/f16 vector ops attention needs.
//!
//! Each public function is safe and picks its implementation at compile time:
//! AVX2 + FMA + F16C when the build targets them (the workspace builds with
//! `target-cpu=native`), else the portable scalar code in [`super::quant`].
//! All `unsafe` of the fast path's arithmetic lives in the `avx2` submodule:
//! raw loads from slices whose lengths are checked at the safe entry points.
//! Pure functions; callers parallelise by handing disjoint rows to threads.
#![allow(unsafe_code)]

use half::f16;

use super::quant::{self, Q8Block, WType, QK};

/// Rows at a time (per column group) the tile loops keep hot in L1.
const ROW_GROUP: usize = 16;

/// Quantizes `x` (`out.len() * 32` long) into activation blocks.
pub fn quantize_q8(x: &[f32], out: &mut [Q8Block]) {
    assert_eq!(x.len(), out.len() * QK, "quantize_q8: length mismatch");
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    {
        for (xb, ob) in x.chunks_exact(QK).zip(out.iter_mut()) {
            // SAFETY: `xb` is exactly 32 floats (chunks_exact); AVX2 is enabled at compile time.
            unsafe { avx2::quantize_block(xb.as_ptr(), ob) }
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c")))]
    quant::quantize_q8_scalar(x, out);
}

/// Multiplies `rows` rows of a quantized weight matrix (`w`, `row_bytes` per
/// row, GGUF block layout) with `ncols` quantized activation columns stored
/// one after another in `y` (each `row_bytes / block_bytes` blocks long), and
/// hands each result to `store(row, col, value)`.
pub fn gemm_q<F: FnMut(usize, usize, f32)>(
    t: WType,
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    (y, ncols): (&[Q8Block], usize),
    store: &mut F,
) {
    assert!(matches!(t, WType::Q4_0 | WType::Q4_1 | WType::Q8_0), "gemm_q: {t:?} is not a quantized type");
    let nb = row_bytes / t.block_bytes();
    assert_eq!(nb * t.block_bytes(), row_bytes, "gemm_q: ragged rows");
    assert!(w.len() >= rows * row_bytes, "gemm_q: weights shorter than {rows} rows");
    assert!(y.len() >= ncols * nb, "gemm_q: activations shorter than {ncols} columns");
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    avx2::gemm_q(t, w, row_bytes, rows, nb, (y, ncols), store);
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c")))]
    for r0 in (0..rows).step_by(ROW_GROUP) {
        for c in 0..ncols {
            for r in r0..(r0 + ROW_GROUP).min(rows) {
                store(r, c, quant::dot_row_scalar(t, &w[r * row_bytes..(r + 1) * row_bytes], &y[c * nb..(c + 1) * nb]));
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
            assert_eq!(x.len() * t.block_bytes(), row_bytes, "gemm_f: activation length mismatch");
            #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
            let v = match t {
                // SAFETY: `row` holds `x.len()` f16 values (checked above).
                WType::F16 => unsafe { avx2::dot_f16(x.as_ptr(), row.as_ptr(), x.len()) },
                _ => quant::dot_row_float(t, row, x),
            };
            #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c")))]
            let v = quant::dot_row_float(t, row, x);
            store(r, c, v);
        }
    }
}

/// `Σ a[i] * b[i]` over f32 and f16 (`a.len() == b.len()`).
pub fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_f16: length mismatch");
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    // SAFETY: equal lengths checked above; AVX2/F16C enabled at compile time.
    return unsafe { avx2::dot_f16(a.as_ptr(), b.as_ptr() as *const u8, a.len()) };
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c")))]
    a.iter().zip(b).map(|(x, y)| x * y.to_f32()).sum()
}

/// `y[i] += a * v[i]` with f16 `v` (`y.len() == v.len()`).
pub fn axpy_f16(y: &mut [f32], a: f32, v: &[f16]) {
    assert_eq!(y.len(), v.len(), "axpy_f16: length mismatch");
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    // SAFETY: equal lengths checked above; AVX2/F16C enabled at compile time.
    unsafe {
        avx2::axpy_f16(y.as_mut_ptr(), a, v.as_ptr(), y.len())
    };
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c")))]
    for (o, x) in y.iter_mut().zip(v) {
        *o += a * x.to_f32();
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
mod avx2 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{Q8Block, WType, QK, ROW_GROUP};

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

    /// SAFETY: `x` points at 32 readable floats.
    #[inline(always)]
    pub unsafe fn quantize_block(x: *const f32, out: &mut Q8Block) {
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
        let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        // packs interleave 128-bit lanes; the permute restores element order.
        let p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(out.qs.as_mut_ptr() as *mut __m256i, p);
        out.d = d;
        out.s = d * hsum_i32(sum) as f32;
    }

    /// 32 nibbles at `p` (16 bytes) as bytes: low nibbles first, then high.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let t = _mm_loadu_si128(p as *const __m128i);
        let v = _mm256_insertf128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1);
        _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
    }

    /// The f16 at `p` and the one after it, as `[a, b, 0, 0]`.
    #[inline(always)]
    unsafe fn half2(p: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)))
    }

    #[inline(always)]
    unsafe fn half1(p: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const u16) as i32))
    }

    /// R rows × C columns of Q4_0 (`MIN = false`) or Q4_1 (`MIN = true`).
    /// SAFETY: `w` points at R rows of `nb` blocks, `row_bytes` apart; each
    /// `ys[c]` at `nb` activation blocks.
    #[inline(always)]
    unsafe fn tile_q4<const R: usize, const C: usize, const MIN: bool>(
        w: *const u8,
        row_bytes: usize,
        nb: usize,
        ys: &[*const Q8Block; C],
    ) -> [[f32; C]; R] {
        let (bb, qoff) = if MIN { (20, 4) } else { (18, 2) };
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut macc = [[0f32; C]; R];
        for b in 0..nb {
            let mut dy = [_mm256_setzero_ps(); C];
            for c in 0..C {
                dy[c] = _mm256_broadcast_ss(&(*ys[c].add(b)).d);
            }
            for r in 0..R {
                let wp = w.add(r * row_bytes + b * bb);
                let dm = if MIN { half2(wp) } else { half1(wp) };
                let d = _mm256_broadcastss_ps(dm);
                let m = if MIN { _mm_cvtss_f32(_mm_movehdup_ps(dm)) } else { -8.0 * _mm_cvtss_f32(dm) };
                let qx = nibbles(wp.add(qoff));
                for c in 0..C {
                    let y = &*ys[c].add(b);
                    let qy = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(qx, qy), ones);
                    acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(d, dy[c]), acc[r][c]);
                    macc[r][c] = m.mul_add(y.s, macc[r][c]);
                }
            }
        }
        let mut out = [[0f32; C]; R];
        for r in 0..R {
            for c in 0..C {
                out[r][c] = hsum(acc[r][c]) + macc[r][c];
            }
        }
        out
    }

    /// R rows × C columns of Q8_0. SAFETY: as [`tile_q4`].
    #[inline(always)]
    unsafe fn tile_q8<const R: usize, const C: usize>(
        w: *const u8,
        row_bytes: usize,
        nb: usize,
        ys: &[*const Q8Block; C],
    ) -> [[f32; C]; R] {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        for b in 0..nb {
            let mut dy = [_mm256_setzero_ps(); C];
            for c in 0..C {
                dy[c] = _mm256_broadcast_ss(&(*ys[c].add(b)).d);
            }
            for r in 0..R {
                let wp = w.add(r * row_bytes + b * 34);
                let d = _mm256_broadcastss_ps(half1(wp));
                let qx = _mm256_loadu_si256(wp.add(2) as *const __m256i);
                let ax = _mm256_sign_epi8(qx, qx);
                for c in 0..C {
                    let y = &*ys[c].add(b);
                    let qy = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
                    let sy = _mm256_sign_epi8(qy, qx);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), ones);
                    acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(d, dy[c]), acc[r][c]);
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
    fn rows_cols<const R: usize, const C: usize, F: FnMut(usize, usize, f32)>(
        t: WType,
        w: &[u8],
        row_bytes: usize,
        (r0, r1): (usize, usize),
        nb: usize,
        y: &[Q8Block],
        c0: usize,
        store: &mut F,
    ) {
        // SAFETY: the caller checked `y` holds `ncols >= c0 + C` columns of `nb` blocks.
        let yp: [*const Q8Block; C] = std::array::from_fn(|c| unsafe { y.as_ptr().add((c0 + c) * nb) });
        let mut r = r0;
        while r < r1 {
            let take_r = r + R <= r1;
            // SAFETY: the caller checked `w` holds all rows and each column `nb`
            // blocks; `r + R <= r1 <= rows` (or one row at a time below).
            unsafe {
                let wp = w.as_ptr().add(r * row_bytes);
                if take_r {
                    let o: [[f32; C]; R] = match t {
                        WType::Q4_1 => tile_q4::<R, C, true>(wp, row_bytes, nb, &yp),
                        WType::Q4_0 => tile_q4::<R, C, false>(wp, row_bytes, nb, &yp),
                        _ => tile_q8::<R, C>(wp, row_bytes, nb, &yp),
                    };
                    for (i, orow) in o.iter().enumerate() {
                        for (c, &v) in orow.iter().enumerate() {
                            store(r + i, c0 + c, v);
                        }
                    }
                } else {
                    let o: [[f32; C]; 1] = match t {
                        WType::Q4_1 => tile_q4::<1, C, true>(wp, row_bytes, nb, &yp),
                        WType::Q4_0 => tile_q4::<1, C, false>(wp, row_bytes, nb, &yp),
                        _ => tile_q8::<1, C>(wp, row_bytes, nb, &yp),
                    };
                    for (c, &v) in o[0].iter().enumerate() {
                        store(r, c0 + c, v);
                    }
                }
            }
            r += if take_r { R } else { 1 };
        }
    }

    pub fn gemm_q<F: FnMut(usize, usize, f32)>(
        t: WType,
        w: &[u8],
        row_bytes: usize,
        rows: usize,
        nb: usize,
        (ys, ncols): (&[Q8Block], usize),
        store: &mut F,
    ) {
        for g0 in (0..rows).step_by(ROW_GROUP) {
            let g = (g0, (g0 + ROW_GROUP).min(rows));
            let mut c0 = 0;
            while c0 < ncols {
                let n = (ncols - c0).min(8);
                match n {
                    1 => rows_cols::<4, 1, F>(t, w, row_bytes, g, nb, ys, c0, store),
                    2 => rows_cols::<2, 2, F>(t, w, row_bytes, g, nb, ys, c0, store),
                    3 => rows_cols::<2, 3, F>(t, w, row_bytes, g, nb, ys, c0, store),
                    4 => rows_cols::<2, 4, F>(t, w, row_bytes, g, nb, ys, c0, store),
                    5 => rows_cols::<1, 5, F>(t, w, row_bytes, g, nb, ys, c0, store),
                    6 => rows_cols::<1, 6, F>(t, w, row_bytes, g, nb, ys, c0, store),
                    7 => rows_cols::<1, 7, F>(t, w, row_bytes, g, nb, ys, c0, store),
                    _ => rows_cols::<1, 8, F>(t, w, row_bytes, g, nb, ys, c0, store),
                }
                c0 += n;
            }
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
            s += *a.add(i) * f16::from_bits(std::ptr::read_unaligned(b.add(2 * i) as *const u16)).to_f32();
            i += 1;
        }
        s
    }

    /// SAFETY: `y` and `v` point at `n` elements each (`y` writable).
    pub unsafe fn axpy_f16(y: *mut f32, a: f32, v: *const f16, n: usize) {
        let av = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            let vv = _mm256_cvtph_ps(_mm_loadu_si128(v.add(i) as *const __m128i));
            _mm256_storeu_ps(y.add(i), _mm256_fmadd_ps(av, vv, _mm256_loadu_ps(y.add(i))));
            i += 8;
        }
        while i < n {
            *y.add(i) += a * (*v.add(i)).to_f32();
            i += 1;
        }
    }

    #[allow(dead_code)]
    const _: () = assert!(QK == 32);
}

#[cfg(test)]
mod tests {
    use super::super::quant::testing::*;
    use super::super::quant::{dot_row_scalar, quantize_q8_scalar};
    use super::*;

    #[test]
    fn quantize_matches_scalar() {
        let mut rng = Rng(3);
        let mut x = rng.vec(32 * 64);
        x[40..72].iter_mut().for_each(|v| *v = 0.0); // an all-zero block
        let mut a = vec![Q8Block::default(); 64];
        let mut b = vec![Q8Block::default(); 64];
        quantize_q8(&x, &mut a);
        quantize_q8_scalar(&x, &mut b);
        for (p, q) in a.iter().zip(&b) {
            assert_eq!(p.d, q.d);
            assert!((p.s - q.s).abs() <= 1e-5 * (1.0 + q.s.abs()), "{} vs {}", p.s, q.s);
            let diff = p.qs.iter().zip(&q.qs).filter(|(u, v)| u != v).count();
            assert!(diff <= 1, "quantized values differ in {diff} places");
        }
    }

    /// Every quantized type, every column count 1..=11 (all tile shapes and
    /// remainders), rows not a multiple of any tile height.
    #[test]
    fn gemm_matches_scalar_reference() {
        let mut rng = Rng(5);
        let (rows, k) = (37, 32 * 9);
        for t in [WType::Q4_0, WType::Q4_1, WType::Q8_0] {
            let rb = t.row_bytes(k);
            let w = random_weights(t, rows, k, &mut rng);
            for ncols in 1..=11 {
                let cols: Vec<Vec<Q8Block>> = (0..ncols)
                    .map(|_| {
                        let mut q = vec![Q8Block::default(); k / QK];
                        quantize_q8(&rng.vec(k), &mut q);
                        q
                    })
                    .collect();
                let ys: Vec<&[Q8Block]> = cols.iter().map(|c| c.as_slice()).collect();
                let flat: Vec<Q8Block> = cols.concat();
                let mut got = vec![f32::NAN; rows * ncols];
                gemm_q(t, &w, rb, rows, (&flat, ncols), &mut |r, c, v| got[r * ncols + c] = v);
                for r in 0..rows {
                    for c in 0..ncols {
                        let want = dot_row_scalar(t, &w[r * rb..(r + 1) * rb], ys[c]);
                        let g = got[r * ncols + c];
                        assert!((want - g).abs() <= 1e-4 * (1.0 + want.abs()), "{t:?} r{r} c{c}: {want} vs {g}");
                    }
                }
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
        let a = rng.vec(75);
        let b: Vec<f16> = rng.vec(75).into_iter().map(f16::from_f32).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y.to_f32()).sum();
        assert!((dot_f16(&a, &b) - want).abs() < 1e-4);
        let mut y = a.clone();
        axpy_f16(&mut y, 0.5, &b);
        for i in 0..75 {
            assert!((y[i] - (a[i] + 0.5 * b[i].to_f32())).abs() < 1e-6);
        }
    }
}
