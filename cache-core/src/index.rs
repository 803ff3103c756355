//! The radix index: token prefixes at page granularity.
//!
//! Every namespace has a root node. An edge (a node) holds whole pages of token ids, many
//! per node (path compression); a node's children are told apart by their first page. Per
//! page the index keeps its block key, which tiers hold it with a handle per tier, a hit
//! count, the last access time and a pin count.
//!
//! Matching walks the tree comparing token slices (memcmp), never hashing the prompt; keys
//! are computed once, when a page is inserted. Each node also counts its resident pages per
//! tier, so a match adds whole nodes' counts and only scans the pages of the last, partly
//! matched node.
//!
//! Storage is flat: nodes and pages live in arenas indexed by `u32` ids with free lists, and
//! per-tier handles live in one array per tier. The structural invariants, checked by
//! [`RadixIndex::check_invariants`]:
//! - every non-root node holds at least one page and is not an only child of a non-root
//!   node (such pairs are merged back);
//! - a page that loses its last residency leaves the tree if it is a leaf; an inner page
//!   that loses it (a corrupt copy) stays as a *lost* page, a match stops before it, and it
//!   leaves once the pages below it are gone;
//! - each node's per-tier counts equal the residency of its pages.
//!
//! The index is a plain data structure; [`crate::TieredCache`] owns the locking.

use std::collections::HashMap;

use crate::error::CacheError;
use crate::namespace::BlockKey;
use crate::tier::{BlockHandle, TierId};

/// Most tiers a cache can have.
pub const MAX_TIERS: usize = 4;

/// Dense id of a cached page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageId(pub u32);

/// Dense id of a tree node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeId(pub u32);

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Page {
    key: BlockKey,
    last_access: u64,
    node: u32,
    hits: u32,
    pins: u32,
    /// Bit t set: resident in tier t.
    resident: u8,
    /// Low nibble, bit t: a copy to tier t is in flight. High nibble, bit 4+t: tier t
    /// declined the page (admission); cleared when the page is used again.
    pending: u8,
}

#[derive(Debug, Default)]
struct Node {
    parent: u32,
    /// Token ids of this node's pages, `pages.len() * page_size` of them.
    tokens: Vec<u32>,
    pages: Vec<PageId>,
    /// (first token, child), sorted by first token.
    children: Vec<(u32, NodeId)>,
    resident: [u32; MAX_TIERS],
    /// Pages resident in no tier (a lost copy, or a page being inserted). A match stops
    /// at the first of them.
    lost: u32,
    live: bool,
}

/// A read-only view of one page's bookkeeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageInfo {
    /// The block key.
    pub key: BlockKey,
    /// Bit t set: resident in tier t.
    pub resident: u8,
    /// Times the page was used.
    pub hits: u32,
    /// Last use, in clock nanoseconds.
    pub last_access: u64,
    /// Pins and leases currently held.
    pub pins: u32,
}

/// Where a match ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatchEnd {
    node: u32,
    /// Pages of `node` that matched (the node may hold more).
    pages_in_node: usize,
}

/// The result of a longest-prefix match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixMatch {
    /// Whole pages matched.
    pub pages: usize,
    /// For each tier, how many of the matched pages it holds.
    pub resident: [u32; MAX_TIERS],
    /// Where the match ended, for [`RadixIndex::path`].
    pub end: MatchEnd,
}

/// The result of an insert.
#[derive(Debug, Default)]
pub struct Inserted {
    /// Every page of the inserted prefix, in order.
    pub pages: Vec<PageId>,
    /// Position in `pages` of the first page that was not there before.
    pub first_new: usize,
}

/// The radix index. See the module docs.
#[derive(Debug)]
pub struct RadixIndex {
    page_size: usize,
    nodes: Vec<Node>,
    free_nodes: Vec<u32>,
    pages: Vec<Page>,
    free_pages: Vec<u32>,
    /// handles[t][page] is the page's handle in tier t (meaningful only when resident).
    handles: Vec<Vec<BlockHandle>>,
    roots: HashMap<BlockKey, u32>,
    root_keys: HashMap<u32, BlockKey>,
    /// Live pages by block key (keys are unique: they chain the whole prefix and its
    /// namespace).
    by_key: HashMap<BlockKey, PageId>,
    live_pages: usize,
}

