//! `micro index`: the radix index under a million pages.
//!
//! Population: 16 shared system prompts of 16 pages, then conversations of 128 pages
//! (8,192 tokens at page size 64) that each start with one of them, until at least
//! 1,000,000 pages are cached. Figures:
//! - `index.match_vs_memcmp`: time of `TieredCache::lookup` of a fully cached 8,192-token
//!   prompt over a plain comparison of the same bytes against a stored copy;
//! - `index.bytes_per_page`: heap bytes the cache's bookkeeping (index, per-tier handles,
//!   eviction state) allocated per page, measured by a counting allocator, minus the token
//!   ids (64 × 4 bytes per page);
//! - `index.insert_pages_per_s`: pages stored per second while populating.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use parking_lot::Mutex;
use strata_cache_core::{
    Bandwidth, BlockHandle, BlockKey, BlockMeta, CacheConfig, EvictionKind, KvDtype, KvLayout,
    KvShape, Namespace, Tier, TierError, TierFuture, TierKind, TierSpec, TieredCache, TpShape,
    WritePolicy, block_on,
};

use super::Figure;
use crate::alloc_count::live_bytes;
use crate::stats::{Rng, median};

const PS: usize = 64;
const PROMPT_PAGES: usize = 128;
const SYSTEM_PAGES: usize = 16;
const SYSTEMS: usize = 16;

/// A memory tier whose storage is allocated up front, so that the counting allocator sees
/// only the cache's bookkeeping while the index fills.
struct ArenaTier {
    block: usize,
    inner: Mutex<(Vec<u8>, Vec<u32>)>,
    slots: u64,
}

impl ArenaTier {
    fn new(block: usize, slots: usize) -> Self {
        ArenaTier {
            block,
            inner: Mutex::new((vec![0; block * slots], (0..slots as u32).rev().collect())),
            slots: slots as u64,
        }
    }
}

impl Tier for ArenaTier {
    fn kind(&self) -> TierKind {
        TierKind::Host
    }
    fn block_size(&self) -> usize {
        self.block
    }
    fn capacity_blocks(&self) -> u64 {
        self.slots
    }
    fn write<'a>(&'a self, _meta: &'a BlockMeta, data: &'a [u8]) -> TierFuture<'a, BlockHandle> {
        let mut g = self.inner.lock();
        let r = match g.1.pop() {
            Some(s) => {
                let off = s as usize * self.block;
                g.0[off..off + self.block].copy_from_slice(data);
                Ok(BlockHandle(u64::from(s)))
            }
            None => Err(TierError::Full),
        };
        Box::pin(async move { r })
    }
    fn read<'a>(
        &'a self,
        h: BlockHandle,
        _key: &'a BlockKey,
        out: &'a mut [u8],
    ) -> TierFuture<'a, ()> {
        let g = self.inner.lock();
        let off = h.0 as usize * self.block;
        out.copy_from_slice(&g.0[off..off + self.block]);
        Box::pin(async move { Ok(()) })
    }
    fn free(&self, h: BlockHandle) {
        self.inner.lock().1.push(h.0 as u32);
    }
    fn bandwidth(&self) -> Bandwidth {
        Bandwidth::default()
    }
}

