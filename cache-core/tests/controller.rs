//! Behaviour of the controller that a user of the cache would notice: tenant isolation,
//! typed errors on bad input with nothing lost, integrity failures, write and prefetch
//! policies, lease expiry.

use std::sync::Arc;
use std::time::Duration;

use strata_cache_core::testing::MemTier;
use strata_cache_core::*;

const PS: usize = 16;

fn ns(salt: &[u8]) -> Namespace {
    Namespace::new(
        [3; 32],
        KvDtype::Bf16,
        KvLayout::PageFirst,
        PS as u32,
        KvShape {
            num_layers: 2,
            num_kv_heads: 1,
            head_dim: 4,
        },
        TpShape::default(),
        salt,
    )
    .unwrap()
}

fn toks(n_pages: usize, seed: u32) -> Vec<u32> {
    (0..(n_pages * PS) as u32)
        .map(|i| i.wrapping_mul(2654435761) ^ seed)
        .collect()
}

fn block(page: usize, seed: u8) -> Vec<u8> {
    let bs = ns(b"").block_bytes();
    (0..bs)
        .map(|i| (i as u8) ^ (page as u8).wrapping_mul(31) ^ seed)
        .collect()
}

struct Setup {
    cache: TieredCache,
    tiers: Vec<Arc<MemTier>>,
    clock: Arc<ManualClock>,
}

fn setup(caps: &[u64], policy: WritePolicy) -> Setup {
    let bs = ns(b"").block_bytes();
    let kinds = [TierKind::Host, TierKind::Disk, TierKind::Remote];
    let tiers: Vec<_> = caps
        .iter()
        .enumerate()
        .map(|(i, &c)| Arc::new(MemTier::new(kinds[i], bs, c)))
        .collect();
    let clock = Arc::new(ManualClock::new());
    let cache = TieredCache::with_clock(
        tiers
            .iter()
            .zip(caps)
            .map(|(t, &c)| TierSpec {
                tier: t.clone(),
                capacity_bytes: c * bs as u64,
                eviction: EvictionKind::Lru,
            })
            .collect(),
        CacheConfig {
            page_size: PS as u32,
            write_policy: policy,
            max_tokens_per_call: 64 * PS,
            ..CacheConfig::default()
        },
        clock.clone(),
    )
    .unwrap();
    Setup {
        cache,
        tiers,
        clock,
    }
}

fn insert(c: &TieredCache, h: &NamespaceHandle, t: &[u32], seed: u8) -> InsertReport {
    let blocks: Vec<Vec<u8>> = (0..t.len() / PS).map(|i| block(i, seed)).collect();
    let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
    block_on(c.insert(h, t, &refs)).unwrap()
}

fn read_all(c: &TieredCache, h: &NamespaceHandle, t: &[u32]) -> (ReadReport, Vec<Vec<u8>>) {
    let mut out = vec![Vec::new(); t.len() / PS];
    let r = block_on(c.read(h, t, &mut out)).unwrap();
    out.truncate(r.read);
    (r, out)
}

#[test]
fn tenants_never_share_blocks() {
    let s = setup(&[32], WritePolicy::WriteBack);
    let a = s.cache.register(&ns(b"tenant-a")).unwrap();
    let b = s.cache.register(&ns(b"tenant-b")).unwrap();
    assert_ne!(a.id(), b.id());
    let t = toks(4, 1);
    insert(&s.cache, &a, &t, 1);
    // B finds nothing that A stored, and reads nothing.
    assert_eq!(s.cache.lookup(&b, &t).unwrap().matched_pages, 0);
    assert_eq!(read_all(&s.cache, &b, &t).0.read, 0);
    // B stores the same tokens: separate blocks, separate keys, each reads its own bytes.
    insert(&s.cache, &b, &t, 2);
    assert_eq!(s.tiers[0].live_blocks(), 8);
    let ka = ns(b"tenant-a").page_keys(&t);
    let kb = ns(b"tenant-b").page_keys(&t);
    assert!(ka.iter().all(|k| !kb.contains(k)));
    assert_eq!(read_all(&s.cache, &a, &t).1[3], block(3, 1));
    assert_eq!(read_all(&s.cache, &b, &t).1[3], block(3, 2));
}

