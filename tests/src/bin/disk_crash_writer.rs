//! Test helper for the crash test: opens a disk tier and writes blocks 0, 1, 2, ... with 16
//! writes in flight, printing `stored <i>` as each write completes, until it is killed (or
//! has written `limit` blocks).
//!
//! Usage: `strata-disk-crash-writer <path> <io_uring|psync> <limit>`

use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, bail};
use strata_cache_core::Tier;
use strata_disk_tier::io::EngineKind;
use strata_disk_tier::{DiskTier, DiskTierConfig};
use strata_tests::*;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        bail!("usage: strata-disk-crash-writer <path> <io_uring|psync> <limit>");
    }
    let engine = match args[2].as_str() {
        "io_uring" => EngineKind::IoUring,
        "psync" => EngineKind::Psync,
        other => bail!("unknown engine {other}"),
    };
    let limit: u64 = args[3].parse().context("limit")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()?;
    rt.block_on(async move {
        let mut cfg = DiskTierConfig::new(&args[1], CRASH_CAPACITY, CRASH_BLOCK);
        cfg.segment_bytes = CRASH_SEGMENT;
        cfg.engine = engine;
        cfg.queue_depth = 16;
        let tier = Arc::new(DiskTier::open(cfg).await?);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let sem = Arc::new(tokio::sync::Semaphore::new(16));
        let printer = tokio::spawn(async move {
            while let Some(i) = rx.recv().await {
                let mut out = std::io::stdout().lock();
                writeln!(out, "stored {i}").ok();
                out.flush().ok();
            }
        });
        for i in 0..limit {
            let permit = sem.clone().acquire_owned().await?;
            let tier = tier.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let data = crash_payload(i, CRASH_BLOCK);
                if tier.write(&crash_meta(i), &data).await.is_ok() {
                    let _ = tx.send(i);
                }
                drop(permit);
            });
        }
        drop(tx);
        let _ = sem.acquire_many(16).await?;
        printer.await?;
        anyhow::Ok(())
    })
}
