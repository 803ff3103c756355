//! Error types of the cache core.

use crate::tier::{TierError, TierId};

/// Everything the cache core can refuse or fail at. Every variant says what was wrong, so a
/// server can hand the message to its client unchanged.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A namespace field is out of range.
    #[error("invalid namespace: {0}")]
    InvalidNamespace(String),
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The namespace was never registered with this cache.
    #[error("unknown namespace {0}")]
    UnknownNamespace(String),
    /// A namespace's blocks do not fit the tiers of this cache.
    #[error(
        "namespace blocks are {namespace} bytes but tier {tier} stores {tier_block} byte blocks"
    )]
    NamespaceMismatch {
        /// Block size of the namespace.
        namespace: usize,
        /// The tier that does not fit.
        tier: TierId,
        /// Block size of that tier.
        tier_block: usize,
    },
    /// A store was given a token count that is not a whole number of pages.
    #[error("{tokens} tokens is not a whole number of {page_size}-token pages")]
    PartialPage {
        /// Tokens given.
        tokens: usize,
        /// Page size of the namespace.
        page_size: u32,
    },
    /// More tokens than a single call may carry.
    #[error("{tokens} tokens exceeds the limit of {limit} tokens per call")]
    TooManyTokens {
        /// Tokens given.
        tokens: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The number of blocks does not match the number of pages.
    #[error("{pages} pages need {pages} blocks, got {blocks}")]
    BlockCount {
        /// Pages in the token list.
        pages: usize,
        /// Blocks given.
        blocks: usize,
    },
    /// A block of the wrong size.
    #[error("block {index} is {got} bytes; blocks of this namespace are {expected} bytes")]
    BlockSize {
        /// Position of the offending block in the call.
        index: usize,
        /// Its size.
        got: usize,
        /// The namespace's block size.
        expected: usize,
    },
    /// A page that is not cached came without its block.
    #[error("page {index} is not cached and its block was sent empty")]
    MissingBlock {
        /// Position of the page in the call.
        index: usize,
    },
    /// A lease was asked to end at a time that has already passed.
    #[error("lease deadline is {past_by_ms} ms in the past")]
    LeaseInPast {
        /// How far in the past.
        past_by_ms: u64,
    },
    /// A lease id that is not (or no longer) held.
    #[error("unknown or expired lease {0}")]
    UnknownLease(u64),
    /// A tier index that this cache does not have.
    #[error("no tier {0} in this cache")]
    UnknownTier(TierId),
    /// Every block of a tier is pinned or otherwise not evictable, so nothing new fits.
    #[error("tier {0} is full and nothing in it can be evicted (all pinned or leased)")]
    TierFull(TierId),
    /// A tier's I/O failed.
    #[error("tier {tier}: {source}")]
    Tier {
        /// Which tier.
        tier: TierId,
        /// What it reported.
        #[source]
        source: TierError,
    },
    /// A quota group has as many blocks in a tier as its quota allows and none of them
    /// can leave (all pinned or leased); nothing of another group's is evicted for it.
    #[error(
        "quota group {group} holds its quota of {quota} blocks in tier {tier} and none of them can be evicted (all pinned or leased)"
    )]
    QuotaFull {
        /// The group.
        group: u32,
        /// The tier.
        tier: TierId,
        /// Its quota there, in blocks.
        quota: u64,
    },
    /// The index cannot address more pages or nodes (2^32 - 1 of each).
    #[error("index is out of page or node ids")]
    IndexFull,
}