impl RadixIndex {
    /// An empty index for pages of `page_size` tokens across `n_tiers` tiers.
    pub fn new(page_size: usize, n_tiers: usize) -> Result<Self, CacheError> {
        if page_size == 0 {
            return Err(CacheError::InvalidConfig(
                "page size must be positive".into(),
            ));
        }
        if n_tiers == 0 || n_tiers > MAX_TIERS {
            return Err(CacheError::InvalidConfig(format!(
                "a cache has 1..={MAX_TIERS} tiers, not {n_tiers}"
            )));
        }
        Ok(RadixIndex {
            page_size,
            nodes: Vec::new(),
            free_nodes: Vec::new(),
            pages: Vec::new(),
            free_pages: Vec::new(),
            handles: vec![Vec::new(); n_tiers],
            roots: HashMap::new(),
            root_keys: HashMap::new(),
            by_key: HashMap::new(),
            live_pages: 0,
        })
    }

    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Pages in the tree.
    pub fn len(&self) -> usize {
        self.live_pages
    }

    /// Whether the tree holds no page.
    pub fn is_empty(&self) -> bool {
        self.live_pages == 0
    }

    /// Live nodes, roots included.
    pub fn node_count(&self) -> usize {
        self.nodes.len() - self.free_nodes.len()
    }

    /// Number of namespace roots.
    pub fn root_count(&self) -> usize {
        self.roots.len()
    }

    /// Reserves room for `pages` more pages, to avoid growth spikes.
    pub fn reserve_pages(&mut self, pages: usize) {
        self.pages.reserve(pages);
        for h in &mut self.handles {
            h.reserve(pages);
        }
    }

    /// Heap bytes held by the index, token ids included. Page arrays are counted at their
    /// capacity, node vectors at theirs.
    pub fn heap_bytes(&self) -> usize {
        let mut b = self.nodes.capacity() * std::mem::size_of::<Node>()
            + self.free_nodes.capacity() * 4
            + self.pages.capacity() * std::mem::size_of::<Page>()
            + self.free_pages.capacity() * 4
            + self.roots.capacity() * (32 + 4 + 8)
            + self.by_key.capacity() * (32 + 4 + 8);
        for h in &self.handles {
            b += h.capacity() * std::mem::size_of::<BlockHandle>();
        }
        for n in &self.nodes {
            b += n.tokens.capacity() * 4 + n.pages.capacity() * 4 + n.children.capacity() * 8;
        }
        b
    }

    /// Returns the root of the namespace whose root key is `root_key`, creating it.
    pub fn root(&mut self, root_key: BlockKey) -> Result<NodeId, CacheError> {
        if let Some(&r) = self.roots.get(&root_key) {
            return Ok(NodeId(r));
        }
        let r = self.alloc_node(NIL)?;
        self.roots.insert(root_key, r);
        self.root_keys.insert(r, root_key);
        Ok(NodeId(r))
    }

    /// The root of a namespace, if it was ever created.
    pub fn find_root(&self, root_key: &BlockKey) -> Option<NodeId> {
        self.roots.get(root_key).map(|&r| NodeId(r))
    }

    fn alloc_node(&mut self, parent: u32) -> Result<u32, CacheError> {
        let n = Node {
            parent,
            live: true,
            ..Node::default()
        };
        if let Some(i) = self.free_nodes.pop() {
            self.nodes[i as usize] = n;
            Ok(i)
        } else {
            let i = u32::try_from(self.nodes.len())
                .ok()
                .filter(|&i| i != NIL)
                .ok_or(CacheError::IndexFull)?;
            self.nodes.push(n);
            Ok(i)
        }
    }

    fn free_node(&mut self, n: u32) {
        self.nodes[n as usize] = Node::default();
        self.free_nodes.push(n);
    }

