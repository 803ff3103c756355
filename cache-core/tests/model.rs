//! Property test: random operations on a two-tier cache, checked against a reference model
//! that is a flat map of full prefixes (block key → the prefix's tokens and the tiers that
//! hold it).
//!
//! The model learns *which* pages an eviction chose from the cache's event stream (the
//! policy's choice is not the model's business), and checks everything else on its own:
//! matches and per-tier counts agree with the map, a stored sequence is fully present, read
//! bytes are the bytes stored, pinned and leased pages never leave a tier, every present
//! prefix has its parent present, no tier exceeds its capacity, and once everything is
//! released and evicted only the roots remain.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use strata_cache_core::testing::MemTier;
use strata_cache_core::*;

const PS: usize = 16;
const CAPS: [u64; 2] = [6, 10];

fn ns(salt: &[u8]) -> Namespace {
    Namespace::new(
        [9; 32],
        KvDtype::F16,
        KvLayout::PageFirst,
        PS as u32,
        KvShape {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 1,
        },
        TpShape::default(),
        salt,
    )
    .unwrap()
}

fn tokens(seq: &[u8]) -> Vec<u32> {
    seq.iter()
        .flat_map(|&v| std::iter::repeat_n(u32::from(v), PS))
        .collect()
}

/// The bytes stored for a page: derived from its key, so a mix-up shows.
fn block_for(key: &BlockKey) -> Vec<u8> {
    key.0.iter().chain(key.0.iter()).copied().collect()
}

#[derive(Debug, Clone)]
enum Op {
    Insert(usize, Vec<u8>),
    Lookup(usize, Vec<u8>),
    Read(usize, Vec<u8>),
    Pin(usize, Vec<u8>),
    Unpin(usize),
    Evict(u8, usize),
    Lease(usize, Vec<u8>, u64),
    Release(usize),
    Advance(u64),
    Prefetch(usize, Vec<u8>),
}

fn seq() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(0u8..3, 1..6)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..2, seq()).prop_map(|(n, s)| Op::Insert(n, s)),
        2 => (0usize..2, seq()).prop_map(|(n, s)| Op::Lookup(n, s)),
        2 => (0usize..2, seq()).prop_map(|(n, s)| Op::Read(n, s)),
        1 => (0usize..2, seq()).prop_map(|(n, s)| Op::Pin(n, s)),
        1 => (0usize..8).prop_map(Op::Unpin),
        2 => (0u8..2, 1usize..4).prop_map(|(t, n)| Op::Evict(t, n)),
        1 => (0usize..2, seq(), 1u64..50).prop_map(|(n, s, ttl)| Op::Lease(n, s, ttl)),
        1 => (0usize..8).prop_map(Op::Release),
        1 => (1u64..40).prop_map(Op::Advance),
        1 => (0usize..2, seq()).prop_map(|(n, s)| Op::Prefetch(n, s)),
    ]
}

struct Model {
    /// key → (namespace index, pages of the prefix, tier mask)
    present: HashMap<BlockKey, (usize, Vec<u8>, u8)>,
    pinned: HashMap<BlockKey, u32>,
}

impl Model {
    fn pin(&mut self, keys: &[BlockKey]) {
        for k in keys {
            *self.pinned.entry(*k).or_default() += 1;
        }
    }

    fn unpin(&mut self, keys: &[BlockKey]) {
        for k in keys {
            let c = self.pinned.get_mut(k).unwrap();
            *c -= 1;
            if *c == 0 {
                self.pinned.remove(k);
            }
        }
    }
}

