//! # strata-kernels
//!
//! CPU (and, behind a feature, CUDA) kernels for the engine.
//!
//! Not implemented yet: this crate exports nothing until the kernels issue lands.