#[test]
fn bad_input_gets_typed_errors_and_loses_nothing() {
    let s = setup(&[8], WritePolicy::WriteBack);
    let h = s.cache.register(&ns(b"")).unwrap();
    let t = toks(3, 5);
    insert(&s.cache, &h, &t, 0);
    let good = block(0, 0);
    let c = &s.cache;

    let e = block_on(c.insert(&h, &t[..20], &[&good])).unwrap_err();
    assert!(
        matches!(
            e,
            CacheError::PartialPage {
                tokens: 20,
                page_size: 16
            }
        ),
        "{e}"
    );
    let e = block_on(c.insert(&h, &toks(2, 9), &[&good])).unwrap_err();
    assert!(
        matches!(
            e,
            CacheError::BlockCount {
                pages: 2,
                blocks: 1
            }
        ),
        "{e}"
    );
    let e = block_on(c.insert(&h, &toks(1, 9), &[&good[..10]])).unwrap_err();
    assert!(
        matches!(
            e,
            CacheError::BlockSize {
                index: 0,
                got: 10,
                ..
            }
        ),
        "{e}"
    );
    // Extending a cached prefix: its cached pages may come empty, a missing one may not.
    let mut longer = t.clone();
    longer.extend_from_slice(&toks(1, 77));
    let fourth = block(3, 0);
    let e = block_on(c.insert(&h, &longer, &[&[], &[], &fourth, &[]])).unwrap_err();
    assert!(matches!(e, CacheError::MissingBlock { index: 3 }), "{e}");
    let r = block_on(c.insert(&h, &longer, &[&[], &[], &[], &fourth])).unwrap();
    assert_eq!((r.existing, r.stored), (3, 1));
    assert_eq!(read_all(c, &h, &longer).1[3], fourth);
    let e = c.lookup(&h, &toks(65, 1)).unwrap_err();
    assert!(matches!(e, CacheError::TooManyTokens { .. }), "{e}");
    assert!(e.to_string().contains("limit of 1024 tokens"));
    let e = c.lease(&h, &t, Duration::ZERO).unwrap_err();
    assert!(matches!(e, CacheError::LeaseInPast { .. }), "{e}");
    s.clock.advance(Duration::from_secs(5));
    let e = c.lease_until(&h, &t, 1_000_000_000).unwrap_err();
    assert!(
        matches!(e, CacheError::LeaseInPast { past_by_ms: 4000 }),
        "{e}"
    );
    assert!(matches!(
        c.release(12345),
        Err(CacheError::UnknownLease(12345))
    ));
    assert!(matches!(
        block_on(c.evict(TierId(3), 1)),
        Err(CacheError::UnknownTier(_))
    ));

    // A handle from another cache names an unknown namespace here.
    let other = setup(&[8], WritePolicy::WriteBack);
    let foreign = other.cache.register(&ns(b"x")).unwrap();
    assert!(matches!(
        c.lookup(&foreign, &t),
        Err(CacheError::UnknownNamespace(_))
    ));
    // A namespace with another block size or page size is refused.
    let big = Namespace::new(
        [3; 32],
        KvDtype::F32,
        KvLayout::PageFirst,
        PS as u32,
        KvShape {
            num_layers: 2,
            num_kv_heads: 1,
            head_dim: 4,
        },
        TpShape::default(),
        b"",
    )
    .unwrap();
    assert!(matches!(
        c.register(&big),
        Err(CacheError::NamespaceMismatch { .. })
    ));

    // Nothing stored was lost.
    let (r, out) = read_all(c, &h, &t);
    assert_eq!(r.read, 3);
    assert_eq!(out[2], block(2, 0));
    c.check_invariants().unwrap();
}

