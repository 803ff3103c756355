//! `micro host`: G2 block writes and reads of 1.5 MiB blocks against single-thread memcpy of
//! the same bytes into (or out of) a region of the same size, both prefaulted, interleaved
//! round by round.

use std::time::Instant;

use anyhow::bail;
use strata_cache_core::BlockHandle;
use strata_host_tier::{HostPool, HostPoolConfig};

use super::Figure;
use crate::stats::median;

const BLOCK: usize = 3 << 19; // 1.5 MiB

pub fn run(quick: bool) -> anyhow::Result<Vec<Figure>> {
    let slots: usize = if quick { 32 } else { 192 };
    let rounds = if quick { 3 } else { 9 };
    let mut cfg = HostPoolConfig::new(BLOCK, (slots * BLOCK) as u64);
    cfg.prefault = true;
    let pool = HostPool::new(cfg)?;
    if pool.slots() as usize != slots {
        bail!("pool has {} slots, wanted {slots}", pool.slots());
    }
    let src: Vec<u8> = (0..BLOCK).map(|i| (i * 31 + 7) as u8).collect();
    let mut dst = vec![1u8; BLOCK];
    let mut region = vec![1u8; slots * BLOCK];
    let gib = (slots * BLOCK) as f64 / (1u64 << 30) as f64;
    eprintln!("host: {slots} slots of 1.5 MiB ({gib:.2} GiB), {rounds} rounds");

    let (mut w_pool, mut w_base, mut r_pool, mut r_base) = (vec![], vec![], vec![], vec![]);
    let mut handles: Vec<BlockHandle> = Vec::with_capacity(slots);
    for round in 0..rounds {
        // Writes.
        let t = Instant::now();
        for chunk in region.chunks_exact_mut(BLOCK) {
            chunk.copy_from_slice(std::hint::black_box(&src));
        }
        w_base.push(gib / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for _ in 0..slots {
            handles.push(pool.put(std::hint::black_box(&src))?);
        }
        w_pool.push(gib / t.elapsed().as_secs_f64());
        // Reads of what was just written.
        let t = Instant::now();
        for chunk in region.chunks_exact(BLOCK) {
            dst.copy_from_slice(std::hint::black_box(chunk));
            std::hint::black_box(&dst);
        }
        r_base.push(gib / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for &h in &handles {
            pool.get(h, &mut dst)?;
            std::hint::black_box(&dst);
        }
        r_pool.push(gib / t.elapsed().as_secs_f64());
        if dst != src {
            bail!("read back other bytes than written");
        }
        for h in handles.drain(..) {
            pool.release(h);
        }
        eprintln!(
            "  round {round}: write {:.2} vs memcpy {:.2} GiB/s, read {:.2} vs memcpy {:.2} GiB/s",
            w_pool[round], w_base[round], r_pool[round], r_base[round]
        );
    }
    let (wp, wb, rp, rb) = (
        median(w_pool),
        median(w_base),
        median(r_pool),
        median(r_base),
    );
    Ok(vec![
        Figure::new("host.read_vs_memcpy", rp / rb, 2, "x"),
        Figure::new("host.write_vs_memcpy", wp / wb, 2, "x"),
        Figure::new("host.read_gib_s", rp, 2, "GiB/s"),
        Figure::new("host.write_gib_s", wp, 2, "GiB/s"),
        Figure::new("host.memcpy_read_gib_s", rb, 2, "GiB/s"),
        Figure::new("host.memcpy_write_gib_s", wb, 2, "GiB/s"),
    ])
}
