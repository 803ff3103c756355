//! # strata-bench (library)
//!
//! What the `strata-bench` binary shares with the integration tests: the soak
//! ([`soak`]), which drives a real `strata-sidecar` under faults and checks every byte.

pub mod soak;