#[test]
fn zero_and_absurd_capacities_are_refused() {
    let bs = ns(b"").block_bytes();
    let mk = |cap_bytes: u64, tier_blocks: u64| {
        TieredCache::new(
            vec![TierSpec {
                tier: Arc::new(MemTier::new(TierKind::Host, bs, tier_blocks)),
                capacity_bytes: cap_bytes,
                eviction: EvictionKind::Lru,
            }],
            CacheConfig {
                page_size: PS as u32,
                ..CacheConfig::default()
            },
        )
    };
    assert!(matches!(mk(0, 10), Err(CacheError::InvalidConfig(_))));
    assert!(matches!(
        mk(bs as u64 - 1, 10),
        Err(CacheError::InvalidConfig(_))
    ));
    assert!(matches!(
        mk(100 * bs as u64, 10),
        Err(CacheError::InvalidConfig(_))
    ));
    assert!(matches!(
        mk(u64::MAX, u64::MAX),
        Err(CacheError::InvalidConfig(_))
    ));
    assert!(mk(10 * bs as u64, 10).is_ok());
    assert!(TieredCache::new(vec![], CacheConfig::default()).is_err());
}

#[test]
fn a_corrupt_copy_is_never_served() {
    let s = setup(&[8, 8], WritePolicy::WriteThrough);
    let h = s.cache.register(&ns(b"")).unwrap();
    let t = toks(3, 7);
    insert(&s.cache, &h, &t, 4);
    assert_eq!(s.tiers[1].live_blocks(), 3, "write-through copied down");
    // Corrupt every host copy: reads fall through to the disk tier, with the right bytes.
    for hd in s.tiers[0].handles() {
        s.tiers[0].corrupt(hd);
    }
    let (r, out) = read_all(&s.cache, &h, &t);
    assert_eq!(r.read, 3);
    assert_eq!(r.from_tier, vec![0, 3]);
    assert_eq!(out[1], block(1, 4));
    let st = s.cache.stats();
    assert_eq!(st.tiers[0].read_errors, 3);
    assert_eq!(s.cache.lookup(&h, &t).unwrap().resident, vec![0, 3]);
    // Now corrupt the only copy of the middle page: the prefix stops before it.
    let mid = s.tiers[1].handles();
    s.tiers[1].corrupt(mid[1]);
    let (r, _) = read_all(&s.cache, &h, &t);
    assert_eq!(r.read, 1);
    assert_eq!(s.cache.lookup(&h, &t).unwrap().matched_pages, 1);
    s.cache.check_invariants().unwrap();
    // Storing the prefix again repairs the lost page (the third is still good on disk).
    let rep = insert(&s.cache, &h, &t, 4);
    assert_eq!(rep.stored, 1, "{rep:?}");
    let (r, out) = read_all(&s.cache, &h, &t);
    assert_eq!(r.read, 3);
    assert_eq!(out[2], block(2, 4));
    s.cache.check_invariants().unwrap();
}

#[test]
fn write_back_demotes_on_eviction() {
    let s = setup(&[2, 8], WritePolicy::WriteBack);
    let h = s.cache.register(&ns(b"")).unwrap();
    let t = toks(5, 2);
    let rep = insert(&s.cache, &h, &t, 9);
    assert_eq!(rep.stored, 5);
    assert_eq!(s.tiers[0].live_blocks(), 2);
    assert_eq!(s.tiers[1].live_blocks(), 3);
    let st = s.cache.stats();
    assert_eq!(st.tiers[0].demotions, 3);
    let (r, out) = read_all(&s.cache, &h, &t);
    assert_eq!(r.read, 5);
    for (i, b) in out.iter().enumerate() {
        assert_eq!(b, &block(i, 9));
    }
}

