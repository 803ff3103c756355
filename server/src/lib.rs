//! # strata-server
//!
//! The sidecar (`strata-sidecar`): a gRPC cache service next to each inference pod.
//!
//! Not implemented yet: this crate exports nothing until the sidecar issue lands.
