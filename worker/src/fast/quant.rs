//! Block formats: the GGUF weight types the fast path reads, the quantized
//! activation block it multiplies them with, and plain scalar kernels for both.
//!
//! The scalar kernels are the portable fallback (used where AVX2 is missing,
//! e.g. on aarch64) and the reference the SIMD kernels are tested against.
//! Everything here is pure functions over slices; no state, no threads.

use half::f16;

/// Elements per quantization block (all supported quantized types).
pub const QK: usize = 32;

/// A weight tensor's storage type, as laid out in the GGUF file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WType {
    F32,
    F16,
    /// 32 × 4-bit, one f16 scale: `x = d * (q - 8)`.
    Q4_0,
    /// 32 × 4-bit, f16 scale and minimum: `x = d * q + m`.
    Q4_1,
    /// 32 × 8-bit, one f16 scale: `x = d * q`.
    Q8_0,
}

impl WType {
    /// Maps candle's GGUF dtype, or says why the fast path cannot run it.
    pub fn from_ggml(t: candle_core::quantized::GgmlDType) -> Result<Self, String> {
        use candle_core::quantized::GgmlDType as G;
        Ok(match t {
            G::F32 => Self::F32,
            G::F16 => Self::F16,
            G::Q4_0 => Self::Q4_0,
            G::Q4_1 => Self::Q4_1,
            G::Q8_0 => Self::Q8_0,
            other => return Err(format!("weight type {other:?} is not supported by the fast path")),
        })
    }

    /// Elements per storage block.
    pub fn block_elems(self) -> usize {
        match self {
            Self::F32 | Self::F16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => QK,
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
        }
    }

    /// Bytes one row of `n` elements takes (`n` must be a multiple of the block size).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_elems() * self.block_bytes()
    }
}

/// One 32-element block of a quantized activation: `x ≈ d * qs`, and
/// `s = d * Σ qs` (which lets weights with an offset, Q4_0 and Q4_1, fold it
/// in with one multiply per block). Like llama.cpp's Q8_1, with f32 scales.
///
/// `s` deliberately sums the *quantized* values: the exact `Σ x` looks more
/// precise but is measurably worse, because then the offset no longer cancels
/// against the quantization error of the centred part of the weights.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Q8Block {
    pub qs: [i8; QK],
    pub d: f32,
    pub s: f32,
}

#[inline]
pub fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Quantizes `x` (a multiple of 32 long) block by block. Scalar reference.
pub fn quantize_q8_scalar(x: &[f32], out: &mut [Q8Block]) {
    debug_assert_eq!(x.len(), out.len() * QK);
    for (xb, ob) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in ob.qs.iter_mut().zip(xb) {
            // Ties to even, like the AVX2 path (`_mm256_round_ps` nearest).
            *q = (v * id).round_ties_even() as i8;
            sum += *q as i32;
        }
        ob.d = d;
        ob.s = d * sum as f32;
    }
}

/// Dot product of one weight block (`wb`, `t.block_bytes()` bytes) with an
/// activation block. Scalar reference for the quantized types.
pub fn dot_block_scalar(t: WType, wb: &[u8], y: &Q8Block) -> f32 {
    match t {
        WType::Q4_0 => {
            let d = f16_at(wb, 0);
            let mut sum = 0i32;
            for j in 0..16 {
                let b = wb[2 + j];
                sum += (b & 0x0F) as i32 * y.qs[j] as i32 + (b >> 4) as i32 * y.qs[j + 16] as i32;
            }
            // Σ (q - 8) y = Σ q y - 8 Σ y
            d * (y.d * sum as f32 - 8.0 * y.s)
        }
        WType::Q4_1 => {
            let d = f16_at(wb, 0);
            let m = f16_at(wb, 2);
            let mut sum = 0i32;
            for j in 0..16 {
                let b = wb[4 + j];
                sum += (b & 0x0F) as i32 * y.qs[j] as i32 + (b >> 4) as i32 * y.qs[j + 16] as i32;
            }
            d * y.d * sum as f32 + m * y.s
        }
        WType::Q8_0 => {
            let d = f16_at(wb, 0);
            let mut sum = 0i32;
            for j in 0..QK {
                sum += (wb[2 + j] as i8) as i32 * y.qs[j] as i32;
            }
            d * y.d * sum as f32
        }
        WType::F32 | WType::F16 => unreachable!("float weights are multiplied in f32"),
    }
}

/// Dot product of one quantized weight row with a quantized activation row. Scalar.
pub fn dot_row_scalar(t: WType, w: &[u8], y: &[Q8Block]) -> f32 {
    let bb = t.block_bytes();
    w.chunks_exact(bb).zip(y).map(|(wb, yb)| dot_block_scalar(t, wb, yb)).sum()
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

/// Expands one weight row into f32 (`out.len()` elements).
pub fn dequantize_row(t: WType, w: &[u8], out: &mut [f32]) {
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
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn quantize_roundtrip_is_within_half_a_step() {
        let mut rng = Rng(7);
        let x = rng.vec(256);
        let mut q = vec![Q8Block::default(); 8];
        quantize_q8_scalar(&x, &mut q);
        for (xb, qb) in x.chunks(QK).zip(&q) {
            let mut sum = 0i32;
            for (v, &qi) in xb.iter().zip(&qb.qs) {
                assert!((v - qb.d * qi as f32).abs() <= qb.d * 0.5 + 1e-6);
                sum += qi as i32;
            }
            assert!((qb.s - qb.d * sum as f32).abs() < 1e-5);
        }
    }

    #[test]
    fn scalar_block_dot_matches_dequantized_dot() {
        let mut rng = Rng(11);
        for t in [WType::Q4_0, WType::Q4_1, WType::Q8_0] {
            let w = random_weights(t, 1, 128, &mut rng);
            let x = rng.vec(128);
            let mut q = vec![Q8Block::default(); 4];
            quantize_q8_scalar(&x, &mut q);
            let mut xd = vec![0f32; 128];
            for (o, b) in xd.chunks_mut(QK).zip(&q) {
                for (v, &qi) in o.iter_mut().zip(&b.qs) {
                    *v = b.d * qi as f32;
                }
            }
            let mut wd = vec![0f32; 128];
            dequantize_row(t, &w, &mut wd);
            let want: f32 = wd.iter().zip(&xd).map(|(a, b)| a * b).sum();
            let got = dot_row_scalar(t, &w, &q);
            assert!((want - got).abs() < 1e-3 * (1.0 + want.abs()), "{t:?}: {want} vs {got}");
        }
    }
}