#[test]
fn selective_write_through_copies_after_enough_hits() {
    let s = setup(&[8, 8], WritePolicy::WriteThroughSelective { hits: 2 });
    let h = s.cache.register(&ns(b"")).unwrap();
    let t = toks(2, 3);
    insert(&s.cache, &h, &t, 1);
    assert_eq!(s.tiers[1].live_blocks(), 0);
    read_all(&s.cache, &h, &t);
    assert_eq!(s.tiers[1].live_blocks(), 0, "one hit is not enough");
    read_all(&s.cache, &h, &t);
    assert_eq!(s.tiers[1].live_blocks(), 2);
    // Evicting the host copies keeps the data on the lower tier.
    assert_eq!(block_on(s.cache.evict(TierId(0), 10)).unwrap(), 2);
    let (r, out) = read_all(&s.cache, &h, &t);
    assert_eq!(r.from_tier, vec![0, 2]);
    assert_eq!(out[1], block(1, 1));
}

#[test]
fn prefetch_policies() {
    let s = setup(&[8, 8], WritePolicy::WriteBack);
    let h = s.cache.register(&ns(b"")).unwrap();
    let t = toks(4, 11);
    insert(&s.cache, &h, &t, 6);
    block_on(s.cache.evict(TierId(0), 8)).unwrap();
    assert_eq!(s.cache.lookup(&h, &t).unwrap().resident, vec![0, 4]);

    // Timeout with a deadline already passed: nothing is copied.
    let (ticket, job) = s
        .cache
        .prefetch(
            &h,
            &t,
            TierId(0),
            PrefetchPolicy::Timeout {
                base: Duration::ZERO,
                per_page: Duration::ZERO,
            },
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(block_on(job.run()), 0);
    let out = block_on(ticket.finish());
    assert_eq!((out.matched, out.ready), (4, 0));
    s.cache.release(out.lease).unwrap();

    // Best effort: the request is scheduled before the job ran; it copies nothing more.
    let (ticket, job) = s
        .cache
        .prefetch(
            &h,
            &t,
            TierId(0),
            PrefetchPolicy::BestEffort,
            Duration::from_secs(5),
        )
        .unwrap();
    let waiter = std::thread::spawn(move || block_on(ticket.finish()));
    // finish() stops the job first thing; wait until the stop is visible to the job.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !job.is_stopped() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(block_on(job.run()), 0);
    let out = waiter.join().unwrap();
    assert_eq!((out.matched, out.ready), (4, 0));
    s.cache.release(out.lease).unwrap();

    // Wait-complete: everything arrives, and it is leased until released.
    let (ticket, job) = s
        .cache
        .prefetch(
            &h,
            &t,
            TierId(0),
            PrefetchPolicy::WaitComplete,
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(block_on(job.run()), 4);
    let out = block_on(ticket.finish());
    assert_eq!((out.matched, out.ready, out.error), (4, 4, None));
    assert_eq!(s.cache.lookup(&h, &t).unwrap().resident, vec![4, 4]);
    assert_eq!(
        s.cache.stats().tiers[0].pinned_bytes,
        4 * s.cache.block_bytes() as u64
    );
    assert_eq!(
        block_on(s.cache.evict(TierId(0), 8)).unwrap(),
        0,
        "leased pages stay"
    );
    s.cache.release(out.lease).unwrap();
    assert_eq!(s.cache.stats().tiers[0].pinned_bytes, 0);
    assert_eq!(block_on(s.cache.evict(TierId(0), 8)).unwrap(), 4);
}

#[test]
fn leases_expire_at_their_deadline() {
    let s = setup(&[4], WritePolicy::WriteBack);
    let h = s.cache.register(&ns(b"")).unwrap();
    let t = toks(2, 1);
    insert(&s.cache, &h, &t, 0);
    let (id, pages) = s.cache.lease(&h, &t, Duration::from_secs(10)).unwrap();
    assert_eq!(pages, 2);
    assert_eq!(block_on(s.cache.evict(TierId(0), 4)).unwrap(), 0);
    s.clock.advance(Duration::from_secs(9));
    assert_eq!(block_on(s.cache.evict(TierId(0), 4)).unwrap(), 0);
    s.clock.advance(Duration::from_secs(1));
    assert_eq!(block_on(s.cache.evict(TierId(0), 4)).unwrap(), 2);
    assert!(matches!(
        s.cache.release(id),
        Err(CacheError::UnknownLease(_))
    ));
    assert_eq!(s.cache.stats().pages, 0);
}

#[test]
fn a_full_tier_of_pinned_pages_refuses_new_blocks_cleanly() {
    let s = setup(&[2], WritePolicy::WriteBack);
    let h = s.cache.register(&ns(b"")).unwrap();
    let t = toks(2, 1);
    insert(&s.cache, &h, &t, 0);
    let pin = s.cache.pin(&h, &t).unwrap();
    assert_eq!(pin.len(), 2);
    let blocks = [block(0, 1)];
    let e = block_on(s.cache.insert(&h, &toks(1, 99), &[&blocks[0]])).unwrap_err();
    assert!(matches!(e, CacheError::TierFull(TierId(0))), "{e}");
    drop(pin);
    let rep = block_on(s.cache.insert(&h, &toks(1, 99), &[&blocks[0]])).unwrap();
    assert_eq!(rep.stored, 1);
    s.cache.check_invariants().unwrap();
}

#[test]
fn a_failing_tier_write_is_an_error_and_keeps_the_rest() {
    let s = setup(&[8], WritePolicy::WriteBack);
    let h = s.cache.register(&ns(b"")).unwrap();
    let t = toks(2, 1);
    insert(&s.cache, &h, &t, 0);
    s.tiers[0].fail_writes(true);
    let b = block(0, 0);
    let e = block_on(s.cache.insert(&h, &toks(1, 5), &[&b])).unwrap_err();
    assert!(matches!(e, CacheError::Tier { .. }), "{e}");
    s.tiers[0].fail_writes(false);
    assert_eq!(read_all(&s.cache, &h, &t).0.read, 2);
    s.cache.check_invariants().unwrap();
}

/// A tier whose writes pause once before completing, so a test can drop a store midway.
struct SlowTier(MemTier);

struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            std::task::Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    }
}

