//! The interleaved layout: packed rows (see [`super::quant`]), 16 at a time,
//! rewritten so that one 64-byte vector holds the same elements of 16 rows,
//! for the group kernels in `avx2` and `avx512`; and its scalar reference
//! (dequantization and dot product), which the kernels are tested against.
//!
//! Pure functions over slices, as in [`super::quant`]; the matrix's
//! [`Layout`] is chosen per build in [`super::simd::layout`].

use super::quant::{f16_at, pack_into, Q8View, Src, WType, QK};

/// How a quantized matrix's rows lie in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Packed rows one after another (the module doc).
    Rows,
    /// Groups of [`RG`] packed rows, [`interleave`]d.
    Interleaved,
}

/// Rows of one row-interleaved group (see [`interleave`]).
pub const RG: usize = 16;

/// Whether [`interleave`] takes a `rows`-row matrix of type `t`: any
/// quantized type, whole groups of [`RG`] rows.
pub fn interleavable(t: WType, rows: usize) -> bool {
    !matches!(t, WType::F32 | WType::F16) && rows > 0 && rows.is_multiple_of(RG)
}

/// Rewrites packed rows, [`RG`] at a time, so that one 64-byte vector holds
/// the same 4 (8-bit) or 2 × 4 (4-bit) elements of 16 rows: a kernel then
/// multiplies 16 rows by 4 activation bytes with one `vpdpbusd` against a
/// broadcast, and sums nothing across lanes. Same size as the packed rows.
///
/// A group of 16 rows with `nb` blocks each:
/// - `d`: `nb × 16` f16, block after block (16 rows' scales in 32 bytes);
///   Q8_16: the scale of each block's first half;
/// - Q4_1 and Q8_1: `m`, the same shape; Q8_16: the second half's scale;
/// - quants, block after block, 64-byte chunks; lane `i` (bytes `4i..4i+4`)
///   of a chunk belongs to row `i`:
///   - 4-bit, 4 chunks per block: chunk `c`'s low nibbles are elements
///     `4c..4c+4` of the block, its high nibbles elements `16+4c..16+4c+4`;
///   - 8-bit, 8 chunks per block: chunk `c` is elements `4c..4c+4`; Q8_0's
///     and Q8_16's as `q + 128` (unsigned, as `vpdpbusd` reads it; the
///     `-128 · d` offset is folded in like Q4_0's `-8 · d`, per half block
///     for Q8_16 with [`super::quant::Q8Buf`]'s `h`), Q8_1's as they are (`0..=127`).
///
/// `rows` must be [`interleavable`]; `data` is `rows` packed rows.
pub fn interleave(t: WType, rows: usize, cols: usize, data: &mut [u8]) {
    assert!(interleavable(t, rows), "interleave: {rows} rows of {t:?}");
    let rb = t.row_bytes(cols);
    let mut rows16 = vec![0u8; RG * rb];
    for group in data[..rows * rb].chunks_exact_mut(RG * rb) {
        rows16.copy_from_slice(group);
        interleave_group(t, cols / QK, &rows16, group);
    }
}

/// [`pack_into`], then [`interleave`], 16 rows at a time: one pass over `out`.
pub fn pack_interleaved_into(src: Src, gguf: &[u8], rows: usize, cols: usize, out: &mut [u8]) {
    let t = src.packed();
    assert!(interleavable(t, rows), "pack_interleaved_into: {rows} rows of {t:?}");
    let (sb, rb) = (src.row_bytes(cols), t.row_bytes(cols));
    let mut rows16 = vec![0u8; RG * rb];
    for (g, group) in out[..rows * rb].chunks_exact_mut(RG * rb).enumerate() {
        let gguf16 = &gguf[g * RG * sb..(g + 1) * RG * sb];
        if matches!(src, Src::Q4_0 | Src::Q4_1 | Src::Q8_0) {
            gguf_group(src, cols / QK, gguf16, group);
        } else {
            pack_into(src, gguf16, RG, cols, &mut rows16);
            interleave_group(t, cols / QK, &rows16, group);
        }
    }
}

