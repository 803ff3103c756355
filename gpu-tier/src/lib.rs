//! # strata-gpu-tier
//!
//! The G1 tier: KV pages in GPU memory, moved to and from host memory by copy kernels.
//!
//! Not implemented yet: this crate exports nothing until the GPU issue lands.