impl Tier for SlowTier {
    fn kind(&self) -> TierKind {
        self.0.kind()
    }
    fn block_size(&self) -> usize {
        self.0.block_size()
    }
    fn capacity_blocks(&self) -> u64 {
        self.0.capacity_blocks()
    }
    fn write<'a>(&'a self, meta: &'a BlockMeta, data: &'a [u8]) -> TierFuture<'a, BlockHandle> {
        Box::pin(async move {
            YieldOnce(false).await;
            self.0.write(meta, data).await
        })
    }
    fn read<'a>(
        &'a self,
        h: BlockHandle,
        key: &'a BlockKey,
        out: &'a mut [u8],
    ) -> TierFuture<'a, ()> {
        self.0.read(h, key, out)
    }
    fn free(&self, h: BlockHandle) {
        self.0.free(h)
    }
    fn bandwidth(&self) -> Bandwidth {
        self.0.bandwidth()
    }
}

#[test]
fn a_cancelled_store_leaves_nothing_behind() {
    let bs = ns(b"").block_bytes();
    let tier = Arc::new(SlowTier(MemTier::new(TierKind::Host, bs, 4)));
    let cache = TieredCache::new(
        vec![TierSpec {
            tier: tier.clone(),
            capacity_bytes: 4 * bs as u64,
            eviction: EvictionKind::Lru,
        }],
        CacheConfig {
            page_size: PS as u32,
            write_policy: WritePolicy::WriteBack,
            ..CacheConfig::default()
        },
    )
    .unwrap();
    let h = cache.register(&ns(b"")).unwrap();
    let t = toks(4, 8);
    let blocks: Vec<Vec<u8>> = (0..4).map(|i| block(i, 0)).collect();
    let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
    {
        let mut fut = Box::pin(cache.insert(&h, &t, &refs));
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        // First poll: the first write pauses. Second: first block written, second pauses.
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(tier.0.live_blocks(), 1);
    } // dropped midway
    assert_eq!(tier.0.live_blocks(), 0, "the written block was given back");
    cache.check_invariants().unwrap();
    assert_eq!(cache.lookup(&h, &t).unwrap().matched_pages, 0);
    // The whole capacity is still usable.
    let rep = block_on(cache.insert(&h, &t, &refs)).unwrap();
    assert_eq!(rep.stored, 4);
    assert_eq!(read_all(&cache, &h, &t).0.read, 4);
}

