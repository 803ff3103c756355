//! The disk tier on a raw block device (a loop device over a scratch file): store, restart,
//! find everything again. Needs root and `losetup` (util-linux), as CI has; without them
//! the test fails and says so.

use std::process::Command;

use strata_cache_core::Tier;
use strata_disk_tier::{DiskTier, DiskTierConfig};
use strata_tests::*;

struct Loop {
    dev: String,
    img: std::path::PathBuf,
}

impl Loop {
    fn new(bytes: u64) -> Self {
        let img = std::env::temp_dir().join(format!("strata-loop-{}.img", std::process::id()));
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(bytes).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(&img)
            .output()
            .expect("this test needs `losetup` (util-linux) to make a block device");
        assert!(
            out.status.success(),
            "this test needs root to attach a loop device: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop {
            dev: String::from_utf8(out.stdout).unwrap().trim().to_string(),
            img,
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        let _ = std::fs::remove_file(&self.img);
    }
}

/// Copies 4 KiB from `source` over the start of `dev`, bypassing the page cache.
fn overwrite_first_block(dev: &str, source: &str) {
    let out = Command::new("dd")
        .args([
            &format!("if={source}"),
            &format!("of={dev}"),
            "bs=4096",
            "count=1",
            "oflag=direct",
        ])
        .output()
        .expect("this test needs `dd` (coreutils)");
    assert!(
        out.status.success(),
        "dd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_raw_block_device_works_and_survives_restart() {
    let cap = CRASH_CAPACITY;
    let dev = Loop::new(cap + (1 << 20));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let cfg = || {
        let mut c = DiskTierConfig::new(&dev.dev, cap, CRASH_BLOCK);
        c.segment_bytes = CRASH_SEGMENT;
        c
    };
    // Foreign data at the start of the device is refused, not overwritten.
    overwrite_first_block(&dev.dev, "/dev/urandom");
    rt.block_on(async {
        assert!(
            DiskTier::open(cfg()).await.is_err(),
            "opened a device holding foreign data"
        );
    });
    // Zeroed, as an operator preparing it would: it is formatted and used.
    overwrite_first_block(&dev.dev, "/dev/zero");
    rt.block_on(async {
        let t = DiskTier::open(cfg()).await.unwrap();
        for i in 0..100 {
            t.write(&crash_meta(i), &crash_payload(i, CRASH_BLOCK))
                .await
                .unwrap();
        }
    });
    rt.block_on(async {
        let t = DiskTier::open(cfg()).await.unwrap();
        assert_eq!(t.metrics().recovered_blocks, 100);
        let mut out = vec![0u8; CRASH_BLOCK];
        for i in 0..100 {
            let h = t.adopt(&crash_key(i)).expect("recovered from the device");
            t.read(h, &crash_key(i), &mut out).await.unwrap();
            assert_eq!(out, crash_payload(i, CRASH_BLOCK));
        }
    });
}
