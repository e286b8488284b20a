//! Block formats: the weight types the fast path reads, the row layout it
//! repacks them into, the quantized activations it multiplies them with, and
//! plain scalar kernels for all of these.
//!
//! The scalar kernels are the portable fallback (used where AVX2 is missing,
//! e.g. on aarch64) and the reference the SIMD kernels are tested against.
//! Everything here is pure functions over slices; no state, no threads.
//!
//! # Packed rows
//! GGUF stores a quantized row as blocks of `scale(s) + quants`. At load time
//! each row is repacked (same size, so the same memory traffic) into
//! `[d; nb] [m; nb] (Q4_1 and Q8_1 only) [quants]`: all scales of the row first, so a
//! kernel converts 8 block scales with one instruction; and for 4-bit types
//! the quants of blocks `2p` and `2p+1` share 32 bytes (low / high nibbles),
//! so one load and two masks unpack 64 weights. An odd last block keeps
//! GGUF's 16-byte nibble order.
//!
//! # Interleaved rows
//! Where the build has AVX2, Q4_0 and Q4_1 matrices are then interleaved
//! ([`super::interleave`]), 16 packed rows at a time, so that one 512-bit vector
//! (two 256-bit ones) holds the same elements of 16 rows; with
//! AVX-512 VNNI (or AVX-VNNI), the 8-bit ones (Q8_0, Q8_1, Q8_16) too.
//!
//! # 5-bit types
//! Q5_0, Q5_1 and Q5_K keep one value per byte (Q8_0 and Q8_1 blocks): no
//! rounding (Q5_K's scales are multiplied out into f16, as Q4_K's), and the
//! 8-bit kernels as they are, for ~1.6× the file's bytes per weight.

use half::f16;

/// Elements per quantization block (all supported quantized types).
pub const QK: usize = 32;

/// A weight matrix's type as the kernels read it (after [`pack`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WType {
    F32,
    F16,
    /// 32 × 4-bit, one f16 scale: `x = d * (q - 8)`.
    Q4_0,
    /// 32 × 4-bit, f16 scale and minimum: `x = d * q + m` (also holds Q4_K).
    Q4_1,
    /// 32 × 8-bit, one f16 scale: `x = d * q` (also holds Q5_0).
    Q8_0,
    /// 32 × 8-bit, f16 scale and minimum: `x = d * q + m`, the 8-bit
    /// Q4_1, with `q` in `0..=127` (so it reads the same as i8 or u8). Holds
    /// Q5_1 and Q5_K, whose 5-bit values (0..=31) are stored one per byte.
    Q8_1,
    /// 32 × 8-bit, one f16 scale per 16: holds Q6_K (`q - 32` and `d · scale`).
    Q8_16,
}

impl WType {
    /// Elements per storage block.
    pub fn block_elems(self) -> usize {
        match self {
            Self::F32 | Self::F16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 | Self::Q8_1 | Self::Q8_16 => QK,
        }
    }

    /// Bytes per storage block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
            Self::Q8_1 | Self::Q8_16 => 36,
        }
    }

    /// Whether a block holds one byte per value (Q8_0, Q8_1, Q8_16): the
    /// 8-bit kernel paths, as against the 4-bit ones.
    pub fn is_8_bit(self) -> bool {
        matches!(self, Self::Q8_0 | Self::Q8_1 | Self::Q8_16)
    }

    /// Bytes one row of `n` elements takes (`n` must be a multiple of the block size).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_elems() * self.block_bytes()
    }

    /// Where a packed row's quants start (after its scale arrays), for `nb` blocks.
    pub fn quants_at(self, nb: usize) -> usize {
        match self {
            Self::Q4_1 | Self::Q8_1 | Self::Q8_16 => 4 * nb,
            Self::Q4_0 | Self::Q8_0 => 2 * nb,
            Self::F32 | Self::F16 => 0,
        }
    }
}