#[test]
fn a_declined_demotion_strands_nothing() {
    let s = setup(&[2, 8], WritePolicy::WriteBack);
    let h = s.cache.register(&ns(b"")).unwrap();
    s.tiers[1].reject_writes(true);
    let t = toks(4, 21);
    let blocks: Vec<Vec<u8>> = (0..4).map(|i| block(i, 2)).collect();
    let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
    // The lower tier declines every page, so only what fits on top is stored, in order.
    let rep = block_on(s.cache.insert(&h, &t, &refs)).unwrap();
    assert_eq!(rep.stored, 2);
    s.cache.check_invariants().unwrap();
    let (r, out) = read_all(&s.cache, &h, &t);
    assert_eq!(r.read, 2);
    assert_eq!(out[1], block(1, 2));
    // Nothing in the tree is resident nowhere.
    assert!(s.cache.residency(&h, &t).iter().all(|(mask, _)| *mask != 0));
    // Once the lower tier accepts again (and the pages were used since), demotion works.
    s.tiers[1].reject_writes(false);
    let rep = block_on(s.cache.insert(&h, &t, &refs)).unwrap();
    assert_eq!(rep.stored, 2);
    assert_eq!(read_all(&s.cache, &h, &t).0.read, 4);
    s.cache.check_invariants().unwrap();
}

#[test]
fn a_dropped_prefetch_job_does_not_hang_the_scheduler() {
    let s = setup(&[8, 8], WritePolicy::WriteBack);
    let h = s.cache.register(&ns(b"")).unwrap();
    let t = toks(2, 4);
    insert(&s.cache, &h, &t, 0);
    block_on(s.cache.evict(TierId(0), 8)).unwrap();
    let (ticket, job) = s
        .cache
        .prefetch(
            &h,
            &t,
            TierId(0),
            PrefetchPolicy::WaitComplete,
            Duration::from_secs(5),
        )
        .unwrap();
    drop(job); // its task was cancelled before it ran
    let out = block_on(ticket.finish());
    assert_eq!((out.matched, out.ready), (2, 0));
    s.cache.release(out.lease).unwrap();
}

#[test]
fn huge_durations_do_not_panic() {
    let s = setup(&[8, 8], WritePolicy::WriteBack);
    let h = s.cache.register(&ns(b"")).unwrap();
    let t = toks(1, 4);
    insert(&s.cache, &h, &t, 0);
    let policy = PrefetchPolicy::Timeout {
        base: Duration::MAX,
        per_page: Duration::MAX,
    };
    let (ticket, job) = s
        .cache
        .prefetch(&h, &t, TierId(0), policy, Duration::from_secs(5))
        .unwrap();
    block_on(job.run());
    let out = block_on(ticket.finish());
    assert_eq!(out.ready, 1);
    assert!(
        s.cache.lease(&h, &t, Duration::MAX).is_err(),
        "over the configured maximum"
    );
}

