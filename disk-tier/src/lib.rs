//! # strata-disk-tier
//!
//! The G3 tier: KV blocks on local NVMe/SSD in a log-structured store that survives
//! restarts. One file (or a raw block device) is cut into fixed-size segments used as a
//! ring. Blocks are appended to the open segment as records (a 4 KiB header and the
//! payload, one O_DIRECT write each, see [`format`]); when it is full the segment is sealed
//! with a summary and the next segment in the ring is reclaimed: blocks read since they
//! were written (hot) are written again into the fresh segment, the others are dropped.
//! Writes are therefore always sequential, and reclaim happens a segment at a time.
//!
//! - **Integrity**: every record carries the blake3 of its payload; a read that does not
//!   match (or whose header names another key) is a miss plus a metric, and the block is
//!   forgotten. Bytes that fail the check are never returned.
//! - **Warm restart**: [`DiskTier::open`] rebuilds the key → location index from segment
//!   summaries, scanning record headers only in segments that were not sealed. Recovered
//!   blocks are *soft*: the controller claims one with [`Tier::adopt`] when a lookup reaches
//!   its key; soft blocks are reclaimed first-in first-out like any other.
//! - **Admission**: blocks used fewer than `admission_hits` times are refused, to spare SSD
//!   endurance.
//! - **Faults**: `ENOSPC` pauses admission for a while (the tier keeps serving what it
//!   has); `EIO` on a read is a miss; each is logged once per episode.
//! - **I/O engines**: io_uring or psync ([`io`]), chosen at run time.
//!
//! Blocks the tier drops by itself are reported through [`Tier::take_dropped`] so that the
//! controller's index stays true.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod format;
pub mod io;

#[cfg(any(test, feature = "testing"))]
pub mod fault;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use strata_cache_core::{
    Bandwidth, BlockHandle, BlockKey, BlockMeta, ThroughputMeter, Tier, TierError, TierFuture,
    TierKind,
};

use crate::format::{ALIGN, Layout, RecordMeta};
use crate::io::{AlignedBuf, EngineKind, IoEngine};

/// Settings of a disk tier.
#[derive(Clone, Debug)]
pub struct DiskTierConfig {
    /// A file (created if missing) or a block device.
    pub path: PathBuf,
    /// Bytes of the file or device to use.
    pub capacity_bytes: u64,
    /// Payload bytes per block.
    pub block_size: usize,
    /// Bytes per segment (default 256 MiB).
    pub segment_bytes: u64,
    /// I/O engine.
    pub engine: EngineKind,
    /// Requests in flight at most (io_uring queue depth; psync threads up to 16).
    pub queue_depth: u32,
    /// Refuse blocks used fewer times than this (0: admit everything).
    pub admission_hits: u32,
    /// Share of a segment that may be rewritten as hot blocks when it is reclaimed.
    pub reinsert_fraction: f64,
    /// How long admission stays off after `ENOSPC`.
    pub enospc_backoff: Duration,
}

impl DiskTierConfig {
    /// Defaults for a file at `path`.
    pub fn new(path: impl Into<PathBuf>, capacity_bytes: u64, block_size: usize) -> Self {
        DiskTierConfig {
            path: path.into(),
            capacity_bytes,
            block_size,
            segment_bytes: 256 << 20,
            engine: EngineKind::Auto,
            queue_depth: 64,
            admission_hits: 0,
            reinsert_fraction: 0.25,
            enospc_backoff: Duration::from_secs(30),
        }
    }
}

/// Why a disk tier could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DiskTierError {
    /// A setting is out of range.
    #[error("invalid disk tier configuration: {0}")]
    Config(String),
    /// The file holds a store made with other settings.
    #[error(
        "{path} holds a disk tier with block size {found_block}, segment size {found_segment} and {found_segments} segments; the configuration asks for {want_block}, {want_segment} and {want_segments} (use another path, or delete the file to start empty)"
    )]
    Mismatch {
        /// The path.
        path: String,
        /// Stored block size.
        found_block: usize,
        /// Stored segment size.
        found_segment: u64,
        /// Stored segment count.
        found_segments: usize,
        /// Configured block size.
        want_block: usize,
        /// Configured segment size.
        want_segment: u64,
        /// Configured segment count.
        want_segments: usize,
    },
    /// The operating system refused.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Counters of a disk tier.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DiskMetrics {
    /// I/O engine in use.
    pub engine: &'static str,
    /// Bytes written to the device (headers, payloads, summaries, reinsertions).
    pub bytes_written: u64,
    /// Bytes read from the device.
    pub bytes_read: u64,
    /// Write requests completed.
    pub writes: u64,
    /// Read requests completed.
    pub reads: u64,
    /// Requests in flight now.
    pub queue_depth: u64,
    /// Payload bytes accepted by `write`.
    pub admitted_bytes: u64,
    /// Blocks refused by admission (too few hits, or paused after `ENOSPC`).
    pub rejected: u64,
    /// Reads that returned a block.
    pub hits: u64,
    /// Reads that could not (I/O error, checksum, stale handle).
    pub misses: u64,
    /// Blocks whose bytes failed their checksum.
    pub checksum_failures: u64,
    /// I/O errors.
    pub io_errors: u64,
    /// Segments reclaimed.
    pub segments_reclaimed: u64,
    /// Hot blocks rewritten on reclaim.
    pub blocks_reinserted: u64,
    /// Blocks dropped on reclaim.
    pub blocks_dropped: u64,
    /// Blocks found at start-up.
    pub recovered_blocks: u64,
    /// Blocks stored now.
    pub live_blocks: u64,
    /// Device bytes written over payload bytes admitted.
    pub write_amplification: f64,
}