/// A weight tensor's type in the GGUF file, and the [`WType`] it is packed into.
/// The hive sizes a worker's memory by the packed sizes
/// (hive-agent/src/models.rs, `resident_bytes`): a type added here, or a
/// change of what one packs into, changes that table too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Src {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    /// 32 × 5-bit (low nibbles, then a 32-bit word of fifth bits), one f16
    /// scale: `x = d * (q - 16)`; packed as Q8_0.
    Q5_0,
    /// Q5_0 with a minimum: `x = d * q + m`; packed as Q8_1.
    Q5_1,
    /// 256-element super-blocks of 8 × 32 4-bit values with 6-bit scales and
    /// minimums: packed as Q4_1 (`d · scale`, `-dmin · min` per 32, as f16).
    Q4K,
    /// Q4_K with a fifth bit per value: packed as Q8_1, with Q4_K's scales.
    Q5K,
    /// 256-element super-blocks of 6-bit values with an i8 scale per 16:
    /// packed as Q8_16.
    Q6K,
}

impl Src {
    /// Maps candle's GGUF dtype, or says why the fast path cannot run it.
    pub fn from_ggml(t: candle_core::quantized::GgmlDType) -> Result<Self, String> {
        use candle_core::quantized::GgmlDType as G;
        Ok(match t {
            G::F32 => Self::F32,
            G::F16 => Self::F16,
            G::Q4_0 => Self::Q4_0,
            G::Q4_1 => Self::Q4_1,
            G::Q8_0 => Self::Q8_0,
            G::Q5_0 => Self::Q5_0,
            G::Q5_1 => Self::Q5_1,
            G::Q4K => Self::Q4K,
            G::Q5K => Self::Q5K,
            G::Q6K => Self::Q6K,
            other => return Err(format!("weight type {other:?} is not supported by the fast path")),
        })
    }

    pub fn packed(self) -> WType {
        match self {
            Self::F32 => WType::F32,
            Self::F16 => WType::F16,
            Self::Q4_0 => WType::Q4_0,
            Self::Q4_1 | Self::Q4K => WType::Q4_1,
            Self::Q8_0 | Self::Q5_0 => WType::Q8_0,
            Self::Q5_1 | Self::Q5K => WType::Q8_1,
            Self::Q6K => WType::Q8_16,
        }
    }

    /// Elements per block in the file.
    pub fn block_elems(self) -> usize {
        match self {
            Self::Q4K | Self::Q5K | Self::Q6K => 256,
            other => other.packed().block_elems(),
        }
    }

    /// Bytes per block in the file.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            other => other.packed().block_bytes(),
        }
    }

    /// Bytes of `n` elements in the file (`n` a multiple of the block size).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_elems() * self.block_bytes()
    }
}

/// Quantized activations, block `i` being elements `32i..32i+32` of the
/// (column after column) input: `x ≈ d[i] * qs[32i..]`, and `s[i] = d[i] * Σ qs`
/// (which folds the offset of Q4_0 / Q4_1 weights in with one multiply per
/// block). Like llama.cpp's Q8_1, with f32 scales, stored as arrays so kernels
/// load 8 block scales at once.
///
/// `s` deliberately sums the *quantized* values: the exact `Σ x` looks more
/// precise but is measurably worse, because then the offset no longer cancels
/// against the quantization error of the centred part of the weights.
///
/// `h[i]` is the same sum over the block's first 16 values only: Q8_16
/// weights have a scale, so an offset, per half block (`s[i] - h[i]` is the
/// second half's).
#[derive(Clone, Debug, Default)]
pub struct Q8Buf {
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub h: Vec<f32>,
}

impl Q8Buf {
    /// Makes room for at least `blocks` blocks (never shrinks).
    pub fn reserve_blocks(&mut self, blocks: usize) {
        if self.d.len() < blocks {
            self.qs.resize(blocks * QK, 0);
            self.d.resize(blocks, 0.0);
            self.s.resize(blocks, 0.0);
            self.h.resize(blocks, 0.0);
        }
    }

    /// The first `blocks` blocks.
    pub fn view(&self, blocks: usize) -> Q8View<'_> {
        Q8View { qs: &self.qs[..blocks * QK], d: &self.d[..blocks], s: &self.s[..blocks], h: &self.h[..blocks] }
    }
}

/// A borrowed run of activation blocks (see [`Q8Buf`]).
#[derive(Clone, Copy, Debug)]
pub struct Q8View<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub h: &'a [f32],
}

impl<'a> Q8View<'a> {
    pub fn blocks(&self) -> usize {
        self.d.len()
    }
    /// Blocks `b0..b0 + n`.
    pub fn range(&self, b0: usize, n: usize) -> Q8View<'a> {
        Q8View {
            qs: &self.qs[b0 * QK..(b0 + n) * QK],
            d: &self.d[b0..b0 + n],
            s: &self.s[b0..b0 + n],
            h: &self.h[b0..b0 + n],
        }
    }
}

