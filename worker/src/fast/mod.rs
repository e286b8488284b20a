//! The fast CPU inference path for llama-, qwen2-, qwen3-, phi3-, gemma2- and gemma3-architecture
//! GGUF models ([`load::Arch`]).
//!
//! candle's `quantized_llama` is general but slow on CPU (scalar Q4_1 dot
//! products, a tensor allocation per op). This module runs the same math with
//! its own kernels: activations quantized per 32-block like llama.cpp, AVX2
//! dot products over several activation columns at once (so batched sequences
//! and prompt tokens share one pass over the weights), preallocated scratch,
//! f16 key/value caches, and a small spin pool for the ~150 parallel sections
//! of each step.
//!
//! - [`load`]: GGUF → weights, repacked once into one [`arena`] (huge pages).
//! - [`quant`]: block formats, the packed row layout, scalar kernels;
//!   [`interleave`]: the interleaved layout (16 rows at a time) and its
//!   scalar reference.
//! - [`simd`]: the kernels' safe API; `avx2` (x86-64 only): their SIMD code,
//!   with 256-bit kernels for interleaved 4-bit rows; `avx512` (AVX-512 VNNI
//!   builds only): 512-bit kernels for interleaved rows, which replace those.
//! - [`matmul`]: parallel matrix × columns; [`attention`]: causal GQA attention.
//! - [`pool`]: the threads; [`model`]: the forward pass and the public API.
//!
//! Concurrency: see [`model`] (one driver thread per `FastModel`, weights
//! shared read-only) and [`pool`] (how a section is spread over threads).

pub mod arena;
pub mod attention;
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
mod avx2;
// AVX-512F implies AVX2, FMA and F16C, so `avx2` is compiled in too.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f", target_feature = "avx512vnni"))]
mod avx512;
pub mod interleave;
pub mod load;
pub mod matmul;
pub mod model;
pub mod pool;
pub mod quant;
pub mod simd;

pub use load::Config;
pub use model::{FastConfig, FastModel, Sequence};
pub use pool::PoolKind;

#[cfg(test)]
pub(crate) mod tests;