    fn alloc_page(&mut self, key: BlockKey, node: u32, now: u64) -> Result<PageId, CacheError> {
        let p = Page {
            key,
            last_access: now,
            node,
            hits: 0,
            pins: 0,
            resident: 0,
            pending: 0,
        };
        let id = if let Some(i) = self.free_pages.pop() {
            self.pages[i as usize] = p;
            i
        } else {
            let i = u32::try_from(self.pages.len())
                .ok()
                .filter(|&i| i != NIL)
                .ok_or(CacheError::IndexFull)?;
            self.pages.push(p);
            for h in &mut self.handles {
                h.push(BlockHandle(0));
            }
            i
        };
        self.live_pages += 1;
        self.nodes[node as usize].lost += 1;
        self.by_key.insert(key, PageId(id));
        Ok(PageId(id))
    }

    /// Finds the child of `node` whose first page equals `page`.
    fn child(&self, node: u32, page: &[u32]) -> Option<u32> {
        let children = &self.nodes[node as usize].children;
        let first = page[0];
        let start = children.partition_point(|&(t, _)| t < first);
        children[start..]
            .iter()
            .take_while(|&&(t, _)| t == first)
            .map(|&(_, c)| c.0)
            .find(|&c| &self.nodes[c as usize].tokens[..self.page_size] == page)
    }

    /// Whole pages at the start of `a` and `b` that are equal.
    fn common_pages(&self, a: &[u32], b: &[u32]) -> usize {
        let n = a.len().min(b.len());
        if a[..n] == b[..n] {
            return n / self.page_size;
        }
        a[..n]
            .chunks_exact(self.page_size)
            .zip(b[..n].chunks_exact(self.page_size))
            .take_while(|(x, y)| x == y)
            .count()
    }

    /// Longest match of `tokens` (truncated to whole pages) under `root`, stopping before
    /// the first lost page.
    pub fn match_prefix(&self, root: NodeId, tokens: &[u32]) -> PrefixMatch {
        self.walk(root, tokens, true)
    }

    fn walk(&self, root: NodeId, tokens: &[u32], stop_at_lost: bool) -> PrefixMatch {
        let ps = self.page_size;
        let tokens = &tokens[..tokens.len() / ps * ps];
        let mut node = root.0;
        let mut pos = 0;
        let mut resident = [0u32; MAX_TIERS];
        let mut end = MatchEnd {
            node,
            pages_in_node: 0,
        };
        while pos < tokens.len() {
            let Some(c) = self.child(node, &tokens[pos..pos + ps]) else {
                break;
            };
            let cn = &self.nodes[c as usize];
            // The first page is known to match.
            let full = 1 + self.common_pages(&cn.tokens[ps..], &tokens[pos + ps..]);
            // Stop at the first page that no tier holds.
            let full = if stop_at_lost && cn.lost > 0 {
                cn.pages[..full]
                    .iter()
                    .position(|p| self.pages[p.0 as usize].resident == 0)
                    .unwrap_or(full)
            } else {
                full
            };
            if full == 0 {
                break;
            }
            pos += full * ps;
            end = MatchEnd {
                node: c,
                pages_in_node: full,
            };
            if full == cn.pages.len() {
                for (r, n) in resident.iter_mut().zip(cn.resident) {
                    *r += n;
                }
                node = c;
            } else {
                for p in &cn.pages[..full] {
                    let mask = self.pages[p.0 as usize].resident;
                    for (t, r) in resident.iter_mut().enumerate() {
                        *r += u32::from(mask >> t & 1);
                    }
                }
                break;
            }
        }
        PrefixMatch {
            pages: pos / ps,
            resident,
            end,
        }
    }

    /// The pages from the root to a match's end, in order.
    pub fn path(&self, end: MatchEnd) -> Vec<PageId> {
        let mut chunks: Vec<&[PageId]> = Vec::new();
        let mut n = end.node;
        let mut take = end.pages_in_node;
        let mut total = 0;
        while n != NIL {
            let node = &self.nodes[n as usize];
            chunks.push(&node.pages[..take]);
            total += take;
            n = node.parent;
            if n != NIL {
                take = self.nodes[n as usize].pages.len();
            }
        }
        let mut out = Vec::with_capacity(total);
        for c in chunks.iter().rev() {
            out.extend_from_slice(c);
        }
        out
    }

