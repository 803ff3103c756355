//! `kill -9` a process in the middle of a burst of disk-tier writes, open the store again,
//! and check that every block the writer reported as stored is found with its bytes, and
//! that no block ever reads back wrong. Runs once per I/O engine.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use strata_cache_core::{Tier, TierError};
use strata_disk_tier::io::EngineKind;
use strata_disk_tier::{DiskTier, DiskTierConfig};
use strata_tests::*;

fn crash_then_recover(engine: &str, kind: EngineKind) {
    let dir = std::env::temp_dir().join(format!("strata-crash-{engine}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("g3.dat");
    let _ = std::fs::remove_file(&path);
    let mut child = Command::new(env!("CARGO_BIN_EXE_strata-disk-crash-writer"))
        .arg(&path)
        .arg(engine)
        .arg("600")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the writer");
    let stdout = child.stdout.take().unwrap();
    let mut stored = BTreeSet::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let i: u64 = line.strip_prefix("stored ").unwrap().parse().unwrap();
        stored.insert(i);
        if stored.len() == 400 {
            // SIGKILL, mid-burst: 16 writes are in flight.
            child.kill().unwrap();
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the writer finished before it was killed"
    );
    assert_eq!(stored.len(), 400, "the writer stopped early");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    rt.block_on(async {
        let mut cfg = DiskTierConfig::new(&path, CRASH_CAPACITY, CRASH_BLOCK);
        cfg.segment_bytes = CRASH_SEGMENT;
        cfg.engine = kind;
        let tier = DiskTier::open(cfg).await.unwrap();
        assert!(tier.metrics().recovered_blocks >= 400);
        let max = *stored.last().unwrap();
        let mut out = vec![0u8; CRASH_BLOCK];
        for i in 0..=max + 64 {
            let Some(h) = tier.adopt(&crash_key(i)) else {
                assert!(
                    !stored.contains(&i),
                    "block {i} was reported stored but is gone"
                );
                continue;
            };
            match tier.read(h, &crash_key(i), &mut out).await {
                Ok(()) => assert_eq!(
                    out,
                    crash_payload(i, CRASH_BLOCK),
                    "block {i} read back wrong"
                ),
                // A write cut short by the kill is never served.
                Err(TierError::Corrupt) => {
                    assert!(!stored.contains(&i), "stored block {i} is torn")
                }
                Err(e) => panic!("block {i}: {e}"),
            }
        }
    });
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn kill_9_mid_burst_io_uring() {
    crash_then_recover("io_uring", EngineKind::IoUring);
}

#[test]
fn kill_9_mid_burst_psync() {
    crash_then_recover("psync", EngineKind::Psync);
}
