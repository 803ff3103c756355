//! Namespaces and block keys.
//!
//! A [`Namespace`] holds everything that makes KV bytes incompatible or private: the model
//! fingerprint, the KV dtype and layout, the page size, the model's KV shape, the
//! tensor-parallel shape and the tenant's cache salt. Two namespaces never share a block,
//! because every block key chains from the namespace's own root key:
//!
//! ```text
//! key(page -1) = blake3(namespace descriptor)
//! key(page i)  = blake3(key(page i-1) ‖ token ids of page i as u32 little-endian)
//! ```
//!
//! Keys are stable across releases, processes and machines (blake3 over a fixed byte layout,
//! never `DefaultHasher`), so a disk or remote tier can find a block by key alone.

use std::fmt;

use crate::error::CacheError;

/// Smallest page size Strata accepts, in tokens.
pub const MIN_PAGE_SIZE: u32 = 16;
/// Largest page size Strata accepts, in tokens.
pub const MAX_PAGE_SIZE: u32 = 256;
/// Largest block Strata accepts (1 GiB): anything bigger is a configuration mistake.
pub const MAX_BLOCK_BYTES: u64 = 1 << 30;
/// Longest tenant salt, in bytes.
pub const MAX_SALT_BYTES: usize = 256;

/// Element type of the stored KV.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvDtype {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit float (e4m3).
    Fp8E4m3,
}

impl KvDtype {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 | KvDtype::Bf16 => 2,
            KvDtype::Fp8E4m3 => 1,
        }
    }

    fn tag(self) -> u8 {
        match self {
            KvDtype::F32 => 1,
            KvDtype::F16 => 2,
            KvDtype::Bf16 => 3,
            KvDtype::Fp8E4m3 => 4,
        }
    }
}

/// How the bytes of one block are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvLayout {
    /// `[layer][k|v][token][kv_head][head_dim]`: one page of all layers in one contiguous
    /// block, so a block moves as one I/O. The layout of every tier below G1.
    PageFirst,
    /// `[layer][k|v][kv_head][token][head_dim]`: head-major inside each layer, as some
    /// attention kernels want it.
    PageFirstHeadMajor,
}

impl KvLayout {
    fn tag(self) -> u8 {
        match self {
            KvLayout::PageFirst => 1,
            KvLayout::PageFirstHeadMajor => 2,
        }
    }
}

/// The model's KV shape: what one token's KV looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvShape {
    /// Transformer layers.
    pub num_layers: u32,
    /// KV heads held by this shard (after tensor-parallel splitting).
    pub num_kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
}

/// Tensor-parallel shape of the engine that produced the KV.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TpShape {
    /// Number of tensor-parallel ranks.
    pub world_size: u16,
    /// This shard's rank.
    pub rank: u16,
}

impl Default for TpShape {
    fn default() -> Self {
        TpShape {
            world_size: 1,
            rank: 0,
        }
    }
}

/// Everything that makes KV bytes incompatible or private. See the module docs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Namespace {
    model_fingerprint: [u8; 32],
    dtype: KvDtype,
    layout: KvLayout,
    page_size: u32,
    shape: KvShape,
    tp: TpShape,
    tenant_salt: Vec<u8>,
}

