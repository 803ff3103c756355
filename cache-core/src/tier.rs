//! The tier trait: what host, disk, GPU and remote storage implement to plug into the
//! controller.
//!
//! A tier stores fixed-size blocks and hands back an opaque [`BlockHandle`] for each. The
//! controller decides *what* lives in a tier (through the index and the tier's eviction
//! policy); the tier decides *where* (slot, file offset, remote key). Data calls are async
//! so that I/O tiers can complete them from an I/O engine; memory tiers return ready
//! futures. Buffers are borrowed for the life of the future: a tier whose I/O outlives a
//! dropped future (io_uring) must stage through buffers of its own.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::namespace::BlockKey;

/// Position of a tier in a cache, 0 being the fastest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TierId(pub u8);

impl fmt::Display for TierId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What kind of storage a tier is (the G1..G4 of the design).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TierKind {
    /// G1: accelerator memory, or the engine's working KV pool on a CPU build.
    Device,
    /// G2: host RAM.
    Host,
    /// G3: local disk.
    Disk,
    /// G4: shared remote store.
    Remote,
}

impl TierKind {
    /// Short name used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TierKind::Device => "device",
            TierKind::Host => "host",
            TierKind::Disk => "disk",
            TierKind::Remote => "remote",
        }
    }
}

/// A tier's own name for a stored block (slot index, file offset, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockHandle(pub u64);

/// What a tier is told about a block it stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockMeta {
    /// The block key.
    pub key: BlockKey,
    /// The namespace id (root key) the block belongs to.
    pub namespace: BlockKey,
    /// Times the page has been used, for admission policies.
    pub hits: u32,
}

/// What a tier can fail with.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// No room for another block.
    #[error("tier has no free block")]
    Full,
    /// The tier declined the block (admission policy, or admission paused after the device
    /// filled up). Not an error of the caller's request.
    #[error("tier declined the block (admission)")]
    Rejected,
    /// The handle does not name a live block of this tier.
    #[error("invalid block handle {0:?}")]
    BadHandle(BlockHandle),
    /// A buffer of the wrong length was passed.
    #[error("buffer is {got} bytes; blocks are {expected} bytes")]
    BufferSize {
        /// Length passed.
        got: usize,
        /// The tier's block size.
        expected: usize,
    },
    /// The stored bytes failed their integrity check; the block must not be served.
    #[error("block failed its integrity check")]
    Corrupt,
    /// An operating-system I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// A boxed future returned by tier data calls.
pub type TierFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, TierError>> + Send + 'a>>;

/// A storage tier. See the module docs.
///
/// Contract the controller relies on:
/// - `write` returns a handle that stays valid until `free(handle)`; the tier never reuses
///   or moves it before that.
/// - `read` of a live handle returns exactly the bytes written, or an error; never other
///   bytes (tiers that can corrupt verify a checksum and answer [`TierError::Corrupt`]).
/// - `free` is called exactly once per handle, after the last read of it has completed.
/// - A `write` future dropped before it completes leaves no block behind (the tier frees
///   it itself), and a dropped `read` future never writes into `out` afterwards (stage
///   through buffers the tier owns if the I/O can outlive the future).
pub trait Tier: Send + Sync {
    /// The kind of storage.
    fn kind(&self) -> TierKind;
    /// Size of every block, in bytes.
    fn block_size(&self) -> usize;
    /// How many blocks the tier can hold at most.
    fn capacity_blocks(&self) -> u64;
    /// Stores one block and returns its handle. The metadata lets tiers that must find
    /// blocks again without the index (disk, remote) record the key and namespace, and lets
    /// admission policies see how popular the block is.
    fn write<'a>(&'a self, meta: &'a BlockMeta, data: &'a [u8]) -> TierFuture<'a, BlockHandle>;
    /// Reads one block into `out` (exactly `block_size()` bytes).
    fn read<'a>(
        &'a self,
        handle: BlockHandle,
        key: &'a BlockKey,
        out: &'a mut [u8],
    ) -> TierFuture<'a, ()>;
    /// Releases a block. Its handle may be reused afterwards. Called with the controller's
    /// lock held: it must be cheap and must not block (defer slow work).
    fn free(&self, handle: BlockHandle);
    /// Measured read/write bandwidth, for the load planner.
    fn bandwidth(&self) -> Bandwidth;

    /// Whether the tier can find blocks by key that the index does not know (a persistent
    /// tier after a restart, a shared remote store).
    fn can_adopt(&self) -> bool {
        false
    }

    /// Whether the tier holds a block under `key` (owned or not). A cheap probe, called
    /// under the controller's shared lock.
    fn has_key(&self, _key: &BlockKey) -> bool {
        false
    }

    /// Claims the block stored under `key`, if the tier has one nobody owns yet. From then
    /// on the handle belongs to the caller like one returned by `write`.
    fn adopt(&self, _key: &BlockKey) -> Option<BlockHandle> {
        None
    }

    /// Attaches the caller's tag to a handle; [`Tier::take_dropped`] reports it back.
    /// Called with the controller's lock held: must be cheap.
    fn set_tag(&self, _handle: BlockHandle, _tag: u64) {}

    /// Owned blocks the tier dropped on its own (segment reclaim) since the last call, with
    /// their tags. Their handles are already invalid. Called with the controller's lock held
    /// on every update: must be cheap when there is nothing to report.
    fn take_dropped(&self) -> Vec<(BlockHandle, u64)> {
        Vec::new()
    }
}

/// Exponentially weighted throughput estimate of one direction of a tier, lock-free.
#[derive(Debug, Default)]
pub struct ThroughputMeter {
    /// Bytes per second as f64 bits; 0 until the first sample.
    bps_bits: AtomicU64,
}

impl ThroughputMeter {
    /// An empty meter.
    pub const fn new() -> Self {
        ThroughputMeter {
            bps_bits: AtomicU64::new(0),
        }
    }

    /// Records a transfer of `bytes` that took `elapsed`.
    pub fn record(&self, bytes: usize, elapsed: Duration) {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let sample = bytes as f64 / secs;
        // A racing update may lose one sample; the estimate stays sane.
        let old = f64::from_bits(self.bps_bits.load(Ordering::Relaxed));
        let new = if old == 0.0 {
            sample
        } else {
            0.9 * old + 0.1 * sample
        };
        self.bps_bits.store(new.to_bits(), Ordering::Relaxed);
    }

    /// The current estimate in bytes per second, if any sample was recorded.
    pub fn bytes_per_sec(&self) -> Option<f64> {
        let v = f64::from_bits(self.bps_bits.load(Ordering::Relaxed));
        (v > 0.0).then_some(v)
    }
}

/// A tier's measured bandwidth in bytes per second (`None` before the first transfer).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Bandwidth {
    /// Read throughput.
    pub read_bps: Option<f64>,
    /// Write throughput.
    pub write_bps: Option<f64>,
}
