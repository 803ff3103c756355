//! The protobuf codec of `strata.v1`, with a check before decoding: a request's repeated
//! elements are counted in its encoded bytes first, and one that carries more than any
//! call needs is refused before prost allocates for it. Without the count, 64 MiB of empty
//! `bytes` elements (2 bytes each on the wire, 32 in memory) or packed zero varints (1 byte
//! each, 4 or 8 in memory) decode to gigabytes.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};

use prost::Message;
use prost::bytes::Buf;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::pb;

/// Most repeated elements a decoded request may carry (set by the sidecar from its
/// configuration; see `SidecarConfig::max_request_elements`).
static MAX_ELEMENTS: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Sets the element limit every request is checked against.
pub fn set_max_elements(n: usize) {
    MAX_ELEMENTS.store(n, Ordering::Relaxed);
}

/// How a message is checked before decoding.
pub trait Checked {
    /// Field numbers of packed repeated scalars, whose elements are counted one by one;
    /// `None` for messages that are not checked (answers, which our own clients decode).
    const PACKED: Option<&'static [u32]>;
}

macro_rules! checked {
    ($($t:ty => $p:expr),* $(,)?) => { $( impl Checked for $t { const PACKED: Option<&'static [u32]> = $p; } )* };
}

checked! {
    pb::OpenNamespaceRequest => Some(&[]),
    pb::LookupRequest => Some(&[2]),
    pb::PrefetchRequest => Some(&[2]),
    pb::PrefetchStatusRequest => Some(&[]),
    pb::PutRequest => Some(&[2, 4]),
    pb::GetRequest => Some(&[2]),
    pb::ReleaseRequest => Some(&[1]),
    pb::StatsRequest => Some(&[]),
    pb::WatchRequest => Some(&[]),
    pb::OpenNamespaceResponse => None,
    pb::LookupResponse => None,
    pb::PrefetchResponse => None,
    pb::PrefetchStatusResponse => None,
    pb::PutResponse => None,
    pb::GetResponse => None,
    pb::ReleaseResponse => None,
    pb::StatsResponse => None,
    pb::WatchEvent => None,
}

/// Counts the elements of an encoded message: one per top-level field occurrence, plus
/// one per varint inside the packed fields `packed`. `None` if the bytes are not a
/// well-formed message at the top level (prost will then refuse them itself).
pub fn count_elements(mut b: &[u8], packed: &[u32]) -> Option<usize> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&x, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(x & 0x7f) << (7 * i);
            if x & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut n = 0usize;
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let field = (key >> 3) as u32;
        n += 1;
        match key & 7 {
            0 => {
                varint(&mut b)?;
            }
            1 => b = b.get(8..)?,
            5 => b = b.get(4..)?,
            2 => {
                let len = usize::try_from(varint(&mut b)?).ok()?;
                let body = b.get(..len)?;
                if packed.contains(&field) {
                    n += body.iter().filter(|&&x| x & 0x80 == 0).count();
                }
                b = &b[len..];
            }
            _ => return None,
        }
    }
    Some(n)
}

/// The codec of the generated client and server (prost, plus the check).
#[derive(Debug, Clone)]
pub struct CheckedCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for CheckedCodec<T, U> {
    fn default() -> Self {
        CheckedCodec(PhantomData)
    }
}

impl<T, U> Codec for CheckedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Checked + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = CheckedEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        CheckedEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder(PhantomData)
    }
}

/// Encodes with prost.
#[derive(Debug, Clone)]
pub struct CheckedEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for CheckedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding: {e}")))
    }
}

/// Counts, then decodes with prost.
#[derive(Debug, Clone)]
pub struct CheckedDecoder<U>(PhantomData<U>);

impl<U: Message + Default + Checked> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        if let Some(packed) = U::PACKED {
            // tonic hands the decoder one whole message, contiguous in its buffer.
            let chunk = buf.chunk();
            if chunk.len() == buf.remaining() {
                let max = MAX_ELEMENTS.load(Ordering::Relaxed);
                // Our messages use no groups: bytes that do not parse as plain fields are
                // refused before prost (which would skip groups) decodes anything.
                let n = count_elements(chunk, packed).ok_or_else(|| {
                    Status::invalid_argument("the request is not a well-formed message")
                })?;
                if n > max {
                    return Err(Status::resource_exhausted(format!(
                        "the request carries {n} repeated elements; no call needs more than {max} \
                         (max_tokens_per_call tokens plus two per page)"
                    )));
                }
            }
        }
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(format!("decoding: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_are_counted_on_the_wire() {
        let put = pb::PutRequest {
            namespace: "ns".into(),
            tokens: vec![0; 100],
            blocks: vec![Default::default(); 7],
            staging_slots: vec![1, 2, 3],
            ..Default::default()
        };
        let bytes = put.encode_to_vec();
        // namespace 1, tokens field 1 + 100, 7 blocks, slots field 1 + 3.
        assert_eq!(count_elements(&bytes, &[2, 4]), Some(1 + 101 + 7 + 4));
        let rel = pb::ReleaseRequest {
            leases: vec![u64::MAX; 10],
        };
        assert_eq!(count_elements(&rel.encode_to_vec(), &[1]), Some(11));
        assert_eq!(count_elements(&[0x0a, 0x05, 1], &[]), None);
    }
}