    /// Inserts every missing page of `tokens` (a whole number of pages) under `root`, whose
    /// namespace root key is `root_key`. New pages get their chained keys and no residency:
    /// the caller must make each resident (or remove it) before giving up the lock. Lost
    /// pages on the path count as present (`pages[..first_new]`); the caller may make them
    /// resident again.
    pub fn insert(
        &mut self,
        root: NodeId,
        root_key: BlockKey,
        tokens: &[u32],
        now: u64,
    ) -> Result<Inserted, CacheError> {
        let ps = self.page_size;
        if !tokens.len().is_multiple_of(ps) {
            return Err(CacheError::PartialPage {
                tokens: tokens.len(),
                page_size: ps as u32,
            });
        }
        let m = self.walk(root, tokens, false);
        let mut pages = self.path(m.end);
        let first_new = pages.len();
        if m.pages * ps == tokens.len() {
            return Ok(Inserted { pages, first_new });
        }
        // Split the last node if the match ended inside it.
        let mut attach = m.end.node;
        let end_node = &self.nodes[attach as usize];
        if m.end.pages_in_node < end_node.pages.len() && m.end.pages_in_node > 0 {
            attach = self.split(attach, m.end.pages_in_node)?;
        }
        let mut prev_key = pages
            .last()
            .map(|p| self.pages[p.0 as usize].key)
            .unwrap_or(root_key);
        let rest = &tokens[m.pages * ps..];
        // Extend a childless non-root leaf in place; otherwise hang a new leaf.
        let a = &self.nodes[attach as usize];
        let target = if a.parent != NIL && a.children.is_empty() {
            attach
        } else {
            let leaf = self.alloc_node(attach)?;
            let pos = {
                let ch = &self.nodes[attach as usize].children;
                ch.partition_point(|&(t, _)| t <= rest[0])
            };
            self.nodes[attach as usize]
                .children
                .insert(pos, (rest[0], NodeId(leaf)));
            leaf
        };
        let new_pages = rest.len() / ps;
        self.nodes[target as usize].tokens.reserve(rest.len());
        self.nodes[target as usize].pages.reserve(new_pages);
        for page in rest.chunks_exact(ps) {
            let key = prev_key.chain(page);
            prev_key = key;
            let pid = self.alloc_page(key, target, now)?;
            let n = &mut self.nodes[target as usize];
            n.tokens.extend_from_slice(page);
            n.pages.push(pid);
            pages.push(pid);
        }
        Ok(Inserted { pages, first_new })
    }

    /// Splits `node` after `at` pages: a new parent takes the first `at` pages, `node`
    /// keeps the rest and its children. Returns the new parent.
    fn split(&mut self, node: u32, at: usize) -> Result<u32, CacheError> {
        let ps = self.page_size;
        let parent = self.nodes[node as usize].parent;
        let upper = self.alloc_node(parent)?;
        let (head_tokens, head_pages) = {
            let n = &mut self.nodes[node as usize];
            let tail_tokens = n.tokens.split_off(at * ps);
            let tail_pages = n.pages.split_off(at);
            let head_tokens = std::mem::replace(&mut n.tokens, tail_tokens);
            let head_pages = std::mem::replace(&mut n.pages, tail_pages);
            n.parent = upper;
            (head_tokens, head_pages)
        };
        let mut moved = [0u32; MAX_TIERS];
        let mut moved_lost = 0;
        for p in &head_pages {
            let page = &mut self.pages[p.0 as usize];
            page.node = upper;
            moved_lost += u32::from(page.resident == 0);
            for (t, m) in moved.iter_mut().enumerate() {
                *m += u32::from(page.resident >> t & 1);
            }
        }
        let first = head_tokens[0];
        {
            let n = &mut self.nodes[node as usize];
            for (r, m) in n.resident.iter_mut().zip(moved) {
                *r -= m;
            }
            n.lost -= moved_lost;
            let child_first = n.tokens[0];
            let u = &mut self.nodes[upper as usize];
            u.tokens = head_tokens;
            u.pages = head_pages;
            u.resident = moved;
            u.lost = moved_lost;
            u.children = vec![(child_first, NodeId(node))];
        }
        // Replace `node` by `upper` in the parent's children (same first token).
        let ch = &mut self.nodes[parent as usize].children;
        if let Some(e) = ch.iter_mut().find(|e| e.1.0 == node) {
            *e = (first, NodeId(upper));
        }
        Ok(upper)
    }

