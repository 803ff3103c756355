//! # strata-tests
//!
//! Integration tests that use several crates together and drive the real binaries. The
//! tests live in `tests/`; this library is empty.
