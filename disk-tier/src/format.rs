//! On-disk format.
//!
//! ```text
//! file:     [superblock 4 KiB][segment 0][segment 1]...[segment N-1]
//! segment:  [record 0][record 1]...[record B-1][summary]
//! record:   [header 4 KiB][payload, rounded up to 4 KiB]
//! ```
//!
//! A record is written in one I/O. Its header names the block (key, namespace), the
//! segment generation it was written in, a global sequence number, the payload length and
//! the payload's blake3; the header carries its own checksum. A segment's summary (written
//! when the segment is sealed) lists every record, so recovery reads one summary per sealed
//! segment and scans headers only in segments that were not sealed. A segment that is
//! reused first has its summary wiped, so a valid summary always describes the records of
//! the segment's current generation.
//!
//! The superblock holds a random store id; every header and summary carries it, so records
//! left on a reused file or device by an earlier store never count as this store's.

use strata_cache_core::BlockKey;

/// Alignment and size of headers, superblock and summaries.
pub const ALIGN: usize = 4096;
const SUPER_MAGIC: &[u8; 8] = b"STRATAG3";
const RECORD_MAGIC: &[u8; 8] = b"STRATAB1";
const SUMMARY_MAGIC: &[u8; 8] = b"STRATAS1";
const VERSION: u32 = 2;
/// Bytes of one summary entry.
pub const ENTRY_BYTES: usize = 120;
const SUMMARY_HEAD: usize = 64;

/// Sizes that follow from the block size and segment size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Payload bytes per block.
    pub block_size: usize,
    /// Header plus padded payload.
    pub record_bytes: usize,
    /// Bytes per segment.
    pub segment_bytes: u64,
    /// Records per segment.
    pub blocks_per_segment: usize,
    /// Bytes reserved for the summary at the end of each segment.
    pub summary_bytes: usize,
    /// Number of segments.
    pub segments: usize,
}

impl Layout {
    /// Computes the layout, or says why it cannot hold anything.
    pub fn new(block_size: usize, segment_bytes: u64, capacity_bytes: u64) -> Result<Self, String> {
        if block_size == 0 {
            return Err("block size must be positive".into());
        }
        if !segment_bytes.is_multiple_of(ALIGN as u64) {
            return Err(format!(
                "segment size {segment_bytes} is not a multiple of {ALIGN}"
            ));
        }
        let record_bytes = ALIGN + block_size.div_ceil(ALIGN) * ALIGN;
        let seg = segment_bytes as usize;
        let mut b = seg / (record_bytes + ENTRY_BYTES);
        let summary = |b: usize| (SUMMARY_HEAD + b * ENTRY_BYTES).div_ceil(ALIGN) * ALIGN;
        while b > 0 && b * record_bytes + summary(b) > seg {
            b -= 1;
        }
        if b == 0 {
            return Err(format!(
                "a {segment_bytes}-byte segment cannot hold one {block_size}-byte block; use larger segments"
            ));
        }
        let segments = (capacity_bytes.saturating_sub(ALIGN as u64) / segment_bytes) as usize;
        if segments < 2 {
            return Err(format!(
                "capacity of {capacity_bytes} bytes holds {segments} segment(s) of {segment_bytes} bytes; at least 2 are needed"
            ));
        }
        Ok(Layout {
            block_size,
            record_bytes,
            segment_bytes,
            blocks_per_segment: b,
            summary_bytes: summary(b),
            segments,
        })
    }

    /// Total file size.
    pub fn file_bytes(&self) -> u64 {
        ALIGN as u64 + self.segments as u64 * self.segment_bytes
    }

    /// File offset of record `idx` of segment `seg`.
    pub fn record_offset(&self, seg: usize, idx: usize) -> u64 {
        ALIGN as u64 + seg as u64 * self.segment_bytes + (idx * self.record_bytes) as u64
    }

    /// File offset of segment `seg`'s summary.
    pub fn summary_offset(&self, seg: usize) -> u64 {
        ALIGN as u64 + (seg as u64 + 1) * self.segment_bytes - self.summary_bytes as u64
    }
}

/// Identifies one store: records of another store on the same file never match.
pub type StoreId = [u8; 16];

