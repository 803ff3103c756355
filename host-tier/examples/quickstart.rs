//! Quickstart: a G2 host pool under the tiered cache. Stores the KV blocks of a chat's first
//! turn, finds them again when the second turn arrives (the shared prefix is loaded instead
//! of recomputed), shows another tenant finding nothing, and fills the pool past capacity
//! to show eviction. Prints per-tier hits at the end.
//!
//! Run: `cargo run --release --example quickstart`

use std::sync::Arc;

use strata_cache_core::{
    CacheConfig, EvictionKind, KvDtype, KvLayout, KvShape, Namespace, TierSpec, TieredCache,
    TpShape, WritePolicy, block_on,
};
use strata_host_tier::{HostPool, HostPoolConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SmolLM2-135M's KV shape: 30 layers, 3 KV heads of 64, bf16, 64-token pages.
    let shape = KvShape {
        num_layers: 30,
        num_kv_heads: 3,
        head_dim: 64,
    };
    let model = *blake3::hash(b"SmolLM2-135M-Instruct.Q4_1.gguf").as_bytes();
    let ns = Namespace::new(
        model,
        KvDtype::Bf16,
        KvLayout::PageFirst,
        64,
        shape,
        TpShape::default(),
        b"tenant-a",
    )?;
    let block = ns.block_bytes();
    let capacity = 64 * block as u64;
    let pool = Arc::new(HostPool::new(HostPoolConfig::new(block, capacity))?);
    println!(
        "G2 host pool: {} slots of {} KiB ({:.1} MiB)",
        pool.slots(),
        block / 1024,
        capacity as f64 / 1048576.0
    );
    let cache = TieredCache::new(
        vec![TierSpec {
            tier: pool.clone(),
            capacity_bytes: capacity,
            eviction: EvictionKind::Lru,
        }],
        CacheConfig {
            page_size: 64,
            write_policy: WritePolicy::WriteBack,
            ..CacheConfig::default()
        },
    )?;
    let tenant_a = cache.register(&ns)?;
    let tenant_b = cache.register(&ns.with_tenant_salt(b"tenant-b")?)?;

    // Turn 1: a 1,000-token prompt. Only whole pages are cached: 15 pages (960 tokens).
    let turn1: Vec<u32> = (0..1000u32).map(|i| (i * 7919) % 49152).collect();
    let pages = turn1.len() / 64;
    let blocks: Vec<Vec<u8>> = (0..pages).map(|p| vec![p as u8; block]).collect();
    let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
    let stored = block_on(cache.insert(&tenant_a, &turn1[..pages * 64], &refs))?;
    println!(
        "turn 1: stored {} pages ({} tokens)",
        stored.stored,
        stored.stored * 64
    );

    // Turn 2 repeats turn 1 and adds 500 tokens.
    let mut turn2 = turn1.clone();
    turn2.extend((0..500u32).map(|i| (i * 104729) % 49152));
    let hit = cache.lookup(&tenant_a, &turn2)?;
    println!(
        "turn 2: {} of {} pages cached (host tier holds {}): {} tokens load instead of prefill",
        hit.matched_pages,
        hit.requested_pages,
        hit.resident[0],
        hit.matched_pages * 64
    );
    let mut out = vec![Vec::new(); hit.matched_pages];
    let read = block_on(cache.read(&tenant_a, &turn2, &mut out))?;
    assert!(out.iter().enumerate().all(|(p, b)| b[0] == p as u8));
    println!("turn 2: read {} blocks back, bytes verified", read.read);

    let other = cache.lookup(&tenant_b, &turn2)?;
    println!(
        "tenant B, same tokens: {} pages (tenants never share blocks)",
        other.matched_pages
    );

    // Fill past capacity: least recently used pages are evicted, never more than fits.
    for conv in 0..8u32 {
        let t: Vec<u32> = (0..640u32)
            .map(|i| (i + 1000 * conv + 50_000) % 49152)
            .collect();
        let b: Vec<Vec<u8>> = (0..10).map(|_| vec![0u8; block]).collect();
        let r: Vec<&[u8]> = b.iter().map(|x| x.as_slice()).collect();
        block_on(cache.insert(&tenant_a, &t, &r))?;
    }
    let after = cache.lookup(&tenant_a, &turn2)?;
    println!(
        "stored 80 more pages in a {}-slot pool: {} evicted least recently used first; turn 2 now finds {} pages",
        pool.slots(),
        cache.stats().tiers[0].evictions,
        after.matched_pages
    );

    let st = cache.stats();
    for (i, t) in st.tiers.iter().enumerate() {
        println!(
            "tier {i} ({}): hits {} pages, misses {} pages, evictions {}, resident {:.1} of {:.1} MiB",
            t.kind.map(|k| k.as_str()).unwrap_or("?"),
            t.hits,
            t.misses,
            t.evictions,
            t.resident_bytes as f64 / 1048576.0,
            t.capacity_bytes as f64 / 1048576.0
        );
    }
    Ok(())
}
