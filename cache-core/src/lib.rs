//! # strata-cache-core
//!
//! The library every other Strata crate builds on: it decides which KV blocks exist, where
//! they live and when they move, and knows nothing of GPUs, sockets or files.
//!
//! - [`Namespace`] and [`BlockKey`]: everything that makes KV incompatible or private
//!   (model, dtype, layout, page size, tensor-parallel shape, tenant salt) is hashed into
//!   the root of a blake3 key chain, so two tenants never share a block and the same prefix
//!   has the same key on every host.
//! - [`RadixIndex`]: a path-compressed radix tree over token ids at page granularity that
//!   records, per page, which tiers hold it, its handle in each, its hits, last access and
//!   pins. Matching compares tokens; it never hashes the prompt.
//! - [`EvictionPolicy`]: one instance per tier (LRU or SIEVE), leaves first, never a pinned
//!   page.
//! - [`Tier`]: the trait host, disk, GPU and remote storage implement.
//! - [`TieredCache`]: the controller: lookup, store under a write policy, read, pin, lease,
//!   prefetch (promote) under a prefetch policy, demote on eviction, statistics.
//!
//! ```
//! use std::sync::Arc;
//! use strata_cache_core::*;
//! # use strata_cache_core::testing::MemTier;
//!
//! let ns = Namespace::new([1; 32], KvDtype::F16, KvLayout::PageFirst, 16,
//!     KvShape { num_layers: 2, num_kv_heads: 1, head_dim: 4 }, TpShape::default(), b"tenant-a")
//!     .unwrap();
//! let tier = Arc::new(MemTier::new(TierKind::Host, ns.block_bytes(), 64));
//! let cache = TieredCache::new(
//!     vec![TierSpec { tier, capacity_bytes: 64 * ns.block_bytes() as u64, eviction: EvictionKind::Lru }],
//!     CacheConfig { page_size: 16, ..CacheConfig::default() },
//! ).unwrap();
//! let h = cache.register(&ns).unwrap();
//! let tokens: Vec<u32> = (0..32).collect();
//! let block = vec![7u8; ns.block_bytes()];
//! let report = block_on(cache.insert(&h, &tokens, &[&block, &block])).unwrap();
//! assert_eq!(report.stored, 2);
//! assert_eq!(cache.lookup(&h, &tokens[..40.min(tokens.len())]).unwrap().matched_pages, 2);
//! ```

pub mod cache;
pub mod clock;
pub mod error;
pub mod eviction;
pub mod index;
pub mod namespace;
pub mod testing;
pub mod tier;

pub use cache::{
    CacheConfig, CacheEvent, CacheStats, EventKind, InsertReport, LeaseGuard, LookupResult,
    NamespaceHandle, PinGuard, PrefetchJob, PrefetchOutcome, PrefetchPolicy, PrefetchTicket,
    ReadReport, TierSpec, TierStats, TieredCache, WritePolicy,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::CacheError;
pub use eviction::{EvictionKind, EvictionPolicy, Lru, Sieve};
pub use index::{MAX_TIERS, PageId, PrefixMatch, RadixIndex};
pub use namespace::{BlockKey, KvDtype, KvLayout, KvShape, Namespace, TpShape};
pub use tier::{
    Bandwidth, BlockHandle, BlockMeta, ThroughputMeter, Tier, TierError, TierFuture, TierId,
    TierKind,
};

/// Runs a future to completion on the current thread. For synchronous callers of the async
/// API whose tiers complete without an external reactor (memory tiers do).
pub fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};

    struct ThreadWaker(std::thread::Thread);
    impl Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}
