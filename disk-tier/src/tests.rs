//! The disk tier's suite, run once per I/O engine.

use std::path::PathBuf;
use std::time::Duration;

use strata_cache_core::{BlockHandle, BlockKey, BlockMeta, Tier, TierError};

use crate::io::EngineKind;
use crate::{DiskTier, DiskTierConfig, DiskTierError};

const BS: usize = 16 << 10;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "strata-disk-{name}-{}-{:x}",
            std::process::id(),
            rand_u64()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn file(&self) -> PathBuf {
        self.0.join("g3.dat")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(42);
    h.finish()
}

fn key(i: u64) -> BlockKey {
    BlockKey(*blake3::hash(&i.to_le_bytes()).as_bytes())
}

fn meta(i: u64) -> BlockMeta {
    BlockMeta {
        key: key(i),
        namespace: BlockKey([9; 32]),
        hits: 5,
    }
}

fn payload(i: u64) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..BS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn cfg(
    dir: &TempDir,
    engine: EngineKind,
    segments: u64,
    blocks_per_segment: u64,
) -> DiskTierConfig {
    let rec = (BS + 4096) as u64;
    // Room for the records plus a summary page.
    let seg = (blocks_per_segment * rec + 8192).div_ceil(4096) * 4096;
    let mut c = DiskTierConfig::new(dir.file(), 4096 + segments * seg, BS);
    c.segment_bytes = seg;
    c.engine = engine;
    c.queue_depth = 8;
    c
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn read(t: &DiskTier, h: BlockHandle, i: u64) -> Result<Vec<u8>, TierError> {
    let mut out = vec![0u8; BS];
    t.read(h, &key(i), &mut out).await.map(|_| out)
}

fn engines() -> [EngineKind; 2] {
    [EngineKind::IoUring, EngineKind::Psync]
}

#[test]
fn round_trip_many_blocks() {
    for engine in engines() {
        let dir = TempDir::new("rt");
        rt().block_on(async {
            let t = DiskTier::open(cfg(&dir, engine, 4, 64)).await.unwrap();
            assert_eq!(
                t.engine_name(),
                if engine == EngineKind::Psync {
                    "psync"
                } else {
                    "io_uring"
                }
            );
            let mut hs = Vec::new();
            for i in 0..150u64 {
                hs.push(t.write(&meta(i), &payload(i)).await.unwrap());
            }
            for (i, h) in hs.iter().enumerate() {
                assert_eq!(read(&t, *h, i as u64).await.unwrap(), payload(i as u64));
            }
            // A handle read under another key is refused, not served.
            assert!(matches!(
                read(&t, hs[0], 1).await,
                Err(TierError::BadHandle(_))
            ));
            t.free(hs[3]);
            assert!(matches!(
                read(&t, hs[3], 3).await,
                Err(TierError::BadHandle(_))
            ));
            assert!(!t.contains(&key(3)));
            let m = t.metrics();
            assert_eq!(m.live_blocks, 149);
            assert!(m.write_amplification >= 1.0, "{m:?}");
            assert_eq!(m.checksum_failures, 0);
        });
    }
}

#[test]
fn restart_recovers_sealed_and_open_segments() {
    for engine in engines() {
        let dir = TempDir::new("restart");
        let r = rt();
        // 3.5 segments' worth: three sealed with summaries, one open without.
        let n = 8 * 3 + 4;
        r.block_on(async {
            let t = DiskTier::open(cfg(&dir, engine, 6, 8)).await.unwrap();
            for i in 0..n {
                t.write(&meta(i), &payload(i)).await.unwrap();
            }
        });
        r.block_on(async {
            let t = DiskTier::open(cfg(&dir, engine, 6, 8)).await.unwrap();
            assert_eq!(t.metrics().recovered_blocks, n);
            for i in 0..n {
                let h = t.adopt(&key(i)).expect("recovered block");
                assert_eq!(read(&t, h, i).await.unwrap(), payload(i), "block {i}");
            }
            assert_eq!(t.adopt(&key(0)), None, "already adopted");
            assert_eq!(t.adopt(&key(n + 1)), None);
            // New writes continue after the recovered ones and survive another restart.
            for i in n..n + 10 {
                t.write(&meta(i), &payload(i)).await.unwrap();
            }
        });
        r.block_on(async {
            let t = DiskTier::open(cfg(&dir, engine, 6, 8)).await.unwrap();
            for i in 0..n + 10 {
                let h = t.adopt(&key(i)).unwrap_or_else(|| panic!("block {i} lost"));
                assert_eq!(read(&t, h, i).await.unwrap(), payload(i));
            }
        });
    }
}

#[test]
fn a_flipped_byte_makes_a_miss() {
    use std::os::unix::fs::FileExt;
    for engine in engines() {
        let dir = TempDir::new("flip");
        rt().block_on(async {
            let t = DiskTier::open(cfg(&dir, engine, 4, 16)).await.unwrap();
            let h0 = t.write(&meta(0), &payload(0)).await.unwrap();
            let h1 = t.write(&meta(1), &payload(1)).await.unwrap();
            // Flip one payload byte of block 1 behind the tier's back.
            let l = t.layout();
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.file())
                .unwrap();
            let off = l.record_offset(0, 1) + 4096 + 1234;
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, off).unwrap();
            f.write_all_at(&[b[0] ^ 0x40], off).unwrap();
            f.sync_all().unwrap();
            assert!(matches!(read(&t, h1, 1).await, Err(TierError::Corrupt)));
            let m = t.metrics();
            assert_eq!(m.checksum_failures, 1);
            assert!(!t.contains(&key(1)), "a corrupt block is forgotten");
            assert!(matches!(
                read(&t, h1, 1).await,
                Err(TierError::BadHandle(_))
            ));
            assert_eq!(read(&t, h0, 0).await.unwrap(), payload(0));
        });
    }
}