#[derive(Default)]
struct Counters {
    bytes_written: AtomicU64,
    bytes_read: AtomicU64,
    writes: AtomicU64,
    reads: AtomicU64,
    admitted_bytes: AtomicU64,
    rejected: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    checksum_failures: AtomicU64,
    io_errors: AtomicU64,
    segments_reclaimed: AtomicU64,
    blocks_reinserted: AtomicU64,
    blocks_dropped: AtomicU64,
    recovered_blocks: AtomicU64,
}

const NONE: u32 = u32::MAX;

#[derive(Clone, Debug)]
struct Slot {
    seg: u32,
    idx: u32,
    epoch: u32,
    live: bool,
    owned: bool,
    hot: bool,
    tag: u64,
    meta: RecordMeta,
}

#[derive(Debug)]
struct Segment {
    epoch: u64,
    next: usize,
    records: Vec<u32>,
    /// Records allocated in the segment and not yet recorded in memory (or abandoned).
    writing: usize,
    /// Writes to the segment (records, summary) not yet over in the kernel; counted down
    /// by the engine, also for writes whose caller has gone.
    io: usize,
    /// Takes no more records; its last writer writes the summary.
    full: bool,
    /// The summary has been (or is being) written.
    sealed: bool,
    /// No valid summary is on disk for it: it can be reopened without another I/O.
    wiped: bool,
    /// Summary writes issued to it so far. A wipe marks the segment `wiped` only if no
    /// summary write was issued and the segment was not reused (`epoch`) while it was in
    /// flight: its requester may resume long after the write is over.
    summaries: u64,
}

struct State {
    slots: Vec<Slot>,
    /// First in, first out: a slot id is reused as rarely as possible, so its epoch
    /// (which tells stale handles apart) does not wrap.
    free_slots: std::collections::VecDeque<u32>,
    by_key: HashMap<BlockKey, u32>,
    segs: Vec<Segment>,
    open: usize,
    next_seq: u64,
    next_gen: u64,
    /// Hot blocks being rewritten during a reclaim, served from memory meanwhile.
    moving: HashMap<u32, Arc<AlignedBuf>>,
    dropped: Vec<(BlockHandle, u64)>,
    paused_until: Option<Instant>,
    enospc_episode: bool,
    eio_episode: bool,
    live: u64,
}

/// The G3 tier. See the crate docs.
pub struct DiskTier {
    layout: Layout,
    store_id: format::StoreId,
    engine: Arc<dyn IoEngine>,
    _file: File,
    path: String,
    state: Arc<Mutex<State>>,
    rotation: tokio::sync::Mutex<()>,
    writes_done: Arc<tokio::sync::Notify>,
    counters: Counters,
    dropped_flag: AtomicBool,
    admission_hits: u32,
    reinsert_max: usize,
    enospc_backoff: Duration,
    read_meter: ThroughputMeter,
    write_meter: ThroughputMeter,
    /// Record-sized buffers kept for reuse: a fresh large allocation is a fresh mapping
    /// the kernel must fault in and zero on every I/O.
    pool: Mutex<Vec<AlignedBuf>>,
    /// Payload-sized buffers for reads (a read fetches the payload only).
    read_pool: Mutex<Vec<AlignedBuf>>,
    pool_max: usize,
    #[cfg(any(test, feature = "testing"))]
    faults: Arc<fault::Faults>,
}

fn handle_of(slot: u32, epoch: u32) -> BlockHandle {
    BlockHandle(u64::from(epoch) << 32 | u64::from(slot))
}

impl State {
    fn slot(&self, h: BlockHandle) -> Option<u32> {
        let id = (h.0 & 0xffff_ffff) as u32;
        let epoch = (h.0 >> 32) as u32;
        self.slots
            .get(id as usize)
            .filter(|s| s.live && s.epoch == epoch)
            .map(|_| id)
    }

    fn new_slot(&mut self, seg: usize, idx: usize, meta: RecordMeta, owned: bool) -> u32 {
        let s = Slot {
            seg: seg as u32,
            idx: idx as u32,
            epoch: 0,
            live: true,
            owned,
            hot: false,
            tag: 0,
            meta,
        };
        let id = match self.free_slots.pop_front() {
            Some(id) => {
                let epoch = self.slots[id as usize].epoch;
                self.slots[id as usize] = Slot { epoch, ..s };
                id
            }
            None => {
                self.slots.push(s);
                (self.slots.len() - 1) as u32
            }
        };
        self.segs[seg].records[idx] = id;
        // The newest copy of a key is the one found by key.
        match self.by_key.get(&meta.key) {
            Some(&old) if self.slots[old as usize].meta.seq > meta.seq => {}
            _ => {
                self.by_key.insert(meta.key, id);
            }
        }
        self.live += 1;
        id
    }

    /// Forgets a slot. Returns its (handle, tag) if the controller owned it.
    fn drop_slot(&mut self, id: u32) -> Option<(BlockHandle, u64)> {
        let s = &mut self.slots[id as usize];
        if !s.live {
            return None;
        }
        s.live = false;
        let owned = s.owned.then(|| (handle_of(id, s.epoch), s.tag));
        s.epoch = s.epoch.wrapping_add(1);
        let (seg, idx, key) = (s.seg as usize, s.idx as usize, s.meta.key);
        if self.segs[seg].records.get(idx) == Some(&id) {
            self.segs[seg].records[idx] = NONE;
        }
        if self.by_key.get(&key) == Some(&id) {
            self.by_key.remove(&key);
        }
        self.moving.remove(&id);
        self.free_slots.push_back(id);
        self.live -= 1;
        owned
    }
}

/// A record slot taken by `allocate`: ends when the write is recorded in memory
/// ([`WriteSlot::finish`]) or abandoned (dropped, e.g. a cancelled caller). A segment is
/// sealed only when none is open, so its summary lists every record written to it.
struct WriteSlot<'a> {
    tier: &'a DiskTier,
    seg: usize,
}

