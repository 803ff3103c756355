//! The controller: [`TieredCache`] keeps the index, the tiers and the policies that move
//! blocks between them.
//!
//! # Locking design
//!
//! All bookkeeping (the radix index, one eviction policy per tier, occupancy counters,
//! leases) sits behind one `parking_lot::RwLock`. Lookups take it shared; everything that
//! changes bookkeeping takes it exclusive for a few microseconds. **No lock is held across
//! tier I/O**: an operation decides under the lock, pins what it will touch, drops the lock,
//! does the I/O, and takes the lock again to record the outcome. Pins are what keep a block
//! alive while no lock is held:
//!
//! - a reader pins the pages it will read before releasing the lock; a pinned page is never
//!   evicted, so its handle stays valid until the [`PinGuard`] is dropped (also when the
//!   future that holds it is cancelled);
//! - a writer reserves room in a tier (the occupancy counter) under the lock, writes without
//!   it, and records the handle under it; a store into the middle of the tree pins the
//!   existing prefix so that the new pages still have their parent when they are recorded;
//! - a handle is freed (`Tier::free`, which must be cheap and never block) under the lock,
//!   in the same step that releases its occupancy, so a tier never holds more blocks than
//!   the controller has counted; only unpinned blocks are freed.
//!
//! Per-tier counters (hits, bytes, evictions) are atomics outside the lock.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::clock::{Clock, SystemClock};
use crate::error::CacheError;
use crate::eviction::{EvictionKind, EvictionPolicy};
use crate::index::{MAX_TIERS, NodeId, PageId, RadixIndex};
use crate::namespace::{BlockKey, Namespace};
use crate::tier::{BlockHandle, BlockMeta, Tier, TierError, TierId, TierKind};

/// When blocks are copied down to slower tiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePolicy {
    /// Copy every new block to every lower tier as part of the store.
    WriteThrough,
    /// Copy a block down once it has been used `hits` times.
    WriteThroughSelective {
        /// Uses before the copy.
        hits: u32,
    },
    /// Copy a block down only when it is evicted from its last tier above.
    WriteBack,
}

impl Default for WritePolicy {
    fn default() -> Self {
        WritePolicy::WriteThroughSelective { hits: 2 }
    }
}

/// One tier of a cache and how much of it the cache may use.
pub struct TierSpec {
    /// The storage.
    pub tier: Arc<dyn Tier>,
    /// Bytes of the tier the cache may fill; at least one block, at most the tier's size.
    pub capacity_bytes: u64,
    /// Eviction order for this tier.
    pub eviction: EvictionKind,
}

/// Cache-wide settings.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Tokens per page; every namespace of this cache uses it.
    pub page_size: u32,
    /// Copy-down policy.
    pub write_policy: WritePolicy,
    /// New blocks are stored in this tier first (usually 0).
    pub insert_tier: TierId,
    /// Most tokens one call may carry.
    pub max_tokens_per_call: usize,
    /// Longest lease a caller may ask for.
    pub max_lease: Duration,
    /// Events buffered per subscriber before the oldest are dropped.
    pub event_buffer: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            page_size: 64,
            write_policy: WritePolicy::default(),
            insert_tier: TierId(0),
            max_tokens_per_call: 1 << 20,
            max_lease: Duration::from_secs(600),
            event_buffer: 4096,
        }
    }
}

/// How a prefetch decides it is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefetchPolicy {
    /// Use whatever has arrived when [`PrefetchTicket::finish`] is called; the rest stops.
    BestEffort,
    /// [`PrefetchTicket::finish`] waits until every page has arrived.
    WaitComplete,
    /// Stop copying at a deadline of `base + per_page × pages` after the start.
    Timeout {
        /// Fixed part of the deadline.
        base: Duration,
        /// Part that grows with the prefix length.
        per_page: Duration,
    },
}

/// A registered namespace, as calls name it.
#[derive(Clone, Debug)]
pub struct NamespaceHandle {
    ns: Arc<Namespace>,
    root_key: BlockKey,
    root: NodeId,
}

impl NamespaceHandle {
    /// The namespace.
    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// Its root key (the namespace id).
    pub fn id(&self) -> BlockKey {
        self.root_key
    }
}

/// What a lookup found.
#[derive(Clone, Debug, PartialEq)]
pub struct LookupResult {
    /// Whole pages of the request that the cache holds, from the start.
    pub matched_pages: usize,
    /// Pages of the request (whole pages only).
    pub requested_pages: usize,
    /// For each tier, how many of the matched pages it holds.
    pub resident: Vec<u32>,
    /// Estimated time to read the matched pages from the fastest tiers holding them, from
    /// measured bandwidth; `None` until every tier involved has been measured.
    pub estimated_load: Option<Duration>,
}

/// What a store did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InsertReport {
    /// Pages in the request.
    pub pages: usize,
    /// Pages that were already cached.
    pub existing: usize,
    /// Pages written by this call.
    pub stored: usize,
}

/// What a read returned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadReport {
    /// Pages matched when the read started.
    pub matched: usize,
    /// Leading pages whose bytes were delivered.
    pub read: usize,
    /// For each tier, how many pages were read from it.
    pub from_tier: Vec<u32>,
}

/// Counters of one tier.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TierStats {
    /// Kind of storage.
    pub kind: Option<TierKind>,
    /// Matched pages this tier held, counted at lookup.
    pub hits: u64,
    /// Requested pages this tier did not hold, counted at lookup.
    pub misses: u64,
    /// Bytes written into the tier.
    pub bytes_in: u64,
    /// Bytes read from the tier.
    pub bytes_out: u64,
    /// Pages evicted from the tier.
    pub evictions: u64,
    /// Pages copied from this tier to the next one down on eviction.
    pub demotions: u64,
    /// Reads that failed (corrupt or I/O error); each is a miss.
    pub read_errors: u64,
    /// Bytes resident now.
    pub resident_bytes: u64,
    /// Bytes pinned or leased now.
    pub pinned_bytes: u64,
    /// Bytes the cache may fill.
    pub capacity_bytes: u64,
}

/// Counters of the whole cache.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Per tier, fastest first.
    pub tiers: Vec<TierStats>,
    /// Lookups served.
    pub lookups: u64,
    /// Pages in the tree.
    pub pages: u64,
    /// Tree nodes, roots included.
    pub nodes: u64,
    /// Leases held.
    pub leases: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    evictions: AtomicU64,
    demotions: AtomicU64,
    read_errors: AtomicU64,
}

struct Lease {
    pages: Vec<PageId>,
    deadline: u64,
}

struct State {
    /// The tiers, so that a handle is freed under the lock in the same step that releases
    /// its occupancy (a tier never holds more blocks than the controller counts).
    tier_refs: Vec<Arc<dyn Tier>>,
    index: RadixIndex,
    policies: Vec<Box<dyn EvictionPolicy>>,
    /// Resident plus reserved blocks per tier.
    occupancy: Vec<u64>,
    /// Resident pages with at least one pin, per tier.
    pinned: Vec<u64>,
    leases: HashMap<u64, Lease>,
    lease_deadlines: BinaryHeap<Reverse<(u64, u64)>>,
    next_lease: u64,
    namespaces: HashMap<BlockKey, NamespaceHandle>,
    /// Pages that reached the selective write-through threshold.
    copy_down: Vec<(PageId, BlockKey)>,
    events: tokio::sync::broadcast::Sender<CacheEvent>,
    /// Quota groups (tenants): their namespaces, blocks per tier and quotas.
    groups: Groups,
}

/// Quota groups: namespaces are put in a group ([`TieredCache::set_group`]); the cache
/// counts each group's blocks per tier and keeps a group with a quota in a tier within it
/// by evicting that group's own blocks, never another group's.
#[derive(Default)]
struct Groups {
    of_root: HashMap<BlockKey, u32>,
    blocks: HashMap<u32, Vec<u64>>,
    quota: HashMap<(u32, u8), u64>,
    /// Room reserved for a group's blocks still being written, per (group, tier) with a
    /// quota: counted with its blocks, so concurrent or batched writes cannot pass it.
    pending: HashMap<(u32, u8), Arc<std::sync::atomic::AtomicU64>>,
}

/// Room reserved in a tier for one block of a quota group, counted against the group's
/// quota until the block is recorded (or the write is given up).
struct GroupHold(Arc<std::sync::atomic::AtomicU64>);

