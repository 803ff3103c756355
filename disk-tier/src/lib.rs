//! # strata-disk-tier
//!
//! The G3 tier: blocks on local NVMe/SSD, written and read with O_DIRECT through an I/O
//! engine (io_uring, with a psync fallback), surviving restarts.
//!
//! Not implemented yet: this crate exports nothing until the disk-tier issue lands.
