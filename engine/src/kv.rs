//! The engine's working KV pool (G1 on CPU): pages in cache-core's block layout.
//!
//! A page holds `page_size` tokens of K and V for every layer, as
//! `[layer][k|v][token][kv_head][head_dim]` f32 (cache-core's [`KvLayout::PageFirst`]), so
//! [`KvPool::export`] is the block a tier stores and [`KvPool::import`] puts a block back
//! byte for byte.
//!
//! [`KvLayout::PageFirst`]: strata_cache_core::KvLayout::PageFirst

use crate::EngineError;
use crate::model::ModelConfig;

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
    page_size: usize,
    n_layers: usize,
    n_kv_heads: usize,
    head_dim: usize,
    max_pages: usize,
    pages: Vec<Box<[f32]>>,
    free: Vec<u32>,
}

impl KvPool {
    /// A pool for `config`'s KV shape, `page_size` tokens per page, at most `max_pages` pages.
    pub fn new(
        config: &ModelConfig,
        page_size: usize,
        max_pages: usize,
    ) -> Result<Self, EngineError> {
        if !(16..=256).contains(&page_size) {
            return Err(EngineError::BadRequest(format!(
                "page size {page_size} is outside 16..=256 tokens"
            )));
        }
        Ok(KvPool {
            page_size,
            n_layers: config.n_layers,
            n_kv_heads: config.n_kv_heads,
            head_dim: config.head_dim,
            max_pages,
            pages: Vec::new(),
            free: Vec::new(),
        })
    }

    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    fn layer_floats(&self) -> usize {
        2 * self.page_size * self.n_kv_heads * self.head_dim
    }

    /// Bytes of one page: cache-core's block size for this namespace.
    pub fn block_bytes(&self) -> usize {
        self.n_layers * self.layer_floats() * 4
    }

    /// Pages in use.
    pub fn used_pages(&self) -> usize {
        self.pages.len() - self.free.len()
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
        if self.pages.len() >= self.max_pages {
            return Err(EngineError::OutOfPages {
                pages: self.max_pages,
            });
        }
        self.pages
            .push(vec![0f32; self.n_layers * self.layer_floats()].into_boxed_slice());
        Ok((self.pages.len() - 1) as u32)
    }

    /// Makes sure `seq` has pages for `positions` positions.
    pub fn reserve(&mut self, seq: &mut Sequence, positions: usize) -> Result<(), EngineError> {
        let need = positions.div_ceil(self.page_size);
        let missing = need.saturating_sub(seq.pages.len());
        if missing > self.free.len() + (self.max_pages - self.pages.len()) {
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
    /// `start..start + n` of layer `layer`.
    pub(crate) fn write_kv(
        &mut self,
        seq: &Sequence,
        layer: usize,
        start: usize,
        k: &[f32],
        v: &[f32],
    ) {
        let row = self.n_kv_heads * self.head_dim;
        let lf = self.layer_floats();
        let v_off = self.page_size * row;
        for (i, (kr, vr)) in k.chunks_exact(row).zip(v.chunks_exact(row)).enumerate() {
            let t = start + i;
            let page = &mut self.pages[seq.pages[t / self.page_size] as usize];
            let o = layer * lf + (t % self.page_size) * row;
            page[o..o + row].copy_from_slice(kr);
            page[o + v_off..o + v_off + row].copy_from_slice(vr);
        }
    }

    /// Each page's slice of layer `layer`, in position order.
    pub(crate) fn layer_pages(&self, seq: &Sequence, layer: usize) -> Vec<&[f32]> {
        let lf = self.layer_floats();
        seq.pages
            .iter()
            .map(|p| &self.pages[*p as usize][layer * lf..(layer + 1) * lf])
            .collect()
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
        Ok(bytemuck::cast_slice(&self.pages[*p as usize]))
    }

    /// Appends a full page whose bytes came from a tier to `seq` (which must end on a page
    /// boundary), so that the next forward pass continues after it.
    pub fn import(&mut self, seq: &mut Sequence, block: &[u8]) -> Result<(), EngineError> {
        if block.len() != self.block_bytes() {
            return Err(EngineError::BadRequest(format!(
                "block of {} bytes, this model's pages are {}",
                block.len(),
                self.block_bytes()
            )));
        }
        if !seq.len.is_multiple_of(self.page_size) || seq.pages.len() != seq.len / self.page_size {
            return Err(EngineError::BadRequest(
                "a page can only be imported at a page boundary".into(),
            ));
        }
        let p = self.alloc()?;
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut self.pages[p as usize]);
        dst.copy_from_slice(block);
        seq.pages.push(p);
        seq.len += self.page_size;
        Ok(())
    }
}