/// A fresh store id (blake3 of the time, the process and a counter).
pub fn new_store_id(path: &str) -> StoreId {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = blake3::Hasher::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.update(&now.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    h.update(path.as_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.finalize().as_bytes()[..16]);
    id
}

/// Encodes the superblock.
pub fn encode_super(l: &Layout, id: &StoreId, out: &mut [u8]) {
    out[..ALIGN].fill(0);
    out[0..8].copy_from_slice(SUPER_MAGIC);
    out[8..12].copy_from_slice(&VERSION.to_le_bytes());
    out[12..20].copy_from_slice(&(l.block_size as u64).to_le_bytes());
    out[20..28].copy_from_slice(&l.segment_bytes.to_le_bytes());
    out[28..36].copy_from_slice(&(l.segments as u64).to_le_bytes());
    out[36..52].copy_from_slice(id);
    let sum = blake3::hash(&out[..52]);
    out[52..68].copy_from_slice(&sum.as_bytes()[..16]);
}

/// What a superblock says: block size, segment size, segments, store id.
pub fn decode_super(b: &[u8]) -> Option<(usize, u64, usize, StoreId)> {
    if &b[0..8] != SUPER_MAGIC || u32::from_le_bytes(b[8..12].try_into().ok()?) != VERSION {
        return None;
    }
    if blake3::hash(&b[..52]).as_bytes()[..16] != b[52..68] {
        return None;
    }
    Some((
        u64::from_le_bytes(b[12..20].try_into().ok()?) as usize,
        u64::from_le_bytes(b[20..28].try_into().ok()?),
        u64::from_le_bytes(b[28..36].try_into().ok()?) as usize,
        b[36..52].try_into().ok()?,
    ))
}

/// The metadata of one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordMeta {
    /// Block key.
    pub key: BlockKey,
    /// Namespace id.
    pub namespace: BlockKey,
    /// Generation of the segment when written.
    pub epoch: u64,
    /// Global write sequence number.
    pub seq: u64,
    /// Payload bytes.
    pub len: u64,
    /// blake3 of the payload.
    pub checksum: [u8; 32],
}

/// Writes a record header into the first `ALIGN` bytes of `out`.
pub fn encode_header(m: &RecordMeta, id: &StoreId, out: &mut [u8]) {
    let h = &mut out[..ALIGN];
    h.fill(0);
    h[0..8].copy_from_slice(RECORD_MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&m.epoch.to_le_bytes());
    h[24..32].copy_from_slice(&m.seq.to_le_bytes());
    h[32..64].copy_from_slice(&m.key.0);
    h[64..96].copy_from_slice(&m.namespace.0);
    h[96..104].copy_from_slice(&m.len.to_le_bytes());
    h[104..136].copy_from_slice(&m.checksum);
    h[136..152].copy_from_slice(id);
    let sum = blake3::hash(&h[..152]);
    h[152..168].copy_from_slice(&sum.as_bytes()[..16]);
}

/// Reads a record header of store `id`; `None` if it is not a valid header of that store.
pub fn decode_header(h: &[u8], id: &StoreId) -> Option<RecordMeta> {
    if h.len() < 168 || &h[0..8] != RECORD_MAGIC || &h[136..152] != id {
        return None;
    }
    if blake3::hash(&h[..152]).as_bytes()[..16] != h[152..168] {
        return None;
    }
    if u32::from_le_bytes(h[8..12].try_into().ok()?) != VERSION {
        return None;
    }
    Some(RecordMeta {
        epoch: u64::from_le_bytes(h[16..24].try_into().ok()?),
        seq: u64::from_le_bytes(h[24..32].try_into().ok()?),
        key: BlockKey(h[32..64].try_into().ok()?),
        namespace: BlockKey(h[64..96].try_into().ok()?),
        len: u64::from_le_bytes(h[96..104].try_into().ok()?),
        checksum: h[104..136].try_into().ok()?,
    })
}

/// Encodes a segment summary of `(record index, meta)` entries into `out`
/// (`summary_bytes` long).
pub fn encode_summary(epoch: u64, entries: &[(u32, RecordMeta)], id: &StoreId, out: &mut [u8]) {
    out.fill(0);
    out[0..8].copy_from_slice(SUMMARY_MAGIC);
    out[8..16].copy_from_slice(&epoch.to_le_bytes());
    out[16..20].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    out[20..36].copy_from_slice(id);
    for (i, (idx, m)) in entries.iter().enumerate() {
        let e = &mut out[SUMMARY_HEAD + i * ENTRY_BYTES..SUMMARY_HEAD + (i + 1) * ENTRY_BYTES];
        e[0..4].copy_from_slice(&idx.to_le_bytes());
        e[8..16].copy_from_slice(&m.seq.to_le_bytes());
        e[16..48].copy_from_slice(&m.key.0);
        e[48..80].copy_from_slice(&m.namespace.0);
        e[80..88].copy_from_slice(&m.len.to_le_bytes());
        e[88..120].copy_from_slice(&m.checksum);
    }
    let end = SUMMARY_HEAD + entries.len() * ENTRY_BYTES;
    let sum = summary_checksum(out, end);
    out[36..52].copy_from_slice(&sum);
}

/// blake3 (16 bytes) of a summary's epoch, count, store id and entries.
fn summary_checksum(b: &[u8], end: usize) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(&b[8..36]);
    h.update(&b[SUMMARY_HEAD..end]);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// Decodes a summary of store `id` whose records hold `block_size` bytes: its epoch and
