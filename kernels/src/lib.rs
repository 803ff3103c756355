//! # strata-kernels
//!
//! The CPU kernels of Strata's bundled engine: everything a Llama-family forward pass
//! spends its time in.
//!
//! - **Weights stay in their file format.** A [`WeightMatrix`] is a view of rows in one of
//!   the GGUF/safetensors encodings ([`DType`]: F32, F16, BF16, Q8_0, Q4_0, Q4_1). Quantized
//!   products work like llama.cpp's: the activations are quantized per block of 32 ([`QAct`];
//!   16-bit rather than llama.cpp's 8, see there why) and each block's product is an integer
//!   dot product scaled once, in AVX2 when the CPU has it (detected at run time) and in
//!   portable Rust otherwise.
//! - **Matrix products are row-parallel** on the rayon pool, and tile four activation rows
//!   per weight row during prefill so a weight block is unpacked once for four tokens.
//! - **Attention reads a paged KV cache** laid out exactly as cache-core's `PageFirst` block
//!   (`[layer][k|v][token][kv_head][head_dim]`, f16 or f32, see [`KvElement`]):
//!   [`paged_attention`] takes, per page, the slice of one layer, so a page exported to a
//!   tier and imported back is used as is. f16 pages are widened to f32 as they are read
//!   (F16C); grouped-query attention shares each K/V row among the query heads of its group.
//! - RMSNorm, RoPE in both pair layouts ([`RopeLayout::Adjacent`] for GGUF Llama weights,
//!   [`RopeLayout::HalfSplit`] for Hugging Face weights), SiLU-gated MLP and softmax in
//!   [`ops`].
//!
//! Every kernel is tested against a plain scalar reference on random inputs.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod attention;
mod dot;
pub mod matmul;
pub mod ops;
pub mod quant;

pub use attention::{AttnItem, AttnShape, KvElement, paged_attention, paged_attention_many};
pub use matmul::{WeightMatrix, matmul, matmul_many};
pub use ops::RopeLayout;
pub use quant::{DType, QAct};

/// Errors of the kernels' checked entry points.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A shape does not fit the data or the encoding.
    #[error("shape error: {0}")]
    Shape(String),
    /// The thread pool could not be configured.
    #[error("thread pool: {0}")]
    Threads(String),
}

/// The instruction set the kernels use on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    /// AVX2 + FMA + F16C.
    Avx2,
    /// Portable Rust.
    Scalar,
}

/// Detects (once) what the kernels can use on this CPU. Set `STRATA_KERNELS=scalar` to force
/// the portable path.
pub fn simd() -> Simd {
    static LEVEL: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        if std::env::var("STRATA_KERNELS").is_ok_and(|v| v == "scalar") {
            return Simd::Scalar;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                return Simd::Avx2;
            }
        }
        Simd::Scalar
    })
}

/// Sets the number of threads of the global pool the kernels run on. Call once, before the
/// first kernel; later calls fail (the pool already exists).
pub fn init_threads(threads: usize) -> Result<(), KernelError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| KernelError::Threads(e.to_string()))
}

/// The number of threads kernels run on.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);

// SAFETY: SharedOut is only used by parallel tasks that each write a disjoint set of
// elements of one buffer that outlives the parallel section (documented at each use).
unsafe impl Send for SharedOut {}
// SAFETY: as above: no two tasks touch the same element, and nobody reads meanwhile.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Writes `v` at element `i`.
    ///
    /// # Safety
    /// `i` is inside the buffer and no other task reads or writes element `i` meanwhile.
    #[inline]
    pub(crate) unsafe fn write(self, i: usize, v: f32) {
        // SAFETY: the caller's contract.
        unsafe { *self.0.add(i) = v };
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    /// Deterministic pseudo-random floats in [-scale, scale) (never all zero).
    pub fn randv(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }
}
