//! `micro disk`: the disk tier against `fio` on the same file system, with the same block
//! size, queue depth (32) and O_DIRECT, in one run.
//!
//! - Sequential write: fio `rw=write` vs `DiskTier::write` of fresh blocks (payload bytes
//!   per second; the tier also writes a 4 KiB header per block and checksums every block).
//! - Random read: fio `rw=randread` over the file it wrote vs `DiskTier::read` of random
//!   stored blocks (checksum verified, copied out).
//! - Recovery: start-up time of a store holding 100,000 blocks of 16 KiB.
//! - Write amplification: device bytes over admitted bytes under churn (a store a quarter
//!   the size of the data written, a tenth of the blocks read again).
//!
//! `fio` comes from the Debian package `fio`; when it is missing the suite installs it with
//! apt-get (as root) or stops with a message saying how.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use strata_cache_core::{BlockKey, BlockMeta, Tier};
use strata_disk_tier::io::EngineKind;
use strata_disk_tier::{DiskTier, DiskTierConfig};
use tokio::sync::Semaphore;

use super::Figure;
use crate::stats::{Rng, median};

const QD: usize = 32;

fn ensure_fio() -> anyhow::Result<()> {
    if Command::new("fio").arg("--version").output().is_ok() {
        return Ok(());
    }
    eprintln!("disk: fio is not installed; installing the Debian package fio...");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        let ok = Command::new("apt-get")
            .args(["install", "-y", "-qq", "fio"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
            || (Command::new("apt-get")
                .args(["update", "-qq"])
                .status()
                .is_ok()
                && Command::new("apt-get")
                    .args(["install", "-y", "-qq", "fio"])
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false));
        if ok && Command::new("fio").arg("--version").output().is_ok() {
            return Ok(());
        }
    }
    bail!(
        "the disk suite needs fio as its baseline: install it with `apt-get install fio` (Debian/Ubuntu) and run again"
    )
}

/// Runs fio and returns its bandwidth in bytes per second.
fn fio(file: &Path, rw: &str, bs: usize, size: u64, runtime: Option<u32>) -> anyhow::Result<f64> {
    let mut cmd = Command::new("fio");
    cmd.arg("--name=strata")
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--size={size}"))
        .arg(format!("--iodepth={QD}"))
        .arg("--direct=1")
        .arg("--ioengine=io_uring")
        .arg("--output-format=json");
    if let Some(t) = runtime {
        cmd.arg(format!("--runtime={t}")).arg("--time_based");
    }
    let out = cmd.output().context("running fio")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio's JSON")?;
    let dir = if rw.contains("read") { "read" } else { "write" };
    v["jobs"][0][dir]["bw_bytes"]
        .as_f64()
        .filter(|b| *b > 0.0)
        .context("fio reported no bandwidth")
}

fn key(i: u64) -> BlockKey {
    BlockKey(*blake3::hash(&i.to_le_bytes()).as_bytes())
}

fn meta(i: u64) -> BlockMeta {
    BlockMeta {
        key: key(i),
        namespace: BlockKey([0; 32]),
        hits: 1,
    }
}

fn config(path: &Path, bs: usize, blocks: u64) -> DiskTierConfig {
    let seg: u64 = 64 << 20;
    let per_seg = (seg as usize - 8192) / (bs.div_ceil(4096) * 4096 + 4096 + 120);
    let segments = (blocks as usize).div_ceil(per_seg) as u64 + 2;
    let mut c = DiskTierConfig::new(path, 4096 + segments * seg, bs);
    c.segment_bytes = seg;
    c.engine = EngineKind::IoUring;
    c.queue_depth = QD as u32;
    c
}

/// Writes blocks `0..n` with QD writes in flight; returns payload bytes per second.
async fn tier_write(
    t: &Arc<DiskTier>,
    n: u64,
    bs: usize,
) -> anyhow::Result<(f64, Vec<strata_cache_core::BlockHandle>)> {
    let data = Arc::new((0..bs).map(|i| (i * 7 + 3) as u8).collect::<Vec<u8>>());
    let sem = Arc::new(Semaphore::new(QD));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let (t, data) = (t.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            let r = t.write(&meta(i), &data).await;
            drop(permit);
            r
        }));
    }
    let mut handles = Vec::with_capacity(n as usize);
    for task in tasks {
        handles.push(task.await?.context("disk tier write")?);
    }
    Ok((
        (n * bs as u64) as f64 / start.elapsed().as_secs_f64(),
        handles,
    ))
}

