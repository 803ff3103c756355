//! The controller over a real G2 host pool and a real G3 disk tier: blocks written through
//! to disk are found again by a fresh cache after a restart, and blocks the disk tier
//! reclaims on its own leave the index.

use std::sync::Arc;

use strata_cache_core::*;
use strata_disk_tier::{DiskTier, DiskTierConfig};
use strata_host_tier::{HostPool, HostPoolConfig};

const PS: usize = 16;

fn ns() -> Namespace {
    Namespace::new(
        [4; 32],
        KvDtype::F16,
        KvLayout::PageFirst,
        PS as u32,
        KvShape {
            num_layers: 8,
            num_kv_heads: 2,
            head_dim: 32,
        },
        TpShape::default(),
        b"tenant",
    )
    .unwrap()
}

fn prompt(conv: u32, pages: usize) -> Vec<u32> {
    (0..(pages * PS) as u32)
        .map(|i| if i < 64 { i } else { i ^ (conv << 20) })
        .collect()
}

fn block_for(key: &BlockKey, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| key.0[i % 32].wrapping_add((i / 32) as u8))
        .collect()
}

async fn cache(dir: &std::path::Path, disk_cap: u64, segment: u64) -> (TieredCache, Arc<DiskTier>) {
    let bs = ns().block_bytes();
    let host = Arc::new(HostPool::new(HostPoolConfig::new(bs, 16 * bs as u64)).unwrap());
    let mut cfg = DiskTierConfig::new(dir.join("g3.dat"), disk_cap, bs);
    cfg.segment_bytes = segment;
    let disk = Arc::new(DiskTier::open(cfg).await.unwrap());
    let cap = disk.capacity_blocks() * bs as u64;
    let c = TieredCache::new(
        vec![
            TierSpec {
                tier: host,
                capacity_bytes: 16 * bs as u64,
                eviction: EvictionKind::Lru,
            },
            TierSpec {
                tier: disk.clone(),
                capacity_bytes: cap,
                eviction: EvictionKind::Sieve,
            },
        ],
        CacheConfig {
            page_size: PS as u32,
            write_policy: WritePolicy::WriteThrough,
            ..CacheConfig::default()
        },
    )
    .unwrap();
    (c, disk)
}

async fn store(c: &TieredCache, h: &NamespaceHandle, t: &[u32]) {
    let keys = ns().page_keys(t);
    let blocks: Vec<Vec<u8>> = keys
        .iter()
        .map(|k| block_for(k, ns().block_bytes()))
        .collect();
    let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
    c.insert(h, t, &refs).await.unwrap();
}

async fn check_read(c: &TieredCache, h: &NamespaceHandle, t: &[u32]) -> ReadReport {
    let keys = ns().page_keys(t);
    let mut out = vec![Vec::new(); keys.len()];
    let r = c.read(h, t, &mut out).await.unwrap();
    for i in 0..r.read {
        assert_eq!(out[i], block_for(&keys[i], ns().block_bytes()), "page {i}");
    }
    r
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap()
}

#[test]
fn a_restarted_cache_finds_blocks_on_disk() {
    let dir = std::env::temp_dir().join(format!("strata-dc-restart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let seg = 8 << 20;
    rt().block_on(async {
        let (c, _) = cache(&dir, 4096 + 4 * seg, seg).await;
        let h = c.register(&ns()).unwrap();
        for conv in 0..6 {
            store(&c, &h, &prompt(conv, 8)).await;
        }
        assert_eq!(
            c.stats().tiers[1].resident_bytes,
            (4 + 6 * 4) as u64 * ns().block_bytes() as u64
        );
    });
    rt().block_on(async {
        let (c, disk) = cache(&dir, 4096 + 4 * seg, seg).await;
        assert_eq!(disk.metrics().recovered_blocks, 28);
        let h = c.register(&ns()).unwrap();
        // Nothing in the index yet; the lookup finds the pages on disk.
        let r = c.lookup(&h, &prompt(3, 8)).unwrap();
        assert_eq!(r.matched_pages, 8);
        assert_eq!(r.resident, vec![0, 8]);
        let rr = check_read(&c, &h, &prompt(3, 8)).await;
        assert_eq!(rr.read, 8);
        assert_eq!(rr.from_tier, vec![0, 8]);
        // Another tenant does not find them.
        let other = c
            .register(&ns().with_tenant_salt(b"other").unwrap())
            .unwrap();
        assert_eq!(c.lookup(&other, &prompt(3, 8)).unwrap().matched_pages, 0);
        // Storing a recovered prompt again writes nothing new to disk.
        let before = disk.metrics().admitted_bytes;
        store(&c, &h, &prompt(4, 8)).await;
        assert_eq!(disk.metrics().admitted_bytes, before);
        c.check_invariants().unwrap();
    });
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn blocks_the_disk_reclaims_leave_the_index() {
    let dir = std::env::temp_dir().join(format!("strata-dc-reclaim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bs = ns().block_bytes() as u64;
    // Three small segments of about 8 blocks: writing 40 conversations wraps the ring often.
    let seg = (8 * (bs + 4096) + 8192).div_ceil(4096) * 4096;
    rt().block_on(async {
        let (c, disk) = cache(&dir, 4096 + 3 * seg, seg).await;
        let h = c.register(&ns()).unwrap();
        for conv in 0..40 {
            store(&c, &h, &prompt(conv, 6)).await;
            c.check_invariants().unwrap();
        }
        let m = disk.metrics();
        assert!(m.segments_reclaimed > 0 && m.blocks_dropped > 0, "{m:?}");
        let st = c.stats();
        assert!(st.tiers[1].resident_bytes <= disk.metrics().live_blocks * bs);
        // Whatever the index claims is cached reads back, and right: the pages the disk
        // dropped are no longer claimed.
        for conv in 0..40 {
            let claimed = c.lookup(&h, &prompt(conv, 6)).unwrap().matched_pages;
            let r = check_read(&c, &h, &prompt(conv, 6)).await;
            assert_eq!(r.read, claimed, "conversation {conv}");
        }
        assert_eq!(c.stats().tiers[1].read_errors, 0);
        c.check_invariants().unwrap();
    });
    std::fs::remove_dir_all(&dir).unwrap();
}