    /// Returns the spare capacity of the node holding `p` (after a store that grew it in
    /// several steps).
    pub fn compact_node_of(&mut self, p: PageId) {
        let Some(pg) = self.pages.get(p.0 as usize) else {
            return;
        };
        if pg.node == NIL {
            return;
        }
        let n = &mut self.nodes[pg.node as usize];
        n.tokens.shrink_to_fit();
        n.pages.shrink_to_fit();
    }

    /// Bookkeeping of a page.
    pub fn page(&self, p: PageId) -> PageInfo {
        let pg = &self.pages[p.0 as usize];
        PageInfo {
            key: pg.key,
            resident: pg.resident,
            hits: pg.hits,
            last_access: pg.last_access,
            pins: pg.pins,
        }
    }

    /// The live page stored under block key `key`, if any.
    pub fn find_key(&self, key: &BlockKey) -> Option<PageId> {
        self.by_key.get(key).copied()
    }

    /// The page before `p` on its path (`None` for a namespace's first page).
    pub fn parent_page(&self, p: PageId) -> Option<PageId> {
        let node = self.pages[p.0 as usize].node;
        if node == NIL {
            return None;
        }
        let n = &self.nodes[node as usize];
        let at = n.pages.iter().position(|&q| q == p)?;
        if at > 0 {
            return Some(n.pages[at - 1]);
        }
        self.nodes
            .get(n.parent as usize)
            .and_then(|parent| parent.pages.last().copied())
    }

    /// The root key of the namespace `p` belongs to (walks up the tree).
    pub fn namespace_of(&self, p: PageId) -> Option<BlockKey> {
        let mut n = self.pages[p.0 as usize].node;
        if n == NIL {
            return None;
        }
        while self.nodes[n as usize].parent != NIL {
            n = self.nodes[n as usize].parent;
        }
        self.root_keys.get(&n).copied()
    }

    /// Whether `p` names a page currently in the tree that still has key `key` (page ids
    /// are reused, keys are not).
    pub fn is_live_as(&self, p: PageId, key: &BlockKey) -> bool {
        self.is_live(p) && self.pages[p.0 as usize].key == *key
    }

    /// Whether `p` names a page currently in the tree.
    pub fn is_live(&self, p: PageId) -> bool {
        let Some(pg) = self.pages.get(p.0 as usize) else {
            return false;
        };
        pg.node != NIL && self.nodes[pg.node as usize].live
    }

    /// The handle of `p` in `tier`, if resident there.
    pub fn handle(&self, p: PageId, tier: TierId) -> Option<BlockHandle> {
        let pg = &self.pages[p.0 as usize];
        (pg.resident >> tier.0 & 1 == 1).then(|| self.handles[tier.0 as usize][p.0 as usize])
    }

    /// Records that `p` is resident in `tier` under `handle`.
    pub fn set_resident(&mut self, p: PageId, tier: TierId, handle: BlockHandle) {
        let t = tier.0 as usize;
        let pg = &mut self.pages[p.0 as usize];
        debug_assert!(pg.resident >> t & 1 == 0);
        let was_lost = pg.resident == 0;
        pg.resident |= 1 << t;
        pg.pending &= !(1 << t);
        let node = pg.node;
        self.handles[t][p.0 as usize] = handle;
        let n = &mut self.nodes[node as usize];
        n.resident[t] += 1;
        if was_lost {
            n.lost -= 1;
        }
    }

    /// Clears `p`'s residency in `tier` and returns the handle it had.
    pub fn clear_resident(&mut self, p: PageId, tier: TierId) -> Option<BlockHandle> {
        let t = tier.0 as usize;
        let pg = &mut self.pages[p.0 as usize];
        if pg.resident >> t & 1 == 0 {
            return None;
        }
        pg.resident &= !(1 << t);
        let now_lost = pg.resident == 0;
        let node = pg.node;
        let n = &mut self.nodes[node as usize];
        n.resident[t] -= 1;
        if now_lost {
            n.lost += 1;
        }
        Some(self.handles[t][p.0 as usize])
    }