impl Drop for GroupHold {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A block became resident in, or left, a tier. Subscribe with [`TieredCache::subscribe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheEvent {
    /// Stored or removed.
    pub kind: EventKind,
    /// The tier.
    pub tier: TierId,
    /// The namespace id (root key).
    pub namespace: BlockKey,
    /// The block.
    pub key: BlockKey,
}

/// What happened to a block in a tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// It is now readable from the tier.
    Stored,
    /// It left the tier.
    Removed,
}

struct TierSlot {
    tier: Arc<dyn Tier>,
    cap_blocks: u64,
    counters: Counters,
}

struct Inner {
    state: RwLock<State>,
    tiers: Vec<TierSlot>,
    config: CacheConfig,
    block_bytes: usize,
    clock: Arc<dyn Clock>,
    lookups: AtomicU64,
    /// Some tier can find blocks by key that the index does not know.
    adopting: bool,
    /// Signalled whenever a copy between tiers ends.
    copies_done: tokio::sync::Notify,
}

/// The tiered KV-block cache. Cheap to clone; every clone is the same cache.
#[derive(Clone)]
pub struct TieredCache {
    inner: Arc<Inner>,
}

/// What to do with a victim.
enum Victim {
    Dropped,
    Demote {
        page: PageId,
        key: BlockKey,
        handle: BlockHandle,
    },
}

impl State {
    fn pin_page(&mut self, p: PageId) {
        if self.index.pin(p) == 1 {
            let r = self.index.page(p).resident;
            for (t, c) in self.pinned.iter_mut().enumerate() {
                *c += u64::from(r >> t & 1);
            }
        }
    }

    fn unpin_page(&mut self, p: PageId) {
        if self.index.unpin(p) == 0 {
            let r = self.index.page(p).resident;
            for (t, c) in self.pinned.iter_mut().enumerate() {
                *c -= u64::from(r >> t & 1);
            }
        }
    }

    fn emit(&self, kind: EventKind, p: PageId, t: TierId) {
        if self.events.receiver_count() == 0 {
            return;
        }
        if let Some(namespace) = self.index.namespace_of(p) {
            // A lagging subscriber loses old events; it is told so by its receiver.
            let _ = self.events.send(CacheEvent {
                kind,
                tier: t,
                namespace,
                key: self.index.page(p).key,
            });
        }
    }

    /// Records a use of `p` in the policy of every tier that holds it.
    fn touch_policies(&mut self, p: PageId) {
        let resident = self.index.page(p).resident;
        for (t, policy) in self.policies.iter_mut().enumerate() {
            if resident >> t & 1 == 1 {
                policy.touch(p);
            }
        }
    }

    /// Whether `ns` names a namespace registered with this cache.
    fn check_ns(&self, ns: &NamespaceHandle) -> Result<(), CacheError> {
        match self.namespaces.get(&ns.root_key) {
            Some(h) if h.root == ns.root => Ok(()),
            _ => Err(CacheError::UnknownNamespace(ns.root_key.to_hex())),
        }
    }

    /// The quota group of page `p`'s namespace, if it has one.
    fn group_of(&self, p: PageId) -> Option<u32> {
        if self.groups.of_root.is_empty() {
            return None;
        }
        let ns = self.index.namespace_of(p)?;
        self.groups.of_root.get(&ns).copied()
    }

    fn count_group(&mut self, p: PageId, t: TierId, up: bool) {
        if let Some(g) = self.group_of(p) {
            let n = self.tier_refs.len();
            let v = self.groups.blocks.entry(g).or_insert_with(|| vec![0; n]);
            let c = &mut v[t.0 as usize];
            *c = if up { *c + 1 } else { c.saturating_sub(1) };
        }
    }

    /// Whether group `g` holds its quota of blocks in tier `t` (or more).
    fn group_at_quota(&self, g: u32, t: TierId) -> Option<u64> {
        let q = *self.groups.quota.get(&(g, t.0))?;
        let held = self.groups.blocks.get(&g).map_or(0, |v| v[t.0 as usize]);
        let pending = self
            .groups
            .pending
            .get(&(g, t.0))
            .map_or(0, |p| p.load(Ordering::Acquire));
        (held + pending >= q).then_some(q)
    }

    /// Counts one block being written for group `g` in tier `t`, if it has a quota there.
    fn hold_for_group(&mut self, g: Option<u32>, t: TierId) -> Option<GroupHold> {
        let g = g?;
        if !self.groups.quota.contains_key(&(g, t.0)) {
            return None;
        }
        let p = self.groups.pending.entry((g, t.0)).or_default().clone();
        p.fetch_add(1, Ordering::AcqRel);
        Some(GroupHold(p))
    }

    fn make_resident(&mut self, p: PageId, t: TierId, h: BlockHandle) {
        self.count_group(p, t, true);
        self.emit(EventKind::Stored, p, t);
        self.tier_refs[t.0 as usize].set_tag(h, u64::from(p.0));
        self.index.set_resident(p, t, h);
        self.policies[t.0 as usize].insert(p);
        if self.index.page(p).pins > 0 {
            self.pinned[t.0 as usize] += 1;
        }
    }

    /// Gives a block back to its tier and releases its occupancy.
    fn free_block(&mut self, t: TierId, h: BlockHandle) {
        self.tier_refs[t.0 as usize].free(h);
        self.occupancy[t.0 as usize] -= 1;
    }

    /// Releases a reservation whose write did not happen.
    fn unreserve(&mut self, t: TierId) {
        self.occupancy[t.0 as usize] -= 1;
    }

    /// Clears residency in `t` and frees the block. Removes the page from the tree if it
    /// is resident nowhere else and is an unpinned leaf. Returns whether it was resident.
    fn drop_resident(&mut self, p: PageId, t: TierId) -> bool {
        self.clear_copy(p, t, true)
    }

    /// Like `drop_resident` for a block the tier has already dropped: its handle is not
    /// given back (it may already name another block).
    fn forget_resident(&mut self, p: PageId, t: TierId) -> bool {
        self.clear_copy(p, t, false)
    }

    fn clear_copy(&mut self, p: PageId, t: TierId, free: bool) -> bool {
        if self.index.handle(p, t).is_none() {
            return false;
        }
        self.count_group(p, t, false);
        let Some(h) = self.index.clear_resident(p, t) else {
            return false;
        };
        self.emit(EventKind::Removed, p, t);
        self.policies[t.0 as usize].remove(p);
        if free {
            self.free_block(t, h);
        } else {
            self.unreserve(t);
        }
        let info = self.index.page(p);
        if info.pins > 0 {
            self.pinned[t.0 as usize] -= 1;
        }
        if info.resident == 0 && info.pins == 0 && self.index.is_leaf(p) {
            self.index.remove_leaf(p);
        }
        true
    }

    /// Work done at every exclusive acquisition: expired leases end, and blocks that tiers
    /// dropped on their own leave the index.
    fn housekeeping(&mut self, now: u64) {
        self.expire_leases(now);
        for t in 0..self.tier_refs.len() {
            let dropped = self.tier_refs[t].take_dropped();
            for (h, tag) in dropped {
                let Ok(p) = u32::try_from(tag).map(PageId) else {
                    continue;
                };
                if self.index.is_live(p) && self.index.handle(p, TierId(t as u8)) == Some(h) {
                    self.forget_resident(p, TierId(t as u8));
                }
            }
        }
    }

    fn expire_leases(&mut self, now: u64) {
        while let Some(&Reverse((deadline, id))) = self.lease_deadlines.peek() {
            if deadline > now {
                break;
            }
            self.lease_deadlines.pop();
            if let Some(l) = self.leases.get(&id)
                && l.deadline <= now
                && let Some(l) = self.leases.remove(&id)
            {
                self.release_pages(&l.pages);
            }
        }
    }

    /// Unpins pages, then removes any that became unpinned, resident-nowhere leaves
    /// (possible after a failed store).
    fn release_pages(&mut self, pages: &[PageId]) {
        for &p in pages.iter().rev() {
            self.unpin_page(p);
            let info = self.index.page(p);
            if info.pins == 0
                && info.resident == 0
                && self.index.is_live(p)
                && self.index.is_leaf(p)
            {
                self.index.remove_leaf(p);
            }
        }
    }
}

impl TieredCache {
    /// A cache over `tiers` (fastest first) using the real clock.
    pub fn new(tiers: Vec<TierSpec>, config: CacheConfig) -> Result<Self, CacheError> {
        Self::with_clock(tiers, config, Arc::new(SystemClock::new()))
    }

    /// A cache with an injected clock (tests move time by hand).
    pub fn with_clock(
        tiers: Vec<TierSpec>,
        config: CacheConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, CacheError> {
        if tiers.is_empty() || tiers.len() > MAX_TIERS {
            return Err(CacheError::InvalidConfig(format!(
                "a cache needs 1..={MAX_TIERS} tiers, got {}",
                tiers.len()
            )));
        }
        if !(crate::namespace::MIN_PAGE_SIZE..=crate::namespace::MAX_PAGE_SIZE)
            .contains(&config.page_size)
        {
            return Err(CacheError::InvalidConfig(format!(
                "page size {} is outside {}..={}",
                config.page_size,
                crate::namespace::MIN_PAGE_SIZE,
                crate::namespace::MAX_PAGE_SIZE
            )));
        }
        if config.insert_tier.0 as usize >= tiers.len() {
            return Err(CacheError::UnknownTier(config.insert_tier));
        }
        if config.max_tokens_per_call < config.page_size as usize {
            return Err(CacheError::InvalidConfig(
                "max_tokens_per_call is smaller than one page".into(),
            ));
        }
        if let WritePolicy::WriteThroughSelective { hits: 0 } = config.write_policy {
            return Err(CacheError::InvalidConfig(
                "write-through-selective needs a hit threshold of at least 1".into(),
            ));
        }
        let block_bytes = tiers[0].tier.block_size();
        let mut slots = Vec::with_capacity(tiers.len());
        for (i, spec) in tiers.into_iter().enumerate() {
            let id = TierId(i as u8);
            let bs = spec.tier.block_size();
            if bs != block_bytes || bs == 0 {
                return Err(CacheError::InvalidConfig(format!(
                    "tier {id} stores {bs} byte blocks, tier 0 stores {block_bytes}"
                )));
            }
            let cap_blocks = spec.capacity_bytes / bs as u64;
            if cap_blocks == 0 {
                return Err(CacheError::InvalidConfig(format!(
                    "tier {id}: capacity of {} bytes holds no {bs} byte block",
                    spec.capacity_bytes
                )));
            }
            if cap_blocks > spec.tier.capacity_blocks() {
                return Err(CacheError::InvalidConfig(format!(
                    "tier {id}: capacity of {} bytes exceeds the tier's {} blocks",
                    spec.capacity_bytes,
                    spec.tier.capacity_blocks()
                )));
            }
            if cap_blocks >= u64::from(u32::MAX) {
                return Err(CacheError::InvalidConfig(format!(
                    "tier {id}: {cap_blocks} blocks is more than the index can address"
                )));
            }
            slots.push((
                TierSlot {
                    tier: spec.tier,
                    cap_blocks,
                    counters: Counters::default(),
                },
                spec.eviction.build(),
            ));
        }
        let n = slots.len();
        let (tiers, policies): (Vec<_>, Vec<_>) = slots.into_iter().unzip();
        let state = State {
            tier_refs: tiers.iter().map(|s: &TierSlot| s.tier.clone()).collect(),
            index: RadixIndex::new(config.page_size as usize, n)?,
            policies,
            occupancy: vec![0; n],
            pinned: vec![0; n],
            leases: HashMap::new(),
            lease_deadlines: BinaryHeap::new(),
            next_lease: 1,
            namespaces: HashMap::new(),
            copy_down: Vec::new(),
            events: tokio::sync::broadcast::channel(config.event_buffer.max(1)).0,
            groups: Groups::default(),
        };
        let adopting = tiers.iter().any(|t| t.tier.can_adopt());
        Ok(TieredCache {
            inner: Arc::new(Inner {
                state: RwLock::new(state),
                tiers,
                config,
                block_bytes,
                clock,
                lookups: AtomicU64::new(0),
                adopting,
                copies_done: tokio::sync::Notify::new(),
            }),
        })
    }

    /// Block size of every tier.
    pub fn block_bytes(&self) -> usize {
        self.inner.block_bytes
    }

    /// Number of tiers.
    pub fn tier_count(&self) -> usize {
        self.inner.tiers.len()
    }

    /// The configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// Registers a namespace (idempotent) and returns the handle calls name it by.
    pub fn register(&self, ns: &Namespace) -> Result<NamespaceHandle, CacheError> {
        if ns.page_size() != self.inner.config.page_size {
            return Err(CacheError::InvalidNamespace(format!(
                "namespace page size {} differs from the cache's {}",
                ns.page_size(),
                self.inner.config.page_size
            )));
        }
        if ns.block_bytes() != self.inner.block_bytes {
            return Err(CacheError::NamespaceMismatch {
                namespace: ns.block_bytes(),
                tier: TierId(0),
                tier_block: self.inner.block_bytes,
            });
        }
        let root_key = ns.root_key();
        let mut st = self.inner.state.write();
        if let Some(h) = st.namespaces.get(&root_key) {
            return Ok(h.clone());
        }
        let root = st.index.root(root_key)?;
        let h = NamespaceHandle {
            ns: Arc::new(ns.clone()),
            root_key,
            root,
        };
        st.namespaces.insert(root_key, h.clone());
        Ok(h)
    }

    /// Puts namespace `ns` in quota group `group` (a tenant): its blocks count toward the
    /// group's usage ([`TieredCache::group_blocks`]) and quotas
    /// ([`TieredCache::set_group_quota`]). Blocks stored before the call are counted from
    /// then on as they come and go.
    pub fn set_group(&self, ns: &NamespaceHandle, group: u32) {
        let mut st = self.inner.state.write();
        st.groups.of_root.insert(ns.root_key, group);
    }

    /// Sets (or with `None` removes) the most blocks group `group` may hold in tier `t`.
    /// At its quota, a block the group stores there first evicts the group's own least
    /// recently used block; if none can leave, the store fails with
    /// [`CacheError::QuotaFull`]. Other groups' blocks are never evicted to make room for
    /// a group at its quota.
    pub fn set_group_quota(&self, group: u32, t: TierId, blocks: Option<u64>) {
        let mut st = self.inner.state.write();
        match blocks {
            Some(b) => st.groups.quota.insert((group, t.0), b),
            None => st.groups.quota.remove(&(group, t.0)),
        };
    }

    /// Blocks of group `group` per tier.
    pub fn group_blocks(&self, group: u32) -> Vec<u64> {
        let st = self.inner.state.read();
        st.groups
            .blocks
            .get(&group)
            .cloned()
            .unwrap_or_else(|| vec![0; st.tier_refs.len()])
    }

    /// The handle of a registered namespace, by id.
    pub fn namespace(&self, id: &BlockKey) -> Option<NamespaceHandle> {
        self.inner.state.read().namespaces.get(id).cloned()
    }

    fn check_handle(&self, ns: &NamespaceHandle) -> Result<(), CacheError> {
        self.inner.state.read().check_ns(ns)
    }

    fn check_tokens(&self, tokens: &[u32], whole: bool) -> Result<(), CacheError> {
        let limit = self.inner.config.max_tokens_per_call;
        if tokens.len() > limit {
            return Err(CacheError::TooManyTokens {
                tokens: tokens.len(),
                limit,
            });
        }
        let ps = self.inner.config.page_size;
        if whole && !tokens.len().is_multiple_of(ps as usize) {
            return Err(CacheError::PartialPage {
                tokens: tokens.len(),
                page_size: ps,
            });
        }
        Ok(())
    }

    fn tier(&self, t: TierId) -> Result<&TierSlot, CacheError> {
        self.inner
            .tiers
            .get(t.0 as usize)
            .ok_or(CacheError::UnknownTier(t))
    }

    fn now(&self) -> u64 {
        self.inner.clock.now_nanos()
    }

    /// Extends the tree with pages that tiers able to find blocks by key hold but the index
    /// does not know (a disk tier after a restart): for each page past the match, in order,
    /// the first such tier with room that has its key adopts it. Stops at the first page
    /// no tier has. Hashes only the pages past the match, and only when such a tier exists.
    fn adopt_suffix(&self, ns: &NamespaceHandle, tokens: &[u32]) {
        if !self.inner.adopting {
            return;
        }
        let ps = self.inner.config.page_size as usize;
        let whole = tokens.len() / ps;
        // Under the shared lock: is the next page's key in any such tier at all? Most
        // misses end here, without the exclusive lock.
        {
            let st = self.inner.state.read();
            let m = st.index.match_prefix(ns.root, tokens);
            if m.pages == whole {
                return;
            }
            let prev = match st.index.path(m.end).last() {
                Some(&p) => st.index.page(p).key,
                None => ns.root_key,
            };
            let key = prev.chain(&tokens[m.pages * ps..(m.pages + 1) * ps]);
            if !self
                .inner
                .tiers
                .iter()
                .any(|s| s.tier.can_adopt() && s.tier.has_key(&key))
            {
                return;
            }
        }
        let now = self.now();
        let mut st = self.inner.state.write();
        st.housekeeping(now);
        let m = st.index.match_prefix(ns.root, tokens);
        let mut prev = match st.index.path(m.end).last() {
            Some(&p) => st.index.page(p).key,
            None => ns.root_key,
        };
        let mut found: Vec<(TierId, BlockHandle)> = Vec::new();
        for page in m.pages..whole {
            let key = prev.chain(&tokens[page * ps..(page + 1) * ps]);
            let mut hit = None;
            for (t, slot) in self.inner.tiers.iter().enumerate() {
                if !slot.tier.can_adopt() || st.occupancy[t] >= slot.cap_blocks {
                    continue;
                }
                if let Some(h) = slot.tier.adopt(&key) {
                    st.occupancy[t] += 1;
                    hit = Some((TierId(t as u8), h));
                    break;
                }
            }
            let Some(hit) = hit else { break };
            found.push(hit);
            prev = key;
        }
        if found.is_empty() {
            return;
        }
        let end = m.pages + found.len();
        match st
            .index
            .insert(ns.root, ns.root_key, &tokens[..end * ps], now)
        {
            Ok(ins) => {
                for (i, (t, h)) in found.into_iter().enumerate() {
                    let pos = m.pages + i;
                    let p = ins.pages[pos];
                    if pos < ins.first_new && st.index.page(p).resident & (1 << t.0) != 0 {
                        st.free_block(t, h);
                    } else if st.index.handle(p, t).is_none() {
                        st.make_resident(p, t, h);
                    } else {
                        st.free_block(t, h);
                    }
                }
            }
            Err(_) => {
                for (t, h) in found {
                    st.free_block(t, h);
                }
            }
        }
    }

    /// Longest cached prefix of `tokens` (a trailing partial page is ignored), with how many
    /// of its pages each tier holds. Takes the lock shared and changes nothing but counters,
    /// except that blocks a disk or remote tier holds beyond the match join the index.
    pub fn lookup(&self, ns: &NamespaceHandle, tokens: &[u32]) -> Result<LookupResult, CacheError> {
        self.check_tokens(tokens, false)?;
        if self.inner.adopting {
            self.check_handle(ns)?;
            self.adopt_suffix(ns, tokens);
        }
        let m = {
            let st = self.inner.state.read();
            st.check_ns(ns)?;
            st.index.match_prefix(ns.root, tokens)
        };
        let requested = tokens.len() / self.inner.config.page_size as usize;
        Ok(self.lookup_result(m.pages, requested, &m.resident))
    }

    /// Like [`TieredCache::lookup`], by block keys instead of tokens: how many of `keys`,
    /// in order, are cached in this namespace as one chain (each page the child of the one
    /// before). For routers and engines that hash pages themselves. A key of another
    /// namespace never matches.
    pub fn lookup_keys(
        &self,
        ns: &NamespaceHandle,
        keys: &[BlockKey],
    ) -> Result<LookupResult, CacheError> {
        let limit = self.inner.config.max_tokens_per_call / self.inner.config.page_size as usize;
        if keys.len() > limit {
            return Err(CacheError::TooManyTokens {
                tokens: keys.len() * self.inner.config.page_size as usize,
                limit: self.inner.config.max_tokens_per_call,
            });
        }
        let mut resident = [0u32; crate::index::MAX_TIERS];
        let mut matched = 0;
        {
            let st = self.inner.state.read();
            st.check_ns(ns)?;
            let mut prev: Option<PageId> = None;
            for key in keys {
                let Some(p) = st.index.find_key(key) else {
                    break;
                };
                if st.index.parent_page(p) != prev
                    || (prev.is_none() && st.index.namespace_of(p) != Some(ns.root_key))
                {
                    break;
                }
                let r = st.index.page(p).resident;
                if r == 0 {
                    break;
                }
                for (t, c) in resident.iter_mut().enumerate() {
                    *c += u32::from(r >> t & 1);
                }
                matched += 1;
                prev = Some(p);
            }
        }
        Ok(self.lookup_result(matched, keys.len(), &resident))
    }

    /// Counts a lookup and estimates its load time (pages come from the fastest tier that
    /// holds them).
    fn lookup_result(
        &self,
        matched: usize,
        requested: usize,
        resident: &[u32; crate::index::MAX_TIERS],
    ) -> LookupResult {
        self.inner.lookups.fetch_add(1, Ordering::Relaxed);
        let n = self.inner.tiers.len();
        let mut est = Some(Duration::ZERO);
        let mut remaining = matched as u64;
        for (t, slot) in self.inner.tiers.iter().enumerate() {
            let have = u64::from(resident[t]);
            slot.counters.hits.fetch_add(have, Ordering::Relaxed);
            slot.counters
                .misses
                .fetch_add((requested as u64).saturating_sub(have), Ordering::Relaxed);
            let take = have.min(remaining);
            remaining -= take;
            if take > 0 {
                est = match (est, slot.tier.bandwidth().read_bps) {
                    (Some(e), Some(bps)) => Some(
                        e + Duration::from_secs_f64(
                            take as f64 * self.inner.block_bytes as f64 / bps,
                        ),
                    ),
                    _ => None,
                };
            }
        }
        LookupResult {
            matched_pages: matched,
            requested_pages: requested,
            resident: resident[..n].to_vec(),
            estimated_load: est,
        }
    }

    /// Stores the pages of `tokens` (a whole number of pages) with their blocks, one per
    /// page. Pages already cached are left as they are, and their blocks may be given
    /// empty (so a caller extending a long prefix need not send it again); an empty block
    /// for a page that is not cached is [`CacheError::MissingBlock`]. New blocks go to the insert tier,
    /// evicting as needed, and, with write-through, to every lower tier too.
    ///
    /// Pages are written in batches that fit the tier and recorded after each batch, so a
    /// prefix longer than the tier can still be stored when older pages can move down. If
    /// the tier fills with pages that cannot leave, the call stores the leading pages that
    /// fit and reports how many; it fails only when it stored none.
    pub async fn insert(
        &self,
        ns: &NamespaceHandle,
        tokens: &[u32],
        blocks: &[&[u8]],
    ) -> Result<InsertReport, CacheError> {
        self.check_tokens(tokens, true)?;
        let ps = self.inner.config.page_size as usize;
        let pages = tokens.len() / ps;
        if blocks.len() != pages {
            return Err(CacheError::BlockCount {
                pages,
                blocks: blocks.len(),
            });
        }
        for (i, b) in blocks.iter().enumerate() {
            if !b.is_empty() && b.len() != self.inner.block_bytes {
                return Err(CacheError::BlockSize {
                    index: i,
                    got: b.len(),
                    expected: self.inner.block_bytes,
                });
            }
        }
        self.check_handle(ns)?;
        self.adopt_suffix(ns, tokens);
        let group = self
            .inner
            .state
            .read()
            .groups
            .of_root
            .get(&ns.root_key)
            .copied();
        let t = self.inner.config.insert_tier;
        let slot = self.tier(t)?;
        // The existing prefix; its last page is pinned so that new pages keep a parent.
        let (existing, mut tail, mut prev_key) = {
            let now = self.now();
            let mut st = self.inner.state.write();
            st.housekeeping(now);
            let m = st.index.match_prefix(ns.root, tokens);
            let path = st.index.path(m.end);
            for &p in path.iter().rev() {
                st.touch_policies(p);
            }
            let last = path.last().copied();
            if let Some(p) = last {
                st.pin_page(p);
            }
            let key = last.map(|p| st.index.page(p).key).unwrap_or(ns.root_key);
            (
                path.len(),
                PinGuard {
                    cache: self.clone(),
                    pages: last.into_iter().collect(),
                },
                key,
            )
        };
        if let Some(i) = blocks[existing..].iter().position(|b| b.is_empty()) {
            return Err(CacheError::MissingBlock {
                index: existing + i,
            });
        }
        let batch_max = (slot.cap_blocks as usize / 2).clamp(1, 32);
        let mut done = existing;
        let mut stored = 0;
        let mut failure = None;
        while done < pages && failure.is_none() {
            let end = (done + batch_max).min(pages);
            // Write a batch without the lock.
            let mut staging = Staging::new(self, t);
            // Quota room of the batch's blocks, held until they are recorded.
            let mut holds = Vec::new();
            let mut keys = Vec::with_capacity(end - done);
            for i in done..end {
                let key = prev_key.chain(&tokens[i * ps..(i + 1) * ps]);
                match self.reserve(t, group).await {
                    Ok(h) => holds.extend(h),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
                staging.reserved += 1;
                let meta = BlockMeta {
                    key,
                    namespace: ns.root_key,
                    hits: 0,
                };
                match slot.tier.write(&meta, blocks[i]).await {
                    Ok(h) => {
                        slot.counters
                            .bytes_in
                            .fetch_add(self.inner.block_bytes as u64, Ordering::Relaxed);
                        staging.reserved -= 1;
                        staging.written.push(h);
                        keys.push(key);
                        prev_key = key;
                    }
                    Err(e) => {
                        failure = Some(CacheError::Tier { tier: t, source: e });
                        break;
                    }
                }
            }
            if staging.written.is_empty() {
                break;
            }
            let handles = std::mem::take(&mut staging.written);
            let written = done + handles.len();
            // Record it. Another caller may have stored some of the same pages meanwhile;
            // a lost page (resident nowhere) takes our copy.
            let mut new_pages = Vec::with_capacity(handles.len());
            {
                let now = self.now();
                let mut st = self.inner.state.write();
                // The page the batch hangs from lost its last copy meanwhile (a tier
                // dropped it): pages below it could never be found, so stop here.
                if let Some(&parent) = tail.pages.first()
                    && st.index.page(parent).resident == 0
                {
                    for h in handles {
                        st.free_block(t, h);
                    }
                    break;
                }
                let ins = match st
                    .index
                    .insert(ns.root, ns.root_key, &tokens[..written * ps], now)
                {
                    Ok(ins) => ins,
                    Err(e) => {
                        for h in handles {
                            st.free_block(t, h);
                        }
                        return Err(e);
                    }
                };
                for (i, &h) in handles.iter().enumerate() {
                    let pos = done + i;
                    let p = ins.pages[pos];
                    if pos < ins.first_new && st.index.page(p).resident != 0 {
                        st.free_block(t, h);
                    } else {
                        st.make_resident(p, t, h);
                        new_pages.push((p, pos));
                    }
                }
                for &(p, _) in new_pages.iter().rev() {
                    st.policies[t.0 as usize].touch(p);
                }
                // Hold the new tail (and, for the copies below, the new pages).
                for &(p, _) in &new_pages {
                    st.pin_page(p);
                }
                let last = ins.pages[written - 1];
                st.pin_page(last);
                drop(st);
                tail = PinGuard {
                    cache: self.clone(),
                    pages: vec![last],
                };
            }
            let batch_guard = PinGuard {
                cache: self.clone(),
                pages: new_pages.iter().map(|&(p, _)| p).collect(),
            };
            // Write-through: copy the batch to every lower tier from the caller's bytes.
            if self.inner.config.write_policy == WritePolicy::WriteThrough {
                'lower: for lower in (t.0 as usize + 1)..self.inner.tiers.len() {
                    for &(p, pos) in &new_pages {
                        if self
                            .copy_into(p, TierId(lower as u8), blocks[pos])
                            .await
                            .is_err()
                        {
                            break 'lower;
                        }
                    }
                }
            }
            drop(batch_guard);
            stored += new_pages.len();
            done = written;
        }
        if stored > 0
            && let Some(&last) = tail.pages.first()
        {
            let mut st = self.inner.state.write();
            st.index.compact_node_of(last);
            // Batches were touched as they landed; touch the whole prefix once more,
            // deepest first, so ancestors are again at least as recent as descendants.
            let m = st.index.match_prefix(ns.root, &tokens[..done * ps]);
            for p in st.index.path(m.end).into_iter().rev() {
                st.touch_policies(p);
            }
        }
        drop(tail);
        self.run_copy_down().await;
        match failure {
            Some(e) if stored == 0 && done < pages => Err(e),
            _ => Ok(InsertReport {
                pages,
                existing,
                stored,
            }),
        }
    }

    /// Writes `data` (the bytes of page `p`, which the caller keeps pinned) into tier `t`
    /// and records it there. A no-op if the page is already there or on its way.
    async fn copy_into(&self, p: PageId, t: TierId, data: &[u8]) -> Result<(), CacheError> {
        let (meta, group) = {
            let mut st = self.inner.state.write();
            debug_assert!(!st.index.is_live(p) || st.index.page(p).pins > 0);
            if !st.index.is_live(p) || st.index.handle(p, t).is_some() || st.index.is_pending(p, t)
            {
                return Ok(());
            }
            st.index.set_pending(p, t, true);
            let info = st.index.page(p);
            let meta = BlockMeta {
                key: info.key,
                namespace: st.index.namespace_of(p).unwrap_or(info.key),
                hits: info.hits,
            };
            (meta, st.group_of(p))
        };
        let _mark = PendingMark {
            cache: self,
            page: p,
            tier: t,
        };
        let mut staging = Staging::new(self, t);
        let _hold = self.reserve(t, group).await?;
        staging.reserved = 1;
        let slot = self.tier(t)?;
        let h = slot
            .tier
            .write(&meta, data)
            .await
            .map_err(|e| CacheError::Tier { tier: t, source: e })?;
        slot.counters
            .bytes_in
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        staging.reserved = 0;
        let mut st = self.inner.state.write();
        // Another path (a store taking over a lost page, an adoption) may have made the
        // page resident here meanwhile: keep one copy.
        if st.index.is_live(p) && st.index.handle(p, t).is_none() {
            st.make_resident(p, t, h);
        } else {
            st.free_block(t, h);
        }
        Ok(())
    }

    /// Reserves one block of room in tier `t` for a block of quota group `group`,
    /// evicting (and demoting) as needed: the group's own blocks first while it is at its
    /// quota there, then any block while the tier is full.
    fn reserve(
        &self,
        t: TierId,
        group: Option<u32>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Option<GroupHold>, CacheError>> + Send + '_>,
    > {
        Box::pin(async move {
            let cap = self.tier(t)?.cap_blocks;
            // Victims that were pinned again while being demoted; bounded so that a page
            // that keeps coming back cannot spin this loop.
            let mut skipped = 0;
            loop {
                let victim = {
                    let now = self.now();
                    let mut st = self.inner.state.write();
                    st.housekeeping(now);
                    let at_quota = group.and_then(|g| Some((g, st.group_at_quota(g, t)?)));
                    if let Some((g, quota)) = at_quota {
                        self.pick_victim(&mut st, t, Some(g)).map_err(|_| {
                            CacheError::QuotaFull {
                                group: g,
                                tier: t,
                                quota,
                            }
                        })?
                    } else if st.occupancy[t.0 as usize] < cap {
                        st.occupancy[t.0 as usize] += 1;
                        return Ok(st.hold_for_group(group, t));
                    } else {
                        self.pick_victim(&mut st, t, None)?
                    }
                };
                match self.handle_victim(t, victim).await {
                    Ok(true) => {}
                    Ok(false) => {
                        skipped += 1;
                        if skipped > 64 {
                            return Err(CacheError::TierFull(t));
                        }
                    }
                    // The victim could not move down; nothing else is tried, so that a
                    // full lower tier cannot spin this loop.
                    Err(CacheError::TierFull(_) | CacheError::QuotaFull { .. }) => {
                        return Err(CacheError::TierFull(t));
                    }
                    Err(e) => return Err(e),
                }
            }
        })
    }

    /// Chooses and detaches one victim from tier `t` (lock held), of quota group `only`
    /// when given.
    fn pick_victim(
        &self,
        st: &mut State,
        t: TierId,
        only: Option<u32>,
    ) -> Result<Victim, CacheError> {
        let ti = t.0 as usize;
        let can_demote = self.inner.config.write_policy == WritePolicy::WriteBack
            && ti + 1 < self.inner.tiers.len();
        let State {
            index,
            policies,
            groups,
            ..
        } = st;
        let lower = TierId(t.0 + 1);
        let v = policies[ti]
            .victim(&mut |p| {
                let info = index.page(p);
                let in_group = only.is_none_or(|g| {
                    index.namespace_of(p).and_then(|ns| groups.of_root.get(&ns)) == Some(&g)
                });
                in_group
                    && info.pins == 0
                    && ((can_demote && !index.is_declined(p, lower))
                        || info.resident & !(1 << ti) != 0
                        || index.is_leaf(p))
            })
            .ok_or(CacheError::TierFull(t))?;
        let info = st.index.page(v);
        let below = !((1u8 << (ti + 1)) - 1);
        let demote = can_demote && info.resident & below == 0 && !st.index.is_declined(v, lower);
        if demote {
            let handle = st.index.handle(v, t).ok_or(CacheError::TierFull(t))?;
            st.pin_page(v);
            Ok(Victim::Demote {
                page: v,
                key: info.key,
                handle,
            })
        } else {
            if !st.drop_resident(v, t) {
                return Err(CacheError::TierFull(t));
            }
            self.inner.tiers[ti]
                .counters
                .evictions
                .fetch_add(1, Ordering::Relaxed);
            Ok(Victim::Dropped)
        }
    }

    /// Carries out an eviction chosen by `pick_victim`. Returns whether the page left the
    /// tier (`false`: it was pinned again meanwhile); an error if a demotion failed.
    async fn handle_victim(&self, t: TierId, v: Victim) -> Result<bool, CacheError> {
        let slot = self.tier(t)?;
        match v {
            Victim::Dropped => Ok(true),
            Victim::Demote { page, key, handle } => {
                // `pick_victim` pinned the page; this guard unpins it if we are cancelled.
                let mut guard = PinGuard {
                    cache: self.clone(),
                    pages: vec![page],
                };
                let lower = TierId(t.0 + 1);
                let mut buf = vec![0u8; self.inner.block_bytes];
                let (readable, copied) = match slot.tier.read(handle, &key, &mut buf).await {
                    Ok(()) => {
                        slot.counters
                            .bytes_out
                            .fetch_add(buf.len() as u64, Ordering::Relaxed);
                        (true, self.copy_into(page, lower, &buf).await)
                    }
                    Err(_) => {
                        slot.counters.read_errors.fetch_add(1, Ordering::Relaxed);
                        (false, Ok(()))
                    }
                };
                if readable && copied.is_ok() {
                    slot.counters.demotions.fetch_add(1, Ordering::Relaxed);
                }
                let evicted = {
                    let mut st = self.inner.state.write();
                    guard.pages.clear();
                    st.unpin_page(page);
                    let info = st.index.page(page);
                    let here = st.index.is_live(page) && info.resident >> t.0 & 1 == 1;
                    // An unreadable copy goes whatever else holds the page (fail closed);
                    // so does one the tier below declined (its admission policy says the
                    // page is not worth keeping).
                    let declined = matches!(
                        copied,
                        Err(CacheError::Tier {
                            source: TierError::Rejected,
                            ..
                        })
                    );
                    if declined {
                        // Not demotable until its next use; it may still go if nothing is
                        // stranded by that.
                        st.index.set_declined(page, TierId(t.0 + 1));
                    }
                    let evictable = here
                        && (!readable
                            || (info.pins == 0
                                && (info.resident & !(1 << t.0) != 0 || st.index.is_leaf(page))));
                    if evictable {
                        slot.counters.evictions.fetch_add(1, Ordering::Relaxed);
                        st.drop_resident(page, t)
                    } else {
                        false
                    }
                };
                match copied {
                    // Room was made, whatever happened below.
                    _ if evicted => Ok(true),
                    Err(CacheError::Tier {
                        source: TierError::Rejected,
                        ..
                    }) => Ok(false),
                    Err(e) => Err(e),
                    Ok(()) => Ok(false),
                }
            }
        }
    }

    /// Evicts up to `pages` pages from tier `t` by its policy (demoting under write-back).
    /// Returns how many left the tier.
    pub async fn evict(&self, t: TierId, pages: usize) -> Result<usize, CacheError> {
        self.tier(t)?;
        let mut n = 0;
        while n < pages {
            let v = {
                let now = self.now();
                let mut st = self.inner.state.write();
                st.housekeeping(now);
                match self.pick_victim(&mut st, t, None) {
                    Ok(v) => v,
                    Err(CacheError::TierFull(_)) => break,
                    Err(e) => return Err(e),
                }
            };
            match self.handle_victim(t, v).await {
                Ok(true) => n += 1,
                Ok(false) => {}
                Err(CacheError::TierFull(_)) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    /// Pins the longest cached prefix of `tokens`, counting a use of each page. The pages
    /// stay in every tier that holds them until the guard is dropped.
    pub fn pin(&self, ns: &NamespaceHandle, tokens: &[u32]) -> Result<PinGuard, CacheError> {
        self.check_tokens(tokens, false)?;
        self.check_handle(ns)?;
        self.adopt_suffix(ns, tokens);
        let pages = self.acquire(ns, tokens, usize::MAX, true);
        Ok(PinGuard {
            cache: self.clone(),
            pages,
        })
    }

    /// Lock held inside: match, pin, count a use, touch the policies.
    fn acquire(
        &self,
        ns: &NamespaceHandle,
        tokens: &[u32],
        max_pages: usize,
        hit: bool,
    ) -> Vec<PageId> {
        let now = self.now();
        let mut st = self.inner.state.write();
        st.housekeeping(now);
        let m = st.index.match_prefix(ns.root, tokens);
        let mut pages = st.index.path(m.end);
        pages.truncate(max_pages);
        let threshold = match self.inner.config.write_policy {
            WritePolicy::WriteThroughSelective { hits } => Some(hits),
            _ => None,
        };
        let last_tier = TierId((self.inner.tiers.len() - 1) as u8);
        // Deepest first, so that ancestors are always at least as recent as descendants.
        for &p in pages.iter().rev() {
            st.pin_page(p);
            let hits = if hit { st.index.touch(p, now) } else { 0 };
            st.touch_policies(p);
            let resident = st.index.page(p).resident;
            // At or past the threshold and not yet on the last tier: copy down, unless a
            // copy is already on its way or that tier declined the page.
            if threshold.is_some_and(|th| hit && hits >= th)
                && resident >> last_tier.0 & 1 == 0
                && !st.index.is_pending(p, last_tier)
                && !st.index.is_declined(p, last_tier)
            {
                let key = st.index.page(p).key;
                st.copy_down.push((p, key));
            }
        }
        pages
    }

    /// Reads the blocks of the longest cached prefix of `tokens` into `out` (one buffer of
    /// `block_bytes()` per page, at most `out.len()` pages), each from the fastest tier that
    /// holds it. A block that fails its integrity check is dropped from that tier and read
    /// from the next one; the read stops at the first page no tier can deliver.
    pub async fn read(
        &self,
        ns: &NamespaceHandle,
        tokens: &[u32],
        out: &mut [Vec<u8>],
    ) -> Result<ReadReport, CacheError> {
        self.read_from(ns, tokens, 0, out).await
    }

    /// Like [`TieredCache::read`], starting at page `skip` of the cached prefix: reads pages
    /// `skip..skip + out.len()` (those that are cached). For callers that stream a long
    /// prefix a few blocks at a time. `matched` counts the cached pages of that range.
    pub async fn read_from(
        &self,
        ns: &NamespaceHandle,
        tokens: &[u32],
        skip: usize,
        out: &mut [Vec<u8>],
    ) -> Result<ReadReport, CacheError> {
        self.check_tokens(tokens, false)?;
        self.check_handle(ns)?;
        self.adopt_suffix(ns, tokens);
        let guard = PinGuard {
            cache: self.clone(),
            pages: self.acquire(ns, tokens, skip.saturating_add(out.len()), true),
        };
        let range = guard.pages.get(skip..).unwrap_or_default();
        let mut report = ReadReport {
            matched: range.len(),
            read: 0,
            from_tier: vec![0; self.inner.tiers.len()],
        };
        'pages: for (i, &p) in range.iter().enumerate() {
            let buf = &mut out[i];
            buf.resize(self.inner.block_bytes, 0);
            for ti in 0..self.inner.tiers.len() {
                let t = TierId(ti as u8);
                let (h, key) = {
                    let st = self.inner.state.read();
                    (st.index.handle(p, t), st.index.page(p).key)
                };
                let Some(h) = h else { continue };
                let slot = &self.inner.tiers[ti];
                match slot.tier.read(h, &key, buf).await {
                    Ok(()) => {
                        slot.counters
                            .bytes_out
                            .fetch_add(self.inner.block_bytes as u64, Ordering::Relaxed);
                        report.from_tier[ti] += 1;
                        report.read += 1;
                        continue 'pages;
                    }
                    Err(_) => {
                        slot.counters.read_errors.fetch_add(1, Ordering::Relaxed);
                        self.discard_bad_copy(p, t, h);
                    }
                }
            }
            break;
        }
        drop(guard);
        self.run_copy_down().await;
        Ok(report)
    }

    /// Forgets the copy `h` that failed to read (the page is pinned by the caller, so the
    /// tree keeps it until the pin drops). If the page's copy in `t` is another one by now
    /// (the bad one was dropped and a fresh one stored while the read was under way), that
    /// one stays.
    fn discard_bad_copy(&self, p: PageId, t: TierId, h: BlockHandle) {
        let mut st = self.inner.state.write();
        if st.index.handle(p, t) == Some(h) {
            st.drop_resident(p, t);
        }
    }

    /// Copies pages that reached the selective write-through threshold to every lower tier.
    async fn run_copy_down(&self) {
        let pending = std::mem::take(&mut self.inner.state.write().copy_down);
        if pending.is_empty() {
            return;
        }
        let mut buf = vec![0u8; self.inner.block_bytes];
        for (p, page_key) in pending {
            // Pin, find a source, copy to every tier below it.
            let src = {
                let mut st = self.inner.state.write();
                if !st.index.is_live_as(p, &page_key) {
                    continue;
                }
                st.pin_page(p);
                let info = st.index.page(p);
                let top = info.resident.trailing_zeros() as usize;
                (top < self.inner.tiers.len()).then(|| {
                    (
                        TierId(top as u8),
                        st.index.handle(p, TierId(top as u8)),
                        info.key,
                    )
                })
            };
            let guard = PinGuard {
                cache: self.clone(),
                pages: vec![p],
            };
            let Some((t, Some(h), key)) = src else {
                continue;
            };
            let slot = &self.inner.tiers[t.0 as usize];
            if slot.tier.read(h, &key, &mut buf).await.is_err() {
                slot.counters.read_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            for lower in (t.0 as usize + 1)..self.inner.tiers.len() {
                let lower = TierId(lower as u8);
                match self.copy_into(p, lower, &buf).await {
                    Ok(()) => {}
                    Err(CacheError::Tier {
                        source: TierError::Rejected,
                        ..
                    }) => {
                        self.inner.state.write().index.set_declined(p, lower);
                        break;
                    }
                    Err(_) => break,
                }
            }
            drop(guard);
        }
    }

    /// Leases the longest cached prefix of `tokens` for `ttl`: its pages are not evicted
    /// until [`TieredCache::release`] or the deadline. Returns the lease id and its pages.
    pub fn lease(
        &self,
        ns: &NamespaceHandle,
        tokens: &[u32],
        ttl: Duration,
    ) -> Result<(u64, usize), CacheError> {
        if ttl.is_zero() {
            return Err(CacheError::LeaseInPast { past_by_ms: 0 });
        }
        if ttl > self.inner.config.max_lease {
            return Err(CacheError::InvalidConfig(format!(
                "lease of {ttl:?} exceeds the maximum of {:?}",
                self.inner.config.max_lease
            )));
        }
        self.check_tokens(tokens, false)?;
        self.check_handle(ns)?;
        self.adopt_suffix(ns, tokens);
        let pages = self.acquire(ns, tokens, usize::MAX, false);
        let ttl_nanos = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
        let deadline = self.now().saturating_add(ttl_nanos);
        Ok(self.register_lease(pages, deadline))
    }

    /// Leases the longest cached prefix of `tokens` like [`TieredCache::lease`] and returns,
    /// with the lease id, the handles in tier `t` of its leading pages that `t` holds (it
    /// stops at the first page `t` does not hold). While the lease lasts those handles stay
    /// valid: a leased page is never evicted, so its block is never freed or reused. For
    /// tiers whose handles mean something to a caller (the host tier's shared slots).
    pub fn lease_in_tier(
        &self,
        ns: &NamespaceHandle,
        tokens: &[u32],
        ttl: Duration,
        t: TierId,
    ) -> Result<(u64, Vec<BlockHandle>), CacheError> {
        self.tier(t)?;
        let (id, _) = self.lease(ns, tokens, ttl)?;
        let st = self.inner.state.read();
        let handles = st
            .leases
            .get(&id)
            .map(|l| {
                l.pages
                    .iter()
                    .map_while(|&p| st.index.handle(p, t))
                    .collect()
            })
            .unwrap_or_default();
        Ok((id, handles))
    }

    /// Like [`TieredCache::lease`], but the lease also ends when the returned guard drops.
    pub fn lease_guard(
        &self,
        ns: &NamespaceHandle,
        tokens: &[u32],
        ttl: Duration,
    ) -> Result<LeaseGuard, CacheError> {
        let (id, pages) = self.lease(ns, tokens, ttl)?;
        Ok(LeaseGuard {
            cache: self.clone(),
            id,
            pages,
        })
    }

    /// Leases with an absolute deadline in clock nanoseconds.
    pub fn lease_until(
        &self,
        ns: &NamespaceHandle,
        tokens: &[u32],
        deadline_nanos: u64,
    ) -> Result<(u64, usize), CacheError> {
        let now = self.now();
        if deadline_nanos <= now {
            return Err(CacheError::LeaseInPast {
                past_by_ms: (now - deadline_nanos) / 1_000_000,
            });
        }
        self.lease(ns, tokens, Duration::from_nanos(deadline_nanos - now))
    }

    fn register_lease(&self, pages: Vec<PageId>, deadline: u64) -> (u64, usize) {
        let mut st = self.inner.state.write();
        let id = st.next_lease;
        st.next_lease += 1;
        let n = pages.len();
        st.leases.insert(id, Lease { pages, deadline });
        st.lease_deadlines.push(Reverse((deadline, id)));
        (id, n)
    }

    /// Ends a lease early.
    pub fn release(&self, lease: u64) -> Result<(), CacheError> {
        let mut st = self.inner.state.write();
        let l = st
            .leases
            .remove(&lease)
            .ok_or(CacheError::UnknownLease(lease))?;
        st.release_pages(&l.pages);
        Ok(())
    }

    /// Ends every lease whose deadline has passed. Happens on its own at every write; call
    /// it to make expiry visible without other traffic.
    pub fn expire_leases(&self) {
        let now = self.now();
        self.inner.state.write().housekeeping(now);
    }

    /// Starts promoting the longest cached prefix of `tokens` into tier `target`. The
    /// matched pages are leased for `lease_ttl` at once. Drive the returned job (spawn it,
    /// or await it); call [`PrefetchTicket::finish`] when the request is scheduled.
    pub fn prefetch(
        &self,
        ns: &NamespaceHandle,
        tokens: &[u32],
        target: TierId,
        policy: PrefetchPolicy,
        lease_ttl: Duration,
    ) -> Result<(PrefetchTicket, PrefetchJob), CacheError> {
        self.tier(target)?;
        let (lease, pages) = self.lease(ns, tokens, lease_ttl)?;
        let page_ids = {
            let st = self.inner.state.read();
            st.leases
                .get(&lease)
                .map(|l| l.pages.iter().map(|&p| (p, st.index.page(p).key)).collect())
                .unwrap_or_default()
        };
        let deadline = match policy {
            PrefetchPolicy::Timeout { base, per_page } => {
                // A deadline too far to represent is no deadline.
                let wait = base.saturating_add(
                    per_page.saturating_mul(u32::try_from(pages).unwrap_or(u32::MAX)),
                );
                Instant::now().checked_add(wait)
            }
            _ => None,
        };
        let shared = Arc::new(PrefetchShared {
            ready: AtomicUsize::new(0),
            total: pages,
            stop: AtomicBool::new(false),
            done: AtomicBool::new(false),
            notify: tokio::sync::Notify::new(),
            error: Mutex::new(None),
        });
        Ok((
            PrefetchTicket {
                shared: shared.clone(),
                lease,
                policy,
            },
            PrefetchJob {
                cache: self.clone(),
                pages: page_ids,
                target,
                deadline,
                shared,
            },
        ))
    }

    /// A stream of stored/removed events, for KV-aware routers and audits.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<CacheEvent> {
        self.inner.state.read().events.subscribe()
    }

    /// Counters and occupancy.
    pub fn stats(&self) -> CacheStats {
        let st = self.inner.state.read();
        let bb = self.inner.block_bytes as u64;
        CacheStats {
            tiers: self
                .inner
                .tiers
                .iter()
                .enumerate()
                .map(|(t, s)| TierStats {
                    kind: Some(s.tier.kind()),
                    hits: s.counters.hits.load(Ordering::Relaxed),
                    misses: s.counters.misses.load(Ordering::Relaxed),
                    bytes_in: s.counters.bytes_in.load(Ordering::Relaxed),
                    bytes_out: s.counters.bytes_out.load(Ordering::Relaxed),
                    evictions: s.counters.evictions.load(Ordering::Relaxed),
                    demotions: s.counters.demotions.load(Ordering::Relaxed),
                    read_errors: s.counters.read_errors.load(Ordering::Relaxed),
                    resident_bytes: st.policies[t].len() as u64 * bb,
                    pinned_bytes: st.pinned[t] * bb,
                    capacity_bytes: s.cap_blocks * bb,
                })
                .collect(),
            lookups: self.inner.lookups.load(Ordering::Relaxed),
            pages: st.index.len() as u64,
            nodes: st.index.node_count() as u64,
            leases: st.leases.len() as u64,
        }
    }

    /// Checks the index's invariants and the controller's own (occupancy within capacity,
    /// policy sizes equal residency). For tests and audits.
    pub fn check_invariants(&self) -> Result<(), String> {
        let st = self.inner.state.read();
        st.index.check_invariants()?;
        let mut resident = vec![0u64; self.inner.tiers.len()];
        let mut pinned = vec![0u64; self.inner.tiers.len()];
        let mut groups: HashMap<u32, Vec<u64>> = HashMap::new();
        for p in st.index.all_pages() {
            let info = st.index.page(p);
            let g = st.group_of(p);
            for t in 0..resident.len() {
                if info.resident >> t & 1 == 1 {
                    if let Some(g) = g {
                        groups.entry(g).or_insert_with(|| vec![0; resident.len()])[t] += 1;
                    }
                    resident[t] += 1;
                    if info.pins > 0 {
                        pinned[t] += 1;
                    }
                }
            }
        }
        for (t, slot) in self.inner.tiers.iter().enumerate() {
            if st.policies[t].len() as u64 != resident[t] {
                return Err(format!(
                    "tier {t}: policy tracks {} pages, {} resident",
                    st.policies[t].len(),
                    resident[t]
                ));
            }
            if st.occupancy[t] < resident[t] {
                return Err(format!(
                    "tier {t}: occupancy {} below residency {}",
                    st.occupancy[t], resident[t]
                ));
            }
            if st.occupancy[t] > slot.cap_blocks {
                return Err(format!(
                    "tier {t}: occupancy {} over capacity {}",
                    st.occupancy[t], slot.cap_blocks
                ));
            }
            if st.pinned[t] != pinned[t] {
                return Err(format!(
                    "tier {t}: pinned counter {} != {}",
                    st.pinned[t], pinned[t]
                ));
            }
        }
        for (g, counted) in &st.groups.blocks {
            let real = groups
                .get(g)
                .cloned()
                .unwrap_or_else(|| vec![0; resident.len()]);
            if *counted != real {
                return Err(format!(
                    "quota group {g}: counted blocks {counted:?}, resident {real:?}"
                ));
            }
        }
        Ok(())
    }

    /// Which tiers hold each page of the longest cached prefix of `tokens` (bit t set: tier
    /// t), with each page's pin count. For tests and debugging tools.
    pub fn residency(&self, ns: &NamespaceHandle, tokens: &[u32]) -> Vec<(u8, u32)> {
        let st = self.inner.state.read();
        let m = st.index.match_prefix(ns.root, tokens);
        st.index
            .path(m.end)
            .into_iter()
            .map(|p| {
                let i = st.index.page(p);
                (i.resident, i.pins)
            })
            .collect()
    }
}

/// A lease that ends at its deadline or when dropped, whichever comes first.
pub struct LeaseGuard {
    cache: TieredCache,
    id: u64,
    pages: usize,
}

impl LeaseGuard {
    /// The lease id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Pages leased.
    pub fn pages(&self) -> usize {
        self.pages
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        // Already expired is fine: the pages were released then.
        let _ = self.cache.release(self.id);
    }
}

/// Room reserved in one tier and blocks written there but not yet recorded in the index.
/// Whatever is still here when it drops (the future was cancelled, or an error cut the
/// store short) is given back: blocks freed, reservations released.
struct Staging {
    cache: TieredCache,
    tier: TierId,
    reserved: usize,
    written: Vec<BlockHandle>,
}

impl Staging {
    fn new(cache: &TieredCache, tier: TierId) -> Self {
        Staging {
            cache: cache.clone(),
            tier,
            reserved: 0,
            written: Vec::new(),
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.reserved == 0 && self.written.is_empty() {
            return;
        }
        let mut st = self.cache.inner.state.write();
        for h in self.written.drain(..) {
            st.free_block(self.tier, h);
        }
        for _ in 0..self.reserved {
            st.unreserve(self.tier);
        }
    }
}

/// Clears a page's "copy in flight" mark when the copy ends or is cancelled.
struct PendingMark<'a> {
    cache: &'a TieredCache,
    page: PageId,
    tier: TierId,
}

impl Drop for PendingMark<'_> {
    fn drop(&mut self) {
        self.cache
            .inner
            .state
            .write()
            .index
            .set_pending(self.page, self.tier, false);
        self.cache.inner.copies_done.notify_waiters();
    }
}

/// Pages pinned by [`TieredCache::pin`] (or internally); unpinned on drop.
pub struct PinGuard {
    cache: TieredCache,
    pages: Vec<PageId>,
}

impl PinGuard {
    /// Pages pinned.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether nothing is pinned.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// The handles in tier `t` of the leading pinned pages that tier holds, stopping at the
    /// first page it does not. For a tier that lends its blocks in place (the engine's KV
    /// pool is tier 0): the pin keeps these handles valid until the guard is dropped.
    pub fn handles(&self, t: TierId) -> Vec<BlockHandle> {
        let st = self.cache.inner.state.read();
        self.pages
            .iter()
            .map_while(|&p| st.index.handle(p, t))
            .collect()
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if !self.pages.is_empty() {
            self.cache.inner.state.write().release_pages(&self.pages);
        }
    }
}

struct PrefetchShared {
    ready: AtomicUsize,
    total: usize,
    stop: AtomicBool,
    done: AtomicBool,
    notify: tokio::sync::Notify,
    error: Mutex<Option<String>>,
}

/// What a finished prefetch gives the scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefetchOutcome {
    /// Pages that were matched and leased.
    pub matched: usize,
    /// Leading pages now in the target tier.
    pub ready: usize,
    /// The lease that keeps them there; release it when the request is done.
    pub lease: u64,
    /// Why the prefetch stopped early, if it failed.
    pub error: Option<String>,
}

/// The scheduler's side of a prefetch.
pub struct PrefetchTicket {
    shared: Arc<PrefetchShared>,
    lease: u64,
    policy: PrefetchPolicy,
}

impl PrefetchTicket {
    /// Leading pages already in the target tier.
    pub fn ready(&self) -> usize {
        self.shared.ready.load(Ordering::Acquire)
    }

    /// Pages the prefetch covers.
    pub fn total(&self) -> usize {
        self.shared.total
    }

    /// Whether the job has finished.
    pub fn is_done(&self) -> bool {
        self.shared.done.load(Ordering::Acquire)
    }

    /// The lease id.
    pub fn lease(&self) -> u64 {
        self.lease
    }

    /// Waits until the job has finished or `timeout` has passed; returns whether it has
    /// finished. Unlike [`PrefetchTicket::finish`] it applies no policy and keeps the ticket.
    pub async fn wait(&self, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.shared.notify.notified();
                if self.shared.done.load(Ordering::Acquire) {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// Why the job stopped early, if it failed.
    pub fn error(&self) -> Option<String> {
        self.shared.error.lock().clone()
    }

    /// Asks the job to stop after the block it is copying (the request was cancelled).
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
    }

    /// Called when the request is scheduled: applies the policy (best-effort stops the job,
    /// the others wait for it) and reports what is ready. The job must be running.
    pub async fn finish(self) -> PrefetchOutcome {
        if self.policy == PrefetchPolicy::BestEffort {
            self.shared.stop.store(true, Ordering::Release);
        }
        loop {
            let notified = self.shared.notify.notified();
            if self.shared.done.load(Ordering::Acquire) {
                break;
            }
            notified.await;
        }
        PrefetchOutcome {
            matched: self.shared.total,
            ready: self.shared.ready.load(Ordering::Acquire),
            lease: self.lease,
            error: self.shared.error.lock().clone(),
        }
    }
}

/// The worker side of a prefetch: copies pages into the target tier in prefix order.
pub struct PrefetchJob {
    cache: TieredCache,
    pages: Vec<(PageId, BlockKey)>,
    target: TierId,
    deadline: Option<Instant>,
    shared: Arc<PrefetchShared>,
}

impl Drop for PrefetchJob {
    /// A job that ends, or is dropped without running (its task cancelled), is done: the
    /// scheduler waiting in `finish` gets what is ready.
    fn drop(&mut self) {
        self.shared.done.store(true, Ordering::Release);
        self.shared.notify.notify_waiters();
    }
}

impl PrefetchJob {
    /// Whether the scheduler has already asked the job to stop.
    pub fn is_stopped(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire)
    }

    /// Runs the copies. Returns the number of leading pages in the target tier.
    pub async fn run(self) -> usize {
        let r = self.copy_all().await;
        if let Err(e) = &r {
            *self.shared.error.lock() = Some(e.to_string());
        }
        // Dropping `self` marks the prefetch done.
        self.shared.ready.load(Ordering::Acquire)
    }

    async fn copy_all(&self) -> Result<(), CacheError> {
        let c = &self.cache;
        let t = self.target;
        let mut buf = vec![0u8; c.inner.block_bytes];
        for &(p, page_key) in &self.pages {
            if self.shared.stop.load(Ordering::Acquire)
                || self.deadline.is_some_and(|d| Instant::now() >= d)
            {
                return Ok(());
            }
            // Another request may be copying this very page: wait for it.
            loop {
                let copied = c.inner.copies_done.notified();
                {
                    let st = c.inner.state.read();
                    if !st.index.is_live_as(p, &page_key) || !st.index.is_pending(p, t) {
                        break;
                    }
                }
                copied.await;
            }
            // Source: the fastest tier holding the page. Pinned for the copy: the lease may
            // expire while we work.
            let (src, key, _pin) = {
                let mut st = c.inner.state.write();
                if !st.index.is_live_as(p, &page_key) {
                    return Ok(());
                }
                let info = st.index.page(p);
                if info.resident >> t.0 & 1 == 1 {
                    self.shared.ready.fetch_add(1, Ordering::AcqRel);
                    continue;
                }
                let src = (0..c.inner.tiers.len())
                    .find(|&s| info.resident >> s & 1 == 1)
                    .map(|s| (TierId(s as u8), st.index.handle(p, TierId(s as u8))));
                st.pin_page(p);
                let pin = PinGuard {
                    cache: c.clone(),
                    pages: vec![p],
                };
                (src, info.key, pin)
            };
            let Some((s, Some(h))) = src else {
                return Ok(());
            };
            let slot = &c.inner.tiers[s.0 as usize];
            if let Err(e) = slot.tier.read(h, &key, &mut buf).await {
                slot.counters.read_errors.fetch_add(1, Ordering::Relaxed);
                c.discard_bad_copy(p, s, h);
                return Err(CacheError::Tier { tier: s, source: e });
            }
            slot.counters
                .bytes_out
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            c.copy_into(p, t, &buf).await?;
            if c.inner.state.read().index.handle(p, t).is_none() {
                return Ok(());
            }
            self.shared.ready.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }
}
