//! A simple heap-backed [`Tier`] with fault injection, for tests and examples of code that
//! uses the cache core. Production tiers live in their own crates.

use std::collections::HashSet;
use std::time::Instant;

use parking_lot::Mutex;

use crate::namespace::BlockKey;
use crate::tier::{
    Bandwidth, BlockHandle, BlockMeta, ThroughputMeter, Tier, TierError, TierFuture, TierKind,
};

/// A tier that keeps blocks in `Vec`s and can be told to fail.
pub struct MemTier {
    kind: TierKind,
    block_size: usize,
    capacity: u64,
    inner: Mutex<MemInner>,
    read_meter: ThroughputMeter,
    write_meter: ThroughputMeter,
}

#[derive(Default)]
struct MemInner {
    slots: Vec<Option<(BlockKey, Vec<u8>)>>,
    free: Vec<u64>,
    live: u64,
    corrupt: HashSet<u64>,
    fail_writes: bool,
    reject_writes: bool,
}

impl MemTier {
    /// A tier of `capacity` blocks of `block_size` bytes.
    pub fn new(kind: TierKind, block_size: usize, capacity: u64) -> Self {
        MemTier {
            kind,
            block_size,
            capacity,
            inner: Mutex::new(MemInner::default()),
            read_meter: ThroughputMeter::new(),
            write_meter: ThroughputMeter::new(),
        }
    }

    /// Blocks stored now.
    pub fn live_blocks(&self) -> u64 {
        self.inner.lock().live
    }

    /// Makes every later read of `handle` fail its integrity check.
    pub fn corrupt(&self, handle: BlockHandle) {
        self.inner.lock().corrupt.insert(handle.0);
    }

    /// Makes every later write fail with an I/O error (a full or broken device).
    pub fn fail_writes(&self, on: bool) {
        self.inner.lock().fail_writes = on;
    }

    /// Makes every later write answer [`TierError::Rejected`] (an admission policy that
    /// declines everything).
    pub fn reject_writes(&self, on: bool) {
        self.inner.lock().reject_writes = on;
    }

    /// Handles of every stored block.
    pub fn handles(&self) -> Vec<BlockHandle> {
        let g = self.inner.lock();
        (0..g.slots.len() as u64)
            .filter(|&i| g.slots[i as usize].is_some())
            .map(BlockHandle)
            .collect()
    }
}

impl Tier for MemTier {
    fn kind(&self) -> TierKind {
        self.kind
    }

    fn block_size(&self) -> usize {
        self.block_size
    }

    fn capacity_blocks(&self) -> u64 {
        self.capacity
    }

    fn write<'a>(&'a self, meta: &'a BlockMeta, data: &'a [u8]) -> TierFuture<'a, BlockHandle> {
        Box::pin(async move {
            if data.len() != self.block_size {
                return Err(TierError::BufferSize {
                    got: data.len(),
                    expected: self.block_size,
                });
            }
            let start = Instant::now();
            let mut g = self.inner.lock();
            if g.reject_writes {
                return Err(TierError::Rejected);
            }
            if g.fail_writes {
                return Err(TierError::Io(std::io::Error::other(
                    "injected write failure",
                )));
            }
            if g.live >= self.capacity {
                return Err(TierError::Full);
            }
            let h = match g.free.pop() {
                Some(h) => h,
                None => {
                    g.slots.push(None);
                    g.slots.len() as u64 - 1
                }
            };
            g.slots[h as usize] = Some((meta.key, data.to_vec()));
            g.corrupt.remove(&h);
            g.live += 1;
            drop(g);
            self.write_meter.record(data.len(), start.elapsed());
            Ok(BlockHandle(h))
        })
    }

    fn read<'a>(
        &'a self,
        handle: BlockHandle,
        key: &'a BlockKey,
        out: &'a mut [u8],
    ) -> TierFuture<'a, ()> {
        Box::pin(async move {
            let start = Instant::now();
            let g = self.inner.lock();
            let Some(Some((k, data))) = g.slots.get(handle.0 as usize) else {
                return Err(TierError::BadHandle(handle));
            };
            if g.corrupt.contains(&handle.0) || k != key {
                return Err(TierError::Corrupt);
            }
            if out.len() != data.len() {
                return Err(TierError::BufferSize {
                    got: out.len(),
                    expected: data.len(),
                });
            }
            out.copy_from_slice(data);
            drop(g);
            self.read_meter.record(out.len(), start.elapsed());
            Ok(())
        })
    }

    fn free(&self, handle: BlockHandle) {
        let mut g = self.inner.lock();
        if let Some(slot) = g.slots.get_mut(handle.0 as usize)
            && slot.take().is_some()
        {
            g.live -= 1;
            g.free.push(handle.0);
        }
    }

    fn bandwidth(&self) -> Bandwidth {
        Bandwidth {
            read_bps: self.read_meter.bytes_per_sec(),
            write_bps: self.write_meter.bytes_per_sec(),
        }
    }
}