    /// Marks or clears "a copy of `p` to `tier` is in flight".
    pub fn set_pending(&mut self, p: PageId, tier: TierId, on: bool) {
        let pg = &mut self.pages[p.0 as usize];
        if on {
            pg.pending |= 1 << tier.0;
        } else {
            pg.pending &= !(1 << tier.0);
        }
    }

    /// Whether a copy of `p` to `tier` is in flight.
    pub fn is_pending(&self, p: PageId, tier: TierId) -> bool {
        self.pages[p.0 as usize].pending >> tier.0 & 1 == 1
    }

    /// Records that `tier` declined `p` (until its next use).
    pub fn set_declined(&mut self, p: PageId, tier: TierId) {
        self.pages[p.0 as usize].pending |= 1 << (4 + tier.0);
    }

    /// Whether `tier` declined `p` since its last use.
    pub fn is_declined(&self, p: PageId, tier: TierId) -> bool {
        self.pages[p.0 as usize].pending >> (4 + tier.0) & 1 == 1
    }

    /// Adds a pin. Returns the new pin count.
    pub fn pin(&mut self, p: PageId) -> u32 {
        let pg = &mut self.pages[p.0 as usize];
        pg.pins += 1;
        pg.pins
    }

    /// Drops a pin. Returns the new pin count.
    pub fn unpin(&mut self, p: PageId) -> u32 {
        let pg = &mut self.pages[p.0 as usize];
        debug_assert!(pg.pins > 0);
        pg.pins = pg.pins.saturating_sub(1);
        pg.pins
    }

    /// Records a use of `p` at `now`; returns the new hit count.
    pub fn touch(&mut self, p: PageId, now: u64) -> u32 {
        let pg = &mut self.pages[p.0 as usize];
        pg.hits = pg.hits.saturating_add(1);
        // A tier that declined the page may take it now that it has one more use.
        pg.pending &= 0x0f;
        pg.last_access = pg.last_access.max(now);
        pg.hits
    }

    /// Whether no page extends `p`: it is the last page of a node without children.
    pub fn is_leaf(&self, p: PageId) -> bool {
        let pg = &self.pages[p.0 as usize];
        let n = &self.nodes[pg.node as usize];
        n.children.is_empty() && n.pages.last() == Some(&p)
    }

    /// Removes a leaf page that is resident nowhere and not pinned, then removes an
    /// emptied node and merges an only child back into its parent. Pages above it that
    /// thereby become unpinned, resident-nowhere leaves go too.
    pub fn remove_leaf(&mut self, p: PageId) {
        let ps = self.page_size;
        let mut next = Some(p);
        while let Some(p) = next.take() {
            debug_assert!(self.is_leaf(p));
            let node = self.pages[p.0 as usize].node;
            debug_assert_eq!(self.pages[p.0 as usize].resident, 0);
            debug_assert_eq!(self.pages[p.0 as usize].pins, 0);
            let n = &mut self.nodes[node as usize];
            n.pages.pop();
            let l = n.tokens.len();
            n.tokens.truncate(l - ps);
            n.lost -= 1;
            self.pages[p.0 as usize].node = NIL;
            let key = self.pages[p.0 as usize].key;
            self.by_key.remove(&key);
            self.free_pages.push(p.0);
            self.live_pages -= 1;
            let candidate = if let Some(&last) = self.nodes[node as usize].pages.last() {
                Some(last)
            } else {
                // The node is empty (and childless): unlink it.
                let parent = self.nodes[node as usize].parent;
                self.free_node(node);
                let pch = &mut self.nodes[parent as usize].children;
                if let Some(i) = pch.iter().position(|e| e.1.0 == node) {
                    pch.remove(i);
                }
                let pn = &self.nodes[parent as usize];
                if pn.parent == NIL {
                    None
                } else if pn.children.len() == 1 {
                    let only = pn.children[0].1.0;
                    self.merge_child(parent, only);
                    None
                } else if pn.children.is_empty() {
                    pn.pages.last().copied()
                } else {
                    None
                }
            };
            if let Some(c) = candidate {
                let pg = &self.pages[c.0 as usize];
                if pg.resident == 0 && pg.pins == 0 {
                    next = Some(c);
                }
            }
        }
    }

