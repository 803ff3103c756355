//! # strata-tests
//!
//! Integration tests that use several crates together and drive real processes. The tests
//! live in `tests/`; this library holds what the tests and their helper binaries share.

use strata_cache_core::{BlockKey, BlockMeta};

/// Key of test block `i`.
pub fn crash_key(i: u64) -> BlockKey {
    BlockKey(*blake3::hash(&i.to_le_bytes()).as_bytes())
}

/// Metadata of test block `i`.
pub fn crash_meta(i: u64) -> BlockMeta {
    BlockMeta {
        key: crash_key(i),
        namespace: BlockKey([7; 32]),
        hits: 1,
    }
}

/// Payload of test block `i` (`len` bytes, derived from `i`).
pub fn crash_payload(i: u64, len: usize) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Block size, segment size and capacity of the crash test's store.
pub const CRASH_BLOCK: usize = 16 << 10;
/// Blocks per segment in the crash test (so that segments seal during the run).
pub const CRASH_SEGMENT: u64 = 64 * (CRASH_BLOCK as u64 + 4096) + 8192;
/// Capacity of the crash test's store: ten segments, more than the test writes.
pub const CRASH_CAPACITY: u64 = 4096 + 10 * CRASH_SEGMENT;

pub mod engine;
pub mod sidecar;