fn run(ops: Vec<Op>, policy: WritePolicy, eviction: EvictionKind) -> Result<(), TestCaseError> {
    let namespaces = [ns(b"tenant-a"), ns(b"tenant-b")];
    let bs = namespaces[0].block_bytes();
    let tiers = [
        Arc::new(MemTier::new(TierKind::Host, bs, CAPS[0])),
        Arc::new(MemTier::new(TierKind::Disk, bs, CAPS[1])),
    ];
    let clock = Arc::new(ManualClock::new());
    let cache = TieredCache::with_clock(
        tiers
            .iter()
            .zip(CAPS)
            .map(|(t, c)| TierSpec {
                tier: t.clone(),
                capacity_bytes: c * bs as u64,
                eviction,
            })
            .collect(),
        CacheConfig {
            page_size: PS as u32,
            write_policy: policy,
            event_buffer: 1 << 16,
            ..CacheConfig::default()
        },
        clock.clone(),
    )
    .unwrap();
    let handles = [
        cache.register(&namespaces[0]).unwrap(),
        cache.register(&namespaces[1]).unwrap(),
    ];
    let mut events = cache.subscribe();
    let mut model = Model {
        present: HashMap::new(),
        pinned: HashMap::new(),
    };
    // Which prefix each key names, for both namespaces (learned on insert).
    let mut names: HashMap<BlockKey, (usize, Vec<u8>)> = HashMap::new();
    let mut pins: Vec<(PinGuard, Vec<BlockKey>)> = Vec::new();
    let mut leases: Vec<(u64, u64, Vec<BlockKey>)> = Vec::new(); // id, deadline, keys

    let present_prefix = |model: &Model, n: usize, s: &[u8]| -> Vec<BlockKey> {
        let keys = namespaces[n].page_keys(&tokens(s));
        keys.into_iter()
            .take_while(|k| model.present.get(k).is_some_and(|e| e.2 != 0))
            .collect()
    };

    for op in ops {
        match &op {
            Op::Insert(n, s) => {
                let t = tokens(s);
                let keys = namespaces[*n].page_keys(&t);
                for (i, k) in keys.iter().enumerate() {
                    names.insert(*k, (*n, s[..=i].to_vec()));
                }
                let blocks: Vec<Vec<u8>> = keys.iter().map(block_for).collect();
                let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
                match block_on(cache.insert(&handles[*n], &t, &refs)) {
                    Ok(r) => {
                        prop_assert_eq!(r.pages, keys.len());
                        prop_assert!(r.existing + r.stored <= r.pages);
                    }
                    Err(CacheError::TierFull(_)) => {}
                    Err(e) => prop_assert!(false, "insert failed: {e}"),
                }
            }
            Op::Lookup(..) | Op::Read(..) => {}
            Op::Pin(n, s) => {
                let g = cache.pin(&handles[*n], &tokens(s)).unwrap();
                let keys = present_prefix(&model, *n, s);
                prop_assert_eq!(g.len(), keys.len());
                model.pin(&keys);
                pins.push((g, keys));
            }
            Op::Unpin(i) => {
                if !pins.is_empty() {
                    let (g, keys) = pins.remove(i % pins.len());
                    drop(g);
                    model.unpin(&keys);
                }
            }
            Op::Evict(t, k) => {
                block_on(cache.evict(TierId(*t), *k)).unwrap();
            }
            Op::Lease(n, s, ttl) => {
                let (id, pages) = cache
                    .lease(&handles[*n], &tokens(s), Duration::from_millis(*ttl))
                    .unwrap();
                let keys = present_prefix(&model, *n, s);
                prop_assert_eq!(pages, keys.len());
                model.pin(&keys);
                leases.push((id, clock.now_nanos() + ttl * 1_000_000, keys));
            }
            Op::Release(i) => {
                if !leases.is_empty() {
                    let (id, _, keys) = leases.remove(i % leases.len());
                    cache.release(id).unwrap();
                    model.unpin(&keys);
                }
            }
            Op::Advance(ms) => {
                clock.advance(Duration::from_millis(*ms));
                cache.expire_leases();
                let now = clock.now_nanos();
                let (expired, kept): (Vec<_>, Vec<_>) = leases.drain(..).partition(|l| l.1 <= now);
                leases = kept;
                for (id, _, keys) in expired {
                    prop_assert!(cache.release(id).is_err(), "expired lease still held");
                    model.unpin(&keys);
                }
            }
            Op::Prefetch(n, s) => {
                let (ticket, job) = cache
                    .prefetch(
                        &handles[*n],
                        &tokens(s),
                        TierId(0),
                        PrefetchPolicy::WaitComplete,
                        Duration::from_secs(1),
                    )
                    .unwrap();
                let keys = present_prefix(&model, *n, s);
                model.pin(&keys);
                block_on(job.run());
                let out = block_on(ticket.finish());
                prop_assert_eq!(out.matched, keys.len());
                // Pages were leased: the promotions cannot have evicted each other, so every
                // page fits unless the tier is full of other pinned pages.
                drain(&mut events, &mut model, &names)?;
                let in_top = keys
                    .iter()
                    .take_while(|k| model.present.get(k).is_some_and(|e| e.2 & 1 == 1))
                    .count();
                prop_assert_eq!(out.ready, in_top);
                cache.release(out.lease).unwrap();
                model.unpin(&keys);
            }
        }
        drain(&mut events, &mut model, &names)?;

        // Checks after every operation.
        cache.check_invariants().map_err(TestCaseError::fail)?;
        for (t, tier) in tiers.iter().enumerate() {
            prop_assert!(tier.live_blocks() <= CAPS[t], "tier {t} over capacity");
            let in_model = model.present.values().filter(|e| e.2 >> t & 1 == 1).count() as u64;
            prop_assert_eq!(tier.live_blocks(), in_model, "tier {} blocks vs model", t);
        }
        for (key, (n, s, mask)) in &model.present {
            prop_assert!(*mask != 0);
            if s.len() > 1 {
                let parent = namespaces[*n].page_keys(&tokens(&s[..s.len() - 1]));
                prop_assert!(
                    model.present.contains_key(parent.last().unwrap()),
                    "page {key:?} present without its parent"
                );
            }
        }
        match &op {
            Op::Insert(n, s) => {
                // Everything stored is findable right after the store.
                let r = cache.lookup(&handles[*n], &tokens(s)).unwrap();
                let expect = present_prefix(&model, *n, s).len();
                prop_assert_eq!(r.matched_pages, expect);
            }
            Op::Lookup(n, s) => {
                let r = cache.lookup(&handles[*n], &tokens(s)).unwrap();
                let keys = present_prefix(&model, *n, s);
                prop_assert_eq!(r.matched_pages, keys.len());
                for t in 0..2 {
                    let want = keys
                        .iter()
                        .filter(|k| model.present[*k].2 >> t & 1 == 1)
                        .count() as u32;
                    prop_assert_eq!(r.resident[t], want, "tier {} count", t);
                }
                // The other tenant never sees this one's pages unless it stored them too.
                let other = 1 - n;
                let theirs = present_prefix(&model, other, s).len();
                prop_assert_eq!(
                    cache
                        .lookup(&handles[other], &tokens(s))
                        .unwrap()
                        .matched_pages,
                    theirs
                );
            }
            Op::Read(n, s) => {
                let keys = present_prefix(&model, *n, s);
                let mut out = vec![Vec::new(); s.len()];
                let r = block_on(cache.read(&handles[*n], &tokens(s), &mut out)).unwrap();
                prop_assert_eq!(r.matched, keys.len());
                prop_assert_eq!(r.read, keys.len());
                for (i, k) in keys.iter().enumerate() {
                    prop_assert_eq!(&out[i], &block_for(k), "page {} bytes", i);
                }
                drain(&mut events, &mut model, &names)?;
            }
            _ => {}
        }
    }

    // Release everything, evict everything: only the roots remain.
    pins.clear();
    for (id, _, _) in leases.drain(..) {
        cache.release(id).unwrap();
    }
    model.pinned.clear();
    loop {
        let mut n = 0;
        for t in 0..2 {
            n += block_on(cache.evict(TierId(t), usize::MAX)).unwrap();
        }
        if n == 0 {
            break;
        }
    }
    drain(&mut events, &mut model, &names)?;
    let st = cache.stats();
    prop_assert_eq!(st.pages, 0);
    prop_assert_eq!(st.nodes, 2, "only the two roots remain");
    prop_assert_eq!(tiers[0].live_blocks() + tiers[1].live_blocks(), 0);
    prop_assert!(model.present.is_empty());
    cache.check_invariants().map_err(TestCaseError::fail)?;
    Ok(())
}