    /// Appends `child` (the only child of `parent`) to `parent` and frees it.
    fn merge_child(&mut self, parent: u32, child: u32) {
        let c = std::mem::take(&mut self.nodes[child as usize]);
        for p in &c.pages {
            self.pages[p.0 as usize].node = parent;
        }
        for &(_, g) in &c.children {
            self.nodes[g.0 as usize].parent = parent;
        }
        let pn = &mut self.nodes[parent as usize];
        pn.tokens.extend_from_slice(&c.tokens);
        pn.pages.extend_from_slice(&c.pages);
        pn.children = c.children;
        for (r, x) in pn.resident.iter_mut().zip(c.resident) {
            *r += x;
        }
        pn.lost += c.lost;
        self.free_nodes.push(child);
    }

    /// Every page in the tree, for audits and tests.
    pub fn all_pages(&self) -> Vec<PageId> {
        let mut out = Vec::with_capacity(self.live_pages);
        for n in self.nodes.iter().filter(|n| n.live) {
            out.extend_from_slice(&n.pages);
        }
        out
    }

    /// Checks the structural invariants listed in the module docs.
    pub fn check_invariants(&self) -> Result<(), String> {
        let ps = self.page_size;
        let mut seen_pages = 0;
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.live {
                continue;
            }
            let i = i as u32;
            if n.tokens.len() != n.pages.len() * ps {
                return Err(format!(
                    "node {i}: {} tokens for {} pages",
                    n.tokens.len(),
                    n.pages.len()
                ));
            }
            let is_root = n.parent == NIL;
            if is_root {
                if !n.pages.is_empty() {
                    return Err(format!("root {i} holds pages"));
                }
            } else {
                if n.pages.is_empty() {
                    return Err(format!("node {i} holds no page"));
                }
                let p = &self.nodes[n.parent as usize];
                if !p.live || !p.children.iter().any(|e| e.1.0 == i) {
                    return Err(format!("node {i} is not a child of its parent"));
                }
                if p.parent != NIL && p.children.len() == 1 {
                    return Err(format!(
                        "node {i} is an only child of non-root {}",
                        n.parent
                    ));
                }
            }
            for w in n.children.windows(2) {
                if w[0].0 > w[1].0 {
                    return Err(format!("node {i}: children not sorted"));
                }
            }
            for &(t, c) in &n.children {
                let cn = &self.nodes[c.0 as usize];
                if !cn.live || cn.parent != i || cn.tokens.first() != Some(&t) {
                    return Err(format!("node {i}: bad child entry {t}->{}", c.0));
                }
            }
            let mut counts = [0u32; MAX_TIERS];
            let mut lost = 0;
            for p in &n.pages {
                let pg = &self.pages[p.0 as usize];
                if pg.node != i {
                    return Err(format!("page {} points to node {} not {i}", p.0, pg.node));
                }
                lost += u32::from(pg.resident == 0);
                for (t, c) in counts.iter_mut().enumerate() {
                    *c += u32::from(pg.resident >> t & 1);
                }
            }
            if counts != n.resident || lost != n.lost {
                return Err(format!(
                    "node {i}: counts {:?}/{} != {:?}/{lost}",
                    n.resident, n.lost, counts
                ));
            }
            seen_pages += n.pages.len();
            for &p in &n.pages {
                if self.by_key.get(&self.pages[p.0 as usize].key) != Some(&p) {
                    return Err(format!("page {} is missing from the key map", p.0));
                }
            }
        }
        if self.by_key.len() != self.live_pages {
            return Err(format!(
                "{} keys mapped for {} live pages",
                self.by_key.len(),
                self.live_pages
            ));
        }
        if seen_pages != self.live_pages {
            return Err(format!(
                "{seen_pages} pages in nodes, {} counted",
                self.live_pages
            ));
        }
        if self.node_count() < self.roots.len() {
            return Err("fewer nodes than roots".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: usize = 16;

    fn toks(pages: &[u32]) -> Vec<u32> {
        // Page i of the prompt is 16 copies of pages[i] (makes shared prefixes easy).
        pages
            .iter()
            .flat_map(|&p| std::iter::repeat_n(p, PS))
            .collect()
    }

    fn insert_resident(ix: &mut RadixIndex, root: NodeId, t: &[u32]) -> Inserted {
        let ins = ix.insert(root, BlockKey([1; 32]), t, 0).unwrap();
        for (i, p) in ins.pages.iter().enumerate().skip(ins.first_new) {
            ix.set_resident(*p, TierId(0), BlockHandle(i as u64));
        }
        ins
    }

    #[test]
    fn insert_match_split_and_merge() {
        let mut ix = RadixIndex::new(PS, 2).unwrap();
        let r = ix.root(BlockKey([1; 32])).unwrap();
        let a = insert_resident(&mut ix, r, &toks(&[1, 2, 3, 4]));
        assert_eq!(a.first_new, 0);
        assert_eq!(ix.node_count(), 2);
        // Extends the leaf in place.
        let b = insert_resident(&mut ix, r, &toks(&[1, 2, 3, 4, 5]));
        assert_eq!(b.first_new, 4);
        assert_eq!(ix.node_count(), 2);
        // Branches inside: split.
        let c = insert_resident(&mut ix, r, &toks(&[1, 2, 9]));
        assert_eq!(c.first_new, 2);
        assert_eq!(ix.node_count(), 4);
        ix.check_invariants().unwrap();

        let m = ix.match_prefix(r, &toks(&[1, 2, 3, 7]));
        assert_eq!(m.pages, 3);
        assert_eq!(m.resident[0], 3);
        assert_eq!(ix.path(m.end), b.pages[..3].to_vec());
        // Trailing partial page is ignored.
        let mut t = toks(&[1, 2, 9]);
        t.extend_from_slice(&[5, 5, 5]);
        assert_eq!(ix.match_prefix(r, &t).pages, 3);
        // Same first token, different first page: no match.
        let mut odd = toks(&[1]);
        odd[5] = 77;
        assert_eq!(ix.match_prefix(r, &odd).pages, 0);

        // Remove the [9] branch: its node goes and the rest merges back.
        let p9 = c.pages[2];
        ix.clear_resident(p9, TierId(0));
        ix.remove_leaf(p9);
        ix.check_invariants().unwrap();
        assert_eq!(ix.node_count(), 2);
        assert_eq!(ix.match_prefix(r, &toks(&[1, 2, 3, 4, 5])).pages, 5);
        // Keys survive split and merge.
        let keys: Vec<_> = ix
            .path(ix.match_prefix(r, &toks(&[1, 2, 3, 4, 5])).end)
            .iter()
            .map(|p| ix.page(*p).key)
            .collect();
        let mut k = BlockKey([1; 32]);
        for (i, page) in toks(&[1, 2, 3, 4, 5]).chunks(PS).enumerate() {
            k = k.chain(page);
            assert_eq!(keys[i], k);
        }
    }

    #[test]
    fn partial_pages_are_refused() {
        let mut ix = RadixIndex::new(PS, 1).unwrap();
        let r = ix.root(BlockKey([0; 32])).unwrap();
        assert!(matches!(
            ix.insert(r, BlockKey([0; 32]), &[1, 2, 3], 0),
            Err(CacheError::PartialPage { tokens: 3, .. })
        ));
        assert!(ix.is_empty());
    }

    #[test]
    fn same_first_token_children_are_distinguished() {
        let mut ix = RadixIndex::new(PS, 1).unwrap();
        let r = ix.root(BlockKey([0; 32])).unwrap();
        let mut a = toks(&[3, 4]);
        let mut b = a.clone();
        a[3] = 100;
        b[3] = 200;
        insert_resident(&mut ix, r, &a);
        insert_resident(&mut ix, r, &b);
        assert_eq!(ix.match_prefix(r, &a).pages, 2);
        assert_eq!(ix.match_prefix(r, &b).pages, 2);
        ix.check_invariants().unwrap();
    }
}
