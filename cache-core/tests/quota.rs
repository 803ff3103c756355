//! Quota groups: a group at its quota in a tier makes room by evicting its own blocks,
//! never another group's; its counts stay exact through evictions, write-back demotion and
//! stores of many pages at once.

use std::sync::Arc;

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

fn cache(caps: &[u64], policy: WritePolicy) -> TieredCache {
    let bs = ns(b"").block_bytes();
    let kinds = [TierKind::Host, TierKind::Disk];
    TieredCache::new(
        caps.iter()
            .enumerate()
            .map(|(i, &c)| TierSpec {
                tier: Arc::new(MemTier::new(kinds[i], bs, c)),
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
    )
    .unwrap()
}

fn insert(c: &TieredCache, h: &NamespaceHandle, t: &[u32]) -> Result<InsertReport, CacheError> {
    let bs = ns(b"").block_bytes();
    let blocks: Vec<Vec<u8>> = (0..t.len() / PS).map(|i| vec![i as u8; bs]).collect();
    let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
    block_on(c.insert(h, t, &refs))
}

#[test]
fn a_group_at_its_quota_evicts_only_its_own_blocks() {
    let c = cache(&[64], WritePolicy::WriteThrough);
    let a = c.register(&ns(b"a")).unwrap();
    let b = c.register(&ns(b"b")).unwrap();
    c.set_group(&a, 1);
    c.set_group(&b, 2);
    c.set_group_quota(1, TierId(0), Some(10));
    // B fills most of the tier; A stores far more than its quota, in long batches.
    let bt = toks(40, 99);
    insert(&c, &b, &bt).unwrap();
    for s in 0..6 {
        let rep = insert(&c, &a, &toks(8, s)).unwrap();
        assert_eq!(rep.stored, 8, "prompt {s}");
        assert!(c.group_blocks(1)[0] <= 10, "{:?}", c.group_blocks(1));
    }
    // A store longer than the quota keeps its leading pages only while it can, and never
    // passes the quota.
    let long = toks(20, 1000);
    let _ = insert(&c, &a, &long);
    assert!(c.group_blocks(1)[0] <= 10, "{:?}", c.group_blocks(1));
    assert_eq!(c.group_blocks(2)[0], 40);
    assert_eq!(c.lookup(&b, &bt).unwrap().matched_pages, 40);
    // The counts are the pages really resident.
    assert_eq!(
        c.stats().tiers[0].resident_bytes / ns(b"").block_bytes() as u64,
        c.group_blocks(1)[0] + c.group_blocks(2)[0]
    );
    c.check_invariants().unwrap();
}

#[test]
fn a_group_whose_blocks_are_all_leased_is_refused_by_name() {
    let c = cache(&[64], WritePolicy::WriteThrough);
    let a = c.register(&ns(b"a")).unwrap();
    c.set_group(&a, 1);
    c.set_group_quota(1, TierId(0), Some(4));
    let t = toks(4, 1);
    insert(&c, &a, &t).unwrap();
    let lease = c.lease(&a, &t, std::time::Duration::from_secs(60)).unwrap();
    let e = insert(&c, &a, &toks(2, 2)).unwrap_err();
    assert!(
        matches!(
            e,
            CacheError::QuotaFull {
                group: 1,
                quota: 4,
                ..
            }
        ),
        "{e:?}"
    );
    c.release(lease.0).unwrap();
    insert(&c, &a, &toks(2, 2)).unwrap();
    assert_eq!(c.group_blocks(1)[0], 4);
}

#[test]
fn counts_follow_write_back_demotion_and_the_disk_quota() {
    let c = cache(&[8, 32], WritePolicy::WriteBack);
    let a = c.register(&ns(b"a")).unwrap();
    let b = c.register(&ns(b"b")).unwrap();
    c.set_group(&a, 1);
    c.set_group(&b, 2);
    c.set_group_quota(1, TierId(1), Some(6));
    let bt = toks(6, 50);
    insert(&c, &b, &bt).unwrap();
    for s in 0..5 {
        insert(&c, &a, &toks(4, s)).unwrap();
        let g = c.group_blocks(1);
        assert!(g[1] <= 6, "{g:?}");
    }
    // B's pages went down to disk when A's took the host tier, and stayed there.
    let g = c.group_blocks(2);
    assert_eq!(g[0] + g[1], 6, "{g:?}");
    assert_eq!(c.lookup(&b, &bt).unwrap().matched_pages, 6);
    c.check_invariants().unwrap();
}