#[test]
fn enospc_stops_admission_and_keeps_serving() {
    for engine in engines() {
        let dir = TempDir::new("enospc");
        rt().block_on(async {
            let mut c = cfg(&dir, engine, 4, 16);
            c.enospc_backoff = Duration::from_millis(200);
            let t = DiskTier::open(c).await.unwrap();
            let h = t.write(&meta(0), &payload(0)).await.unwrap();
            t.faults().fail_writes(libc::ENOSPC);
            for i in 1..20 {
                assert!(matches!(
                    t.write(&meta(i), &payload(i)).await,
                    Err(TierError::Rejected)
                ));
            }
            // Only the first attempt reached the device; the rest were turned away.
            assert_eq!(t.metrics().io_errors, 1);
            t.faults().fail_writes(0);
            assert!(
                matches!(
                    t.write(&meta(30), &payload(30)).await,
                    Err(TierError::Rejected)
                ),
                "still paused"
            );
            assert_eq!(
                read(&t, h, 0).await.unwrap(),
                payload(0),
                "serving continues"
            );
            std::thread::sleep(Duration::from_millis(250));
            assert!(
                t.write(&meta(31), &payload(31)).await.is_ok(),
                "admission resumes"
            );
        });
    }
}

#[test]
fn eio_on_read_is_a_miss() {
    for engine in engines() {
        let dir = TempDir::new("eio");
        rt().block_on(async {
            let t = DiskTier::open(cfg(&dir, engine, 4, 16)).await.unwrap();
            let h = t.write(&meta(0), &payload(0)).await.unwrap();
            t.faults().fail_reads(libc::EIO);
            for _ in 0..5 {
                assert!(matches!(read(&t, h, 0).await, Err(TierError::Io(_))));
            }
            assert_eq!(t.metrics().misses, 5);
            t.faults().fail_reads(0);
            assert_eq!(read(&t, h, 0).await.unwrap(), payload(0));
        });
    }
}

#[test]
fn reclaim_keeps_hot_blocks_and_reports_dropped_ones() {
    for engine in engines() {
        let dir = TempDir::new("reclaim");
        rt().block_on(async {
            let mut c = cfg(&dir, engine, 3, 8);
            c.reinsert_fraction = 0.5;
            let t = DiskTier::open(c).await.unwrap();
            assert_eq!(t.capacity_blocks(), 16);
            let mut hs = Vec::new();
            for i in 0..16u64 {
                let h = t.write(&meta(i), &payload(i)).await.unwrap();
                t.set_tag(h, 1000 + i);
                hs.push(h);
            }
            // Blocks 0 and 1 are hot.
            read(&t, hs[0], 0).await.unwrap();
            read(&t, hs[1], 1).await.unwrap();
            // Fill the third segment and start a fourth: segment 0 is reclaimed.
            for i in 16..25u64 {
                t.write(&meta(i), &payload(i)).await.unwrap();
            }
            let m = t.metrics();
            assert_eq!(m.segments_reclaimed, 1, "{m:?}");
            assert_eq!(m.blocks_reinserted, 2);
            assert_eq!(m.blocks_dropped, 6);
            let mut dropped = t.take_dropped();
            dropped.sort_by_key(|d| d.1);
            assert_eq!(
                dropped.iter().map(|d| d.1).collect::<Vec<_>>(),
                (1002..1008).collect::<Vec<_>>()
            );
            assert!(t.take_dropped().is_empty());
            // Hot blocks kept their handles and bytes; dropped ones are gone.
            assert_eq!(read(&t, hs[0], 0).await.unwrap(), payload(0));
            assert_eq!(read(&t, hs[1], 1).await.unwrap(), payload(1));
            assert!(matches!(
                read(&t, hs[2], 2).await,
                Err(TierError::BadHandle(_))
            ));
            assert!(m.write_amplification > 1.0);
        });
    }
}