#[test]
fn lookup_by_block_keys_matches_the_token_lookup_and_respects_namespaces() {
    let s = setup(&[32, 32], WritePolicy::WriteThrough);
    let a = s.cache.register(&ns(b"tenant-a")).unwrap();
    let b = s.cache.register(&ns(b"tenant-b")).unwrap();
    let t = toks(6, 7);
    insert(&s.cache, &a, &t[..4 * PS], 1);
    let keys = ns(b"tenant-a").page_keys(&t);
    let by_keys = s.cache.lookup_keys(&a, &keys).unwrap();
    let by_tokens = s.cache.lookup(&a, &t).unwrap();
    assert_eq!(by_keys.matched_pages, 4);
    assert_eq!(by_keys.requested_pages, 6);
    assert_eq!(by_keys.resident, by_tokens.resident);
    // Another tenant's namespace never matches these keys, even given them verbatim.
    assert_eq!(s.cache.lookup_keys(&b, &keys).unwrap().matched_pages, 0);
    // Keys out of chain order stop the match where the chain breaks.
    let skipped = [keys[0], keys[2]];
    assert_eq!(s.cache.lookup_keys(&a, &skipped).unwrap().matched_pages, 1);
    assert_eq!(
        s.cache.lookup_keys(&a, &keys[1..]).unwrap().matched_pages,
        0
    );
    // Too many keys is the token limit, in pages.
    let many = vec![keys[0]; 65];
    assert!(matches!(
        s.cache.lookup_keys(&a, &many),
        Err(CacheError::TooManyTokens { .. })
    ));
    s.cache.check_invariants().unwrap();
}

#[test]
fn read_from_streams_a_prefix_in_pieces() {
    let s = setup(&[32], WritePolicy::WriteBack);
    let a = s.cache.register(&ns(b"")).unwrap();
    let t = toks(5, 3);
    insert(&s.cache, &a, &t, 9);
    let mut got = Vec::new();
    let mut skip = 0;
    loop {
        let mut out = vec![Vec::new(); 2];
        let r = block_on(s.cache.read_from(&a, &t, skip, &mut out)).unwrap();
        if r.read == 0 {
            break;
        }
        got.extend(out.into_iter().take(r.read));
        skip += r.read;
    }
    assert_eq!(got.len(), 5);
    for (i, b) in got.iter().enumerate() {
        assert_eq!(*b, block(i, 9), "page {i}");
    }
    let mut out = vec![Vec::new(); 2];
    let r = block_on(s.cache.read_from(&a, &t, 99, &mut out)).unwrap();
    assert_eq!((r.matched, r.read), (0, 0));
}

#[test]
fn lease_in_tier_hands_out_handles_that_outlive_eviction_pressure() {
    let s = setup(&[4, 16], WritePolicy::WriteBack);
    let a = s.cache.register(&ns(b"")).unwrap();
    let t = toks(4, 5);
    insert(&s.cache, &a, &t, 2);
    let (lease, handles) = s
        .cache
        .lease_in_tier(&a, &t, Duration::from_secs(5), TierId(0))
        .unwrap();
    assert_eq!(handles.len(), 4);
    // Another prefix cannot push the leased blocks out of the full host tier.
    let other = toks(4, 6);
    let blocks: Vec<Vec<u8>> = (0..4).map(|i| block(i, 3)).collect();
    let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
    assert!(block_on(s.cache.insert(&a, &other, &refs)).is_err());
    let mut buf = vec![0u8; ns(b"").block_bytes()];
    for (i, h) in handles.iter().enumerate() {
        block_on(s.tiers[0].read(*h, &ns(b"").page_keys(&t)[i], &mut buf)).unwrap();
        assert_eq!(buf, block(i, 2));
    }
    // Once released, the same insert succeeds by moving them down.
    s.cache.release(lease).unwrap();
    assert_eq!(insert(&s.cache, &a, &other, 3).stored, 4);
    assert!(matches!(
        s.cache
            .lease_in_tier(&a, &t, Duration::from_secs(1), TierId(7)),
        Err(CacheError::UnknownTier(_))
    ));
    s.cache.check_invariants().unwrap();
}

/// A tier whose next read of one handle gets its answer (decided when the read starts, as
/// a device read's bytes are) only when the test opens the gate: a read that is slow to
/// report its failure.
struct GatedTier {
    inner: MemTier,
    hold: std::sync::Mutex<Option<BlockHandle>>,
    open: std::sync::atomic::AtomicBool,
}

struct Gate<'a>(&'a GatedTier);

