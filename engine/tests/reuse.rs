//! The reason the engine exists: KV pages exported to a cache tier and imported again give
//! the same logits as computing them, and so do one-pass and chunked prefill.

mod common;

use std::sync::Arc;

use common::{engine, ids, reference};
use strata_cache_core::{CacheConfig, EvictionKind, TierSpec, TieredCache, WritePolicy, block_on};
use strata_engine::sampler::argmax;
use strata_engine::{Engine, KvDtype, KvPool, Logits, Sequence};
use strata_host_tier::{HostPool, HostPoolConfig};

const PAGE: usize = 64;

fn greedy(
    e: &Engine,
    pool: &KvPool,
    seq: &mut Sequence,
    mut logits: Vec<f32>,
    n: usize,
) -> Vec<u32> {
    let mut out = Vec::new();
    for _ in 0..n {
        let t = argmax(&logits);
        out.push(t);
        logits = e.model.forward(pool, seq, &[t], Logits::Last).unwrap();
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn one_pass_chunked_and_imported_prefill_agree() {
    one_pass_chunked_and_imported_prefill_agree_in(KvDtype::F32);
}

#[test]
fn one_pass_chunked_and_imported_prefill_agree_with_f16_pages() {
    one_pass_chunked_and_imported_prefill_agree_in(KvDtype::F16);
}

fn one_pass_chunked_and_imported_prefill_agree_in(dtype: KvDtype) {
    let e = engine();
    let tokens = ids(&reference()["passage"]["tokens"]);
    assert!(tokens.len() > 5 * PAGE);
    let prefix_pages = 4;
    let cfg = &e.model.config;

    // 1. One pass.
    let pool = KvPool::new(cfg, dtype, PAGE, 16).unwrap();
    let mut seq = Sequence::new();
    let one = e
        .model
        .prefill(&pool, &mut seq, &tokens, tokens.len())
        .unwrap();
    let one_cont = greedy(e, &pool, &mut seq, one.clone(), 16);

    // 2. Chunks of 37 tokens (not page-aligned).
    // Its pages come from the pool out of order: a sequence that held six pages returned
    // them, and the free list hands them back last first.
    let pool2 = KvPool::new(cfg, dtype, PAGE, 16).unwrap();
    let mut scratch = Sequence::new();
    pool2.reserve(&mut scratch, 6 * PAGE).unwrap();
    pool2.release(&mut scratch);
    let mut seq2 = Sequence::new();
    let chunked = e.model.prefill(&pool2, &mut seq2, &tokens, 37).unwrap();
    assert_ne!(
        seq2.pages()[..3],
        [0, 1, 2],
        "the chunked run's pages are out of order"
    );
    let chunked_cont = greedy(e, &pool2, &mut seq2, chunked.clone(), 16);

    // 3. A first request computes the prefix and stores its pages in a host-tier cache ...
    let ns = e.model.namespace(dtype, PAGE, b"tenant").unwrap();
    assert_eq!(
        ns.block_bytes(),
        pool.block_bytes(),
        "a page is a cache block"
    );
    let host = Arc::new(
        HostPool::new(HostPoolConfig::new(
            ns.block_bytes(),
            8 * ns.block_bytes() as u64,
        ))
        .unwrap(),
    );
    let cache = TieredCache::new(
        vec![TierSpec {
            tier: host,
            capacity_bytes: 8 * ns.block_bytes() as u64,
            eviction: EvictionKind::Lru,
        }],
        CacheConfig {
            page_size: PAGE as u32,
            write_policy: WritePolicy::WriteBack,
            ..CacheConfig::default()
        },
    )
    .unwrap();
    let h = cache.register(&ns).unwrap();
    let prefix = &tokens[..prefix_pages * PAGE];
    let pool3 = KvPool::new(cfg, dtype, PAGE, 16).unwrap();
    let mut first = Sequence::new();
    e.model.prefill(&pool3, &mut first, prefix, 100).unwrap();
    let blocks: Vec<&[u8]> = (0..prefix_pages)
        .map(|i| pool3.export(&first, i).unwrap())
        .collect();
    block_on(cache.insert(&h, prefix, &blocks)).unwrap();
    pool3.release(&mut first);

    // ... and a second request with the same prompt loads them and prefills only the rest.
    let hit = cache.lookup(&h, &tokens).unwrap();
    assert_eq!(hit.matched_pages, prefix_pages);
    let mut got = vec![Vec::new(); hit.matched_pages];
    block_on(cache.read(&h, &tokens, &mut got)).unwrap();
    let pool4 = KvPool::new(cfg, dtype, PAGE, 16).unwrap();
    let mut seq4 = Sequence::new();
    for b in &got {
        pool4.import(&mut seq4, b).unwrap();
    }
    assert_eq!(seq4.len(), prefix_pages * PAGE);
    for i in 0..prefix_pages {
        assert_eq!(
            pool4.export(&seq4, i).unwrap(),
            blocks_of(&pool, &seq, i),
            "page {i} came back byte for byte"
        );
    }
    let imported = e
        .model
        .prefill(&pool4, &mut seq4, &tokens[prefix_pages * PAGE..], 512)
        .unwrap();
    let imported_cont = greedy(e, &pool4, &mut seq4, imported.clone(), 16);

    let (d_chunk, d_import) = (max_diff(&one, &chunked), max_diff(&one, &imported));
    println!(
        "{dtype} KV: max |Δlogit| vs one pass: chunked {d_chunk:e}, imported prefix {d_import:e}"
    );
    assert!(
        d_chunk < 1e-3 && d_import < 1e-3,
        "chunked {d_chunk}, imported {d_import}"
    );
    assert_eq!(one_cont, chunked_cont);
    assert_eq!(one_cont, imported_cont);

    // Another tenant's namespace finds nothing of it.
    let other = cache
        .register(&e.model.namespace(dtype, PAGE, b"other").unwrap())
        .unwrap();
    assert_eq!(cache.lookup(&other, &tokens).unwrap().matched_pages, 0);
}

/// Page `i` of the one-pass run, for the byte comparison (a page of the prefix holds the same
/// K/V however the prefill was chunked).
fn blocks_of<'a>(pool: &'a KvPool, seq: &'a Sequence, i: usize) -> &'a [u8] {
    pool.export(seq, i).unwrap()
}

#[test]
fn import_refuses_bad_blocks_and_keeps_what_it_has() {
    let e = engine();
    let pool = KvPool::new(&e.model.config, KvDtype::default(), PAGE, 4).unwrap();
    let mut seq = Sequence::new();
    let short = vec![0u8; pool.block_bytes() - 4];
    assert!(pool.import(&mut seq, &short).is_err());
    assert!(seq.is_empty());
    // Mid-page: imports must land on a page boundary, and a partly filled page (whose tail
    // still holds an earlier sequence's KV) cannot be exported.
    e.model
        .forward(&pool, &mut seq, &[1, 2, 3], Logits::Last)
        .unwrap();
    assert!(pool.export(&seq, 0).is_err());
    let block = vec![0u8; pool.block_bytes()];
    assert!(pool.import(&mut seq, &block).is_err());
    assert_eq!(seq.len(), 3);
    // Out-of-vocabulary tokens and a full pool are errors, not panics.
    assert!(
        e.model
            .forward(&pool, &mut seq, &[u32::MAX], Logits::Last)
            .is_err()
    );
    let long: Vec<u32> = (0..(5 * PAGE) as u32).collect();
    let err = e
        .model
        .forward(&pool, &mut seq, &long, Logits::Last)
        .unwrap_err();
    assert!(err.to_string().contains("full"), "{err}");
    // A refused reservation takes no pages: the sequence still has its one page.
    assert_eq!(seq.pages().len(), 1);
    assert_eq!(pool.used_pages(), 1);
    assert!(
        e.model
            .forward(&pool, &mut Sequence::new(), &[], Logits::Last)
            .is_err()
    );
}
