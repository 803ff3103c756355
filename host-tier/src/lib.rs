//! # strata-host-tier
//!
//! The G2 tier: one page-aligned region of host memory cut into fixed-size slots, one block
//! per slot. The region is an anonymous mapping, or a `memfd` so that another process on the
//! same host (the sidecar's clients) can map the same bytes later. It never grows: when no
//! slot is free a write answers [`TierError::Full`] and the controller in `cache-core`
//! evicts by its policy before trying again.
//!
//! Free slots sit in a lock-free bounded queue (crossbeam's `ArrayQueue`), so allocation and
//! release do not serialise threads. Each slot has its own reader-writer lock, held only for
//! the copy, so that even a caller that breaks the tier contract (reads a handle it already
//! freed) sees stale bytes or an error, never a data race. The region can be `mlock`ed, and
//! [`HostPool::register`] hands it to a [`MemoryRegistrar`] (the GPU tier registers it with
//! CUDA as pinned memory).
//!
//! ```
//! use strata_cache_core::{BlockKey, BlockMeta, Tier, block_on};
//! use strata_host_tier::{HostPool, HostPoolConfig};
//!
//! let pool = HostPool::new(HostPoolConfig::new(4096, 4 * 4096)).unwrap();
//! let key = BlockKey([0; 32]);
//! let meta = BlockMeta { key, namespace: BlockKey([1; 32]), hits: 0 };
//! let h = block_on(pool.write(&meta, &[7u8; 4096])).unwrap();
//! let mut out = vec![0u8; 4096];
//! block_on(pool.read(h, &key, &mut out)).unwrap();
//! assert_eq!(out, vec![7u8; 4096]);
//! pool.free(h);
//! ```

#![deny(clippy::undocumented_unsafe_blocks)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crossbeam::queue::ArrayQueue;
use memmap2::{MmapMut, MmapOptions};
use parking::SlotLock;
use strata_cache_core::{
    Bandwidth, BlockHandle, BlockKey, BlockMeta, ThroughputMeter, Tier, TierError, TierFuture,
    TierKind,
};

/// OS page size assumed for slot alignment.
pub const PAGE: usize = 4096;

/// How the region is backed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory.
    #[default]
    Anonymous,
    /// A `memfd`, shareable with other processes by passing its descriptor.
    Memfd,
}

/// Settings of a host pool.
#[derive(Clone, Debug)]
pub struct HostPoolConfig {
    /// Bytes per block.
    pub block_size: usize,
    /// Bytes of memory the pool may use; slots are `block_size` rounded up to 4 KiB.
    pub capacity_bytes: u64,
    /// Anonymous memory or memfd.
    pub backing: Backing,
    /// Lock the region in RAM (needs `RLIMIT_MEMLOCK` or `CAP_IPC_LOCK`).
    pub mlock: bool,
    /// Fault every page in at start-up, so the first writes do not pay for it.
    pub prefault: bool,
}

impl HostPoolConfig {
    /// Anonymous, not locked, not prefaulted.
    pub fn new(block_size: usize, capacity_bytes: u64) -> Self {
        HostPoolConfig {
            block_size,
            capacity_bytes,
            backing: Backing::Anonymous,
            mlock: false,
            prefault: false,
        }
    }
}

/// Why a pool could not be built.
#[derive(Debug, thiserror::Error)]
pub enum HostTierError {
    /// A setting is out of range.
    #[error("invalid host pool configuration: {0}")]
    Config(String),
    /// The operating system refused.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A registrar refused the region.
    #[error("registering the host pool failed: {0}")]
    Register(String),
}

/// Something that must know the pool's memory (for example CUDA's `cudaHostRegister`).
pub trait MemoryRegistrar {
    /// Called once with the region's start and length.
    fn register(&self, base: *mut u8, len: usize) -> Result<(), String>;
}

mod parking {
    /// A small per-slot reader-writer lock.
    pub type SlotLock = parking_lot::RwLock<()>;
}

/// The G2 pool. See the crate docs.
pub struct HostPool {
    map: MmapMut,
    memfd: Option<OwnedFd>,
    block_size: usize,
    slot_size: usize,
    slots: u32,
    free: ArrayQueue<u32>,
    locks: Box<[SlotLock]>,
    /// Bit per slot: allocated.
    allocated: Box<[AtomicU64]>,
    base: *mut u8,
    read_meter: ThroughputMeter,
    write_meter: ThroughputMeter,
}

// SAFETY: `base` points into `map`, which lives as long as the pool. All access to slot
// bytes goes through the per-slot locks (shared for reads, exclusive for writes), so the
// raw pointer is never used for unsynchronised aliasing writes across threads.
unsafe impl Send for HostPool {}
// SAFETY: as above: shared access is synchronised by the slot locks and atomics.
unsafe impl Sync for HostPool {}