/// Writes 16 GGUF rows of Q4_0, Q4_1 or Q8_0 (`nb` blocks each) as one
/// interleaved group, straight from the file's blocks: a 4-bit block's
/// bytes already hold elements `j` (low nibble) and `j + 16` (high), so a
/// lane of a chunk is four of its bytes as they are.
fn gguf_group(src: Src, nb: usize, gguf16: &[u8], group: &mut [u8]) {
    let t = src.packed();
    let (bb, qg) = (src.block_bytes(), RG * t.quants_at(nb));
    let (chunks, qs_at) = if t == WType::Q8_0 { (8, 2) } else { (4, bb - 16) };
    let flip = if t == WType::Q8_0 { 0x8080_8080u32 } else { 0 };
    for b in 0..nb {
        let blocks = gguf16.chunks_exact(nb * bb).map(|row| &row[b * bb..(b + 1) * bb]);
        for (i, blk) in blocks.enumerate() {
            let at = 2 * (RG * b + i);
            group[at..at + 2].copy_from_slice(&blk[..2]);
            if t == WType::Q4_1 {
                group[2 * RG * nb + at..2 * RG * nb + at + 2].copy_from_slice(&blk[2..4]);
            }
            let quants = &mut group[qg + 64 * chunks * b..qg + 64 * chunks * (b + 1)];
            for (c, w) in blk[qs_at..].chunks_exact(4).enumerate() {
                let v = u32::from_le_bytes(w.try_into().unwrap_or_default()) ^ flip;
                quants[64 * c + 4 * i..64 * c + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// Writes 16 packed rows (`rows16`, `nb` blocks each) as one interleaved
/// group. Four bytes (one lane of a chunk) at a time.
fn interleave_group(t: WType, nb: usize, rows16: &[u8], group: &mut [u8]) {
    let rb = rows16.len() / RG;
    let (qa, qg) = (t.quants_at(nb), RG * t.quants_at(nb));
    let word = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default());
    for (i, row) in rows16.chunks_exact(rb).enumerate() {
        let q = &row[qa..];
        for b in 0..nb {
            let at = 2 * (RG * b + i);
            // The second scale slot: Q4_1's and Q8_1's minimum, Q8_16's
            // second half's scale (a packed Q8_16 row has both at 4b).
            let (d, m) = match t {
                WType::Q8_16 => (4 * b, Some(4 * b + 2)),
                WType::Q4_1 | WType::Q8_1 => (2 * b, Some(2 * nb + 2 * b)),
                _ => (2 * b, None),
            };
            group[at..at + 2].copy_from_slice(&row[d..d + 2]);
            if let Some(m) = m {
                group[2 * RG * nb + at..2 * RG * nb + at + 2].copy_from_slice(&row[m..m + 2]);
            }
            match t {
                WType::Q8_0 | WType::Q8_1 | WType::Q8_16 => {
                    for c in 0..8 {
                        let flip = if t == WType::Q8_1 { 0 } else { 0x8080_8080 };
                        put(group, qg + 512 * b + 64 * c + 4 * i, word(q, 32 * b + 4 * c) ^ flip);
                    }
                }
                _ => {
                    let odd_last = b == nb - 1 && nb % 2 == 1;
                    for c in 0..4 {
                        // Elements 4c..4c+4 (low nibbles) and 16+4c.. (high).
                        let v = if odd_last {
                            // GGUF's own order already: byte j holds j and j + 16.
                            word(q, 16 * b + 4 * c)
                        } else {
                            let (lo, hi) = (word(q, 32 * (b / 2) + 4 * c), word(q, 32 * (b / 2) + 16 + 4 * c));
                            if b % 2 == 0 {
                                (lo & 0x0F0F_0F0F) | ((hi & 0x0F0F_0F0F) << 4)
                            } else {
                                ((lo >> 4) & 0x0F0F_0F0F) | (hi & 0xF0F0_F0F0)
                            }
                        };
                        put(group, qg + 256 * b + 64 * c + 4 * i, v);
                    }
                }
            }
        }
    }
}

fn put(dst: &mut [u8], at: usize, v: u32) {
    dst[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Element `j` (0..32) of block `b` of row `i` of an interleaved group, as
/// stored: a nibble (4-bit types), `q + 128` (Q8_0, Q8_16) or `q` (Q8_1).
#[inline]
fn interleaved_q(t: WType, group: &[u8], nb: usize, (i, b, j): (usize, usize, usize)) -> u8 {
    let qg = RG * t.quants_at(nb);
    if t.is_8_bit() {
        group[qg + 512 * b + 64 * (j / 4) + 4 * i + j % 4]
    } else {
        let byte = group[qg + 256 * b + 64 * (j % 16 / 4) + 4 * i + j % 4];
        if j < 16 {
            byte & 0x0F
        } else {
            byte >> 4
        }
    }
}

/// Scale and offset of half `h` (elements `16h..16h+16`) of block `b` of
/// row `i` of an interleaved group: the weight is `d · q + m` for `q` as
/// [`interleaved_q`] gives it. Only Q8_16's halves differ.
#[inline]
fn interleaved_dm(t: WType, group: &[u8], nb: usize, (i, b): (usize, usize), h: usize) -> (f32, f32) {
    let second = 2 * RG * nb + 2 * (RG * b + i);
    let d = if t == WType::Q8_16 && h == 1 { f16_at(group, second) } else { f16_at(group, 2 * (RG * b + i)) };
    let m = match t {
        WType::Q4_1 | WType::Q8_1 => f16_at(group, second),
        WType::Q4_0 => -8.0 * d,
        _ => -128.0 * d,
    };
    (d, m)
}

/// Expands row `i` of an interleaved group (see [`interleave`]) into f32.
pub fn dequantize_interleaved(t: WType, group: &[u8], i: usize, out: &mut [f32]) {
    let nb = out.len() / QK;
    for (b, ob) in out.chunks_exact_mut(QK).enumerate() {
        for (j, o) in ob.iter_mut().enumerate() {
            let (d, m) = interleaved_dm(t, group, nb, (i, b), j / 16);
            *o = d * interleaved_q(t, group, nb, (i, b, j)) as f32 + m;
        }
    }
}

/// [`super::quant::dot_row_scalar`] for row `i` of an interleaved group. Scalar reference.
pub fn dot_interleaved_scalar(t: WType, group: &[u8], i: usize, y: Q8View<'_>) -> f32 {
    let nb = y.blocks();
    let mut total = 0f32;
    for b in 0..nb {
        let yq = &y.qs[b * QK..(b + 1) * QK];
        let dot = |js: std::ops::Range<usize>| -> f32 { js.map(|j| interleaved_q(t, group, nb, (i, b, j)) as i32 * yq[j] as i32).sum::<i32>() as f32 };
        if t == WType::Q8_16 {
            // Each half with its own scale and offset (`h`: the first half's sum).
            let ((d0, m0), (d1, m1)) = (interleaved_dm(t, group, nb, (i, b), 0), interleaved_dm(t, group, nb, (i, b), 1));
            total += y.d[b] * (d0 * dot(0..16) + d1 * dot(16..QK)) + m0 * y.h[b] + m1 * (y.s[b] - y.h[b]);
        } else {
            let (d, m) = interleaved_dm(t, group, nb, (i, b), 0);
            total += d * y.d[b] * dot(0..QK) + m * y.s[b];
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::super::quant::testing::*;
    use super::super::quant::{dequantize_row, dot_row_scalar, pack, quantize_q8_scalar, Q8Buf};
    use super::*;

    /// Interleaving keeps every weight of every row (odd and even block
    /// counts), and its scalar dot product agrees with the packed row's;
    /// also for rows packed from 5-bit types (Q5_0 into Q8_0, Q5_1 and Q5_K
    /// into Q8_1) and from Q6_K (into Q8_16, a scale per half block).
    #[test]
    fn interleaved_groups_hold_the_same_weights_and_dot_products() {
        let mut rng = Rng(13);
        for src in [Src::Q4_0, Src::Q4_1, Src::Q8_0, Src::Q5_0, Src::Q5_1, Src::Q5K, Src::Q6K] {
            let t = src.packed();
            for nb in [1, 2, 3, 8, 9, 16, 18] {
                let k = nb * QK;
                if !k.is_multiple_of(src.block_elems()) {
                    continue; // K-quant rows come in 256-element super-blocks
                }
                let (rows, rb) = (2 * RG, t.row_bytes(k));
                let packed = pack(src, &random_gguf(src, rows, k, &mut rng), rows, k);
                let mut inter = packed.clone();
                interleave(t, rows, k, &mut inter);
                let x = rng.vec(k);
                let mut q = Q8Buf::default();
                quantize_q8_scalar(&x, &mut q);
                for r in 0..rows {
                    let (row, group) = (&packed[r * rb..(r + 1) * rb], &inter[r / RG * RG * rb..(r / RG + 1) * RG * rb]);
                    let (mut a, mut b) = (vec![0f32; k], vec![0f32; k]);
                    dequantize_row(t, row, &mut a);
                    dequantize_interleaved(t, group, r % RG, &mut b);
                    assert_eq!(a, b, "{src:?} nb={nb} row {r}");
                    let want = dot_row_scalar(t, row, q.view(nb));
                    let got = dot_interleaved_scalar(t, group, r % RG, q.view(nb));
                    assert!((want - got).abs() < 1e-4 * (1.0 + want.abs()), "{src:?} nb={nb}: {want} vs {got}");
                }
            }
        }
        assert!(!interleavable(WType::Q4_1, 40) && !interleavable(WType::F16, 32) && interleavable(WType::Q8_16, 32));
    }

    /// Interleaving while packing (straight from GGUF blocks, or through
    /// packed rows for Q4_K) gives the bytes of packing, then interleaving.
    #[test]
    fn packing_interleaved_equals_packing_then_interleaving() {
        let mut rng = Rng(23);
        let rows = 3 * RG;
        for src in [Src::Q4_0, Src::Q4_1, Src::Q8_0, Src::Q4K, Src::Q5_0, Src::Q5_1, Src::Q5K, Src::Q6K] {
            for cols in [256, 512, 768] {
                // Any bytes are blocks of these types; only where they go is compared.
                let gguf: Vec<u8> = (0..rows * src.row_bytes(cols)).map(|_| rng.next_u32() as u8).collect();
                let mut want = pack(src, &gguf, rows, cols);
                interleave(src.packed(), rows, cols, &mut want);
                let mut got = vec![0u8; want.len()];
                pack_interleaved_into(src, &gguf, rows, cols, &mut got);
                assert!(got == want, "{src:?} × {cols}");
            }
        }
    }
}
