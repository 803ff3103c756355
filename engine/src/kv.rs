//! The engine's working KV pool (G1 on CPU): pages in cache-core's block layout.
//!
//! A page holds `page_size` tokens of K and V for every layer, as
//! `[layer][k|v][token][kv_head][head_dim]` in the pool's [`KvDtype`] (f16 by default, as
//! llama.cpp; f32 on request), cache-core's [`KvLayout::PageFirst`], so [`KvPool::export`]
//! is the block a tier stores and [`KvPool::import`] puts a block back byte for byte. K/V are
//! rounded to the pool's dtype once, when they are written; attention widens them to f32 as
//! it reads them. The dtype is part of the cache namespace ([`Model::namespace`]), so f16
//! and f32 blocks never share a key.
//!
//! [`KvLayout::PageFirst`]: strata_cache_core::KvLayout::PageFirst
//! [`Model::namespace`]: crate::Model::namespace

use std::fmt;
use std::str::FromStr;

use std::sync::Mutex;

use half::f16;
use half::slice::HalfFloatSliceExt;
use memmap2::MmapMut;

use crate::EngineError;
use crate::model::ModelConfig;

/// The element type of the KV pool's pages, and so of the cache blocks it exports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvDtype {
    /// IEEE half: half the memory and bytes moved of f32 (llama.cpp's default).
    #[default]
    F16,
    /// 32-bit float: exactly what the forward pass computed.
    F32,
}

impl KvDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
        }
    }

    /// The cache namespace's name for it.
    pub fn cache_dtype(self) -> strata_cache_core::KvDtype {
        match self {
            KvDtype::F16 => strata_cache_core::KvDtype::F16,
            KvDtype::F32 => strata_cache_core::KvDtype::F32,
        }
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvDtype::F16 => "f16",
            KvDtype::F32 => "f32",
        })
    }
}

impl FromStr for KvDtype {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self, EngineError> {
        match s {
            "f16" => Ok(KvDtype::F16),
            "f32" => Ok(KvDtype::F32),
            _ => Err(EngineError::BadRequest(format!(
                "KV dtype {s:?} (supported: f16, f32)"
            ))),
        }
    }
}

/// Holders and state of the pool's pages.
struct Alloc {
    /// Holders of each page: the sequences that own or share it, plus the cache when its
    /// tier 0 indexes the page ([`crate::device::PoolTier`]).
    refs: Vec<u32>,
    /// A sealed page is full and shared: nothing writes it again until it is free.
    sealed: Vec<bool>,
    /// The cache's tier 0 holds a reference on the page ([`KvPool::share`]).
    cached: Vec<bool>,
    /// Pages handed out before and returned.
    free: Vec<u32>,
    /// Pages `fresh..max_pages` have never been handed out (their memory is not touched yet).
    fresh: usize,
}

impl Alloc {
    fn available(&self, max_pages: usize) -> usize {
        self.free.len() + (max_pages - self.fresh)
    }

    /// A private page with one holder, or `None` when every page is held.
    fn take(&mut self, max_pages: usize) -> Option<u32> {
        let p = match self.free.pop() {
            Some(p) => p,
            None if self.fresh < max_pages => {
                self.fresh += 1;
                (self.fresh - 1) as u32
            }
            None => return None,
        };
        self.refs[p as usize] = 1;
        self.sealed[p as usize] = false;
        Some(p)
    }

    fn unref(&mut self, p: u32) {
        let r = &mut self.refs[p as usize];
        if *r == 0 {
            // Released more often than held: a caller's bug. Going below zero would put the
            // page on the free list twice and hand it to two sequences.
            debug_assert!(false, "page {p} released more often than held");
            return;
        }
        *r -= 1;
        if *r == 0 {
            self.sealed[p as usize] = false;
            self.free.push(p);
        }
    }
}