/// entries; `None` if it is absent, damaged, of another store, or names an index twice or
/// past `max_entries`.
pub fn decode_summary(
    b: &[u8],
    max_entries: usize,
    block_size: usize,
    id: &StoreId,
) -> Option<(u64, Vec<(u32, RecordMeta)>)> {
    if b.len() < SUMMARY_HEAD || &b[0..8] != SUMMARY_MAGIC || &b[20..36] != id {
        return None;
    }
    let epoch = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let n = u32::from_le_bytes(b[16..20].try_into().ok()?) as usize;
    if n > max_entries || SUMMARY_HEAD + n * ENTRY_BYTES > b.len() {
        return None;
    }
    let end = SUMMARY_HEAD + n * ENTRY_BYTES;
    if summary_checksum(b, end) != b[36..52] {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    let mut seen = vec![false; max_entries];
    for i in 0..n {
        let e = &b[SUMMARY_HEAD + i * ENTRY_BYTES..SUMMARY_HEAD + (i + 1) * ENTRY_BYTES];
        out.push((
            u32::from_le_bytes(e[0..4].try_into().ok()?),
            RecordMeta {
                epoch,
                seq: u64::from_le_bytes(e[8..16].try_into().ok()?),
                key: BlockKey(e[16..48].try_into().ok()?),
                namespace: BlockKey(e[48..80].try_into().ok()?),
                len: u64::from_le_bytes(e[80..88].try_into().ok()?),
                checksum: e[88..120].try_into().ok()?,
            },
        ));
        let (idx, m) = out.last()?;
        let idx = *idx as usize;
        if idx >= max_entries || seen[idx] || m.len != block_size as u64 {
            return None;
        }
        seen[idx] = true;
    }
    Some((epoch, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(i: u8) -> RecordMeta {
        RecordMeta {
            key: BlockKey([i; 32]),
            namespace: BlockKey([i ^ 0xff; 32]),
            epoch: 7,
            seq: 1000 + u64::from(i),
            len: 65536,
            checksum: [i.wrapping_mul(3); 32],
        }
    }

    #[test]
    fn layout_fits_and_refuses_nonsense() {
        let l = Layout::new(65536, 64 << 20, 1 << 30).unwrap();
        assert_eq!(l.record_bytes, 69632);
        assert!(
            l.blocks_per_segment * l.record_bytes + l.summary_bytes <= l.segment_bytes as usize
        );
        assert_eq!(l.segments, 15);
        assert!(Layout::new(0, 64 << 20, 1 << 30).is_err());
        assert!(Layout::new(65536, 65536, 1 << 30).is_err());
        assert!(Layout::new(65536, 64 << 20, 64 << 20).is_err());
        assert!(Layout::new(65536, 1000, 1 << 30).is_err());
    }

    #[test]
    fn header_round_trip_and_damage() {
        let id = [5u8; 16];
        let mut b = vec![0u8; ALIGN];
        encode_header(&meta(3), &id, &mut b);
        assert_eq!(decode_header(&b, &id), Some(meta(3)));
        assert_eq!(
            decode_header(&b, &[6u8; 16]),
            None,
            "another store's record"
        );
        for pos in [0, 20, 40, 100, 140, 160] {
            let mut c = b.clone();
            c[pos] ^= 1;
            assert_eq!(decode_header(&c, &id), None, "flip at {pos}");
        }
        assert_eq!(decode_header(&[0u8; ALIGN], &id), None);
    }

    #[test]
    fn summary_round_trip_and_damage() {
        let id = [5u8; 16];
        let entries: Vec<_> = (0..10u8).map(|i| (u32::from(i) * 2, meta(i))).collect();
        let mut b = vec![0u8; 2 * ALIGN];
        encode_summary(7, &entries, &id, &mut b);
        assert_eq!(
            decode_summary(&b, 20, 65536, &id).unwrap(),
            (7, entries.clone())
        );
        assert_eq!(decode_summary(&b, 5, 65536, &id), None, "too many entries");
        assert_eq!(
            decode_summary(&b, 18, 65536, &id),
            None,
            "index past the end"
        );
        assert_eq!(decode_summary(&b, 20, 4096, &id), None, "wrong block size");
        assert_eq!(
            decode_summary(&b, 20, 65536, &[6u8; 16]),
            None,
            "another store"
        );
        let mut e = b.clone();
        e[9] ^= 1;
        assert_eq!(decode_summary(&e, 20, 65536, &id), None, "epoch is covered");
        b[SUMMARY_HEAD + 5] ^= 1;
        assert_eq!(decode_summary(&b, 20, 65536, &id), None);
        let mut dup = entries.clone();
        dup[1].0 = dup[0].0;
        let mut d = vec![0u8; 2 * ALIGN];
        encode_summary(7, &dup, &id, &mut d);
        assert_eq!(
            decode_summary(&d, 20, 65536, &id),
            None,
            "an index named twice"
        );
        // An empty summary keeps its epoch.
        encode_summary(9, &[], &id, &mut d);
        assert_eq!(decode_summary(&d, 20, 65536, &id).unwrap(), (9, vec![]));
    }

    #[test]
    fn superblock_round_trip() {
        let l = Layout::new(4096, 1 << 20, 16 << 20).unwrap();
        let mut b = vec![0u8; ALIGN];
        encode_super(&l, &[3u8; 16], &mut b);
        assert_eq!(
            decode_super(&b),
            Some((4096, 1 << 20, l.segments, [3u8; 16]))
        );
        b[13] ^= 1;
        assert_eq!(decode_super(&b), None);
    }
}
