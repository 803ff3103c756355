//! The soak's data, all derived from seeds so that any block read can be checked without
//! remembering what was written: a prompt's tokens are a function of its id (shared by
//! every tenant, so tenant isolation is tested), and a block's bytes are a function of the
//! tenant and the chained key of its token prefix (like the sidecar's own block keys).

use strata_server::client::NamespaceSpec;
use strata_server::pb;

/// Tokens per page.
pub const PAGE: usize = 16;
/// Bytes of one block: 2 × 2 layers × 2 KV heads × 64 × 16 tokens × 2 bytes.
pub const BLOCK: usize = 2 * 2 * 2 * 64 * PAGE * 2;
/// System prompts shared by groups of prompts.
const GROUPS: u64 = 16;
/// Most pages of a prompt's own part.
const MAX_SUFFIX: u64 = 6;
/// Most pages of any prompt.
pub const MAX_PAGES: usize = 3 + MAX_SUFFIX as usize;

/// The namespace every soak tenant opens (the same model for all of them).
pub fn spec() -> NamespaceSpec {
    NamespaceSpec {
        model_fingerprint: [0x50; 32],
        dtype: pb::KvDtype::F16,
        page_size: PAGE as u32,
        num_layers: 2,
        num_kv_heads: 2,
        head_dim: 64,
    }
}

/// splitmix64: a small deterministic generator.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x6A09_E667_F3BC_C908)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A number in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf-shaped popularity over `n` items: item `k` is drawn with weight `1 / (k+1)^s`.
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// The distribution over `n` items with exponent `s`.
    pub fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (0..n.max(1))
            .map(|k| {
                acc += 1.0 / ((k + 1) as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }

    /// Draws an item.
    pub fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

fn page_tokens(kind: u64, id: u64, page: u64, out: &mut Vec<u32>) {
    let mut h = blake3::Hasher::new();
    h.update(b"strata-soak-tokens");
    h.update(&kind.to_le_bytes());
    h.update(&id.to_le_bytes());
    h.update(&page.to_le_bytes());
    let mut x = [0u8; 4 * PAGE];
    h.finalize_xof().fill(&mut x);
    out.extend(
        x.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) % 49_152),
    );
}

/// Tokens of prompt `p` (the same for every tenant): a system prompt of 1 to 3 pages
/// shared by its group, then 1 to 6 pages of its own.
pub fn prompt_tokens(seed: u64, p: u64) -> Vec<u32> {
    let g = p % GROUPS;
    let sys = 1 + g % 3;
    let own = 1 + (Rng::new(seed ^ p.wrapping_mul(0xA24B_AED4_963E_E407)).next_u64() % MAX_SUFFIX);
    let mut t = Vec::with_capacity(((sys + own) as usize) * PAGE);
    for j in 0..sys {
        page_tokens(1, seed ^ g, j, &mut t);
    }
    for j in 0..own {
        page_tokens(2, seed ^ (p << 8), j, &mut t);
    }
    t
}

/// Chained keys of the pages of `tokens` for `tenant`: `k(i) = blake3(k(i-1) ‖ page i)`,
/// `k(-1)` naming the tenant and model. The sidecar computes its own keys; these only
/// derive the expected bytes.
pub fn page_keys(tenant: u32, tokens: &[u32]) -> Vec<[u8; 32]> {
    let mut k =
        *blake3::hash(&[b"strata-soak-root".as_slice(), &tenant.to_le_bytes()].concat()).as_bytes();
    tokens
        .chunks_exact(PAGE)
        .map(|page| {
            let mut h = blake3::Hasher::new();
            h.update(&k);
            for t in page {
                h.update(&t.to_le_bytes());
            }
            k = *h.finalize().as_bytes();
            k
        })
        .collect()
}

/// The bytes of the block with chained key `key`.
pub fn block_bytes(key: &[u8; 32]) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    blake3::Hasher::new_keyed(key).finalize_xof().fill(&mut b);
    b
}

/// Bytes of `got` that differ from `want` (a length difference counts every missing or
/// extra byte).
pub fn wrong_bytes(got: &[u8], want: &[u8]) -> u64 {
    let common = got.len().min(want.len());
    let differ = got[..common]
        .iter()
        .zip(&want[..common])
        .filter(|(a, b)| a != b)
        .count();
    (differ + got.len().max(want.len()) - common) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_share_system_prompts_and_blocks_depend_on_tenant_and_prefix() {
        let a = prompt_tokens(1, 0);
        let b = prompt_tokens(1, GROUPS);
        assert_eq!(a.len() % PAGE, 0);
        assert_eq!(a[..PAGE], b[..PAGE], "same group, same system prompt");
        let (ka, kb) = (page_keys(0, &a), page_keys(0, &b));
        assert_eq!(ka[0], kb[0]);
        assert_ne!(page_keys(1, &a)[0], ka[0], "tenants never share bytes");
        assert_eq!(block_bytes(&ka[0]).len(), BLOCK);
        assert_eq!(wrong_bytes(&block_bytes(&ka[0]), &block_bytes(&kb[0])), 0);
        assert!(wrong_bytes(&block_bytes(&ka[0]), &block_bytes(&page_keys(1, &a)[0])) > 0);
        let z = Zipf::new(100, 1.0);
        let mut r = Rng::new(3);
        let hits = (0..10_000).filter(|_| z.sample(&mut r) == 0).count();
        assert!((1_500..2_500).contains(&hits), "{hits}");
    }
}