/// One layer's slice of each page of a sequence, in position order, for attention.
pub(crate) enum LayerPages<'a> {
    F16(Vec<&'a [f16]>),
    F32(Vec<&'a [f32]>),
}

/// A sequence's KV: its pages, in position order, and how many positions are filled. It
/// holds one reference on each page; [`KvPool::release`] gives them back.
#[derive(Debug, Default)]
pub struct Sequence {
    pages: Vec<u32>,
    len: usize,
}

impl Sequence {
    /// An empty sequence.
    pub fn new() -> Self {
        Self::default()
    }
    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing is filled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The pool pages, in position order.
    pub fn pages(&self) -> &[u32] {
        &self.pages
    }
    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len;
    }
}

/// Fixed-size pages of KV in one anonymous mapping (the kernel commits a page's memory when
/// it is first written), with a reference count per page.
///
/// A page is *private* while one sequence holds it and it is not sealed: only that
/// sequence's forward pass writes it. A full page becomes *sealed* when it is shared (with
/// another sequence through [`KvPool::attach`], or with the cache's tier 0): from then on it
/// is only read, until its last holder lets go and it returns to the free list. That
/// discipline is what lets every method take `&self` and lets readers on other threads (the
/// cache copying a block down) read pages while the scheduler writes others.
pub struct KvPool {
    dtype: KvDtype,
    page_size: usize,
    n_layers: usize,
    n_kv_heads: usize,
    head_dim: usize,
    max_pages: usize,
    block_bytes: usize,
    base: *mut u8,
    _mem: MmapMut,
    alloc: Mutex<Alloc>,
}

// SAFETY: `base` points into `_mem`, which lives as long as the pool and never moves. Page
// memory is only written through `write_kv` (the private pages of a sequence the caller
// holds by `&mut` through `Model::forward_batch`) and `import`/`copy_in` (a page just taken
// from the free list that nobody else can name yet); every other access reads pages that are
// sealed or private to the reading caller. The reference counts are behind a mutex.
unsafe impl Send for KvPool {}
// SAFETY: as for `Send`: shared access only reads sealed pages or the caller's own pages.
unsafe impl Sync for KvPool {}

impl KvPool {
    /// A pool for `config`'s KV shape holding K/V as `dtype`, `page_size` tokens per page, at
    /// most `max_pages` pages. The address space is reserved at once; memory is committed
    /// as pages are first used.
    pub fn new(
        config: &ModelConfig,
        dtype: KvDtype,
        page_size: usize,
        max_pages: usize,
    ) -> Result<Self, EngineError> {
        if !(16..=256).contains(&page_size) {
            return Err(EngineError::BadRequest(format!(
                "page size {page_size} is outside 16..=256 tokens"
            )));
        }
        if max_pages == 0 || max_pages > u32::MAX as usize {
            return Err(EngineError::BadRequest(format!(
                "KV pool of {max_pages} pages (need 1..=2^32-1)"
            )));
        }
        let block_bytes =
            config.n_layers * 2 * page_size * config.n_kv_heads * config.head_dim * dtype.size();
        let bytes = block_bytes
            .checked_mul(max_pages)
            .ok_or_else(|| EngineError::BadRequest("KV pool size overflows".into()))?;
        let mut mem = MmapMut::map_anon(bytes.max(1)).map_err(|e| {
            EngineError::Io(format!("reserving {bytes} bytes for the KV pool: {e}"))
        })?;
        let base = mem.as_mut_ptr();
        Ok(KvPool {
            dtype,
            page_size,
            n_layers: config.n_layers,
            n_kv_heads: config.n_kv_heads,
            head_dim: config.head_dim,
            max_pages,
            block_bytes,
            base,
            _mem: mem,
            alloc: Mutex::new(Alloc {
                refs: vec![0; max_pages],
                sealed: vec![false; max_pages],
                cached: vec![false; max_pages],
                free: Vec::new(),
                fresh: 0,
            }),
        })
    }

    /// The element type of the pages.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Elements of one layer's part of a page.
    fn layer_elems(&self) -> usize {
        2 * self.page_size * self.n_kv_heads * self.head_dim
    }

    /// Bytes of one page: cache-core's block size for this namespace.
    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// Most pages the pool holds.
    pub fn capacity(&self) -> usize {
        self.max_pages
    }

    /// Pages held by a sequence or the cache.
    pub fn used_pages(&self) -> usize {
        self.max_pages - self.free_pages()
    }

