//! `micro disk`: the disk tier against `fio` on the same file system, with the same block
//! size, queue depth (32) and O_DIRECT, in one run.
//!
//! - Sequential write: fio `rw=write` vs `DiskTier::write` of fresh blocks (payload bytes
//!   per second; the tier also writes a 4 KiB header per block and checksums every block).
//! - Random read: fio `rw=randread` of block-sized reads at the payload offsets of the
//!   tier's own file vs `DiskTier::read` of random stored blocks (checksum verified,
//!   copied out): the same bytes of the same age, so host-side caching of recently written
//!   data favours neither side.
//!
//! Both sides work on files of the same size, laid out before timing; one-second runs
//! alternate (the order swapping every round) and the medians are compared.
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
use strata_cache_core::{BlockHandle, BlockKey, BlockMeta, Tier};
use strata_disk_tier::io::EngineKind;
use strata_disk_tier::{DiskTier, DiskTierConfig};
use tokio::sync::Semaphore;

use super::Figure;
use crate::stats::{Rng, median};

const QD: usize = 32;

fn ensure_fio() -> anyhow::Result<()> {
    super::ensure_debian_tool("fio", "--version", "fio", "disk")
}

/// Runs fio over `[offset, offset + size)` of `file`; returns its bandwidth in bytes per
/// second and the bytes it moved.
fn fio_at(
    file: &Path,
    rw: &str,
    bs: usize,
    offset: u64,
    size: u64,
    runtime: Option<u32>,
) -> anyhow::Result<(f64, u64)> {
    let mut cmd = Command::new("fio");
    cmd.arg("--name=strata")
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--offset={offset}"))
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
    let bw = v["jobs"][0][dir]["bw_bytes"]
        .as_f64()
        .filter(|b| *b > 0.0)
        .context("fio reported no bandwidth")?;
    Ok((bw, v["jobs"][0][dir]["io_bytes"].as_u64().unwrap_or(0)))
}

/// CPU seconds (user + system) this process has used.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the stat line (11 and 12 after the name).
    (ticks(11) + ticks(12)) / 100.0
}

/// fio random reads of `bs` bytes at offsets `8 KiB + k × record` of a tier file (its
/// records' payloads), for one second, read-only; bytes per second.
fn fio_reads_of(file: &Path, bs: usize, record: usize, file_bytes: u64) -> anyhow::Result<f64> {
    let out = Command::new("fio")
        .arg("--name=strata")
        .arg(format!("--filename={}", file.display()))
        .arg("--readonly")
        .arg("--rw=randread")
        .arg(format!("--bs={bs}"))
        .arg(format!("--blockalign={record}"))
        .arg("--offset=8192")
        .arg(format!("--size={}", file_bytes - 8192 - record as u64))
        .arg(format!("--iodepth={QD}"))
        .arg("--direct=1")
        .arg("--ioengine=io_uring")
        .arg("--runtime=1")
        .arg("--time_based")
        .arg("--output-format=json")
        .output()
        .context("running fio")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio's JSON")?;
    v["jobs"][0]["read"]["bw_bytes"]
        .as_f64()
        .filter(|b| *b > 0.0)
        .context("fio reported no bandwidth")
}

/// Runs fio over the whole file; returns its bandwidth in bytes per second.
fn fio(file: &Path, rw: &str, bs: usize, size: u64, runtime: Option<u32>) -> anyhow::Result<f64> {
    Ok(fio_at(file, rw, bs, 0, size, runtime)?.0)
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
    let seg: u64 = 256 << 20;
    let per_seg = (seg as usize - 8192) / (bs.div_ceil(4096) * 4096 + 4096 + 120);
    let segments = (blocks as usize).div_ceil(per_seg) as u64 + 2;
    let mut c = DiskTierConfig::new(path, 4096 + segments * seg, bs);
    c.segment_bytes = seg;
    c.engine = EngineKind::IoUring;
    c.queue_depth = QD as u32;
    c
}

/// Writes fresh blocks (numbered from `*next`) with QD writes in flight for `secs`, or
/// `limit` blocks, whichever ends first; returns payload bytes per second. Written blocks
/// are appended to `written`.
async fn tier_write(
    t: &Arc<DiskTier>,
    next: &mut u64,
    limit: u64,
    secs: f64,
    bs: usize,
    written: &mut Vec<(BlockHandle, u64)>,
) -> anyhow::Result<f64> {
    let data = Arc::new((0..bs).map(|i| (i * 7 + 3) as u8).collect::<Vec<u8>>());
    let sem = Arc::new(Semaphore::new(QD));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    let first = *next;
    while *next - first < limit && Instant::now() < deadline {
        let permit = sem.clone().acquire_owned().await?;
        let (t, data, i) = (t.clone(), data.clone(), *next);
        *next += 1;
        tasks.push(tokio::spawn(async move {
            let r = t.write(&meta(i), &data).await;
            drop(permit);
            r.map(|h| (h, i))
        }));
    }
    let n = tasks.len() as u64;
    for task in tasks {
        written.push(task.await?.context("disk tier write")?);
    }
    let secs = start.elapsed().as_secs_f64();
    t.take_dropped();
    Ok((n * bs as u64) as f64 / secs)
}

