//! Throughput of the fast path's matmul kernels on matrices larger than the
//! caches (so decode-like shapes show memory behaviour): GB/s of weights
//! streamed and GMAC/s, per weight type and column count, one thread. The
//! weights sit in a huge-page [`Arena`], as the model's do: on 4 KiB pages
//! a streamed matrix measured up to 2× slower than the forward pass reads
//! its weights (Q8_0: ~12 GB/s against ~25).
//! `cargo run --release -p rbee-worker --example bench_kernels`
use std::time::Instant;

use rbee_worker::fast::arena::Arena;
use rbee_worker::fast::interleave::{interleave, Layout};
use rbee_worker::fast::quant::{pack, Q8Buf, Src, WType, QK};
use rbee_worker::fast::simd::{self, gemm_q, quantize_q8};

fn main() {
    // Big (streams from memory) and L2-sized (compute-bound) matrices.
    let size = std::env::args().nth(1).unwrap_or_default();
    let big = !size.starts_with("small");
    // "small512": a row length with no partial scale group.
    let k = if size.ends_with("512") { 512 } else { 576 };
    let rows = if big { 1536 * 40 } else { 256 };
    let reps = if big { 5 } else { 2000 };
    // Optional filters: a type name and a column count.
    let only_t = std::env::args().nth(2);
    let only_c: Option<usize> = std::env::args().nth(3).and_then(|v| v.parse().ok());
    for t in [WType::Q4_1, WType::Q8_0, WType::Q4_0] {
        if only_t.as_ref().is_some_and(|o| *o != format!("{t:?}")) {
            continue;
        }
        let rb = t.row_bytes(k);
        let w: Vec<u8> = (0..rows * rb).map(|i| ((i * 2654435761usize) >> 7) as u8 & 0x3F).collect();
        let src = match t {
            WType::Q4_1 => Src::Q4_1,
            WType::Q4_0 => Src::Q4_0,
            _ => Src::Q8_0,
        };
        let rowwise = pack(src, &w, rows, k);
        // The layouts the build can run: packed rows always, interleaved
        // groups where the AVX-512 kernels are compiled in.
        let mut layouts = vec![(Layout::Rows, rowwise.clone())];
        if simd::layout(t, rows) == Layout::Interleaved {
            let mut inter = rowwise;
            interleave(t, rows, k, &mut inter);
            layouts.push((Layout::Interleaved, inter));
        }
        // In a huge-page arena, as the model keeps its weights.
        let layouts: Vec<(Layout, Arena)> = layouts
            .into_iter()
            .map(|(l, w)| {
                let mut a = Arena::new(w.len());
                a.bytes_mut().copy_from_slice(&w);
                (l, a)
            })
            .collect();
        for ncols in [1, 2, 4, 8, 16, 64] {
            if only_c.is_some_and(|o| o != ncols) {
                continue;
            }
            let x: Vec<f32> = (0..ncols * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let mut xq = Q8Buf::default();
            quantize_q8(&x, &mut xq);
            let xq = xq.view(ncols * k / QK);
            for (layout, w) in &layouts {
                let mut out = vec![0f32; rows * ncols];
                let mut best = f64::MAX;
                for _ in 0..5 {
                    let t0 = Instant::now();
                    for _ in 0..reps / 5 {
                        gemm_q(t, *layout, w.bytes(), rb, rows, (xq, ncols), &mut |r, c, v| out[c * rows + r] = v);
                    }
                    best = best.min(t0.elapsed().as_secs_f64() / (reps / 5) as f64);
                }
                println!(
                    "{t:?} {:11} cols {ncols:2}: {:6.2} GB/s weights, {:6.2} GMAC/s ({:.3} ms, checksum {:.1})",
                    format!("{layout:?}"),
                    (rows * rb) as f64 / best / 1e9,
                    (rows * k * ncols) as f64 / best / 1e9,
                    best * 1e3,
                    out.iter().sum::<f32>()
                );
            }
        }
    }
}