impl WriteSlot<'_> {
    /// Ends the slot. Returns whether the caller, as the full segment's last writer, must
    /// now write the segment's summary (the claim is taken: nobody else will).
    fn finish(self) -> bool {
        let seal = {
            let mut st = self.tier.state.lock();
            let seg = &mut st.segs[self.seg];
            seg.writing -= 1;
            let seal = seg.writing == 0 && seg.full && !seg.sealed;
            if seal {
                seg.sealed = true;
            }
            if seg.writing == 0 && seg.io == 0 {
                self.tier.writes_done.notify_waiters();
            }
            seal
        };
        std::mem::forget(self);
        seal
    }
}

impl Drop for WriteSlot<'_> {
    /// An abandoned write: the summary is left to recovery's header scan.
    fn drop(&mut self) {
        let mut st = self.tier.state.lock();
        let seg = &mut st.segs[self.seg];
        seg.writing -= 1;
        if seg.writing == 0 && seg.io == 0 {
            self.tier.writes_done.notify_waiters();
        }
    }
}

fn open_file(path: &std::path::Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

impl DiskTier {
    /// Opens (or creates) the store at `cfg.path` and recovers what is on it.
    pub async fn open(cfg: DiskTierConfig) -> Result<Self, DiskTierError> {
        let layout = Layout::new(cfg.block_size, cfg.segment_bytes, cfg.capacity_bytes)
            .map_err(DiskTierError::Config)?;
        if !(0.0..=1.0).contains(&cfg.reinsert_fraction) {
            return Err(DiskTierError::Config(format!(
                "reinsert fraction {} is outside 0..=1",
                cfg.reinsert_fraction
            )));
        }
        if cfg.queue_depth == 0 {
            return Err(DiskTierError::Config("queue depth must be positive".into()));
        }
        let path = cfg.path.display().to_string();
        let io_err = |what: &'static str| {
            let path = path.clone();
            move |source| DiskTierError::Io { what, path, source }
        };
        let file = open_file(&cfg.path).map_err(io_err("opening"))?;
        let md = file.metadata().map_err(io_err("reading metadata of"))?;
        let is_dev = md.file_type().is_block_device();
        let size = if is_dev {
            use std::io::Seek;
            (&file)
                .seek(std::io::SeekFrom::End(0))
                .map_err(io_err("sizing"))?
        } else {
            md.len()
        };
        let fresh = size == 0 && !is_dev;
        if is_dev && size < layout.file_bytes() {
            return Err(DiskTierError::Config(format!(
                "device {path} has {size} bytes; the configuration needs {}",
                layout.file_bytes()
            )));
        }
        if fresh {
            // Reserve the space now, so that a full file system shows up here and not as
            // failed writes later.
            // SAFETY: fallocate on our open descriptor with a valid range.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, layout.file_bytes() as i64) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                let _ = std::fs::remove_file(&cfg.path);
                return Err(DiskTierError::Io {
                    what: "reserving space for",
                    path,
                    source: e,
                });
            }
        }
        let base = io::build_engine(cfg.engine, std::slice::from_ref(&file), cfg.queue_depth)
            .map_err(io_err("starting the I/O engine for"))?;
        #[cfg(any(test, feature = "testing"))]
        let faults = Arc::new(fault::Faults::default());
        #[cfg(any(test, feature = "testing"))]
        let engine: Arc<dyn IoEngine> = Arc::new(fault::FaultyEngine::new(base, faults.clone()));
        #[cfg(not(any(test, feature = "testing")))]
        let engine = base;

        let mut tier = DiskTier {
            layout,
            store_id: [0; 16],
            engine,
            _file: file,
            path: path.clone(),
            state: Arc::new(Mutex::new(State {
                slots: Vec::new(),
                free_slots: std::collections::VecDeque::new(),
                by_key: HashMap::new(),
                segs: (0..layout.segments)
                    .map(|_| Segment {
                        epoch: 0,
                        next: 0,
                        records: vec![NONE; layout.blocks_per_segment],
                        writing: 0,
                        io: 0,
                        full: false,
                        sealed: false,
                        wiped: true,
                        summaries: 0,
                    })
                    .collect(),
                open: 0,
                next_seq: 1,
                next_gen: 1,
                moving: HashMap::new(),
                dropped: Vec::new(),
                paused_until: None,
                enospc_episode: false,
                eio_episode: false,
                live: 0,
            })),
            rotation: tokio::sync::Mutex::new(()),
            writes_done: Arc::new(tokio::sync::Notify::new()),
            counters: Counters::default(),
            dropped_flag: AtomicBool::new(false),
            admission_hits: cfg.admission_hits,
            reinsert_max: (layout.blocks_per_segment as f64 * cfg.reinsert_fraction) as usize,
            enospc_backoff: cfg.enospc_backoff,
            read_meter: ThroughputMeter::new(),
            write_meter: ThroughputMeter::new(),
            pool: Mutex::new(Vec::new()),
            read_pool: Mutex::new(Vec::new()),
            pool_max: 2 * cfg.queue_depth as usize,
            #[cfg(any(test, feature = "testing"))]
            faults,
        };
        // A store whose superblock area is all zeros (a new file, a zeroed device) is
        // empty: format it. Anything else must be a store made with these settings.
        let blank = fresh || {
            let (sb, r) = tier.engine.read(0, 0, AlignedBuf::new(ALIGN, ALIGN)).await;
            r.map_err(io_err("reading the superblock of"))?;
            sb.iter().all(|&b| b == 0)
        };
        if blank {
            let mut sb = AlignedBuf::new(ALIGN, ALIGN);
            tier.store_id = format::new_store_id(&path);
            format::encode_super(&layout, &tier.store_id, &mut sb);
            let (_, r) = tier.engine.write(0, 0, sb).await;
            r.map_err(io_err("writing the superblock of"))?;
            tier.state.lock().segs[0].epoch = 1;
            tier.state.lock().next_gen = 2;
        } else {
            tier.recover().await?;
        }
        tracing::info!(
            path = %tier.path,
            engine = tier.engine.name(),
            segments = layout.segments,
            blocks_per_segment = layout.blocks_per_segment,
            recovered = tier.counters.recovered_blocks.load(Ordering::Relaxed),
            "disk tier open"
        );
        Ok(tier)
    }

    async fn recover(&mut self) -> Result<(), DiskTierError> {
        let l = self.layout;
        let (sb, r) = self.engine.read(0, 0, AlignedBuf::new(ALIGN, ALIGN)).await;
        r.map_err(|source| DiskTierError::Io {
            what: "reading the superblock of",
            path: self.path.clone(),
            source,
        })?;
        let Some((bs, seg_bytes, segments, store_id)) = format::decode_super(&sb) else {
            return Err(DiskTierError::Config(format!(
                "{} holds data that is not a Strata disk tier (its first 4 KiB are neither a superblock nor zeros); use another path, or zero them to format it",
                self.path
            )));
        };
        if (bs, seg_bytes, segments) != (l.block_size, l.segment_bytes, l.segments) {
            return Err(DiskTierError::Mismatch {
                path: self.path.clone(),
                found_block: bs,
                found_segment: seg_bytes,
                found_segments: segments,
                want_block: l.block_size,
                want_segment: l.segment_bytes,
                want_segments: l.segments,
            });
        }
        self.store_id = store_id;
        // Summaries of every segment, all submitted at once.
        let futs: Vec<_> = (0..l.segments)
            .map(|s| {
                self.engine.read(
                    0,
                    l.summary_offset(s),
                    AlignedBuf::new(l.summary_bytes, ALIGN),
                )
            })
            .collect();
        // Per segment: epoch, (record index, meta) entries, whether a summary sealed it.
        type Found = (u64, Vec<(u32, RecordMeta)>, bool);
        let mut per_seg: Vec<Found> = Vec::with_capacity(l.segments);
        let mut unsealed = Vec::new();
        for (s, f) in futs.into_iter().enumerate() {
            let (buf, r) = f.await;
            let summary = r.ok().and_then(|_| {
                format::decode_summary(&buf, l.blocks_per_segment, l.block_size, &self.store_id)
            });
            match summary {
                Some((epoch, e)) => per_seg.push((epoch, e, true)),
                None => {
                    per_seg.push((0, Vec::new(), false));
                    unsealed.push(s);
                }
            }
        }
        // Segments without a summary: read every record header.
        for &s in &unsealed {
            let futs: Vec<_> = (0..l.blocks_per_segment)
                .map(|i| {
                    self.engine
                        .read(0, l.record_offset(s, i), AlignedBuf::new(ALIGN, ALIGN))
                })
                .collect();
            let mut found = Vec::new();
            for (i, f) in futs.into_iter().enumerate() {
                let (buf, r) = f.await;
                if r.is_ok()
                    && let Some(m) = format::decode_header(&buf, &self.store_id)
                    && m.len == l.block_size as u64
                {
                    found.push((i as u32, m));
                }
            }
            // Only the segment's newest generation is current; older headers are stale.
            let epoch = found.iter().map(|x| x.1.epoch).max().unwrap_or(0);
            found.retain(|x| x.1.epoch == epoch);
            per_seg[s] = (epoch, found, false);
        }
        let mut st = self.state.lock();
        let mut max_seq = 0;
        let mut max_gen = 0;
        let mut open = None::<(u64, usize)>;
        for (s, (epoch, entries, sealed)) in per_seg.into_iter().enumerate() {
            max_gen = max_gen.max(epoch);
            let seg_max_seq = entries.iter().map(|e| e.1.seq).max().unwrap_or(0);
            st.segs[s].epoch = epoch;
            st.segs[s].sealed = sealed;
            st.segs[s].full = sealed;
            // Whatever summary area a recovered segment has may hold a valid old summary
            // (even if reading it failed just now): wipe before reuse.
            st.segs[s].wiped = false;
            st.segs[s].next = if sealed {
                l.blocks_per_segment
            } else {
                entries.iter().map(|e| e.0 as usize + 1).max().unwrap_or(0)
            };
            for (idx, m) in entries {
                if (idx as usize) < l.blocks_per_segment {
                    max_seq = max_seq.max(m.seq);
                    st.new_slot(s, idx as usize, m, false);
                }
            }
            if open.is_none_or(|(q, _)| seg_max_seq > q) {
                open = Some((seg_max_seq, s));
            }
        }
        let (_, open) = open.unwrap_or((0, 0));
        // Only the newest segment takes more writes; any other unsealed one is full.
        for s in 0..l.segments {
            if s != open {
                st.segs[s].next = l.blocks_per_segment;
                st.segs[s].full = true;
            }
        }
        st.open = open;
        if st.segs[open].epoch == 0 {
            st.segs[open].epoch = max_gen + 1;
            max_gen += 1;
        }
        st.next_seq = max_seq + 1;
        st.next_gen = max_gen + 1;
        self.counters
            .recovered_blocks
            .store(st.live, Ordering::Relaxed);
        Ok(())
    }

    /// The faults switchboard (tests and the `testing` feature).
    #[cfg(any(test, feature = "testing"))]
    pub fn faults(&self) -> &fault::Faults {
        &self.faults
    }

    /// The on-disk layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Name of the I/O engine in use.
    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    /// Counters.
    pub fn metrics(&self) -> DiskMetrics {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let written = l(&c.bytes_written);
        let admitted = l(&c.admitted_bytes);
        DiskMetrics {
            engine: self.engine.name(),
            bytes_written: written,
            bytes_read: l(&c.bytes_read),
            writes: l(&c.writes),
            reads: l(&c.reads),
            queue_depth: self.engine.in_flight() as u64,
            admitted_bytes: admitted,
            rejected: l(&c.rejected),
            hits: l(&c.hits),
            misses: l(&c.misses),
            checksum_failures: l(&c.checksum_failures),
            io_errors: l(&c.io_errors),
            segments_reclaimed: l(&c.segments_reclaimed),
            blocks_reinserted: l(&c.blocks_reinserted),
            blocks_dropped: l(&c.blocks_dropped),
            recovered_blocks: l(&c.recovered_blocks),
            live_blocks: self.state.lock().live,
            write_amplification: if admitted == 0 {
                0.0
            } else {
                written as f64 / admitted as f64
            },
        }
    }

    /// Waits (up to `timeout`) for the writes in flight to complete, then asks the device to
    /// make everything written durable (`fdatasync`). For shutdown: after it, a restart
    /// finds every block whose write had completed.
    pub async fn flush(&self, timeout: Duration) -> Result<(), DiskTierError> {
        let deadline = Instant::now() + timeout;
        while self.engine.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let io_err = |source| DiskTierError::Io {
            what: "syncing",
            path: self.path.clone(),
            source,
        };
        let file = self._file.try_clone().map_err(io_err)?;
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(|e| io_err(std::io::Error::other(e)))?
            .map_err(io_err)
    }

    /// Whether a block with this key is stored (owned or not).
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.state.lock().by_key.contains_key(key)
    }

    /// Keys of every stored block (for tools and tests).
    pub fn keys(&self) -> Vec<BlockKey> {
        self.state.lock().by_key.keys().copied().collect()
    }

    fn note_io_error(&self, e: &std::io::Error, reading: bool) {
        self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
        let mut st = self.state.lock();
        if e.raw_os_error() == Some(libc::ENOSPC) {
            st.paused_until = Some(Instant::now() + self.enospc_backoff);
            if !st.enospc_episode {
                st.enospc_episode = true;
                tracing::warn!(path = %self.path, "disk tier is full (ENOSPC): admission paused, serving what is stored");
            }
        } else if !st.eio_episode {
            st.eio_episode = true;
            tracing::warn!(path = %self.path, error = %e, reading, "disk tier I/O error; affected blocks are misses");
        }
    }

    fn note_io_ok(&self, reading: bool) {
        // Cheap check first: most calls are not ending an episode.
        let mut st = self.state.lock();
        if reading && st.eio_episode {
            st.eio_episode = false;
            tracing::info!(path = %self.path, "disk tier reads work again");
        }
        if !reading && st.enospc_episode {
            st.enospc_episode = false;
            tracing::info!(path = %self.path, "disk tier writes work again; admission resumed");
        }
    }

    /// Takes a record position in the open segment, rotating to the next segment when it is
    /// full.
    async fn allocate(&self) -> Result<(usize, usize, u64, u64, WriteSlot<'_>), TierError> {
        loop {
            {
                let mut st = self.state.lock();
                let o = st.open;
                if st.segs[o].next < self.layout.blocks_per_segment {
                    let idx = st.segs[o].next;
                    st.segs[o].next += 1;
                    st.segs[o].writing += 1;
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    let epoch = st.segs[o].epoch;
                    return Ok((o, idx, epoch, seq, WriteSlot { tier: self, seg: o }));
                }
            }
            let _r = self.rotation.lock().await;
            let full = {
                let st = self.state.lock();
                st.segs[st.open].next >= self.layout.blocks_per_segment
            };
            if full {
                self.rotate().await?;
            }
        }
    }

    /// Wipes the summary of the segment after `seg` ahead of its reuse, so that rotating
    /// into it needs no I/O while writers wait. Its blocks stay readable; only a recovery
    /// before its reuse would scan its headers instead of reading a summary.
    async fn prepare_next(&self, seg: usize) {
        let l = self.layout;
        let next = (seg + 1) % l.segments;
        let issued = {
            let mut st = self.state.lock();
            if next == st.open || next == seg {
                return;
            }
            let n = &mut st.segs[next];
            if n.wiped || n.writing > 0 || n.io > 0 {
                return;
            }
            // In flight from here, under the same lock as the checks above.
            n.io += 1;
            (n.epoch, n.summaries)
        };
        let (_, r) = self
            .engine
            .write_then(
                0,
                l.summary_offset(next),
                AlignedBuf::new(l.summary_bytes, ALIGN),
                self.seg_io_done(next),
            )
            .await;
        match r {
            Ok(()) => {
                let mut st = self.state.lock();
                let n = &mut st.segs[next];
                // Reused, or given a summary, since the wipe was issued: the zeros may
                // not be what is on disk now.
                if (n.epoch, n.summaries) == issued {
                    n.wiped = true;
                }
                drop(st);
                self.counters
                    .bytes_written
                    .fetch_add(l.summary_bytes as u64, Ordering::Relaxed);
            }
            Err(e) => self.note_io_error(&e, false),
        }
    }

    /// Seals the open segment and reclaims the next one (caller holds `rotation`).
    async fn rotate(&self) -> Result<(), TierError> {
        let l = self.layout;
        let old = self.state.lock().open;
        // 1. The open segment takes no more records. Its summary is written by its last
        // writer (below, if the segment is already idle), so writers keep streaming.
        let seal_now = {
            let mut st = self.state.lock();
            let seg = &mut st.segs[old];
            seg.full = true;
            let idle = seg.writing == 0 && !seg.sealed;
            if idle {
                seg.sealed = true;
            }
            idle
        };
        if seal_now {
            self.write_summary(old).await;
        }
        // 2. The next segment must be idle before it is reused (only a ring of very few
        // segments can get here with writes still landing in it).
        let next = (old + 1) % l.segments;
        loop {
            let notified = self.writes_done.notified();
            let idle = {
                let st = self.state.lock();
                st.segs[next].writing == 0 && st.segs[next].io == 0
            };
            if idle {
                break;
            }
            notified.await;
        }
        // 3. Reclaim it: keep hot blocks (up to the budget), drop the rest.
        let keep: Vec<(u32, u32, u64)> = {
            let mut st = self.state.lock();
            // Blocks left in memory by a rotation that was cancelled midway are gone.
            let stale: Vec<u32> = st.moving.keys().copied().collect();
            for id in stale {
                if let Some(d) = st.drop_slot(id) {
                    st.dropped.push(d);
                    self.dropped_flag.store(true, Ordering::Release);
                }
            }
            let ids: Vec<u32> = st.segs[next]
                .records
                .iter()
                .copied()
                .filter(|&id| id != NONE)
                .collect();
            if !ids.is_empty() {
                self.counters
                    .segments_reclaimed
                    .fetch_add(1, Ordering::Relaxed);
            }
            let mut keep = Vec::new();
            let mut dropped = 0;
            for id in ids {
                let s = &st.slots[id as usize];
                if s.live && s.owned && s.hot && keep.len() < self.reinsert_max {
                    keep.push((id, s.epoch, l.record_offset(next, s.idx as usize)));
                } else if let Some(d) = st.drop_slot(id) {
                    st.dropped.push(d);
                    dropped += 1;
                }
            }
            if dropped > 0 {
                self.dropped_flag.store(true, Ordering::Release);
                self.counters
                    .blocks_dropped
                    .fetch_add(dropped, Ordering::Relaxed);
            }
            keep
        };
        let reads: Vec<_> = keep
            .iter()
            .map(|&(_, _, off)| {
                self.engine
                    .read(0, off, AlignedBuf::new(l.record_bytes, ALIGN))
            })
            .collect();
        let mut moving = Vec::new();
        for ((id, epoch, _), f) in keep.into_iter().zip(reads) {
            let (buf, r) = f.await;
            let mut st = self.state.lock();
            let ok = r.is_ok() && {
                let s = &st.slots[id as usize];
                s.live && s.epoch == epoch && self.verify(&buf, &s.meta)
            };
            if ok {
                self.counters
                    .bytes_read
                    .fetch_add(l.record_bytes as u64, Ordering::Relaxed);
                let buf = Arc::new(buf);
                st.moving.insert(id, buf.clone());
                moving.push((id, epoch, buf));
            } else if st.slots[id as usize].live && st.slots[id as usize].epoch == epoch {
                if let Some(d) = st.drop_slot(id) {
                    st.dropped.push(d);
                    self.dropped_flag.store(true, Ordering::Release);
                }
                self.counters.blocks_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        // 3. Wipe the next segment's summary, so an old one never describes new records
        // (usually done ahead of time by `prepare_next`).
        let wiped = self.state.lock().segs[next].wiped;
        let r = if wiped {
            Ok(())
        } else {
            self.engine
                .write(
                    0,
                    l.summary_offset(next),
                    AlignedBuf::new(l.summary_bytes, ALIGN),
                )
                .await
                .1
        };
        if let Err(e) = r {
            self.note_io_error(&e, false);
            for (id, epoch, _) in &moving {
                let mut st = self.state.lock();
                if st.slots[*id as usize].epoch == *epoch
                    && let Some(d) = st.drop_slot(*id)
                {
                    st.dropped.push(d);
                    self.dropped_flag.store(true, Ordering::Release);
                }
            }
            return Err(TierError::Io(e));
        }
        // 4. Give it a new generation and write the hot blocks back at its first records,
        // all at once, before it is published as open: new writes cannot overtake them, and
        // the indices they take are reserved.
        let (sgen, base_seq) = {
            let mut st = self.state.lock();
            let epoch = st.next_gen;
            st.next_gen += 1;
            let base_seq = st.next_seq;
            st.next_seq += moving.len() as u64;
            let seg = &mut st.segs[next];
            seg.epoch = epoch;
            seg.next = moving.len();
            seg.full = false;
            seg.sealed = false;
            seg.wiped = true;
            seg.records.iter_mut().for_each(|r| *r = NONE);
            (epoch, base_seq)
        };
        let mut writes = Vec::with_capacity(moving.len());
        for (i, (_, _, buf)) in moving.iter().enumerate() {
            let mut rec = AlignedBuf::new(l.record_bytes, ALIGN);
            rec.copy_from_slice(buf);
            let write = match format::decode_header(&rec, &self.store_id) {
                Some(mut meta) => {
                    meta.epoch = sgen;
                    meta.seq = base_seq + i as u64;
                    format::encode_header(&meta, &self.store_id, &mut rec);
                    let f =
                        self.engine
                            .write_then(0, l.record_offset(next, i), rec, self.seg_io(next));
                    Some((meta, f))
                }
                None => None,
            };
            writes.push(write);
        }
        for (i, ((id, epoch, _), w)) in moving.into_iter().zip(writes).enumerate() {
            let r = match w {
                Some((meta, f)) => f.await.1.map(|()| meta),
                None => Err(std::io::Error::other("unreadable header")),
            };
            let failed = {
                let mut st = self.state.lock();
                st.moving.remove(&id);
                let alive = st.slots[id as usize].live && st.slots[id as usize].epoch == epoch;
                match r {
                    Ok(meta) if alive => {
                        self.counters
                            .bytes_written
                            .fetch_add(l.record_bytes as u64, Ordering::Relaxed);
                        self.counters
                            .blocks_reinserted
                            .fetch_add(1, Ordering::Relaxed);
                        let s = &mut st.slots[id as usize];
                        s.seg = next as u32;
                        s.idx = i as u32;
                        s.hot = false;
                        s.meta = meta;
                        st.segs[next].records[i] = id;
                        None
                    }
                    Ok(_) => None,
                    Err(e) => {
                        if alive && let Some(d) = st.drop_slot(id) {
                            st.dropped.push(d);
                            self.dropped_flag.store(true, Ordering::Release);
                        }
                        Some(e)
                    }
                }
            };
            if let Some(e) = failed {
                self.note_io_error(&e, false);
            }
        }
        // 5. Publish it.
        self.state.lock().open = next;
        Ok(())
    }

    /// Counts a write to segment `seg` as in flight and returns what the engine runs when
    /// it is over in the kernel. A segment is reused only when none is in flight, so a
    /// write whose caller has gone cannot land in the segment's next life.
    fn seg_io(&self, seg: usize) -> io::OnDone {
        self.state.lock().segs[seg].io += 1;
        self.seg_io_done(seg)
    }

    /// What the engine runs when a write to segment `seg` already counted in its `io` is
    /// over.
    fn seg_io_done(&self, seg: usize) -> io::OnDone {
        let (state, notify) = (self.state.clone(), self.writes_done.clone());
        Box::new(move || {
            let mut st = state.lock();
            let s = &mut st.segs[seg];
            s.io -= 1;
            if s.writing == 0 && s.io == 0 {
                notify.notify_waiters();
            }
        })
    }

    /// Writes segment `seg`'s summary. The caller holds the segment's seal claim.
    async fn write_summary(&self, seg: usize) {
        let l = self.layout;
        let (epoch, entries) = {
            let mut st = self.state.lock();
            let s = &mut st.segs[seg];
            s.wiped = false;
            s.summaries += 1;
            // In flight from here: a wipe cannot start on the segment until it is over.
            s.io += 1;
            let s = &st.segs[seg];
            let entries: Vec<(u32, RecordMeta)> = s
                .records
                .iter()
                .enumerate()
                .filter(|&(_, &id)| id != NONE)
                .map(|(i, &id)| (i as u32, st.slots[id as usize].meta))
                .collect();
            (s.epoch, entries)
        };
        let mut sum = AlignedBuf::new(l.summary_bytes, ALIGN);
        format::encode_summary(epoch, &entries, &self.store_id, &mut sum);
        let (_, r) = self
            .engine
            .write_then(0, l.summary_offset(seg), sum, self.seg_io_done(seg))
            .await;
        match r {
            Ok(()) => {
                self.counters
                    .bytes_written
                    .fetch_add(l.summary_bytes as u64, Ordering::Relaxed);
            }
            // Recovery scans the headers of a segment without a summary.
            Err(e) => self.note_io_error(&e, false),
        }
    }

    fn take_buf(&self) -> AlignedBuf {
        self.pool
            .lock()
            .pop()
            .unwrap_or_else(|| AlignedBuf::new(self.layout.record_bytes, ALIGN))
    }

    fn give_buf(&self, b: AlignedBuf) {
        let pool = if b.len() == self.layout.record_bytes {
            &self.pool
        } else if b.len() == self.layout.record_bytes - ALIGN {
            &self.read_pool
        } else {
            return;
        };
        let mut p = pool.lock();
        if p.len() < self.pool_max {
            p.push(b);
        }
    }

    fn take_payload_buf(&self) -> AlignedBuf {
        self.read_pool
            .lock()
            .pop()
            .unwrap_or_else(|| AlignedBuf::new(self.layout.record_bytes - ALIGN, ALIGN))
    }

    /// Checks a record read from disk against what the index expects.
    fn verify(&self, rec: &[u8], want: &RecordMeta) -> bool {
        let Some(m) = format::decode_header(&rec[..ALIGN], &self.store_id) else {
            return false;
        };
        if m.key != want.key
            || m.epoch != want.epoch
            || m.len != want.len
            || m.checksum != want.checksum
        {
            return false;
        }
        let payload = &rec[ALIGN..ALIGN + m.len as usize];
        blake3::hash(payload).as_bytes() == &m.checksum
    }

    async fn write_block(&self, meta: &BlockMeta, data: &[u8]) -> Result<BlockHandle, TierError> {
        let l = self.layout;
        if data.len() != l.block_size {
            return Err(TierError::BufferSize {
                got: data.len(),
                expected: l.block_size,
            });
        }
        if meta.hits < self.admission_hits {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(TierError::Rejected);
        }
        {
            let mut st = self.state.lock();
            if let Some(t) = st.paused_until {
                if Instant::now() < t {
                    drop(st);
                    self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                    return Err(TierError::Rejected);
                }
                st.paused_until = None;
            }
        }
        let start = Instant::now();
        let mut rec = self.take_buf();
        rec[ALIGN..ALIGN + data.len()].copy_from_slice(data);
        // Padding after the payload carries no old bytes to the device.
        rec[ALIGN + data.len()..].fill(0);
        let checksum = *blake3::hash(data).as_bytes();
        let (seg, idx, epoch, seq, slot_guard) = self.allocate().await?;
        let rm = RecordMeta {
            key: meta.key,
            namespace: meta.namespace,
            epoch,
            seq,
            len: data.len() as u64,
            checksum,
        };
        format::encode_header(&rm, &self.store_id, &mut rec);
        let (rec, r) = self
            .engine
            .write_then(0, l.record_offset(seg, idx), rec, self.seg_io(seg))
            .await;
        self.give_buf(rec);
        match r {
            Ok(()) => {
                self.counters.writes.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .bytes_written
                    .fetch_add(l.record_bytes as u64, Ordering::Relaxed);
                self.counters
                    .admitted_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                self.write_meter.record(data.len(), start.elapsed());
                // Soft (unowned) until the handle is handed out: if this future is dropped
                // while it seals or prepares below, the block is adoptable, not orphaned.
                let (id, epoch) = {
                    let mut st = self.state.lock();
                    let id = st.new_slot(seg, idx, rm, false);
                    (id, st.slots[id as usize].epoch)
                };
                if slot_guard.finish() {
                    self.write_summary(seg).await;
                }
                if idx == l.blocks_per_segment / 2 {
                    self.prepare_next(seg).await;
                }
                if self.state.lock().enospc_episode {
                    self.note_io_ok(false);
                }
                let mut st = self.state.lock();
                let s = &mut st.slots[id as usize];
                if s.live && s.epoch == epoch && !s.owned {
                    s.owned = true;
                    Ok(handle_of(id, epoch))
                } else {
                    // Reclaimed (or adopted by key) in the meantime: not ours to hand out.
                    Err(TierError::Rejected)
                }
            }
            Err(e) => {
                if slot_guard.finish() {
                    self.write_summary(seg).await;
                }
                self.note_io_error(&e, false);
                if e.raw_os_error() == Some(libc::ENOSPC) {
                    Err(TierError::Rejected)
                } else {
                    Err(TierError::Io(e))
                }
            }
        }
    }

    async fn read_block(
        &self,
        h: BlockHandle,
        key: &BlockKey,
        out: &mut [u8],
    ) -> Result<(), TierError> {
        let l = self.layout;
        if out.len() != l.block_size {
            return Err(TierError::BufferSize {
                got: out.len(),
                expected: l.block_size,
            });
        }
        let start = Instant::now();
        // A block that a reclaim moves while we read it is read again from where it went.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (id, epoch, meta, off, mem) = {
                let mut st = self.state.lock();
                let Some(id) = st.slot(h) else {
                    drop(st);
                    self.counters.misses.fetch_add(1, Ordering::Relaxed);
                    return Err(TierError::BadHandle(h));
                };
                let s = &mut st.slots[id as usize];
                if s.meta.key != *key {
                    drop(st);
                    self.counters.misses.fetch_add(1, Ordering::Relaxed);
                    return Err(TierError::BadHandle(h));
                }
                s.hot = true;
                let (epoch, meta, off) = (
                    s.epoch,
                    s.meta,
                    l.record_offset(s.seg as usize, s.idx as usize),
                );
                (id, epoch, meta, off, st.moving.get(&id).cloned())
            };
            if let Some(buf) = mem {
                out.copy_from_slice(&buf[ALIGN..ALIGN + l.block_size]);
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            // The payload alone: the index already holds the header's facts, and a payload
            // whose blake3 matches the recorded checksum is the block's (a stale or torn
            // record at this place cannot match).
            let (buf, r) = self
                .engine
                .read(0, off + ALIGN as u64, self.take_payload_buf())
                .await;
            if let Err(e) = r {
                self.give_buf(buf);
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                self.note_io_error(&e, true);
                return Err(TierError::Io(e));
            }
            self.counters.reads.fetch_add(1, Ordering::Relaxed);
            self.counters
                .bytes_read
                .fetch_add((l.record_bytes - ALIGN) as u64, Ordering::Relaxed);
            if blake3::hash(&buf[..meta.len as usize]).as_bytes() != &meta.checksum {
                let mut st = self.state.lock();
                let s = &st.slots[id as usize];
                let same = s.live && s.epoch == epoch;
                let moved = same
                    && (st.moving.contains_key(&id)
                        || l.record_offset(s.seg as usize, s.idx as usize) != off);
                if moved && attempts < 3 {
                    drop(st);
                    self.give_buf(buf);
                    continue;
                }
                self.counters
                    .checksum_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                if same {
                    // Forget it; the caller learns from the error and frees its handle.
                    st.slots[id as usize].owned = false;
                    st.drop_slot(id);
                }
                drop(st);
                self.give_buf(buf);
                tracing::debug!(path = %self.path, key = %key, "disk block failed its checksum; dropped");
                return Err(TierError::Corrupt);
            }
            out.copy_from_slice(&buf[..l.block_size]);
            self.give_buf(buf);
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            self.read_meter.record(l.block_size, start.elapsed());
            if self.state.lock().eio_episode {
                self.note_io_ok(true);
            }
            return Ok(());
        }
    }
}

