//! The engine's KV pool as tier 0 ("device", G1) of a cache-core [`TieredCache`]: the prefix
//! cache of the server (RadixAttention) is the cache's radix index over the pool's pages.
//!
//! Blocks are lent in place, never copied within the pool: when the scheduler stores a
//! full page of a running sequence, the block it passes *is* that page's memory, and
//! [`PoolTier::write`] recognises it, takes a reference and seals the page (from then on it
//! is only read). A later request that matches the prefix pins it and attaches the same
//! pages to its own sequence ([`KvPool::attach`]). When the cache evicts a page, its
//! reference goes; the memory returns to the pool once no sequence uses it either. A block
//! that comes from elsewhere (a lower tier, in a later issue) is copied into a fresh page.
//!
//! [`TieredCache`]: strata_cache_core::TieredCache

use std::sync::Arc;
use std::time::Instant;

use strata_cache_core::BlockKey;
use strata_cache_core::tier::{
    Bandwidth, BlockHandle, BlockMeta, ThroughputMeter, Tier, TierError, TierFuture, TierKind,
};

use crate::kv::KvPool;

/// A [`KvPool`] as a cache tier. Handles are page numbers.
pub struct PoolTier {
    pool: Arc<KvPool>,
    read_bw: ThroughputMeter,
    write_bw: ThroughputMeter,
}

impl PoolTier {
    /// The tier over `pool`.
    pub fn new(pool: Arc<KvPool>) -> Self {
        PoolTier {
            pool,
            read_bw: ThroughputMeter::default(),
            write_bw: ThroughputMeter::default(),
        }
    }

    fn page(&self, h: BlockHandle) -> Result<u32, TierError> {
        u32::try_from(h.0)
            .ok()
            .filter(|p| (*p as usize) < self.pool.capacity())
            .ok_or(TierError::BadHandle(h))
    }
}

impl Tier for PoolTier {
    fn kind(&self) -> TierKind {
        TierKind::Device
    }

    fn block_size(&self) -> usize {
        self.pool.block_bytes()
    }

    fn capacity_blocks(&self) -> u64 {
        self.pool.capacity() as u64
    }

    fn write<'a>(&'a self, _meta: &'a BlockMeta, data: &'a [u8]) -> TierFuture<'a, BlockHandle> {
        let r = if data.len() != self.pool.block_bytes() {
            Err(TierError::BufferSize {
                got: data.len(),
                expected: self.pool.block_bytes(),
            })
        } else if let Some(p) = self.pool.page_of(data) {
            // One of our own pages: lend it in place.
            if self.pool.share(p) {
                Ok(BlockHandle(u64::from(p)))
            } else {
                Err(TierError::BadHandle(BlockHandle(u64::from(p))))
            }
        } else {
            let t0 = Instant::now();
            match self.pool.copy_in(data, true) {
                Ok(p) => {
                    self.write_bw.record(data.len(), t0.elapsed());
                    Ok(BlockHandle(u64::from(p)))
                }
                Err(_) => Err(TierError::Full),
            }
        };
        Box::pin(async move { r })
    }

    fn read<'a>(
        &'a self,
        handle: BlockHandle,
        _key: &'a BlockKey,
        out: &'a mut [u8],
    ) -> TierFuture<'a, ()> {
        let t0 = Instant::now();
        let r = self.page(handle).and_then(|p| {
            if out.len() != self.pool.block_bytes() {
                return Err(TierError::BufferSize {
                    got: out.len(),
                    expected: self.pool.block_bytes(),
                });
            }
            if self.pool.read_sealed(p, out) {
                self.read_bw.record(out.len(), t0.elapsed());
                Ok(())
            } else {
                Err(TierError::BadHandle(handle))
            }
        });
        Box::pin(async move { r })
    }

    fn free(&self, handle: BlockHandle) {
        if let Ok(p) = self.page(handle) {
            self.pool.unshare(p);
        }
    }

    fn bandwidth(&self) -> Bandwidth {
        Bandwidth {
            read_bps: self.read_bw.bytes_per_sec(),
            write_bps: self.write_bw.bytes_per_sec(),
        }
    }
}