/// Reads random stored blocks with QD reads in flight for `secs`; payload bytes per second.
async fn tier_randread(
    t: &Arc<DiskTier>,
    handles: &Arc<Vec<strata_cache_core::BlockHandle>>,
    bs: usize,
    secs: f64,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut workers = Vec::new();
    for w in 0..QD as u64 {
        let (t, handles) = (t.clone(), handles.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = Rng(0x1234_5678 + w * 7919);
            let mut out = vec![0u8; bs];
            let mut n = 0u64;
            while Instant::now() < deadline {
                let i = rng.below(handles.len() as u64);
                t.read(handles[i as usize], &key(i), &mut out).await?;
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for w in workers {
        total += w.await??;
    }
    Ok((total * bs as u64) as f64 / start.elapsed().as_secs_f64())
}

struct Pair {
    seq_write: f64,
    rand_read: f64,
}

async fn compare(
    dir: &Path,
    bs: usize,
    size: u64,
    rounds: usize,
    read_secs: u32,
) -> anyhow::Result<Pair> {
    let n = size / bs as u64;
    let fio_file = dir.join("fio.dat");
    let tier_file = dir.join("strata.dat");
    let (mut fw, mut tw, mut fr, mut tr) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let _ = std::fs::remove_file(&fio_file);
        let _ = std::fs::remove_file(&tier_file);
        fw.push(fio(&fio_file, "write", bs, n * bs as u64, None)?);
        let t = Arc::new(DiskTier::open(config(&tier_file, bs, n)).await?);
        let (w, handles) = tier_write(&t, n, bs).await?;
        tw.push(w);
        fr.push(fio(
            &fio_file,
            "randread",
            bs,
            n * bs as u64,
            Some(read_secs),
        )?);
        tr.push(tier_randread(&t, &Arc::new(handles), bs, f64::from(read_secs)).await?);
        eprintln!(
            "  {} KiB round {round}: seq write fio {:.0} vs strata {:.0} MiB/s; rand read fio {:.0} vs strata {:.0} MiB/s",
            bs >> 10,
            fw[round] / 1048576.0,
            tw[round] / 1048576.0,
            fr[round] / 1048576.0,
            tr[round] / 1048576.0
        );
    }
    let _ = std::fs::remove_file(&fio_file);
    let _ = std::fs::remove_file(&tier_file);
    Ok(Pair {
        seq_write: median(tw) / median(fw),
        rand_read: median(tr) / median(fr),
    })
}

async fn recovery(dir: &Path, blocks: u64) -> anyhow::Result<f64> {
    let bs = 16 << 10;
    let path = dir.join("recover.dat");
    let _ = std::fs::remove_file(&path);
    {
        let t = Arc::new(DiskTier::open(config(&path, bs, blocks)).await?);
        tier_write(&t, blocks, bs).await?;
    }
    let start = Instant::now();
    let t = DiskTier::open(config(&path, bs, blocks)).await?;
    let secs = start.elapsed().as_secs_f64();
    let found = t.metrics().recovered_blocks;
    drop(t);
    let _ = std::fs::remove_file(&path);
    if found != blocks {
        bail!("recovered {found} of {blocks} blocks");
    }
    Ok(secs)
}

async fn churn(dir: &Path, quick: bool) -> anyhow::Result<f64> {
    let bs = 64 << 10;
    let path = dir.join("churn.dat");
    let _ = std::fs::remove_file(&path);
    let seg: u64 = 16 << 20;
    let mut c = DiskTierConfig::new(&path, 4096 + 8 * seg, bs);
    c.segment_bytes = seg;
    let t = DiskTier::open(c).await?;
    let cap = t.capacity_blocks();
    let writes = cap * if quick { 2 } else { 4 };
    let data = vec![5u8; bs];
    let mut out = vec![0u8; bs];
    let mut rng = Rng(99);
    let mut handles = Vec::with_capacity(writes as usize);
    for i in 0..writes {
        let h = t.write(&meta(i), &data).await?;
        t.set_tag(h, i);
        handles.push(h);
        // A tenth of the time, read one of the recent blocks again (it becomes hot).
        if rng.below(10) == 0 {
            let j = i.saturating_sub(rng.below(cap));
            let _ = t.read(handles[j as usize], &key(j), &mut out).await;
        }
        t.take_dropped();
    }
    let m = t.metrics();
    eprintln!(
        "  churn: {} writes into {} blocks of room: {} segments reclaimed, {} blocks reinserted, {} dropped",
        writes, cap, m.segments_reclaimed, m.blocks_reinserted, m.blocks_dropped
    );
    drop(t);
    let _ = std::fs::remove_file(&path);
    Ok(m.write_amplification)
}

pub fn run(quick: bool, dir: Option<PathBuf>) -> anyhow::Result<Vec<Figure>> {
    ensure_fio()?;
    let dir = dir.unwrap_or_else(|| PathBuf::from("target/strata-bench-disk"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()?;
    let (rounds, big, small, read_secs, recover_blocks) = if quick {
        (1, 256u64 << 20, 128u64 << 20, 2, 10_000)
    } else {
        (3, 3u64 << 30, 1u64 << 30, 5, 100_000)
    };
    eprintln!(
        "disk: files under {} (same file system for fio and Strata), QD {QD}, O_DIRECT",
        dir.display()
    );
    rt.block_on(async {
        let large = compare(&dir, 3 << 19, big, rounds, read_secs).await?;
        let small = compare(&dir, 64 << 10, small, rounds, read_secs).await?;
        eprintln!("disk: writing {recover_blocks} blocks of 16 KiB for the recovery figure...");
        let rec = recovery(&dir, recover_blocks).await?;
        let wa = churn(&dir, quick).await?;
        let rec_name = if quick {
            "disk.recovery_10k_blocks_s"
        } else {
            "disk.recovery_100k_blocks_s"
        };
        Ok(vec![
            Figure::new("disk.seq_write_vs_fio", large.seq_write, 2, "x"),
            Figure::new("disk.rand_read_vs_fio", large.rand_read, 2, "x"),
            Figure::new("disk.seq_write_vs_fio_64k", small.seq_write, 2, "x"),
            Figure::new("disk.rand_read_vs_fio_64k", small.rand_read, 2, "x"),
            Figure::new(rec_name, rec, 3, "s"),
            Figure::new("disk.write_amplification", wa, 3, "x"),
        ])
    })
}