pub fn run(quick: bool) -> anyhow::Result<Vec<Figure>> {
    let target_pages: usize = if quick { 50_000 } else { 1_000_000 };
    let rounds = if quick { 5 } else { 31 };
    let queries = 256;
    let ns = Namespace::new(
        [1; 32],
        KvDtype::Fp8E4m3,
        KvLayout::PageFirst,
        PS as u32,
        KvShape {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 1,
        },
        TpShape::default(),
        b"",
    )?;
    let block = ns.block_bytes();
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let tok = |rng: &mut Rng| rng.below(49_152) as u32;

    // Prompts (the bench's own memory, allocated before measuring).
    let systems: Vec<Vec<u32>> = (0..SYSTEMS)
        .map(|_| (0..SYSTEM_PAGES * PS).map(|_| tok(&mut rng)).collect())
        .collect();
    let per_conv = PROMPT_PAGES - SYSTEM_PAGES;
    let convs = (target_pages - SYSTEMS * SYSTEM_PAGES).div_ceil(per_conv);
    let mut prompts: Vec<Vec<u32>> = Vec::with_capacity(convs);
    for _ in 0..convs {
        let mut p = systems[rng.below(SYSTEMS as u64) as usize].clone();
        p.extend((0..per_conv * PS).map(|_| tok(&mut rng)));
        prompts.push(p);
    }
    let total_pages = SYSTEMS * SYSTEM_PAGES + convs * per_conv;
    let blocks: Vec<Vec<u8>> = (0..PROMPT_PAGES).map(|i| vec![i as u8; block]).collect();
    let block_refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
    let tier = Arc::new(ArenaTier::new(block, total_pages + 1024));

    eprintln!("index: populating {total_pages} pages ({convs} prompts of {PROMPT_PAGES} pages)...");
    let before = live_bytes();
    let cache = TieredCache::new(
        vec![TierSpec {
            tier: tier.clone(),
            capacity_bytes: ((total_pages + 1024) * block) as u64,
            eviction: EvictionKind::Lru,
        }],
        CacheConfig {
            page_size: PS as u32,
            write_policy: WritePolicy::WriteBack,
            max_tokens_per_call: PROMPT_PAGES * PS,
            ..CacheConfig::default()
        },
    )?;
    let h = cache.register(&ns)?;
    let t0 = Instant::now();
    let mut stored = 0;
    for (i, p) in prompts.iter().enumerate() {
        let r = block_on(cache.insert(&h, p, &block_refs)).context("insert")?;
        stored += r.stored;
        if i % 2000 == 0 {
            eprintln!("  {i}/{convs} prompts, {stored} pages");
        }
    }
    let insert_secs = t0.elapsed().as_secs_f64();
    let after = live_bytes();
    let st = cache.stats();
    if stored != total_pages || st.pages as usize != total_pages {
        bail!(
            "stored {stored} pages, index holds {}, expected {total_pages}",
            st.pages
        );
    }
    let bookkeeping = (after - before) as f64;
    let token_bytes = (total_pages * PS * 4) as f64;
    let bytes_per_page = (bookkeeping - token_bytes) / total_pages as f64;
    eprintln!(
        "index: {} pages in {} nodes; {:.1} MiB bookkeeping of which {:.1} MiB token ids",
        st.pages,
        st.nodes,
        bookkeeping / 1048576.0,
        token_bytes / 1048576.0
    );

    // Queries: fully cached 8,192-token prompts; the baseline compares each prompt with a
    // stored copy of itself.
    let picks: Vec<usize> = (0..queries)
        .map(|_| rng.below(convs as u64) as usize)
        .collect();
    let query: Vec<Vec<u32>> = picks.iter().map(|&i| prompts[i].clone()).collect();
    let copies: Vec<Vec<u32>> = picks.iter().map(|&i| prompts[i].clone()).collect();
    for q in &query {
        let r = cache.lookup(&h, q)?;
        if r.matched_pages != PROMPT_PAGES {
            bail!("lookup matched {} of {PROMPT_PAGES} pages", r.matched_pages);
        }
    }
    let mut t_index = Vec::new();
    let mut t_memcmp = Vec::new();
    let mut sink = 0usize;
    for _ in 0..rounds {
        let t = Instant::now();
        for q in &query {
            sink += std::hint::black_box(cache.lookup(&h, std::hint::black_box(q))?).matched_pages;
        }
        t_index.push(t.elapsed().as_secs_f64() / queries as f64);
        let t = Instant::now();
        for (q, c) in query.iter().zip(&copies) {
            sink += usize::from(
                std::hint::black_box(q.as_slice()) == std::hint::black_box(c.as_slice()),
            );
        }
        t_memcmp.push(t.elapsed().as_secs_f64() / queries as f64);
    }
    if sink == 0 {
        bail!("nothing matched");
    }
    let (mi, mm) = (median(t_index), median(t_memcmp));
    eprintln!(
        "index: lookup of {} tokens {:.2} us, memcmp {:.2} us",
        PROMPT_PAGES * PS,
        mi * 1e6,
        mm * 1e6
    );
    Ok(vec![
        Figure::new("index.match_vs_memcmp", mi / mm, 2, "x"),
        Figure::new("index.bytes_per_page", bytes_per_page, 1, "B"),
        Figure::new(
            "index.insert_pages_per_s",
            stored as f64 / insert_secs,
            0,
            "pages/s",
        ),
        Figure::new("index.match_us", mi * 1e6, 2, "us"),
        Figure::new("index.memcmp_us", mm * 1e6, 2, "us"),
    ])
}
