//! The disk tier's recovery on a store file whose bytes the fuzzer changes.
//!
//! Once per process, a few real stores are written with `DiskTier` (small segments, psync):
//! a partly filled ring, a ring that wrapped with hot blocks reinserted, and one with freed
//! blocks. Each input picks one, applies byte changes (xor, 64-bit writes, zeroed ranges,
//! records, headers and summaries copied over others, truncation or extension, and the
//! re-sealing of a header's, summary's or superblock's checksum after its fields were
//! changed), writes it to a real file (O_DIRECT) and:
//!
//! 1. `DiskTier::open`s it (errors are fine);
//! 2. adopts and reads every key the tier reports: a read that succeeds must return exactly
//!    the bytes written for that key (a key never written must never read successfully);
//! 3. writes fresh blocks through the recovered state (rotating segments) and reads them back;
//! 4. flushes, closes, opens again and repeats step 2.
//!
//! Never panic, never hang (30 s per input), never serve wrong bytes.
//!
//! Re-sealing forges only checksums, never a (key, payload checksum) pair: a header or
//! summary is re-sealed only when each of its entries still pairs a key with the checksum of
//! that key's real payload, so a read that returns other bytes is a bug in the tier, not a
//! forgery the format cannot detect.
#![no_main]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use strata_cache_core::{BlockKey, BlockMeta, Tier};
use strata_disk_tier::format::{ALIGN, ENTRY_BYTES, Layout};
use strata_disk_tier::io::EngineKind;
use strata_disk_tier::{DiskTier, DiskTierConfig};

/// Payload bytes per block: not a multiple of 4 KiB, so records carry padding.
const BS: usize = 3000;
/// Records per segment.
const PER_SEG: u64 = 4;
/// Keys of blocks the target writes after recovery start here.
const FRESH: u64 = 10_000;
const SUMMARY_HEAD: usize = 64;

fn key(i: u64) -> BlockKey {
    BlockKey(*blake3::hash(&i.to_le_bytes()).as_bytes())
}

fn meta(i: u64) -> BlockMeta {
    BlockMeta {
        key: key(i),
        namespace: BlockKey([7; 32]),
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

fn cfg(path: PathBuf, segments: u64) -> DiskTierConfig {
    let rec = (ALIGN + BS.div_ceil(ALIGN) * ALIGN) as u64;
    let seg = (PER_SEG * rec + 8192).div_ceil(4096) * 4096;
    let mut c = DiskTierConfig::new(path, 4096 + segments * seg, BS);
    c.segment_bytes = seg;
    c.engine = EngineKind::Psync;
    c.queue_depth = 4;
    c
}

struct World {
    dir: PathBuf,
    /// Per scenario: segment count and the store's bytes.
    images: Vec<(u64, Vec<u8>)>,
    /// Key → index of every block any scenario or input writes.
    index: HashMap<[u8; 32], u64>,
    /// Key → blake3 of its payload.
    sums: HashMap<[u8; 32], [u8; 32]>,
}

async fn build(path: PathBuf, segments: u64, scenario: u8) -> Vec<u8> {
    let _ = std::fs::remove_file(&path);
    let t = DiskTier::open(cfg(path.clone(), segments))
        .await
        .expect("opening a fresh store");
    let mut handles = Vec::new();
    let n = match scenario {
        0 => 6,
        1 => 26,
        _ => 15,
    };
    for i in 0..n {
        if let Ok(h) = t.write(&meta(i), &payload(i)).await {
            handles.push((i, h));
        }
        // Scenario 1: read every third block so that reclaim reinserts it (hot).
        if scenario == 1 && i % 3 == 0 {
            let (j, h) = handles[handles.len() / 2];
            let mut out = vec![0u8; BS];
            let _ = t.read(h, &key(j), &mut out).await;
        }
        // Scenario 2: free every fourth block, and write some keys twice.
        if scenario == 2 && i % 4 == 3 {
            let (_, h) = handles.remove(0);
            t.free(h);
            let _ = t.write(&meta(i / 2), &payload(i / 2)).await;
        }
    }
    t.flush(Duration::from_secs(10)).await.expect("flushing");
    drop(t);
    std::fs::read(&path).expect("reading the store back")
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        // O_DIRECT needs a real file system: not /dev/shm.
        let dir = strata_fuzz::scratch("/tmp", "disk");
        let images = strata_fuzz::runtime().block_on(async {
            let mut v = Vec::new();
            for (s, segs) in [(0u8, 4u64), (1, 4), (2, 3)] {
                v.push((segs, build(dir.join("build.dat"), segs, s).await));
            }
            v
        });
        let mut index = HashMap::new();
        let mut sums = HashMap::new();
        for i in (0..64).chain(FRESH..FRESH + 64) {
            index.insert(key(i).0, i);
            sums.insert(key(i).0, *blake3::hash(&payload(i)).as_bytes());
        }
        World {
            dir,
            images,
            index,
            sums,
        }
    })
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Region {
    Super,
    Header(u8, u8),
    Payload(u8, u8),
    Summary(u8),
    Anywhere(u32),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Xor(Region, u16, u8),
    Set64(Region, u16, u64),
    Zero(Region, u16, u16),
    CopyRecord((u8, u8), (u8, u8)),
    CopyHeader((u8, u8), (u8, u8)),
    CopySummary(u8, u8),
    /// Recomputes the checksum of a header, summary (`Summary`) or the superblock.
    Reseal(Region),
    Truncate(u32),
}

#[derive(Arbitrary, Debug)]
struct Input {
    scenario: u8,
    ops: Vec<Op>,
    /// Blocks written after recovery (at most 12).
    fresh: u8,
}

struct Image<'a> {
    b: Vec<u8>,
    l: Layout,
    w: &'a World,
}

