//! Eviction policies.
//!
//! The controller keeps one policy instance per tier. A policy only orders the pages that
//! are resident in its tier; it never decides alone what may be evicted. The controller
//! passes a predicate to [`EvictionPolicy::victim`] that rejects pages that must stay:
//!
//! - a pinned or leased page is never evicted;
//! - a page that is resident in no other tier is evicted only if it is a leaf of the tree
//!   (no page extends it), because only a contiguous prefix is useful: evicting an inner
//!   page would strand everything below it. Leaves go first.
//!
//! Invariants every policy keeps:
//! 1. It tracks exactly the pages reported through `insert` and not yet through `remove`.
//! 2. `victim` returns a tracked page for which the predicate returned `true`, or `None`
//!    after offering every tracked page at most twice. It does not stop tracking the page;
//!    the controller calls `remove` when it really evicts it.
//! 3. Every operation is O(1) except `victim`, which is O(pages skipped).
//!
//! Pages are named by [`PageId`], a dense index, so policies keep their state in flat
//! arrays (8 or 9 bytes per page) instead of hash maps.

use crate::index::PageId;

/// Which policy to build for a tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EvictionKind {
    /// Least recently used.
    #[default]
    Lru,
    /// SIEVE (NSDI '24): a FIFO with a visited bit and a moving hand. Scan resistant: a
    /// burst of one-time pages does not flush pages that are used again.
    Sieve,
}

impl EvictionKind {
    /// Builds a policy of this kind.
    pub fn build(self) -> Box<dyn EvictionPolicy> {
        match self {
            EvictionKind::Lru => Box::new(Lru::default()),
            EvictionKind::Sieve => Box::new(Sieve::default()),
        }
    }
}

/// Orders the resident pages of one tier for eviction. See the module docs.
pub trait EvictionPolicy: Send + Sync {
    /// Policy name for logs and metrics.
    fn name(&self) -> &'static str;
    /// `page` became resident in the tier.
    fn insert(&mut self, page: PageId);
    /// `page` was used.
    fn touch(&mut self, page: PageId);
    /// `page` left the tier.
    fn remove(&mut self, page: PageId);
    /// The next page to evict among those `can_evict` accepts.
    fn victim(&mut self, can_evict: &mut dyn FnMut(PageId) -> bool) -> Option<PageId>;
    /// Pages tracked.
    fn len(&self) -> usize;
    /// Whether no page is tracked.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Heap bytes the policy holds.
    fn heap_bytes(&self) -> usize;
}

const NIL: u32 = u32::MAX;
/// Marks a page slot that is not in the list.
const OUT: u32 = u32::MAX - 1;

/// An intrusive doubly linked list over dense page ids: `head` is the newest end.
#[derive(Debug)]
struct List {
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    len: usize,
}

impl Default for List {
    fn default() -> Self {
        List {
            prev: Vec::new(),
            next: Vec::new(),
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }
}

impl List {
    fn contains(&self, p: u32) -> bool {
        (p as usize) < self.prev.len() && self.prev[p as usize] != OUT
    }

    fn push_head(&mut self, p: u32) {
        let i = p as usize;
        if i >= self.prev.len() {
            let n = (i + 1).max(self.prev.len() * 2).max(64);
            self.prev.resize(n, OUT);
            self.next.resize(n, OUT);
        }
        debug_assert!(!self.contains(p));
        self.prev[i] = NIL;
        self.next[i] = self.head;
        if self.head != NIL {
            self.prev[self.head as usize] = p;
        } else {
            self.tail = p;
        }
        self.head = p;
        self.len += 1;
    }

    fn unlink(&mut self, p: u32) {
        let i = p as usize;
        let (pr, nx) = (self.prev[i], self.next[i]);
        if pr != NIL {
            self.next[pr as usize] = nx;
        } else {
            self.head = nx;
        }
        if nx != NIL {
            self.prev[nx as usize] = pr;
        } else {
            self.tail = pr;
        }
        self.prev[i] = OUT;
        self.next[i] = OUT;
        self.len -= 1;
    }

    /// The neighbour of `p` toward the head (newer), or NIL.
    fn newer(&self, p: u32) -> u32 {
        self.prev[p as usize]
    }

    fn heap_bytes(&self) -> usize {
        (self.prev.capacity() + self.next.capacity()) * 4
    }
}

/// Least-recently-used order.
#[derive(Debug, Default)]
pub struct Lru {
    list: List,
}

impl EvictionPolicy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn insert(&mut self, page: PageId) {
        if !self.list.contains(page.0) {
            self.list.push_head(page.0);
        }
    }

    fn touch(&mut self, page: PageId) {
        if self.list.contains(page.0) && self.list.head != page.0 {
            self.list.unlink(page.0);
            self.list.push_head(page.0);
        }
    }