    /// Pages nobody holds.
    pub fn free_pages(&self) -> usize {
        self.lock().available(self.max_pages)
    }

    /// How many holders page `p` has (0 when free).
    pub fn refs(&self, p: u32) -> u32 {
        self.lock().refs.get(p as usize).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Alloc> {
        // The counts are updated in place by code that cannot panic half-way, so a poisoned
        // lock still holds consistent counts.
        self.alloc.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn check_shape(&self, c: &ModelConfig) -> Result<(), EngineError> {
        if (c.n_layers, c.n_kv_heads, c.head_dim) != (self.n_layers, self.n_kv_heads, self.head_dim)
        {
            return Err(EngineError::BadRequest(
                "KV pool was made for another model".into(),
            ));
        }
        Ok(())
    }

    /// Checks that the pages of `seq` from position `seq.len()` on are private, so the next
    /// forward pass may write them.
    fn check_writable(&self, a: &Alloc, seq: &Sequence) -> Result<(), EngineError> {
        for &p in &seq.pages[(seq.len / self.page_size).min(seq.pages.len())..] {
            if a.refs[p as usize] != 1 || a.sealed[p as usize] {
                return Err(EngineError::Internal(format!(
                    "page {p} would be written while shared"
                )));
            }
        }
        Ok(())
    }

    /// Makes sure `seq` has pages for `positions` positions.
    pub fn reserve(&self, seq: &mut Sequence, positions: usize) -> Result<(), EngineError> {
        self.reserve_many(&mut [(seq, positions)])
    }

    /// Makes sure each sequence has pages for its number of positions, all or nothing: when
    /// the pool cannot hold them all, no sequence gains a page.
    pub fn reserve_many(&self, wants: &mut [(&mut Sequence, usize)]) -> Result<(), EngineError> {
        let mut a = self.lock();
        let mut missing = 0;
        for (seq, positions) in wants.iter() {
            self.check_writable(&a, seq)?;
            missing += positions
                .div_ceil(self.page_size)
                .saturating_sub(seq.pages.len());
        }
        if missing > a.available(self.max_pages) {
            return Err(EngineError::OutOfPages {
                pages: self.max_pages,
            });
        }
        for (seq, positions) in wants.iter_mut() {
            while seq.pages.len() < positions.div_ceil(self.page_size) {
                let p = a.take(self.max_pages).expect("counted above");
                seq.pages.push(p);
            }
        }
        Ok(())
    }

    /// Pages a sequence of `positions` positions would still need beyond what `seq` holds.
    pub fn missing(&self, seq: &Sequence, positions: usize) -> usize {
        positions
            .div_ceil(self.page_size)
            .saturating_sub(seq.pages.len())
    }

    /// Lets go of every page of `seq` (a page returns to the pool when its last holder lets
    /// go) and empties it.
    pub fn release(&self, seq: &mut Sequence) {
        let mut a = self.lock();
        for p in seq.pages.drain(..) {
            if (p as usize) < self.max_pages {
                a.unref(p);
            }
        }
        seq.len = 0;
    }

    /// Appends page `p`, a sealed page someone else holds (a cached prefix page), to `seq`,
    /// which must end on a page boundary, sharing it: no bytes move.
    pub fn attach(&self, seq: &mut Sequence, p: u32) -> Result<(), EngineError> {
        if !seq.len.is_multiple_of(self.page_size) || seq.pages.len() != seq.len / self.page_size {
            return Err(EngineError::BadRequest(
                "a page can only be attached at a page boundary".into(),
            ));
        }
        let mut a = self.lock();
        let i = p as usize;
        if i >= self.max_pages || a.refs[i] == 0 || !a.sealed[i] {
            return Err(EngineError::BadRequest(format!(
                "page {p} is not a shared page of this pool"
            )));
        }
        a.refs[i] += 1;
        seq.pages.push(p);
        seq.len += self.page_size;
        Ok(())
    }

    /// Takes the cache's reference on page `p` and seals it (the cache's tier 0 adopting
    /// it). Fails when nobody holds the page or the cache holds it already.
    pub(crate) fn share(&self, p: u32) -> bool {
        let mut a = self.lock();
        let i = p as usize;
        if i >= self.max_pages || a.refs[i] == 0 || a.cached[i] {
            return false;
        }
        a.refs[i] += 1;
        a.sealed[i] = true;
        a.cached[i] = true;
        true
    }

    /// Drops the cache's reference on page `p` (the tier freeing its handle); a page the
    /// cache does not hold is left alone.
    pub(crate) fn unshare(&self, p: u32) {
        let mut a = self.lock();
        let i = p as usize;
        if i < self.max_pages && a.cached[i] {
            a.cached[i] = false;
            a.unref(p);
        }
    }

    /// The page that `block` is, when it is exactly one page of this pool's memory.
    pub(crate) fn page_of(&self, block: &[u8]) -> Option<u32> {
        let off = (block.as_ptr() as usize).checked_sub(self.base as usize)?;
        (block.len() == self.block_bytes
            && off.is_multiple_of(self.block_bytes)
            && off / self.block_bytes < self.max_pages)
            .then_some((off / self.block_bytes) as u32)
    }

    /// Copies `block` into a new page with one holder: the cache (sealed) when `for_cache`,
    /// else the caller's sequence (private).
    pub(crate) fn copy_in(&self, block: &[u8], for_cache: bool) -> Result<u32, EngineError> {
        if block.len() != self.block_bytes {
            return Err(EngineError::BadRequest(format!(
                "block of {} bytes, this model's {} pages are {}",
                block.len(),
                self.dtype,
                self.block_bytes
            )));
        }
        let p = self
            .lock()
            .take(self.max_pages)
            .ok_or(EngineError::OutOfPages {
                pages: self.max_pages,
            })?;
        // SAFETY: `p` was just taken from the free list with one holder (us): no other
        // reference to its memory exists, and it lies inside the mapping.
        unsafe { self.page_mut(p) }.copy_from_slice(block);
        let mut a = self.lock();
        a.sealed[p as usize] = for_cache;
        a.cached[p as usize] = for_cache;
        Ok(p)
    }

    /// The bytes of page `p`.
    ///
    /// # Safety
    /// `p < max_pages`, and nobody writes the page while the slice lives.
    unsafe fn page(&self, p: u32) -> &[u8] {
        assert!(
            (p as usize) < self.max_pages,
            "page {p} is not in this pool"
        );
        // SAFETY: the caller's contract; the range lies inside the mapping (checked above).
        unsafe {
            std::slice::from_raw_parts(
                self.base.add(p as usize * self.block_bytes),
                self.block_bytes,
            )
        }
    }

    /// The bytes of page `p`, to write.
    ///
    /// # Safety
    /// `p < max_pages`, and the page is private to the caller: no other slice of it lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn page_mut(&self, p: u32) -> &mut [u8] {
        assert!(
            (p as usize) < self.max_pages,
            "page {p} is not in this pool"
        );
        // SAFETY: the caller's contract; the range lies inside the mapping (checked above).
        unsafe {
            std::slice::from_raw_parts_mut(
                self.base.add(p as usize * self.block_bytes),
                self.block_bytes,
            )
        }
    }

    /// A copy of sealed page `p` (a tier read of a block the cache holds).
    pub(crate) fn read_sealed(&self, p: u32, out: &mut [u8]) -> bool {
        {
            let a = self.lock();
            let i = p as usize;
            if i >= self.max_pages
                || a.refs[i] == 0
                || !a.sealed[i]
                || out.len() != self.block_bytes
            {
                return false;
            }
        }
        // SAFETY: the page is sealed and the cache still holds it (it frees a handle only
        // after its reads complete), so nobody writes it.
        out.copy_from_slice(unsafe { self.page(p) });
        true
    }

    /// Writes the K and V rows (`n × n_kv_heads × head_dim` each) of positions
    /// `start..start + n` of layer `layer`, rounded to the pool's dtype. Only for
    /// [`crate::Model::forward_batch`], on positions its reservation checked are private.
    pub(crate) fn write_kv(
        &self,
        seq: &Sequence,
        layer: usize,
        start: usize,
        k: &[f32],
        v: &[f32],
    ) {
        let row = self.n_kv_heads * self.head_dim;
        let lf = self.layer_elems();
        let v_off = self.page_size * row;
        for (i, (kr, vr)) in k.chunks_exact(row).zip(v.chunks_exact(row)).enumerate() {
            let t = start + i;
            let p = seq.pages[t / self.page_size];
            let o = layer * lf + (t % self.page_size) * row;
            // SAFETY: positions from `seq.len()` on lie in pages that `reserve_many` checked
            // are private to `seq`, which the forward pass holds by `&mut`; no slice of the
            // page is alive (attention slices are taken after the writes and dropped).
            let bytes = unsafe { self.page_mut(p) };
            match self.dtype {
                KvDtype::F16 => {
                    let page: &mut [f16] = bytemuck::cast_slice_mut(bytes);
                    page[o..o + row].convert_from_f32_slice(kr);
                    page[o + v_off..o + v_off + row].convert_from_f32_slice(vr);
                }
                KvDtype::F32 => {
                    let page: &mut [f32] = bytemuck::cast_slice_mut(bytes);
                    page[o..o + row].copy_from_slice(kr);
                    page[o + v_off..o + v_off + row].copy_from_slice(vr);
                }
            }
        }
    }

    /// Each page's slice of layer `layer`, in position order.
    pub(crate) fn layer_pages<'a>(&'a self, seq: &'a Sequence, layer: usize) -> LayerPages<'a> {
        let r = layer * self.layer_elems()..(layer + 1) * self.layer_elems();
        // SAFETY: the pages of `seq` are sealed (never written) or private to `seq`, which
        // the caller borrows for the slices' lifetime, so they are not written meanwhile.
        let bytes = seq.pages.iter().map(|p| unsafe { self.page(*p) });
        match self.dtype {
            KvDtype::F16 => LayerPages::F16(bytes.map(|b| &cast::<f16>(b)[r.clone()]).collect()),
            KvDtype::F32 => LayerPages::F32(
                bytes
                    .map(|b| &bytemuck::cast_slice::<u8, f32>(b)[r.clone()])
                    .collect(),
            ),
        }
    }

    /// The bytes of the `index`-th page of `seq`: a cache block. Only full pages can be
    /// exported (a partly filled page still holds an earlier user's KV past its end).
    pub fn export<'a>(&'a self, seq: &'a Sequence, index: usize) -> Result<&'a [u8], EngineError> {
        if (index + 1) * self.page_size > seq.len {
            return Err(EngineError::BadRequest(format!(
                "page {index} is not full ({} positions filled)",
                seq.len
            )));
        }
        let p = seq
            .pages
            .get(index)
            .ok_or_else(|| EngineError::BadRequest(format!("sequence has no page {index}")))?;
        // SAFETY: a full page is never written again (writes go to positions past
        // `seq.len()`), and `seq` is borrowed for the slice's lifetime so it cannot be
        // released meanwhile.
        Ok(unsafe { self.page(*p) })
    }

    /// Appends a full page whose bytes came from a tier to `seq` (which must end on a page
    /// boundary), so that the next forward pass continues after it.
    pub fn import(&self, seq: &mut Sequence, block: &[u8]) -> Result<(), EngineError> {
        if !seq.len.is_multiple_of(self.page_size) || seq.pages.len() != seq.len / self.page_size {
            return Err(EngineError::BadRequest(
                "a page can only be imported at a page boundary".into(),
            ));
        }
        let p = self.copy_in(block, false)?;
        seq.pages.push(p);
        seq.len += self.page_size;
        Ok(())
    }
}

/// The bytes of a page as elements (pages start at multiples of the block size inside a
/// page-aligned mapping, so they are aligned for any element type).
fn cast<T: bytemuck::Pod>(b: &[u8]) -> &[T] {
    bytemuck::cast_slice(b)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn config() -> ModelConfig {
        ModelConfig {
            arch: "llama".into(),
            n_layers: 1,
            hidden: 4,
            ffn: 4,
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 4,
            vocab: 8,
            ctx_len: 1024,
            rope_theta: 10000.0,
            rope_dim: 4,
            rope_layout: strata_kernels::RopeLayout::Adjacent,
            rms_eps: 1e-5,
            qkv_bias: false,
            qk_norm: false,
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Sequence grows by this many positions (reserve, then "written").
        Grow(usize, usize),
        /// The cache adopts page `k` of a sequence (if full).
        Adopt(usize, usize),
        /// The cache lets go of its `k`-th page.
        Evict(usize),
        /// A sequence at a page boundary attaches the cache's `k`-th page.
        Attach(usize, usize),
        /// A sequence releases everything.
        Release(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..4usize, 1..40usize).prop_map(|(i, n)| Op::Grow(i, n)),
            (0..4usize, 0..4usize).prop_map(|(i, k)| Op::Adopt(i, k)),
            (0..8usize).prop_map(Op::Evict),
            (0..4usize, 0..8usize).prop_map(|(i, k)| Op::Attach(i, k)),
            (0..4usize).prop_map(Op::Release),
        ]
    }

    proptest! {
        /// Reference counts, sealing and the free count against a model: a page's holders
        /// are the sequences that list it plus the cache's adoptions, a page is free exactly
        /// when nobody holds it, and no page is listed by two sequences unless sealed.
        #[test]
        fn pool_counts_match_a_model(ops in proptest::collection::vec(op(), 1..120)) {
            const PS: usize = 16;
            let pool = KvPool::new(&config(), KvDtype::F16, PS, 12).unwrap();
            let mut seqs: Vec<Sequence> = (0..4).map(|_| Sequence::new()).collect();
            let mut cache: Vec<u32> = Vec::new();
            for op in ops {
                match op {
                    Op::Grow(i, n) => {
                        let end = seqs[i].len() + n;
                        let missing = pool.missing(&seqs[i], end);
                        let free = pool.free_pages();
                        match pool.reserve(&mut seqs[i], end) {
                            Ok(()) => seqs[i].set_len(end),
                            Err(EngineError::OutOfPages { .. }) => prop_assert!(missing > free),
                            Err(e) => prop_assert!(false, "reserve: {e}"),
                        }
                    }
                    Op::Adopt(i, k) => {
                        if let Ok(b) = pool.export(&seqs[i], k) {
                            let p = pool.page_of(b).expect("an exported page is a pool page");
                            let held = cache.contains(&p);
                            prop_assert_eq!(pool.share(p), !held, "the cache holds a page once");
                            if !held {
                                cache.push(p);
                            }
                        }
                    }
                    Op::Evict(k) => {
                        if k < cache.len() {
                            pool.unshare(cache.swap_remove(k));
                        }
                    }
                    Op::Attach(i, k) => {
                        if k < cache.len() {
                            let at_boundary = seqs[i].len().is_multiple_of(PS)
                                && seqs[i].pages().len() == seqs[i].len() / PS;
                            prop_assert_eq!(pool.attach(&mut seqs[i], cache[k]).is_ok(), at_boundary);
                        }
                    }
                    Op::Release(i) => pool.release(&mut seqs[i]),
                }
                let mut holders: HashMap<u32, u32> = HashMap::new();
                for p in seqs.iter().flat_map(|s| s.pages()).chain(&cache) {
                    *holders.entry(*p).or_default() += 1;
                }
                for p in 0..12u32 {
                    prop_assert_eq!(pool.refs(p), holders.get(&p).copied().unwrap_or(0), "page {}", p);
                }
                prop_assert_eq!(pool.free_pages(), 12 - holders.len());
                // A page listed by two sequences (or a sequence and the cache) is sealed, so
                // no forward pass may write it: the writable tail of every sequence is private.
                let a = pool.lock();
                for s in &seqs {
                    prop_assert!(pool.check_writable(&a, s).is_ok());
                }
            }
            for s in &mut seqs {
                pool.release(s);
            }
            for p in cache.drain(..) {
                pool.unshare(p);
            }
            prop_assert_eq!(pool.free_pages(), 12);
        }
    }
}