fn drain(
    events: &mut tokio::sync::broadcast::Receiver<CacheEvent>,
    model: &mut Model,
    names: &HashMap<BlockKey, (usize, Vec<u8>)>,
) -> Result<(), TestCaseError> {
    loop {
        match events.try_recv() {
            Ok(e) => {
                let bit = 1u8 << e.tier.0;
                match e.kind {
                    EventKind::Stored => {
                        let (n, s) = names.get(&e.key).cloned().ok_or_else(|| {
                            TestCaseError::fail(format!("stored unknown key {:?}", e.key))
                        })?;
                        let entry = model.present.entry(e.key).or_insert((n, s, 0));
                        prop_assert!(entry.2 & bit == 0, "stored twice in tier {}", e.tier);
                        entry.2 |= bit;
                    }
                    EventKind::Removed => {
                        prop_assert!(
                            !model.pinned.contains_key(&e.key),
                            "pinned page {:?} left tier {}",
                            e.key,
                            e.tier
                        );
                        let entry = model
                            .present
                            .get_mut(&e.key)
                            .ok_or_else(|| TestCaseError::fail("removed an absent key"))?;
                        prop_assert!(entry.2 & bit != 0);
                        entry.2 &= !bit;
                        if entry.2 == 0 {
                            model.present.remove(&e.key);
                        }
                    }
                }
            }
            Err(tokio::sync::broadcast::error::TryRecvError::Empty) => return Ok(()),
            Err(e) => return Err(TestCaseError::fail(format!("event stream: {e}"))),
        }
    }
}

fn policy() -> impl Strategy<Value = WritePolicy> {
    prop_oneof![
        Just(WritePolicy::WriteThrough),
        Just(WritePolicy::WriteBack),
        (1u32..3).prop_map(|hits| WritePolicy::WriteThroughSelective { hits }),
    ]
}

fn eviction() -> impl Strategy<Value = EvictionKind> {
    prop_oneof![Just(EvictionKind::Lru), Just(EvictionKind::Sieve)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn cache_matches_reference_model(
        ops in proptest::collection::vec(op(), 1..80),
        policy in policy(),
        eviction in eviction(),
    ) {
        run(ops, policy, eviction)?;
    }
}