impl Namespace {
    /// Builds a namespace, checking every field.
    ///
    /// `model_fingerprint` identifies the weights (for example blake3 of the weights file);
    /// `tenant_salt` separates tenants that must never see each other's blocks (empty for a
    /// single-tenant deployment).
    pub fn new(
        model_fingerprint: [u8; 32],
        dtype: KvDtype,
        layout: KvLayout,
        page_size: u32,
        shape: KvShape,
        tp: TpShape,
        tenant_salt: &[u8],
    ) -> Result<Self, CacheError> {
        if !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(CacheError::InvalidNamespace(format!(
                "page size {page_size} is outside {MIN_PAGE_SIZE}..={MAX_PAGE_SIZE} tokens"
            )));
        }
        if shape.num_layers == 0 || shape.num_kv_heads == 0 || shape.head_dim == 0 {
            return Err(CacheError::InvalidNamespace(format!(
                "KV shape has a zero dimension: {shape:?}"
            )));
        }
        if tp.world_size == 0 || tp.rank >= tp.world_size {
            return Err(CacheError::InvalidNamespace(format!(
                "tensor-parallel rank {} is not below world size {}",
                tp.rank, tp.world_size
            )));
        }
        if tenant_salt.len() > MAX_SALT_BYTES {
            return Err(CacheError::InvalidNamespace(format!(
                "tenant salt is {} bytes; at most {MAX_SALT_BYTES} allowed",
                tenant_salt.len()
            )));
        }
        let ns = Namespace {
            model_fingerprint,
            dtype,
            layout,
            page_size,
            shape,
            tp,
            tenant_salt: tenant_salt.to_vec(),
        };
        let bytes = ns.block_bytes_u64();
        if bytes > MAX_BLOCK_BYTES {
            return Err(CacheError::InvalidNamespace(format!(
                "one block would be {bytes} bytes; at most {MAX_BLOCK_BYTES} allowed"
            )));
        }
        Ok(ns)
    }

    /// Saturates instead of overflowing: absurd shapes from the wire are refused by the
    /// size check in `new`, never a panic.
    fn block_bytes_u64(&self) -> u64 {
        2u64.saturating_mul(u64::from(self.shape.num_layers))
            .saturating_mul(u64::from(self.shape.num_kv_heads))
            .saturating_mul(u64::from(self.shape.head_dim))
            .saturating_mul(u64::from(self.page_size))
            .saturating_mul(self.dtype.size())
    }

    /// Bytes of one block: K and V of one page for every layer.
    pub fn block_bytes(&self) -> usize {
        // Bounded by MAX_BLOCK_BYTES in `new`, so it fits in usize on 64-bit targets.
        self.block_bytes_u64() as usize
    }

    /// Tokens per page.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// KV element type.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Block layout.
    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// KV shape.
    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// Tensor-parallel shape.
    pub fn tp(&self) -> TpShape {
        self.tp
    }

    /// The tenant salt.
    pub fn tenant_salt(&self) -> &[u8] {
        &self.tenant_salt
    }

    /// The model fingerprint.
    pub fn model_fingerprint(&self) -> &[u8; 32] {
        &self.model_fingerprint
    }

    /// Returns the same namespace with another tenant salt.
    pub fn with_tenant_salt(&self, salt: &[u8]) -> Result<Self, CacheError> {
        Namespace::new(
            self.model_fingerprint,
            self.dtype,
            self.layout,
            self.page_size,
            self.shape,
            self.tp,
            salt,
        )
    }

    /// The canonical byte descriptor hashed into the root key. Versioned so that a future
    /// change of fields is a deliberate change of every key.
    pub fn descriptor(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(96 + self.tenant_salt.len());
        d.extend_from_slice(b"strata-ns-v1\0");
        d.extend_from_slice(&self.model_fingerprint);
        d.push(self.dtype.tag());
        d.push(self.layout.tag());
        d.extend_from_slice(&self.page_size.to_le_bytes());
        d.extend_from_slice(&self.shape.num_layers.to_le_bytes());
        d.extend_from_slice(&self.shape.num_kv_heads.to_le_bytes());
        d.extend_from_slice(&self.shape.head_dim.to_le_bytes());
        d.extend_from_slice(&self.tp.world_size.to_le_bytes());
        d.extend_from_slice(&self.tp.rank.to_le_bytes());
        d.extend_from_slice(&(self.tenant_salt.len() as u32).to_le_bytes());
        d.extend_from_slice(&self.tenant_salt);
        d
    }

    /// `key(page -1)`: the root of this namespace's key chain. Also the namespace's id.
    pub fn root_key(&self) -> BlockKey {
        BlockKey(*blake3::hash(&self.descriptor()).as_bytes())
    }

    /// The block keys of every whole page of `tokens`, in order.
    pub fn page_keys(&self, tokens: &[u32]) -> Vec<BlockKey> {
        let mut prev = self.root_key();
        tokens
            .chunks_exact(self.page_size as usize)
            .map(|page| {
                prev = prev.chain(page);
                prev
            })
            .collect()
    }
}

/// The 32-byte key of one block. See the module docs for how it is built.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey(pub [u8; 32]);