/// Reads random blocks among `blocks` with QD reads in flight for `secs`; payload bytes
/// per second.
async fn tier_randread(
    t: &Arc<DiskTier>,
    blocks: Arc<Vec<(BlockHandle, u64)>>,
    bs: usize,
    secs: f64,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut workers = Vec::new();
    for w in 0..QD as u64 {
        let (t, blocks) = (t.clone(), blocks.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = Rng(0x1234_5678 + w * 7919);
            let mut out = vec![0u8; bs];
            let mut n = 0u64;
            while Instant::now() < deadline {
                let (h, i) = blocks[rng.below(blocks.len() as u64) as usize];
                t.read(h, &key(i), &mut out).await?;
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

/// Alternates one-second runs of fio and the disk tier, `rounds` times each way, over files
/// of `size` bytes; returns the ratios of the medians. This kind of device drifts by 2-3x
/// within seconds (host-side caching), so short alternating runs compare like with like.
async fn compare(dir: &Path, bs: usize, size: u64, rounds: usize) -> anyhow::Result<Pair> {
    let n = size / bs as u64;
    let fio_file = dir.join("fio.dat");
    let tier_file = dir.join("strata.dat");
    let _ = std::fs::remove_file(&fio_file);
    let _ = std::fs::remove_file(&tier_file);
    // Lay both files out first: fio writes its file once, the tier fills its ring.
    fio(&fio_file, "write", bs, size, None)?;
    let mut c = config(&tier_file, bs, n);
    c.reinsert_fraction = 0.0; // plain FIFO: reads in this benchmark are not reuse
    let t = Arc::new(DiskTier::open(c).await?);
    let l = t.layout();
    let live = (l.segments - 2) * l.blocks_per_segment;
    let mut next = 0;
    let mut written = Vec::new();
    // One full pass around the ring, as fio's layout pass wrote its whole file: after it,
    // both sides overwrite allocated blocks.
    let ring = (l.segments * l.blocks_per_segment) as u64;
    tier_write(&t, &mut next, ring, 600.0, bs, &mut written).await?;
    let keep = written.len().saturating_sub(live);
    written.drain(..keep);
    let (mut fw, mut tw, mut fr, mut tr) = (vec![], vec![], vec![], vec![]);
    // fio's timed writes continue where the last one stopped, as the tier's ring does, so
    // neither side rewrites the same recently written region over and over.
    let mut fio_off = 0u64;
    let mut cpu = Vec::new();
    for round in 0..rounds {
        for side in [round % 2, 1 - round % 2] {
            if side == 0 {
                if size.saturating_sub(fio_off) < size / 2 {
                    fio_off = 0;
                }
                let (bw, moved) = fio_at(&fio_file, "write", bs, fio_off, size - fio_off, Some(1))?;
                // A timed run wraps inside its region; continue after where it stopped.
                let region = size - fio_off;
                fio_off += moved % region / bs as u64 * bs as u64;
                fw.push(bw);
                // Random reads of the tier's own file, block-sized at record payload
                // offsets: the same bytes, of the same age, as the tier reads (this device
                // caches recently written data on its host, so another file would differ).
                fr.push(fio_reads_of(
                    &tier_file,
                    bs,
                    l.record_bytes,
                    l.file_bytes(),
                )?);
            } else {
                let (c0, w0) = (cpu_secs(), Instant::now());
                tw.push(tier_write(&t, &mut next, u64::MAX, 1.0, bs, &mut written).await?);
                cpu.push((cpu_secs() - c0) / w0.elapsed().as_secs_f64());
                let recent = written.len().saturating_sub(live);
                written.drain(..recent);
                tr.push(tier_randread(&t, Arc::new(written.clone()), bs, 1.0).await?);
            }
        }
        eprintln!(
            "  {} KiB round {round}: seq write fio {:.0} vs strata {:.0} MiB/s ({:.2} cores); rand read fio {:.0} vs strata {:.0} MiB/s",
            bs >> 10,
            fw[round] / 1048576.0,
            tw[round] / 1048576.0,
            cpu[round],
            fr[round] / 1048576.0,
            tr[round] / 1048576.0
        );
    }
    drop(t);
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
        let mut next = 0;
        let mut written = Vec::new();
        tier_write(&t, &mut next, blocks, 600.0, bs, &mut written).await?;
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
    let (rounds, big, small, recover_blocks) = if quick {
        (2, 512u64 << 20, 256u64 << 20, 10_000)
    } else {
        (9, 4u64 << 30, 2u64 << 30, 100_000)
    };
    eprintln!(
        "disk: files under {} (same file system for fio and Strata), QD {QD}, O_DIRECT",
        dir.display()
    );
    rt.block_on(async {
        let large = compare(&dir, 3 << 19, big, rounds).await?;
        let small = compare(&dir, 64 << 10, small, rounds).await?;
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