#[test]
fn admission_refuses_cold_blocks() {
    let dir = TempDir::new("admit");
    rt().block_on(async {
        let mut c = cfg(&dir, EngineKind::Auto, 4, 16);
        c.admission_hits = 2;
        let t = DiskTier::open(c).await.unwrap();
        let cold = BlockMeta { hits: 1, ..meta(0) };
        assert!(matches!(
            t.write(&cold, &payload(0)).await,
            Err(TierError::Rejected)
        ));
        let warm = BlockMeta { hits: 2, ..meta(0) };
        assert!(t.write(&warm, &payload(0)).await.is_ok());
        assert_eq!(t.metrics().rejected, 1);
    });
}

#[test]
fn bad_configuration_and_mismatched_store_are_clear_errors() {
    let dir = TempDir::new("cfg");
    rt().block_on(async {
        let mut c = cfg(&dir, EngineKind::Auto, 4, 8);
        c.capacity_bytes = 0;
        assert!(matches!(
            DiskTier::open(c).await,
            Err(DiskTierError::Config(_))
        ));
        let mut c = cfg(&dir, EngineKind::Auto, 4, 8);
        c.segment_bytes = 4096;
        assert!(matches!(
            DiskTier::open(c).await,
            Err(DiskTierError::Config(_))
        ));
        let mut c = cfg(&dir, EngineKind::Auto, 4, 8);
        c.queue_depth = 0;
        assert!(matches!(
            DiskTier::open(c).await,
            Err(DiskTierError::Config(_))
        ));
        let t = DiskTier::open(cfg(&dir, EngineKind::Auto, 4, 8))
            .await
            .unwrap();
        drop(t);
        let mut other = cfg(&dir, EngineKind::Auto, 4, 8);
        other.block_size = BS * 2;
        match DiskTier::open(other).await {
            Err(e @ DiskTierError::Mismatch { .. }) => {
                assert!(e.to_string().contains("block size 16384"), "{e}")
            }
            Err(e) => panic!("wrong error {e}"),
            Ok(_) => panic!("opened a store made with another block size"),
        }
        // A file that is not a store is refused, not overwritten.
        std::fs::write(dir.0.join("junk"), vec![7u8; 1 << 20]).unwrap();
        let mut c = cfg(&dir, EngineKind::Auto, 4, 8);
        c.path = dir.0.join("junk");
        assert!(DiskTier::open(c).await.is_err());
        assert_eq!(
            std::fs::read(dir.0.join("junk")).unwrap(),
            vec![7u8; 1 << 20]
        );
        // Wrong buffer sizes are refused.
        let t = DiskTier::open(cfg(&dir, EngineKind::Auto, 4, 8))
            .await
            .unwrap();
        assert!(matches!(
            t.write(&meta(0), &[0u8; 10]).await,
            Err(TierError::BufferSize { .. })
        ));
    });
}

#[test]
fn a_cancelled_write_does_not_block_rotation() {
    for engine in engines() {
        let dir = TempDir::new("cancel");
        rt().block_on(async {
            let t = DiskTier::open(cfg(&dir, engine, 3, 4)).await.unwrap();
            for i in 0..3u64 {
                let data = payload(i);
                let m = meta(i);
                let mut f = t.write(&m, &data);
                // Poll once, then drop it: the engine keeps the buffer until completion.
                let waker = std::task::Waker::noop();
                let mut cx = std::task::Context::from_waker(waker);
                let _ = f.as_mut().poll(&mut cx);
            }
            // Enough writes to rotate past the segment the cancelled writes were in.
            let res = tokio::time::timeout(Duration::from_secs(20), async {
                for i in 10..20u64 {
                    t.write(&meta(i), &payload(i)).await.unwrap();
                }
            });
            res.await
                .expect("rotation waited forever for a cancelled write");
        });
    }
}