impl std::future::Future for Gate<'_> {
    type Output = ();
    fn poll(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        // Polled by hand in the test, so no waker is kept.
        if self.0.open.load(std::sync::atomic::Ordering::SeqCst) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }
}

impl Tier for GatedTier {
    fn kind(&self) -> TierKind {
        self.inner.kind()
    }
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }
    fn capacity_blocks(&self) -> u64 {
        self.inner.capacity_blocks()
    }
    fn write<'a>(&'a self, meta: &'a BlockMeta, data: &'a [u8]) -> TierFuture<'a, BlockHandle> {
        self.inner.write(meta, data)
    }
    fn read<'a>(
        &'a self,
        h: BlockHandle,
        key: &'a BlockKey,
        out: &'a mut [u8],
    ) -> TierFuture<'a, ()> {
        let held = {
            let mut hold = self.hold.lock().unwrap();
            let held = *hold == Some(h);
            if held {
                *hold = None;
            }
            held
        };
        Box::pin(async move {
            let r = self.inner.read(h, key, out).await;
            if held {
                Gate(self).await;
            }
            r
        })
    }
    fn free(&self, h: BlockHandle) {
        self.inner.free(h)
    }
    fn bandwidth(&self) -> Bandwidth {
        self.inner.bandwidth()
    }
}

/// Issue 15, item 10: a read that fails drops the copy it read, not whatever copy the page
/// has in that tier when the failure is reported. Here another reader drops the corrupt
/// copy first and a store puts a good one in its place before the slow read reports.
#[test]
fn a_failed_read_discards_only_the_copy_it_read() {
    let bs = ns(b"").block_bytes();
    let tier = Arc::new(GatedTier {
        inner: MemTier::new(TierKind::Host, bs, 8),
        hold: std::sync::Mutex::new(None),
        open: std::sync::atomic::AtomicBool::new(false),
    });
    let cache = TieredCache::new(
        vec![TierSpec {
            tier: tier.clone(),
            capacity_bytes: 8 * bs as u64,
            eviction: EvictionKind::Lru,
        }],
        CacheConfig {
            page_size: PS as u32,
            write_policy: WritePolicy::WriteBack,
            ..CacheConfig::default()
        },
    )
    .unwrap();
    let h = cache.register(&ns(b"")).unwrap();
    let t = toks(1, 31);
    insert(&cache, &h, &t, 5);
    let [old] = tier.inner.handles()[..] else {
        panic!("one block stored");
    };
    tier.inner.corrupt(old);
    *tier.hold.lock().unwrap() = Some(old);
    // A: its read of the corrupt copy is under way and slow to answer.
    let mut out_a = vec![Vec::new(); 1];
    let mut a = Box::pin(cache.read(&h, &t, &mut out_a));
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    assert!(a.as_mut().poll(&mut cx).is_pending());
    // B reads the same copy, fails and drops it (its handle goes back to the tier, and
    // another block takes it); then the page is stored again, good, under a new handle.
    assert_eq!(read_all(&cache, &h, &t).0.read, 0);
    insert(&cache, &h, &toks(1, 32), 6);
    insert(&cache, &h, &t, 5);
    assert_eq!(cache.lookup(&h, &t).unwrap().resident, vec![1]);
    assert_eq!(tier.inner.live_blocks(), 2);
    // A hears of its failure now: the good copy stays.
    tier.open.store(true, std::sync::atomic::Ordering::SeqCst);
    let std::task::Poll::Ready(r) = a.as_mut().poll(&mut cx) else {
        panic!("read A still pending");
    };
    assert_eq!(r.unwrap().read, 0);
    drop(a);
    assert_eq!(
        cache.lookup(&h, &t).unwrap().resident,
        vec![1],
        "the good copy stored meanwhile was dropped"
    );
    assert_eq!(tier.inner.live_blocks(), 2);
    let (r, out) = read_all(&cache, &h, &t);
    assert_eq!(r.read, 1);
    assert_eq!(out[0], block(0, 5));
    cache.check_invariants().unwrap();
}