    fn remove(&mut self, page: PageId) {
        if self.list.contains(page.0) {
            self.list.unlink(page.0);
        }
    }

    fn victim(&mut self, can_evict: &mut dyn FnMut(PageId) -> bool) -> Option<PageId> {
        let mut p = self.list.tail;
        while p != NIL {
            if can_evict(PageId(p)) {
                return Some(PageId(p));
            }
            p = self.list.newer(p);
        }
        None
    }

    fn len(&self) -> usize {
        self.list.len
    }

    fn heap_bytes(&self) -> usize {
        self.list.heap_bytes()
    }
}

/// SIEVE order. See [`EvictionKind::Sieve`].
#[derive(Debug, Default)]
pub struct Sieve {
    list: List,
    visited: Vec<u64>,
    /// Next page the hand examines; NIL means "start from the tail".
    hand: u32,
    hand_set: bool,
}

impl Sieve {
    fn visited(&self, p: u32) -> bool {
        let (w, b) = (p as usize / 64, p % 64);
        self.visited.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    fn set_visited(&mut self, p: u32, v: bool) {
        let (w, b) = (p as usize / 64, p % 64);
        if w >= self.visited.len() {
            if !v {
                return;
            }
            self.visited.resize((w + 1).max(self.visited.len() * 2), 0);
        }
        if v {
            self.visited[w] |= 1 << b;
        } else {
            self.visited[w] &= !(1 << b);
        }
    }
}

impl EvictionPolicy for Sieve {
    fn name(&self) -> &'static str {
        "sieve"
    }

    fn insert(&mut self, page: PageId) {
        if !self.list.contains(page.0) {
            self.list.push_head(page.0);
            self.set_visited(page.0, false);
        }
    }

    fn touch(&mut self, page: PageId) {
        if self.list.contains(page.0) {
            self.set_visited(page.0, true);
        }
    }

    fn remove(&mut self, page: PageId) {
        if self.list.contains(page.0) {
            if self.hand_set && self.hand == page.0 {
                self.hand = self.list.newer(page.0);
            }
            self.list.unlink(page.0);
            self.set_visited(page.0, false);
        }
    }

    fn victim(&mut self, can_evict: &mut dyn FnMut(PageId) -> bool) -> Option<PageId> {
        if self.list.len == 0 {
            return None;
        }
        let mut p = if self.hand_set && self.hand != NIL {
            self.hand
        } else {
            self.list.tail
        };
        // Two full sweeps: the first may only clear visited bits.
        for _ in 0..=2 * self.list.len {
            if p == NIL {
                p = self.list.tail;
            }
            if self.visited(p) {
                self.set_visited(p, false);
            } else if can_evict(PageId(p)) {
                self.hand = self.list.newer(p);
                self.hand_set = true;
                return Some(PageId(p));
            }
            p = self.list.newer(p);
        }
        self.hand = p;
        self.hand_set = true;
        None
    }

    fn len(&self) -> usize {
        self.list.len
    }

    fn heap_bytes(&self) -> usize {
        self.list.heap_bytes() + self.visited.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(p: &mut dyn EvictionPolicy, mut ok: impl FnMut(PageId) -> bool) -> Vec<u32> {
        let mut out = vec![];
        while let Some(v) = p.victim(&mut ok) {
            p.remove(v);
            out.push(v.0);
        }
        out
    }

    #[test]
    fn lru_evicts_least_recent_first_and_skips_rejected() {
        let mut l = Lru::default();
        for i in 0..5 {
            l.insert(PageId(i));
        }
        l.touch(PageId(0));
        l.touch(PageId(2));
        assert_eq!(drain(&mut l, |p| p.0 != 3), vec![1, 4, 0, 2]);
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn sieve_keeps_visited_pages_over_a_scan() {
        let mut s = Sieve::default();
        for i in 0..4 {
            s.insert(PageId(i));
        }
        s.touch(PageId(0));
        s.touch(PageId(1));
        // A scan of one-time pages.
        for i in 10..14 {
            s.insert(PageId(i));
        }
        let mut evicted = vec![];
        for _ in 0..6 {
            let v = s.victim(&mut |_| true).unwrap();
            s.remove(v);
            evicted.push(v.0);
        }
        assert!(
            !evicted.contains(&0) && !evicted.contains(&1),
            "{evicted:?}"
        );
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn sieve_returns_none_when_nothing_is_evictable() {
        let mut s = Sieve::default();
        for i in 0..3 {
            s.insert(PageId(i));
            s.touch(PageId(i));
        }
        assert_eq!(s.victim(&mut |_| false), None);
        assert_eq!(drain(&mut s, |_| true).len(), 3);
    }
}