#[test]
fn concurrent_writers_and_readers_across_many_reclaims() {
    for engine in engines() {
        let dir = TempDir::new("conc");
        rt().block_on(async {
            let mut c = cfg(&dir, engine, 4, 16);
            c.reinsert_fraction = 0.5;
            let t = std::sync::Arc::new(DiskTier::open(c).await.unwrap());
            let handles =
                std::sync::Arc::new(parking_lot::Mutex::new(Vec::<(BlockHandle, u64)>::new()));
            let mut tasks = Vec::new();
            for w in 0..4u64 {
                let (t, handles) = (t.clone(), handles.clone());
                tasks.push(tokio::spawn(async move {
                    for k in 0..60u64 {
                        let i = w * 1000 + k;
                        if let Ok(h) = t.write(&meta(i), &payload(i)).await {
                            handles.lock().push((h, i));
                        }
                        // Read some earlier blocks back, making them hot for the reclaim.
                        let pick = {
                            let hs = handles.lock();
                            (!hs.is_empty()).then(|| hs[(i as usize * 7) % hs.len()])
                        };
                        if let Some((h, j)) = pick {
                            let mut out = vec![0u8; BS];
                            if t.read(h, &key(j), &mut out).await.is_ok() {
                                assert_eq!(out, payload(j), "block {j} read back wrong");
                            }
                        }
                    }
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
            let m = t.metrics();
            assert!(m.segments_reclaimed >= 8, "{m:?}");
            assert!(m.blocks_reinserted > 0, "{m:?}");
            assert_eq!(m.checksum_failures, 0, "{m:?}");
            // Every block still held reads back right.
            let hs = handles.lock().clone();
            let mut alive = 0;
            for (h, i) in hs {
                let mut out = vec![0u8; BS];
                match t.read(h, &key(i), &mut out).await {
                    Ok(()) => {
                        assert_eq!(out, payload(i));
                        alive += 1;
                    }
                    Err(TierError::BadHandle(_)) => {}
                    Err(e) => panic!("block {i}: {e}"),
                }
            }
            assert!(alive > 0);
        });
        // And the store opens again with what it had.
        rt().block_on(async {
            let t = DiskTier::open(cfg(&dir, engine, 4, 16)).await.unwrap();
            assert!(t.metrics().recovered_blocks > 0);
        });
    }
}

/// Issue 15, item 10: the wipe that `prepare_next` issues for the next segment may complete
/// (in the kernel) long before its requester resumes. If the segment is reused and sealed
/// with a new summary meanwhile, the late requester must not mark it wiped: the next reuse
/// would skip the wipe, leave that (valid, now stale) summary on disk over new records, and
/// a restart would read the stale summary and miss the newer records.
#[test]
fn a_late_wipe_completion_does_not_mark_a_reused_segment_wiped() {
    for engine in engines() {
        let dir = TempDir::new("latewipe");
        let r = rt();
        r.block_on(async {
            // Three segments of four blocks; a writer at index 2 wipes the next segment.
            let t = std::sync::Arc::new(DiskTier::open(cfg(&dir, engine, 3, 4)).await.unwrap());
            for i in 0..10u64 {
                t.write(&meta(i), &payload(i)).await.unwrap();
            }
            // Block 10 lands at index 2 of segment 2 and wipes segment 0 (sealed at block 4);
            // that wipe finishes, but its writer hears of it only when the test says so.
            t.faults().hold_write_answer(t.layout().summary_offset(0));
            let late = {
                let t = t.clone();
                tokio::spawn(async move { t.write(&meta(10), &payload(10)).await })
            };
            let held = tokio::time::timeout(Duration::from_secs(20), async {
                while t.faults().held_writes() == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
            held.await.expect("the wipe of segment 0 was never issued");
            // Meanwhile segment 0 is reused (block 12) and sealed again with a summary of
            // its new records (block 16 rotates on).
            for i in 11..17u64 {
                t.write(&meta(i), &payload(i)).await.unwrap();
            }
            t.faults().release_writes();
            late.await.unwrap().unwrap();
            assert!(
                !t.state.lock().segs[0].wiped,
                "{engine:?}: segment 0 has a summary on disk but is marked wiped"
            );
            // Two more laps of the ring: segment 0 is reused again at block 24, and blocks
            // 24 and 25 are its first records.
            for i in 17..26u64 {
                t.write(&meta(i), &payload(i)).await.unwrap();
            }
            t.flush(Duration::from_secs(10)).await.unwrap();
        });
        r.block_on(async {
            let t = DiskTier::open(cfg(&dir, engine, 3, 4)).await.unwrap();
            for i in 16..26u64 {
                let h = t
                    .adopt(&key(i))
                    .unwrap_or_else(|| panic!("{engine:?}: block {i} lost in the restart"));
                assert_eq!(read(&t, h, i).await.unwrap(), payload(i), "block {i}");
            }
        });
    }
}
