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

use half::f16;
use half::slice::HalfFloatSliceExt;

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

/// The pages themselves, in the pool's dtype.
enum Pages {
    F16(Vec<Box<[f16]>>),
    F32(Vec<Box<[f32]>>),
}

/// One layer's slice of each page of a sequence, in position order, for attention.
pub(crate) enum LayerPages<'a> {
    F16(Vec<&'a [f16]>),
    F32(Vec<&'a [f32]>),
}

/// A sequence's KV: its pages, in position order, and how many positions are filled.
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

/// Fixed-size pages of KV, allocated on first use up to a limit.
pub struct KvPool {
    dtype: KvDtype,
    page_size: usize,
    n_layers: usize,
    n_kv_heads: usize,
    head_dim: usize,
    max_pages: usize,
    pages: Pages,
    free: Vec<u32>,
}

impl KvPool {
    /// A pool for `config`'s KV shape holding K/V as `dtype`, `page_size` tokens per page, at
    /// most `max_pages` pages.
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
        Ok(KvPool {
            dtype,
            page_size,
            n_layers: config.n_layers,
            n_kv_heads: config.n_kv_heads,
            head_dim: config.head_dim,
            max_pages,
            pages: match dtype {
                KvDtype::F16 => Pages::F16(Vec::new()),
                KvDtype::F32 => Pages::F32(Vec::new()),
            },
            free: Vec::new(),
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
        self.n_layers * self.layer_elems() * self.dtype.size()
    }

    /// Pages allocated so far (in use or free).
    fn allocated(&self) -> usize {
        match &self.pages {
            Pages::F16(p) => p.len(),
            Pages::F32(p) => p.len(),
        }
    }

    /// Pages in use.
    pub fn used_pages(&self) -> usize {
        self.allocated() - self.free.len()
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

    fn alloc(&mut self) -> Result<u32, EngineError> {
        if let Some(p) = self.free.pop() {
            return Ok(p);
        }
        let n = self.allocated();
        if n >= self.max_pages {
            return Err(EngineError::OutOfPages {
                pages: self.max_pages,
            });
        }
        let elems = self.n_layers * self.layer_elems();
        match &mut self.pages {
            Pages::F16(p) => p.push(vec![f16::ZERO; elems].into_boxed_slice()),
            Pages::F32(p) => p.push(vec![0f32; elems].into_boxed_slice()),
        }
        Ok(n as u32)
    }

    /// Makes sure `seq` has pages for `positions` positions.
    pub fn reserve(&mut self, seq: &mut Sequence, positions: usize) -> Result<(), EngineError> {
        let need = positions.div_ceil(self.page_size);
        let missing = need.saturating_sub(seq.pages.len());
        if missing > self.free.len() + (self.max_pages - self.allocated()) {
            return Err(EngineError::OutOfPages {
                pages: self.max_pages,
            });
        }
        while seq.pages.len() < need {
            let p = self.alloc()?;
            seq.pages.push(p);
        }
        Ok(())
    }

    /// Returns every page of `seq` to the pool and empties it.
    pub fn release(&mut self, seq: &mut Sequence) {
        self.free.append(&mut seq.pages);
        seq.len = 0;
    }

    /// Writes the K and V rows (`n × n_kv_heads × head_dim` each) of positions
    /// `start..start + n` of layer `layer`, rounded to the pool's dtype.
    pub(crate) fn write_kv(
        &mut self,
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
            let p = seq.pages[t / self.page_size] as usize;
            let o = layer * lf + (t % self.page_size) * row;
            match &mut self.pages {
                Pages::F16(pages) => {
                    pages[p][o..o + row].convert_from_f32_slice(kr);
                    pages[p][o + v_off..o + v_off + row].convert_from_f32_slice(vr);
                }
                Pages::F32(pages) => {
                    pages[p][o..o + row].copy_from_slice(kr);
                    pages[p][o + v_off..o + v_off + row].copy_from_slice(vr);
                }
            }
        }
    }

    /// Each page's slice of layer `layer`, in position order.
    pub(crate) fn layer_pages(&self, seq: &Sequence, layer: usize) -> LayerPages<'_> {
        let r = layer * self.layer_elems()..(layer + 1) * self.layer_elems();
        match &self.pages {
            Pages::F16(pages) => LayerPages::F16(
                seq.pages
                    .iter()
                    .map(|p| &pages[*p as usize][r.clone()])
                    .collect(),
            ),
            Pages::F32(pages) => LayerPages::F32(
                seq.pages
                    .iter()
                    .map(|p| &pages[*p as usize][r.clone()])
                    .collect(),
            ),
        }
    }

    /// The bytes of page `p`.
    fn page_bytes(&self, p: u32) -> &[u8] {
        match &self.pages {
            Pages::F16(pages) => bytemuck::cast_slice(pages[p as usize].reinterpret_cast()),
            Pages::F32(pages) => bytemuck::cast_slice(&pages[p as usize]),
        }
    }

    /// The bytes of page `p`, to overwrite.
    fn page_bytes_mut(&mut self, p: u32) -> &mut [u8] {
        match &mut self.pages {
            Pages::F16(pages) => bytemuck::cast_slice_mut(pages[p as usize].reinterpret_cast_mut()),
            Pages::F32(pages) => bytemuck::cast_slice_mut(&mut pages[p as usize]),
        }
    }

    /// The bytes of the `index`-th page of `seq`: a cache block. Only full pages can be
    /// exported (a partly filled page still holds an earlier user's KV past its end).
    pub fn export(&self, seq: &Sequence, index: usize) -> Result<&[u8], EngineError> {
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
        Ok(self.page_bytes(*p))
    }

    /// Appends a full page whose bytes came from a tier to `seq` (which must end on a page
    /// boundary), so that the next forward pass continues after it.
    pub fn import(&mut self, seq: &mut Sequence, block: &[u8]) -> Result<(), EngineError> {
        if block.len() != self.block_bytes() {
            return Err(EngineError::BadRequest(format!(
                "block of {} bytes, this model's {} pages are {}",
                block.len(),
                self.dtype,
                self.block_bytes()
            )));
        }
        if !seq.len.is_multiple_of(self.page_size) || seq.pages.len() != seq.len / self.page_size {
            return Err(EngineError::BadRequest(
                "a page can only be imported at a page boundary".into(),
            ));
        }
        let p = self.alloc()?;
        self.page_bytes_mut(p).copy_from_slice(block);
        seq.pages.push(p);
        seq.len += self.page_size;
        Ok(())
    }
}
