//! Throughput of the fast path's matmul kernels on matrices larger than the
//! caches (so decode-like shapes show memory behaviour): GB/s of weights
//! streamed and GMAC/s, per weight type and column count, one thread.
//! `cargo run --release -p rbee-worker --example bench_kernels`
use std::time::Instant;

use rbee_worker::fast::quant::{Q8Block, WType, QK};
use rbee_worker::fast::simd::{gemm_q, quantize_q8};

fn main() {
    // Big (streams from memory) and L2-sized (compute-bound) matrices.
    let big = std::env::args().nth(1).map_or(true, |a| a != "small");
    let (rows, k) = if big { (1536 * 40, 576) } else { (256, 576) };
    let reps = if big { 5 } else { 2000 };
    for t in [WType::Q4_1, WType::Q8_0, WType::Q4_0] {
        let rb = t.row_bytes(k);
        let w: Vec<u8> = (0..rows * rb).map(|i| (i * 2654435761usize >> 7) as u8 & 0x3F).collect();
        for ncols in [1, 2, 4, 8, 16] {
            let x: Vec<f32> = (0..ncols * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let mut xq = vec![Q8Block::default(); ncols * k / QK];
            quantize_q8(&x, &mut xq);
            let mut out = vec![0f32; rows * ncols];
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t0 = Instant::now();
                for _ in 0..reps / 5 {
                    gemm_q(t, &w, rb, rows, (&xq, ncols), &mut |r, c, v| out[c * rows + r] = v);
                }
                best = best.min(t0.elapsed().as_secs_f64() / (reps / 5) as f64);
            }
            println!(
                "{t:?} cols {ncols:2}: {:6.2} GB/s weights, {:6.2} GMAC/s ({:.3} ms, checksum {:.1})",
                (rows * rb) as f64 / best / 1e9,
                (rows * k * ncols) as f64 / best / 1e9,
                best * 1e3,
                out.iter().sum::<f32>()
            );
        }
    }
}