impl HostPool {
    /// Maps the region and fills the free list.
    pub fn new(cfg: HostPoolConfig) -> Result<Self, HostTierError> {
        if cfg.block_size == 0 {
            return Err(HostTierError::Config("block size must be positive".into()));
        }
        let slot_size = cfg.block_size.div_ceil(PAGE) * PAGE;
        let slots = cfg.capacity_bytes / slot_size as u64;
        if slots == 0 {
            return Err(HostTierError::Config(format!(
                "capacity of {} bytes holds no {}-byte slot",
                cfg.capacity_bytes, slot_size
            )));
        }
        if slots > u64::from(u32::MAX - 1) {
            return Err(HostTierError::Config(format!(
                "{slots} slots is more than a pool can address"
            )));
        }
        let len = usize::try_from(slots * slot_size as u64)
            .map_err(|_| HostTierError::Config("capacity does not fit in memory".into()))?;
        let (map, memfd) = match cfg.backing {
            Backing::Anonymous => {
                let mut o = MmapOptions::new();
                o.len(len);
                if cfg.prefault {
                    o.populate();
                }
                let m = o.map_anon().map_err(|source| HostTierError::Os {
                    what: "mapping anonymous memory",
                    source,
                })?;
                (m, None)
            }
            Backing::Memfd => {
                // SAFETY: memfd_create with a valid NUL-terminated name; the result is
                // checked before use.
                let fd = unsafe {
                    libc::memfd_create(
                        c"strata-g2".as_ptr(),
                        libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
                    )
                };
                if fd < 0 {
                    return Err(HostTierError::Os {
                        what: "memfd_create",
                        source: std::io::Error::last_os_error(),
                    });
                }
                // SAFETY: `fd` is a fresh descriptor that nothing else owns.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                let file = File::from(owned.try_clone().map_err(|source| HostTierError::Os {
                    what: "duplicating the memfd",
                    source,
                })?);
                file.set_len(len as u64)
                    .map_err(|source| HostTierError::Os {
                        what: "sizing the memfd",
                        source,
                    })?;
                let mut o = MmapOptions::new();
                o.len(len);
                if cfg.prefault {
                    o.populate();
                }
                // SAFETY: the memfd is private to this process until its descriptor is
                // handed out, and the seals below stop anyone from resizing it afterwards.
                let m = unsafe { o.map_mut(&file) }.map_err(|source| HostTierError::Os {
                    what: "mapping the memfd",
                    source,
                })?;
                // Sealed before anyone else can see it: its size is fixed (a process that
                // gets the descriptor cannot shrink it under our mapping), and no new
                // writable mapping or write() is possible, even through a descriptor
                // reopened read-write; this mapping stays writable.
                let seals = libc::F_SEAL_SHRINK
                    | libc::F_SEAL_GROW
                    | libc::F_SEAL_FUTURE_WRITE
                    | libc::F_SEAL_SEAL;
                // SAFETY: fcntl on a descriptor we own with a valid command and argument.
                if unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
                    return Err(HostTierError::Os {
                        what: "sealing the memfd",
                        source: std::io::Error::last_os_error(),
                    });
                }
                (m, Some(owned))
            }
        };
        let mut map = map;
        if cfg.mlock {
            // SAFETY: the range is exactly the mapping we own.
            let rc = unsafe { libc::mlock(map.as_ptr().cast(), len) };
            if rc != 0 {
                return Err(HostTierError::Os {
                    what: "mlock of the host pool (raise RLIMIT_MEMLOCK or drop --mlock)",
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        let slots = slots as u32;
        let free = ArrayQueue::new(slots as usize);
        for s in 0..slots {
            // Cannot fail: the queue holds exactly `slots` entries.
            let _ = free.push(s);
        }
        let base = map.as_mut_ptr();
        Ok(HostPool {
            map,
            memfd,
            block_size: cfg.block_size,
            slot_size,
            slots,
            free,
            locks: (0..slots).map(|_| SlotLock::new(())).collect(),
            allocated: (0..slots.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            base,
            read_meter: ThroughputMeter::new(),
            write_meter: ThroughputMeter::new(),
        })
    }

    /// Bytes per slot (the block size rounded up to 4 KiB).
    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// Number of slots.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Slots free now.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// The memfd backing the region, if any, for passing to another process.
    pub fn memfd(&self) -> Option<RawFd> {
        self.memfd.as_ref().map(|f| f.as_raw_fd())
    }

    /// Byte offset of a slot in the region (what a process that maps the memfd uses).
    pub fn slot_offset(&self, h: BlockHandle) -> Option<usize> {
        (h.0 < u64::from(self.slots)).then(|| h.0 as usize * self.slot_size)
    }

    /// Hands the region to a registrar (for example to pin it for GPU copies).
    pub fn register(&self, r: &dyn MemoryRegistrar) -> Result<(), HostTierError> {
        r.register(self.base, self.map.len())
            .map_err(HostTierError::Register)
    }

    fn is_allocated(&self, slot: u32) -> bool {
        self.allocated[slot as usize / 64].load(Ordering::Acquire) & (1 << (slot % 64)) != 0
    }

    fn slot_ptr(&self, slot: u32) -> *mut u8 {
        // SAFETY: slot < self.slots, so the offset stays inside the mapping.
        unsafe { self.base.add(slot as usize * self.slot_size) }
    }

    fn check_handle(&self, h: BlockHandle) -> Result<u32, TierError> {
        match u32::try_from(h.0) {
            Ok(s) if s < self.slots && self.is_allocated(s) => Ok(s),
            _ => Err(TierError::BadHandle(h)),
        }
    }

    /// Allocates a slot and copies `data` into it (synchronous form of `Tier::write`).
    pub fn put(&self, data: &[u8]) -> Result<BlockHandle, TierError> {
        if data.len() != self.block_size {
            return Err(TierError::BufferSize {
                got: data.len(),
                expected: self.block_size,
            });
        }
        let start = Instant::now();
        let slot = self.free.pop().ok_or(TierError::Full)?;
        {
            let _w = self.locks[slot as usize].write();
            // SAFETY: the slot was just taken from the free list, so no other writer owns
            // it, and its exclusive lock keeps any stale reader out during the copy; the
            // destination holds slot_size >= block_size bytes inside the mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), self.slot_ptr(slot), data.len());
            }
        }
        self.allocated[slot as usize / 64].fetch_or(1 << (slot % 64), Ordering::AcqRel);
        self.write_meter.record(data.len(), start.elapsed());
        Ok(BlockHandle(u64::from(slot)))
    }

    /// Copies a stored block into `out` (synchronous form of `Tier::read`).
    pub fn get(&self, h: BlockHandle, out: &mut [u8]) -> Result<(), TierError> {
        let slot = self.check_handle(h)?;
        if out.len() != self.block_size {
            return Err(TierError::BufferSize {
                got: out.len(),
                expected: self.block_size,
            });
        }
        let start = Instant::now();
        {
            let _r = self.locks[slot as usize].read();
            if !self.is_allocated(slot) {
                return Err(TierError::BadHandle(h));
            }
            // SAFETY: the shared slot lock excludes writers for the copy; the source range
            // is inside the mapping and `out` is a distinct, exclusively borrowed buffer.
            unsafe {
                std::ptr::copy_nonoverlapping(self.slot_ptr(slot), out.as_mut_ptr(), out.len());
            }
        }
        self.read_meter.record(out.len(), start.elapsed());
        Ok(())
    }

    /// Releases a slot; an unknown or already free handle is ignored.
    pub fn release(&self, h: BlockHandle) {
        let Ok(slot) = self.check_handle(h) else {
            return;
        };
        let bit = 1 << (slot % 64);
        let prev = self.allocated[slot as usize / 64].fetch_and(!bit, Ordering::AcqRel);
        if prev & bit != 0 {
            // Cannot fail: a slot is in the queue at most once, and the queue holds all.
            let _ = self.free.push(slot);
        }
    }
}

impl Tier for HostPool {
    fn kind(&self) -> TierKind {
        TierKind::Host
    }

    fn block_size(&self) -> usize {
        self.block_size
    }

    fn capacity_blocks(&self) -> u64 {
        u64::from(self.slots)
    }

    fn write<'a>(&'a self, _meta: &'a BlockMeta, data: &'a [u8]) -> TierFuture<'a, BlockHandle> {
        let r = self.put(data);
        Box::pin(async move { r })
    }

    fn read<'a>(
        &'a self,
        handle: BlockHandle,
        _key: &'a BlockKey,
        out: &'a mut [u8],
    ) -> TierFuture<'a, ()> {
        let r = self.get(handle, out);
        Box::pin(async move { r })
    }

    fn free(&self, handle: BlockHandle) {
        self.release(handle);
    }

    fn bandwidth(&self) -> Bandwidth {
        Bandwidth {
            read_bps: self.read_meter.bytes_per_sec(),
            write_bps: self.write_meter.bytes_per_sec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn round_trip_and_full() {
        let pool = HostPool::new(HostPoolConfig::new(5000, 3 * 8192)).unwrap();
        assert_eq!(pool.slot_size(), 8192);
        assert_eq!(pool.slots(), 3);
        let hs: Vec<_> = (0..3)
            .map(|i| pool.put(&pattern(i, 5000)).unwrap())
            .collect();
        assert!(matches!(pool.put(&pattern(9, 5000)), Err(TierError::Full)));
        let mut out = vec![0; 5000];
        for (i, h) in hs.iter().enumerate() {
            pool.get(*h, &mut out).unwrap();
            assert_eq!(out, pattern(i as u64, 5000));
        }
        pool.release(hs[1]);
        assert!(matches!(
            pool.get(hs[1], &mut out),
            Err(TierError::BadHandle(_))
        ));
        pool.release(hs[1]); // double free is ignored
        assert_eq!(pool.free_slots(), 1);
        assert!(pool.put(&pattern(4, 5000)).is_ok());
        assert!(pool.put(&pattern(5, 5000)).is_err());
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(HostPool::new(HostPoolConfig::new(0, 1 << 20)).is_err());
        assert!(HostPool::new(HostPoolConfig::new(8192, 100)).is_err());
        let pool = HostPool::new(HostPoolConfig::new(4096, 1 << 16)).unwrap();
        assert!(matches!(
            pool.put(&[0; 10]),
            Err(TierError::BufferSize { .. })
        ));
        let h = pool.put(&[1; 4096]).unwrap();
        assert!(matches!(
            pool.get(h, &mut [0; 10]),
            Err(TierError::BufferSize { .. })
        ));
        assert!(matches!(
            pool.get(BlockHandle(u64::MAX), &mut [0; 4096]),
            Err(TierError::BadHandle(_))
        ));
        // The stored block survived the bad calls.
        let mut out = [0; 4096];
        pool.get(h, &mut out).unwrap();
        assert_eq!(out, [1; 4096]);
    }

    #[test]
    fn memfd_backing_is_shareable() {
        let mut cfg = HostPoolConfig::new(4096, 4 * 4096);
        cfg.backing = Backing::Memfd;
        cfg.prefault = true;
        let pool = HostPool::new(cfg).unwrap();
        let fd = pool.memfd().expect("memfd");
        let h = pool.put(&pattern(3, 4096)).unwrap();
        // Map the same descriptor a second time, as another process would.
        // SAFETY: `fd` is alive for the duration of this test and borrowed only here.
        let file = unsafe { std::mem::ManuallyDrop::new(File::from_raw_fd(fd)) };
        // SAFETY: read-only view of a memfd that is not truncated while mapped.
        let view = unsafe { memmap2::Mmap::map(&*file) }.unwrap();
        let off = pool.slot_offset(h).unwrap();
        assert_eq!(&view[off..off + 4096], &pattern(3, 4096)[..]);
    }

    #[test]
    fn threads_share_the_free_list() {
        let pool =
            std::sync::Arc::new(HostPool::new(HostPoolConfig::new(4096, 64 * 4096)).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    let mut out = vec![0; 4096];
                    for i in 0..2000u64 {
                        let seed = t * 1_000_000 + i;
                        if let Ok(h) = pool.put(&pattern(seed, 4096)) {
                            pool.get(h, &mut out).unwrap();
                            assert_eq!(out, pattern(seed, 4096));
                            pool.release(h);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(pool.free_slots(), 64);
    }

    proptest! {
        /// Random put/get/release against a map of live handles: every live handle reads
        /// back its bytes, the pool never holds more than its slots, freed slots are reused.
        #[test]
        fn allocator_matches_model(ops in proptest::collection::vec((0u8..3, 0u64..50), 1..300)) {
            let pool = HostPool::new(HostPoolConfig::new(4096, 8 * 4096)).unwrap();
            let mut model: HashMap<u64, u64> = HashMap::new(); // handle -> seed
            let mut out = vec![0; 4096];
            for (op, x) in ops {
                match op {
                    0 => match pool.put(&pattern(x, 4096)) {
                        Ok(h) => {
                            prop_assert!(!model.contains_key(&h.0));
                            model.insert(h.0, x);
                        }
                        Err(TierError::Full) => prop_assert_eq!(model.len(), 8),
                        Err(e) => prop_assert!(false, "{e}"),
                    },
                    1 => {
                        if let Some((&h, _)) = model.iter().nth(x as usize % model.len().max(1)) {
                            pool.release(BlockHandle(h));
                            model.remove(&h);
                        }
                    }
                    _ => {
                        for (&h, &seed) in &model {
                            pool.get(BlockHandle(h), &mut out).unwrap();
                            prop_assert_eq!(&out, &pattern(seed, 4096));
                        }
                    }
                }
                prop_assert_eq!(pool.free_slots() + model.len(), 8);
            }
        }
    }
}
