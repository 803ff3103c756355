//! Stress: several threads insert, look up, read, pin and evict on one cache (a real G2 host
//! pool over a second in-memory tier) for a few seconds. Every read must return exactly the
//! bytes stored for its key; at the end the invariants hold, and once everything is evicted
//! only the roots remain and every host slot is free again.
//!
//! `STRATA_STRESS_SECS` sets the duration (default 3).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use strata_cache_core::testing::MemTier;
use strata_cache_core::*;
use strata_host_tier::{HostPool, HostPoolConfig};

const PS: usize = 16;

fn ns(salt: &[u8]) -> Namespace {
    Namespace::new(
        [5; 32],
        KvDtype::F16,
        KvLayout::PageFirst,
        PS as u32,
        KvShape {
            num_layers: 4,
            num_kv_heads: 2,
            head_dim: 16,
        },
        TpShape::default(),
        salt,
    )
    .unwrap()
}

/// Bytes stored for a page, derived from its key.
fn block_for(key: &BlockKey, len: usize) -> Vec<u8> {
    (0..len).map(|i| key.0[i % 32] ^ (i / 32) as u8).collect()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn prompt(rng: &mut Rng) -> Vec<u32> {
    // A few shared "system prompts", then a branchy tail: lots of shared prefixes.
    let pages = 1 + rng.below(12) as usize;
    let mut t = Vec::with_capacity(pages * PS);
    let system = rng.below(3) as u32;
    for p in 0..pages {
        let v = if p < 3 {
            system * 1000 + p as u32
        } else {
            rng.below(4) as u32
        };
        t.extend(std::iter::repeat_n(v, PS));
    }
    t
}

fn run(policy: WritePolicy, eviction: EvictionKind) {
    let secs: u64 = std::env::var("STRATA_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let namespaces = [ns(b"a"), ns(b"b")];
    let bs = namespaces[0].block_bytes();
    let host = Arc::new(HostPool::new(HostPoolConfig::new(bs, 48 * bs as u64)).unwrap());
    let lower = Arc::new(MemTier::new(TierKind::Disk, bs, 96));
    let cache = TieredCache::new(
        vec![
            TierSpec {
                tier: host.clone(),
                capacity_bytes: host.slots() as u64 * host.slot_size() as u64,
                eviction,
            },
            TierSpec {
                tier: lower.clone(),
                capacity_bytes: 96 * bs as u64,
                eviction,
            },
        ],
        CacheConfig {
            page_size: PS as u32,
            write_policy: policy,
            ..CacheConfig::default()
        },
    )
    .unwrap();
    let handles: Vec<_> = namespaces
        .iter()
        .map(|n| cache.register(n).unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let reads = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..4u64)
        .map(|tid| {
            let cache = cache.clone();
            let handles = handles.clone();
            let namespaces = namespaces.clone();
            let reads = reads.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (tid + 1));
                let mut held: Vec<PinGuard> = Vec::new();
                while Instant::now() < deadline {
                    let n = rng.below(2) as usize;
                    let t = prompt(&mut rng);
                    match rng.below(10) {
                        0..=3 => {
                            let keys = namespaces[n].page_keys(&t);
                            let blocks: Vec<Vec<u8>> =
                                keys.iter().map(|k| block_for(k, bs)).collect();
                            let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
                            match block_on(cache.insert(&handles[n], &t, &refs)) {
                                Ok(_) | Err(CacheError::TierFull(_)) => {}
                                Err(e) => panic!("insert: {e}"),
                            }
                        }
                        4 | 5 => {
                            let r = cache.lookup(&handles[n], &t).unwrap();
                            assert!(r.matched_pages <= r.requested_pages);
                        }
                        6 | 7 => {
                            let keys = namespaces[n].page_keys(&t);
                            let mut out = vec![Vec::new(); keys.len()];
                            let r = block_on(cache.read(&handles[n], &t, &mut out)).unwrap();
                            for i in 0..r.read {
                                assert_eq!(
                                    out[i],
                                    block_for(&keys[i], bs),
                                    "wrong bytes for page {i}"
                                );
                            }
                            reads.fetch_add(r.read as u64, Ordering::Relaxed);
                        }
                        8 => {
                            if held.len() < 3 {
                                held.push(cache.pin(&handles[n], &t).unwrap());
                            } else {
                                held.clear();
                            }
                        }
                        _ => {
                            let tier = TierId(rng.below(2) as u8);
                            block_on(cache.evict(tier, 1 + rng.below(4) as usize)).unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a stress thread panicked");
    }
    assert!(
        reads.load(Ordering::Relaxed) > 0,
        "the stress run read nothing"
    );
    cache.check_invariants().unwrap();
    let st = cache.stats();
    assert!(st.tiers[0].resident_bytes <= st.tiers[0].capacity_bytes);
    assert!(st.tiers[1].resident_bytes <= st.tiers[1].capacity_bytes);
    assert_eq!(st.tiers[0].pinned_bytes + st.tiers[1].pinned_bytes, 0);
    loop {
        let n = block_on(cache.evict(TierId(0), usize::MAX)).unwrap()
            + block_on(cache.evict(TierId(1), usize::MAX)).unwrap();
        if n == 0 {
            break;
        }
    }
    let st = cache.stats();
    assert_eq!(st.pages, 0);
    assert_eq!(st.nodes, 2, "only the two roots remain");
    assert_eq!(host.free_slots(), host.slots() as usize);
    assert_eq!(lower.live_blocks(), 0);
    cache.check_invariants().unwrap();
}

#[test]
fn stress_write_back_lru() {
    run(WritePolicy::WriteBack, EvictionKind::Lru);
}

#[test]
fn stress_write_through_sieve() {
    run(WritePolicy::WriteThrough, EvictionKind::Sieve);
}

#[test]
fn stress_selective_lru() {
    run(
        WritePolicy::WriteThroughSelective { hits: 2 },
        EvictionKind::Lru,
    );
}