impl Tier for DiskTier {
    fn kind(&self) -> TierKind {
        TierKind::Disk
    }

    fn block_size(&self) -> usize {
        self.layout.block_size
    }

    fn capacity_blocks(&self) -> u64 {
        // One segment is always being reclaimed.
        ((self.layout.segments - 1) * self.layout.blocks_per_segment) as u64
    }

    fn write<'a>(&'a self, meta: &'a BlockMeta, data: &'a [u8]) -> TierFuture<'a, BlockHandle> {
        Box::pin(self.write_block(meta, data))
    }

    fn read<'a>(
        &'a self,
        h: BlockHandle,
        key: &'a BlockKey,
        out: &'a mut [u8],
    ) -> TierFuture<'a, ()> {
        Box::pin(self.read_block(h, key, out))
    }

    fn free(&self, h: BlockHandle) {
        let mut st = self.state.lock();
        if let Some(id) = st.slot(h) {
            st.slots[id as usize].owned = false;
            st.drop_slot(id);
        }
    }

    fn adopt(&self, key: &BlockKey) -> Option<BlockHandle> {
        let mut st = self.state.lock();
        let id = *st.by_key.get(key)?;
        let s = &mut st.slots[id as usize];
        if s.owned || !s.live {
            return None;
        }
        s.owned = true;
        Some(handle_of(id, s.epoch))
    }

    fn can_adopt(&self) -> bool {
        true
    }

    fn has_key(&self, key: &BlockKey) -> bool {
        self.contains(key)
    }

    fn set_tag(&self, h: BlockHandle, tag: u64) {
        let mut st = self.state.lock();
        if let Some(id) = st.slot(h) {
            st.slots[id as usize].tag = tag;
        }
    }

    fn take_dropped(&self) -> Vec<(BlockHandle, u64)> {
        if !self.dropped_flag.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut self.state.lock().dropped)
    }

    fn bandwidth(&self) -> Bandwidth {
        Bandwidth {
            read_bps: self.read_meter.bytes_per_sec(),
            write_bps: self.write_meter.bytes_per_sec(),
        }
    }
}
