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

use strata_cache_core::BlockKey;

/// Alignment and size of headers, superblock and summaries.
pub const ALIGN: usize = 4096;
const SUPER_MAGIC: &[u8; 8] = b"STRATAG3";
const RECORD_MAGIC: &[u8; 8] = b"STRATAB1";
const SUMMARY_MAGIC: &[u8; 8] = b"STRATAS1";
const VERSION: u32 = 1;
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

/// Encodes the superblock.
pub fn encode_super(l: &Layout, out: &mut [u8]) {
    out[..ALIGN].fill(0);
    out[0..8].copy_from_slice(SUPER_MAGIC);
    out[8..12].copy_from_slice(&VERSION.to_le_bytes());
    out[12..20].copy_from_slice(&(l.block_size as u64).to_le_bytes());
    out[20..28].copy_from_slice(&l.segment_bytes.to_le_bytes());
    out[28..36].copy_from_slice(&(l.segments as u64).to_le_bytes());
    let sum = blake3::hash(&out[..36]);
    out[36..52].copy_from_slice(&sum.as_bytes()[..16]);
}

/// What a superblock says: block size, segment size, segments.
pub fn decode_super(b: &[u8]) -> Option<(usize, u64, usize)> {
    if &b[0..8] != SUPER_MAGIC || u32::from_le_bytes(b[8..12].try_into().ok()?) != VERSION {
        return None;
    }
    if blake3::hash(&b[..36]).as_bytes()[..16] != b[36..52] {
        return None;
    }
    Some((
        u64::from_le_bytes(b[12..20].try_into().ok()?) as usize,
        u64::from_le_bytes(b[20..28].try_into().ok()?),
        u64::from_le_bytes(b[28..36].try_into().ok()?) as usize,
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
pub fn encode_header(m: &RecordMeta, out: &mut [u8]) {
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
    let sum = blake3::hash(&h[..136]);
    h[136..152].copy_from_slice(&sum.as_bytes()[..16]);
}

/// Reads a record header; `None` if it is not a valid header.
pub fn decode_header(h: &[u8]) -> Option<RecordMeta> {
    if h.len() < 152 || &h[0..8] != RECORD_MAGIC {
        return None;
    }
    if blake3::hash(&h[..136]).as_bytes()[..16] != h[136..152] {
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
pub fn encode_summary(epoch: u64, entries: &[(u32, RecordMeta)], out: &mut [u8]) {
    out.fill(0);
    out[0..8].copy_from_slice(SUMMARY_MAGIC);
    out[8..16].copy_from_slice(&epoch.to_le_bytes());
    out[16..20].copy_from_slice(&(entries.len() as u32).to_le_bytes());
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
    let sum = blake3::hash(&out[SUMMARY_HEAD..end]);
    out[24..56].copy_from_slice(sum.as_bytes());
}

/// Decodes a summary; `None` if it is absent or damaged.
pub fn decode_summary(b: &[u8], max_entries: usize) -> Option<Vec<(u32, RecordMeta)>> {
    if &b[0..8] != SUMMARY_MAGIC {
        return None;
    }
    let epoch = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let n = u32::from_le_bytes(b[16..20].try_into().ok()?) as usize;
    if n > max_entries || SUMMARY_HEAD + n * ENTRY_BYTES > b.len() {
        return None;
    }
    let end = SUMMARY_HEAD + n * ENTRY_BYTES;
    if blake3::hash(&b[SUMMARY_HEAD..end]).as_bytes() != &b[24..56] {
        return None;
    }
    let mut out = Vec::with_capacity(n);
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
    }
    Some(out)
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
        let mut b = vec![0u8; ALIGN];
        encode_header(&meta(3), &mut b);
        assert_eq!(decode_header(&b), Some(meta(3)));
        for pos in [0, 20, 40, 100, 140] {
            let mut c = b.clone();
            c[pos] ^= 1;
            assert_eq!(decode_header(&c), None, "flip at {pos}");
        }
        assert_eq!(decode_header(&[0u8; ALIGN]), None);
    }

    #[test]
    fn summary_round_trip_and_damage() {
        let entries: Vec<_> = (0..10u8).map(|i| (u32::from(i) * 2, meta(i))).collect();
        let mut b = vec![0u8; 2 * ALIGN];
        encode_summary(7, &entries, &mut b);
        assert_eq!(decode_summary(&b, 10).unwrap(), entries);
        assert_eq!(decode_summary(&b, 5), None);
        b[SUMMARY_HEAD + 5] ^= 1;
        assert_eq!(decode_summary(&b, 10), None);
    }

    #[test]
    fn superblock_round_trip() {
        let l = Layout::new(4096, 1 << 20, 16 << 20).unwrap();
        let mut b = vec![0u8; ALIGN];
        encode_super(&l, &mut b);
        assert_eq!(decode_super(&b), Some((4096, 1 << 20, l.segments)));
        b[13] ^= 1;
        assert_eq!(decode_super(&b), None);
    }
}