impl BlockKey {
    /// The key of the page that follows `self` and holds `page_tokens`.
    pub fn chain(&self, page_tokens: &[u32]) -> BlockKey {
        let mut h = blake3::Hasher::new();
        h.update(&self.0);
        // Token ids as u32 little-endian, hashed in stack-sized chunks to avoid allocating.
        let mut buf = [0u8; 256];
        for chunk in page_tokens.chunks(64) {
            for (i, t) in chunk.iter().enumerate() {
                buf[i * 4..i * 4 + 4].copy_from_slice(&t.to_le_bytes());
            }
            h.update(&buf[..chunk.len() * 4]);
        }
        BlockKey(*h.finalize().as_bytes())
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

impl fmt::Debug for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockKey({}…)", &self.to_hex()[..16])
    }
}

impl fmt::Display for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn test_ns(salt: &[u8]) -> Namespace {
        Namespace::new(
            [7u8; 32],
            KvDtype::Bf16,
            KvLayout::PageFirst,
            16,
            KvShape {
                num_layers: 2,
                num_kv_heads: 2,
                head_dim: 8,
            },
            TpShape::default(),
            salt,
        )
        .unwrap()
    }

    #[test]
    fn key_bytes_are_pinned() {
        // If this test fails, every key on every disk and remote store changes: bump the
        // descriptor version on purpose instead. The values were cross-checked with Python's
        // `blake3` package over the same descriptor bytes.
        let ns = test_ns(b"tenant-a");
        assert_eq!(
            ns.root_key().to_hex(),
            "b4dcabcea93495b0d1fd35b013ffb8e661bc077e6a36e35b9a07d72c41a90af6"
        );
        let tokens: Vec<u32> = (0..32).collect();
        let keys = ns.page_keys(&tokens);
        assert_eq!(keys.len(), 2);
        assert_eq!(
            keys[0].to_hex(),
            "da0a282c2a3f74ca5a6c49046c67c6a2d8243c73e2b9a61a5c3dfb6e0256f3ea"
        );
        assert_eq!(
            keys[1].to_hex(),
            "1eac874646a56044e7390cd9098c923a431290465a75c44bbaa06d572e362423"
        );
    }

    #[test]
    fn chain_matches_plain_blake3() {
        let ns = test_ns(b"");
        let root = blake3::hash(&ns.descriptor());
        let tokens: Vec<u32> = (100..116).collect();
        let mut input = root.as_bytes().to_vec();
        for t in &tokens {
            input.extend_from_slice(&t.to_le_bytes());
        }
        assert_eq!(ns.page_keys(&tokens)[0].0, *blake3::hash(&input).as_bytes());
    }

    #[test]
    fn salts_give_different_keys() {
        let a = test_ns(b"a");
        let b = test_ns(b"b");
        let tokens: Vec<u32> = (0..16).collect();
        assert_ne!(a.root_key(), b.root_key());
        assert_ne!(a.page_keys(&tokens), b.page_keys(&tokens));
    }

    #[test]
    fn bad_namespaces_are_rejected() {
        let shape = KvShape {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 1,
        };
        let mk = |ps, shape, tp, salt: &[u8]| {
            Namespace::new(
                [0; 32],
                KvDtype::F16,
                KvLayout::PageFirst,
                ps,
                shape,
                tp,
                salt,
            )
        };
        assert!(mk(8, shape, TpShape::default(), b"").is_err());
        assert!(mk(512, shape, TpShape::default(), b"").is_err());
        assert!(
            mk(
                64,
                KvShape {
                    num_layers: 0,
                    ..shape
                },
                TpShape::default(),
                b""
            )
            .is_err()
        );
        assert!(
            mk(
                64,
                shape,
                TpShape {
                    world_size: 2,
                    rank: 2
                },
                b""
            )
            .is_err()
        );
        assert!(mk(64, shape, TpShape::default(), &[0u8; 300]).is_err());
        let huge = KvShape {
            num_layers: 1000,
            num_kv_heads: 1000,
            head_dim: 1000,
        };
        assert!(mk(64, huge, TpShape::default(), b"").is_err());
        assert_eq!(
            mk(64, shape, TpShape::default(), b"")
                .unwrap()
                .block_bytes(),
            2 * 64 * 2
        );
    }
}