#[inline]
pub fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Quantizes `x` (a multiple of 32 long) into `out`'s first blocks. Scalar reference.
pub fn quantize_q8_scalar(x: &[f32], out: &mut Q8Buf) {
    out.reserve_blocks(x.len() / QK);
    for (i, xb) in x.chunks_exact(QK).enumerate() {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = [0i32; 2];
        for (j, (q, &v)) in out.qs[i * QK..(i + 1) * QK].iter_mut().zip(xb).enumerate() {
            // Ties to even, like the AVX2 path (`_mm256_round_ps` nearest).
            *q = (v * id).round_ties_even() as i8;
            sum[j / 16] += *q as i32;
        }
        out.d[i] = d;
        out.s[i] = d * (sum[0] + sum[1]) as f32;
        out.h[i] = d * sum[0] as f32;
    }
}

/// Repacks `rows` GGUF rows of `cols` elements of type `src` into the kernel
/// layout of `src.packed()` (see the module doc). Float types are copied.
pub fn pack(src: Src, gguf: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let mut out = vec![0u8; rows * src.packed().row_bytes(cols)];
    pack_into(src, gguf, rows, cols, &mut out);
    out
}

/// [`pack`] into `out` (`rows * src.packed().row_bytes(cols)` long).
pub fn pack_into(src: Src, gguf: &[u8], rows: usize, cols: usize, out: &mut [u8]) {
    let t = src.packed();
    let (sb, rb) = (src.row_bytes(cols), t.row_bytes(cols));
    assert!(gguf.len() >= rows * sb && out.len() >= rows * rb, "pack: buffers shorter than {rows} rows");
    if matches!(t, WType::F32 | WType::F16) {
        out[..rows * rb].copy_from_slice(&gguf[..rows * rb]);
        return;
    }
    let nb = cols / QK;
    let qa = t.quants_at(nb);
    let bb = src.block_bytes();
    let put_f16 = |dst: &mut [u8], at: usize, v: f32| dst[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
    for (srow, dst) in gguf.chunks_exact(sb).zip(out.chunks_exact_mut(rb)).take(rows) {
        dst.fill(0);
        match src {
            Src::Q4K => {
                for (i, blk) in srow.chunks_exact(bb).enumerate() {
                    let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                    for j in 0..8 {
                        let (sc, mn) = k4_scale_min(j, &blk[4..16]);
                        put_f16(dst, 2 * (8 * i + j), d * sc as f32);
                        put_f16(dst, 2 * nb + 2 * (8 * i + j), -dmin * mn as f32);
                    }
                    // Q4_K's 32-byte chunks already pair sub-blocks 2p (low
                    // nibbles) and 2p+1 (high): our pair layout.
                    dst[qa + 128 * i..qa + 128 * (i + 1)].copy_from_slice(&blk[16..144]);
                }
            }
            Src::Q5_0 | Src::Q5_1 => {
                // d, (m,) 32 fifth bits, 16 bytes of nibbles (element j low,
                // j + 16 high): Q5_0 as signed Q8_0, Q5_1 as Q8_1.
                let q5_1 = src == Src::Q5_1;
                for (b, blk) in srow.chunks_exact(bb).enumerate() {
                    dst[2 * b..2 * b + 2].copy_from_slice(&blk[..2]);
                    if q5_1 {
                        dst[2 * nb + 2 * b..2 * nb + 2 * b + 2].copy_from_slice(&blk[2..4]);
                    }
                    let at = if q5_1 { 4 } else { 2 };
                    let high = u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]]);
                    let q = &mut dst[qa + 32 * b..qa + 32 * (b + 1)];
                    for j in 0..16 {
                        let nib = blk[at + 4 + j];
                        let lo = (nib & 0x0F) | (((high >> j) as u8 & 1) << 4);
                        let hi = (nib >> 4) | (((high >> (j + 16)) as u8 & 1) << 4);
                        (q[j], q[j + 16]) = if q5_1 { (lo, hi) } else { ((lo as i8 - 16) as u8, (hi as i8 - 16) as u8) };
                    }
                }
            }
            Src::Q5K => {
                // d, dmin, Q4_K's 12 bytes of scales and minimums, 32 bytes
                // of fifth bits (bit 2p of byte l: element l of sub-block
                // 2p; bit 2p+1: of sub-block 2p+1), 128 bytes of nibbles
                // (32 bytes per pair of sub-blocks, as Q4_K).
                for (i, blk) in srow.chunks_exact(bb).enumerate() {
                    let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                    let (qh, ql) = (&blk[16..48], &blk[48..176]);
                    for j in 0..8 {
                        let (sc, mn) = k4_scale_min(j, &blk[4..16]);
                        put_f16(dst, 2 * (8 * i + j), d * sc as f32);
                        put_f16(dst, 2 * nb + 2 * (8 * i + j), -dmin * mn as f32);
                        let (nibs, shift) = (&ql[32 * (j / 2)..32 * (j / 2 + 1)], 4 * (j % 2));
                        let q = &mut dst[qa + 32 * (8 * i + j)..qa + 32 * (8 * i + j + 1)];
                        for l in 0..32 {
                            q[l] = ((nibs[l] >> shift) & 0x0F) | (((qh[l] >> j) & 1) << 4);
                        }
                    }
                }
            }
            Src::Q6K => {
                for (i, blk) in srow.chunks_exact(bb).enumerate() {
                    let (ql, qh, sc) = (&blk[..128], &blk[128..192], &blk[192..208]);
                    let d = f16_at(blk, 208);
                    for (j, &s) in sc.iter().enumerate() {
                        put_f16(dst, 2 * (16 * i + j), d * (s as i8) as f32);
                    }
                    let q = &mut dst[qa + 256 * i..qa + 256 * (i + 1)];
                    for half in 0..2 {
                        let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
                        for l in 0..32 {
                            let e = 128 * half + l;
                            q[e] = (((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32) as u8;
                            q[e + 32] = (((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32) as u8;
                            q[e + 64] = (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32) as u8;
                            q[e + 96] = (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32) as u8;
                        }
                    }
                }
            }
            _ => {
                for (b, blk) in srow.chunks_exact(bb).enumerate() {
                    dst[2 * b..2 * b + 2].copy_from_slice(&blk[..2]);
                    match t {
                        WType::Q8_0 => dst[qa + 32 * b..qa + 32 * (b + 1)].copy_from_slice(&blk[2..34]),
                        _ => {
                            if t == WType::Q4_1 {
                                dst[2 * nb + 2 * b..2 * nb + 2 * b + 2].copy_from_slice(&blk[2..4]);
                            }
                            let qs = &blk[bb - 16..];
                            if b == nb - 1 && nb % 2 == 1 {
                                dst[qa + 16 * b..qa + 16 * (b + 1)].copy_from_slice(qs);
                            } else {
                                let pair = &mut dst[qa + 32 * (b / 2)..qa + 32 * (b / 2 + 1)];
                                let shift = if b % 2 == 0 { 0 } else { 4 };
                                for j in 0..16 {
                                    pair[j] |= (qs[j] & 0x0F) << shift;
                                    pair[j + 16] |= (qs[j] >> 4) << shift;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Scale and minimum `j` (0..8) of a Q4_K super-block's 12 packed 6-bit values
/// (ggml's `get_scale_min_k4`).
fn k4_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Element `j` (0..32) of 4-bit block `b` of a packed row's quants `q`.
#[inline]
fn nibble(q: &[u8], nb: usize, b: usize, j: usize) -> u8 {
    if b == nb - 1 && nb % 2 == 1 {
        let byte = q[16 * b + j % 16];
        if j < 16 {
            byte & 0x0F
        } else {
            byte >> 4
        }
    } else {
        let byte = q[32 * (b / 2) + j];
        if b.is_multiple_of(2) {
            byte & 0x0F
        } else {
            byte >> 4
        }
    }
}

/// Dot product of one packed quantized row (`nb` blocks) with one column of
/// activation blocks. Scalar reference.
pub fn dot_row_scalar(t: WType, row: &[u8], y: Q8View<'_>) -> f32 {
    let nb = y.blocks();
    let q = &row[t.quants_at(nb)..];
    let mut total = 0f32;
    for b in 0..nb {
        let d = if t == WType::Q8_16 { 0.0 } else { f16_at(row, 2 * b) };
        let yq = &y.qs[b * QK..(b + 1) * QK];
        match t {
            WType::Q8_0 | WType::Q8_1 => {
                let sum: i32 = (0..QK).map(|j| (q[32 * b + j] as i8) as i32 * yq[j] as i32).sum();
                total += d * y.d[b] * sum as f32;
                if t == WType::Q8_1 {
                    total += f16_at(row, 2 * nb + 2 * b) * y.s[b];
                }
            }
            WType::Q8_16 => {
                let half = |h: usize| -> f32 {
                    let sum: i32 = (16 * h..16 * h + 16).map(|j| (q[32 * b + j] as i8) as i32 * yq[j] as i32).sum();
                    f16_at(row, 4 * b + 2 * h) * sum as f32
                };
                total += y.d[b] * (half(0) + half(1));
            }
            WType::Q4_0 | WType::Q4_1 => {
                let sum: i32 = (0..QK).map(|j| nibble(q, nb, b, j) as i32 * yq[j] as i32).sum();
                // Q4_0: Σ (q - 8) y = Σ q y - 8 Σ y; Q4_1: Σ (d q + m) y.
                let m = if t == WType::Q4_1 { f16_at(row, 2 * nb + 2 * b) } else { -8.0 * d };
                total += d * y.d[b] * sum as f32 + m * y.s[b];
            }
            WType::F32 | WType::F16 => unreachable!("float weights are multiplied in f32"),
        }
    }
    total
}

/// Dot product of one float weight row (F32 or F16 bytes) with f32 activations.
pub fn dot_row_float(t: WType, w: &[u8], x: &[f32]) -> f32 {
    match t {
        WType::F32 => w
            .chunks_exact(4)
            .zip(x)
            .map(|(b, &v)| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * v)
            .sum(),
        WType::F16 => w.chunks_exact(2).zip(x).map(|(b, &v)| f16::from_le_bytes([b[0], b[1]]).to_f32() * v).sum(),
        _ => unreachable!("quantized weights are multiplied with quantized activations"),
    }
}

/// Expands one packed weight row into f32 (`out.len()` elements).
pub fn dequantize_row(t: WType, row: &[u8], out: &mut [f32]) {
    match t {
        WType::F32 => dequantize_gguf_row(Src::F32, row, out),
        WType::F16 => dequantize_gguf_row(Src::F16, row, out),
        _ => {
            let nb = out.len() / QK;
            let q = &row[t.quants_at(nb)..];
            for (b, ob) in out.chunks_exact_mut(QK).enumerate() {
                let d = f16_at(row, 2 * b);
                for (j, o) in ob.iter_mut().enumerate() {
                    *o = match t {
                        WType::Q8_0 => d * (q[32 * b + j] as i8) as f32,
                        WType::Q8_1 => d * (q[32 * b + j] as i8) as f32 + f16_at(row, 2 * nb + 2 * b),
                        WType::Q8_16 => f16_at(row, 4 * b + 2 * (j / 16)) * (q[32 * b + j] as i8) as f32,
                        WType::Q4_0 => d * (nibble(q, nb, b, j) as f32 - 8.0),
                        _ => d * nibble(q, nb, b, j) as f32 + f16_at(row, 2 * nb + 2 * b),
                    };
                }
            }
        }
    }
}

/// Expands one row in GGUF's own layout into f32 (`out.len()` elements).
pub fn dequantize_gguf_row(src: Src, w: &[u8], out: &mut [f32]) {
    let t = match src {
        Src::Q5_0 | Src::Q5_1 | Src::Q4K | Src::Q5K | Src::Q6K => {
            let packed = pack(src, w, 1, out.len());
            return dequantize_row(src.packed(), &packed, out);
        }
        other => other.packed(),
    };
    match t {
        WType::F32 => {
            for (o, b) in out.iter_mut().zip(w.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        WType::F16 => {
            for (o, b) in out.iter_mut().zip(w.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        WType::Q4_0 | WType::Q4_1 | WType::Q8_0 => {
            for (ob, wb) in out.chunks_exact_mut(QK).zip(w.chunks_exact(t.block_bytes())) {
                let d = f16_at(wb, 0);
                match t {
                    WType::Q4_0 => {
                        for j in 0..16 {
                            ob[j] = d * ((wb[2 + j] & 0x0F) as f32 - 8.0);
                            ob[j + 16] = d * ((wb[2 + j] >> 4) as f32 - 8.0);
                        }
                    }
                    WType::Q4_1 => {
                        let m = f16_at(wb, 2);
                        for j in 0..16 {
                            ob[j] = d * (wb[4 + j] & 0x0F) as f32 + m;
                            ob[j + 16] = d * (wb[4 + j] >> 4) as f32 + m;
                        }
                    }
                    _ => {
                        for j in 0..QK {
                            ob[j] = d * (wb[2 + j] as i8) as f32;
                        }
                    }
                }
            }
        }
        WType::Q8_1 | WType::Q8_16 => unreachable!("{t:?} exists only packed"),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Random blocks for the kernel tests (a tiny xorshift, so tests need no extra crate).
    use super::*;

    pub struct Rng(pub u64);
    impl Rng {
        pub fn next_u32(&mut self) -> u32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 32) as u32
        }
        /// Uniform in [-1, 1).
        pub fn f32(&mut self) -> f32 {
            self.next_u32() as f32 / 2_147_483_648.0 - 1.0
        }
        pub fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.f32()).collect()
        }
    }

    /// A random `rows × cols` weight matrix of type `t`, as GGUF bytes.
    pub fn random_weights(t: WType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
        let mut out = Vec::with_capacity(t.row_bytes(cols) * rows);
        for _ in 0..rows * cols / t.block_elems() {
            match t {
                WType::F32 => out.extend_from_slice(&rng.f32().to_le_bytes()),
                WType::F16 => out.extend_from_slice(&f16::from_f32(rng.f32()).to_le_bytes()),
                WType::Q4_0 | WType::Q8_0 => {
                    out.extend_from_slice(&f16::from_f32(rng.f32() * 0.1).to_le_bytes());
                    let n = if t == WType::Q4_0 { 16 } else { 32 };
                    out.extend((0..n).map(|_| rng.next_u32() as u8));
                }
                WType::Q4_1 => {
                    out.extend_from_slice(&f16::from_f32(rng.f32() * 0.1).to_le_bytes());
                    out.extend_from_slice(&f16::from_f32(rng.f32() * 0.5).to_le_bytes());
                    out.extend((0..16).map(|_| rng.next_u32() as u8));
                }
                WType::Q8_1 | WType::Q8_16 => unreachable!("no GGUF layout"),
            }
        }
        out
    }

    /// A random `rows × cols` matrix of GGUF type `src` (Q4_0, Q4_1, Q8_0,
    /// a 5-bit type or Q6_K), as GGUF bytes.
    pub fn random_gguf(src: Src, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
        match src {
            Src::Q5_0 | Src::Q5_1 | Src::Q5K => random_5_bit(src, rows, cols, rng),
            Src::Q6K => {
                // Any 6-bit values and i8 scales, then a small finite `d`.
                let mut out = Vec::with_capacity(src.row_bytes(cols) * rows);
                for _ in 0..rows * cols / src.block_elems() {
                    out.extend((0..208).map(|_| rng.next_u32() as u8));
                    out.extend_from_slice(&f16::from_f32(rng.f32() * 0.01).to_le_bytes());
                }
                out
            }
            _ => random_weights(src.packed(), rows, cols, rng),
        }
    }

    /// Random packed Q8_16 rows of any block count (Q6_K files only have
    /// multiples of 8): scales, then int8 values in Q6_K's range.
    pub fn random_q8_16_rows(rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
        let (nb, rb) = (cols / QK, WType::Q8_16.row_bytes(cols));
        let mut w = random_weights(WType::Q8_0, rows, cols, rng);
        w.resize(rows * rb, 0);
        w.iter_mut().enumerate().for_each(|(i, b)| *b = if i % rb < 4 * nb { *b & 0x2F } else { (*b as i8 / 4) as u8 });
        w
    }

    /// A random `rows × cols` matrix of a 5-bit type (Q5_0, Q5_1, Q5_K), as
    /// GGUF bytes: small finite scales, any quants.
    fn random_5_bit(src: Src, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
        let scales = match src {
            Src::Q5_0 => 1,
            Src::Q5_1 | Src::Q5K => 2,
            _ => unreachable!("{src:?} is not a 5-bit type"),
        };
        let mut out = Vec::with_capacity(src.row_bytes(cols) * rows);
        for _ in 0..rows * cols / src.block_elems() {
            for _ in 0..scales {
                out.extend_from_slice(&f16::from_f32(rng.f32() * 0.1).to_le_bytes());
            }
            out.extend((2 * scales..src.block_bytes()).map(|_| rng.next_u32() as u8));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn src_of(t: WType) -> Src {
        match t {
            WType::Q4_0 => Src::Q4_0,
            WType::Q4_1 => Src::Q4_1,
            _ => Src::Q8_0,
        }
    }

    /// Rows quantized by candle to Q5_0 / Q5_1 pack into Q8_0 / Q8_1 rows
    /// holding exactly the weights candle dequantizes; Q4_K, Q5_K and Q6_K
    /// into Q4_1 / Q8_1 / Q8_16 rows, up to rounding the combined scales to
    /// f16 (relative 2^-11 of a block's scale).
    #[test]
    fn k_and_5_bit_quants_pack_to_the_weights_candle_dequantizes() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        let mut rng = Rng(29);
        let (rows, cols) = (3, 512);
        let types = [
            (GgmlDType::Q5_0, Src::Q5_0),
            (GgmlDType::Q5_1, Src::Q5_1),
            (GgmlDType::Q4K, Src::Q4K),
            (GgmlDType::Q5K, Src::Q5K),
            (GgmlDType::Q6K, Src::Q6K),
        ];
        for (g, src) in types {
            let exact = matches!(src, Src::Q5_0 | Src::Q5_1);
            let x = Tensor::from_vec(rng.vec(rows * cols), (rows, cols), &Device::Cpu).expect("tensor");
            let q = QTensor::quantize(&x, g).expect("quantize");
            let want: Vec<f32> = q.dequantize(&Device::Cpu).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1()).expect("dequantize");
            let bytes = q.data().expect("bytes");
            assert_eq!(bytes.len(), rows * src.row_bytes(cols));
            let t = src.packed();
            let packed = pack(src, &bytes, rows, cols);
            let rb = t.row_bytes(cols);
            for r in 0..rows {
                let mut got = vec![0f32; cols];
                dequantize_row(t, &packed[r * rb..(r + 1) * rb], &mut got);
                let w = &want[r * cols..(r + 1) * cols];
                let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (a, b) in got.iter().zip(w) {
                    let tol = if exact { 0.0 } else { 2e-3 * amax };
                    assert!((a - b).abs() <= tol, "{src:?}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn quantize_roundtrip_is_within_half_a_step() {
        let mut rng = Rng(7);
        let x = rng.vec(256);
        let mut q = Q8Buf::default();
        quantize_q8_scalar(&x, &mut q);
        for (i, xb) in x.chunks(QK).enumerate() {
            let mut sum = 0i32;
            for (v, &qi) in xb.iter().zip(&q.qs[i * QK..]) {
                assert!((v - q.d[i] * qi as f32).abs() <= q.d[i] * 0.5 + 1e-6);
                sum += qi as i32;
            }
            assert!((q.s[i] - q.d[i] * sum as f32).abs() < 1e-5);
        }
    }

    /// Packing keeps every weight (odd and even block counts), and the scalar
    /// dot product equals the dot product of the dequantized vectors.
    #[test]
    fn packed_rows_hold_the_same_weights_and_dot_products() {
        let mut rng = Rng(11);
        for t in [WType::Q4_0, WType::Q4_1, WType::Q8_0] {
            for nb in [1, 2, 3, 8, 9, 18] {
                let k = nb * QK;
                let (rows, rb) = (3, t.row_bytes(k));
                let w = random_weights(t, rows, k, &mut rng);
                let packed = pack(src_of(t), &w, rows, k);
                assert_eq!(packed.len(), w.len());
                let x = rng.vec(k);
                let mut q = Q8Buf::default();
                quantize_q8_scalar(&x, &mut q);
                let xd: Vec<f32> = (0..k).map(|i| q.d[i / QK] * q.qs[i] as f32).collect();
                for r in 0..rows {
                    let (mut a, mut b) = (vec![0f32; k], vec![0f32; k]);
                    dequantize_gguf_row(src_of(t), &w[r * rb..(r + 1) * rb], &mut a);
                    dequantize_row(t, &packed[r * rb..(r + 1) * rb], &mut b);
                    assert_eq!(a, b, "{t:?} nb={nb}");
                    let want: f32 = a.iter().zip(&xd).map(|(p, q)| p * q).sum();
                    let got = dot_row_scalar(t, &packed[r * rb..(r + 1) * rb], q.view(nb));
                    assert!((want - got).abs() < 1e-3 * (1.0 + want.abs()), "{t:?} nb={nb}: {want} vs {got}");
                }
            }
        }
    }
}