impl Image<'_> {
    fn rec(&self, (s, i): (u8, u8)) -> usize {
        let s = usize::from(s) % self.l.segments;
        let i = usize::from(i) % self.l.blocks_per_segment;
        self.l.record_offset(s, i) as usize
    }
    fn sum(&self, s: u8) -> usize {
        self.l.summary_offset(usize::from(s) % self.l.segments) as usize
    }
    /// Start and length of a region.
    fn region(&self, r: Region) -> (usize, usize) {
        match r {
            Region::Super => (0, ALIGN),
            Region::Header(s, i) => (self.rec((s, i)), ALIGN),
            Region::Payload(s, i) => (self.rec((s, i)) + ALIGN, self.l.record_bytes - ALIGN),
            Region::Summary(s) => (self.sum(s), self.l.summary_bytes),
            Region::Anywhere(o) => (o as usize, usize::MAX),
        }
    }
    fn at(&self, r: Region, off: usize) -> usize {
        let (start, len) = self.region(r);
        start + if len == usize::MAX { 0 } else { off % len }
    }
    fn copy(&mut self, from: usize, to: usize, len: usize) {
        let n = self.b.len();
        let (from, to) = (from.min(n), to.min(n));
        let len = len.min(n - from).min(n - to);
        self.b.copy_within(from..from + len, to);
    }
    fn reseal(&mut self, r: Region) {
        let (start, len) = self.region(r);
        if len == usize::MAX || start + len > self.b.len() {
            return;
        }
        let b = &mut self.b[start..start + len];
        match r {
            Region::Super => {
                let sum = blake3::hash(&b[..52]);
                b[52..68].copy_from_slice(&sum.as_bytes()[..16]);
            }
            Region::Header(..) => {
                if !self
                    .w
                    .sums
                    .get(&b[32..64])
                    .is_some_and(|s| s[..] == b[104..136])
                {
                    return;
                }
                let sum = blake3::hash(&b[..152]);
                b[152..168].copy_from_slice(&sum.as_bytes()[..16]);
            }
            Region::Summary(_) => {
                let n = u32::from_le_bytes(b[16..20].try_into().expect("4 bytes")) as usize;
                let end = SUMMARY_HEAD + n.min(self.l.blocks_per_segment) * ENTRY_BYTES;
                if end > b.len() {
                    return;
                }
                let all_genuine = (0..n.min(self.l.blocks_per_segment)).all(|i| {
                    let e = &b[SUMMARY_HEAD + i * ENTRY_BYTES..][..ENTRY_BYTES];
                    self.w
                        .sums
                        .get(&e[16..48])
                        .is_some_and(|s| s[..] == e[88..120])
                });
                if !all_genuine {
                    return;
                }
                let mut h = blake3::Hasher::new();
                h.update(&b[8..36]);
                h.update(&b[SUMMARY_HEAD..end]);
                b[36..52].copy_from_slice(&h.finalize().as_bytes()[..16]);
            }
            Region::Payload(..) | Region::Anywhere(_) => {}
        }
    }
    fn apply(&mut self, op: &Op) {
        let n = self.b.len();
        match *op {
            Op::Xor(r, off, v) => {
                let p = self.at(r, usize::from(off));
                if p < n {
                    self.b[p] ^= v;
                }
            }
            Op::Set64(r, off, v) => {
                let p = self.at(r, usize::from(off) & !7);
                if p + 8 <= n {
                    self.b[p..p + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
            Op::Zero(r, off, len) => {
                let p = self.at(r, usize::from(off)).min(n);
                let e = p.saturating_add(usize::from(len)).min(n);
                self.b[p..e].fill(0);
            }
            Op::CopyRecord(a, b) => {
                let (f, t) = (self.rec(a), self.rec(b));
                self.copy(f, t, self.l.record_bytes);
            }
            Op::CopyHeader(a, b) => {
                let (f, t) = (self.rec(a), self.rec(b));
                self.copy(f, t, ALIGN);
            }
            Op::CopySummary(a, b) => {
                let (f, t) = (self.sum(a), self.sum(b));
                self.copy(f, t, self.l.summary_bytes);
            }
            Op::Reseal(r) => self.reseal(r),
            Op::Truncate(len) => {
                // Up to one segment past the end.
                let max = n + self.l.segment_bytes as usize;
                self.b.resize(len as usize % (max + 1), 0);
            }
        }
    }
}

/// Adopts and reads every key the tier reports; each successful read must be that key's
/// payload. Returns how many blocks were read.
async fn check_all(t: &DiskTier, w: &World) -> usize {
    let mut ok = 0;
    for k in t.keys() {
        let Some(h) = t.adopt(&k) else {
            continue;
        };
        let mut out = vec![0u8; BS];
        if t.read(h, &k, &mut out).await.is_ok() {
            let i = w
                .index
                .get(&k.0)
                .unwrap_or_else(|| panic!("key {k} was never written but read successfully"));
            assert!(out == payload(*i), "block {i} read back with wrong bytes");
            ok += 1;
        }
    }
    ok
}

fuzz_target!(|inp: Input| {
    let w = world();
    let (segs, base) = &w.images[usize::from(inp.scenario) % w.images.len()];
    let c = cfg(w.dir.join("g3.dat"), *segs);
    let l = Layout::new(BS, c.segment_bytes, c.capacity_bytes).expect("layout");
    let mut img = Image {
        b: base.clone(),
        l,
        w,
    };
    for op in inp.ops.iter().take(32) {
        img.apply(op);
    }
    std::fs::write(&c.path, &img.b).expect("writing the mutated store");
    let fresh = u64::from(inp.fresh % 13);
    let run = async {
        let Ok(t) = DiskTier::open(c.clone()).await else {
            return;
        };
        check_all(&t, w).await;
        for i in FRESH..FRESH + fresh {
            if let Ok(h) = t.write(&meta(i), &payload(i)).await {
                let mut out = vec![0u8; BS];
                if t.read(h, &key(i), &mut out).await.is_ok() {
                    assert!(
                        out == payload(i),
                        "fresh block {i} read back with wrong bytes"
                    );
                }
            }
        }
        let _ = t.flush(Duration::from_secs(5)).await;
        drop(t);
        let Ok(t) = DiskTier::open(c.clone()).await else {
            return;
        };
        check_all(&t, w).await;
    };
    strata_fuzz::runtime().block_on(async {
        tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("disk tier recovery hung for 30 s");
    });
});
