//! # strata-engine
//!
//! The standalone engine: a Llama-family decode engine with the cache in-process.
//!
//! Not implemented yet: this crate exports nothing until the engine issue lands.
