//! Model configuration, weights (GGUF or safetensors) and the forward pass over paged KV.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use rayon::prelude::*;
use strata_cache_core::{KvLayout, KvShape, Namespace, TpShape};
use strata_kernels::ops::{Rope, add_inplace, rmsnorm_rows_inplace, silu_mul};
use strata_kernels::{
    AttnItem, AttnShape, DType, RopeLayout, WeightMatrix, matmul, matmul_many, paged_attention_many,
};

use crate::EngineError;
use crate::gguf::{GgufFile, Value};
use crate::kv::{KvDtype, KvPool, LayerPages, Sequence};

/// What the forward pass needs to know about a model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Architecture name (`llama`, `mistral`, `qwen2`, `qwen3`).
    pub arch: String,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Residual width.
    pub hidden: usize,
    /// MLP width.
    pub ffn: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Longest context the model was trained for.
    pub ctx_len: usize,
    /// RoPE base.
    pub rope_theta: f32,
    /// Rotated dimensions per head.
    pub rope_dim: usize,
    /// Which elements RoPE pairs.
    pub rope_layout: RopeLayout,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Q/K/V projections have biases (Qwen2).
    pub qkv_bias: bool,
    /// Per-head RMSNorm of Q and K before RoPE (Qwen3).
    pub qk_norm: bool,
}

impl ModelConfig {
    /// Checks that the configuration is consistent and within sane bounds (a hostile file
    /// cannot make the loader allocate absurd amounts or overflow a size).
    pub fn validate(&self, path: &Path) -> Result<(), EngineError> {
        let c = self;
        let ok = (1..=1024).contains(&c.n_layers)
            && (1..=1 << 16).contains(&c.hidden)
            && (1..=1 << 20).contains(&c.ffn)
            && (1..=1024).contains(&c.n_heads)
            && (1..=1024).contains(&c.n_kv_heads)
            && c.n_heads.is_multiple_of(c.n_kv_heads)
            && (2..=1024).contains(&c.head_dim)
            && c.head_dim.is_multiple_of(2)
            && c.rope_dim <= c.head_dim
            && (1..=1 << 22).contains(&c.vocab)
            && (2..=1 << 24).contains(&c.ctx_len)
            && c.rope_theta.is_finite()
            && c.rope_theta > 0.0
            && c.rms_eps.is_finite();
        if !ok {
            return Err(EngineError::Format(format!(
                "{}: inconsistent configuration {c:?}",
                path.display()
            )));
        }
        Ok(())
    }
}

/// A weight matrix living in a memory map.
#[derive(Clone, Debug)]
pub struct Matrix {
    dtype: DType,
    rows: usize,
    cols: usize,
    map: Arc<Mmap>,
    offset: usize,
    len: usize,
}

impl Matrix {
    /// The kernels' view of it.
    pub fn view(&self) -> WeightMatrix<'_> {
        WeightMatrix::new(
            self.dtype,
            self.rows,
            self.cols,
            &self.map[self.offset..self.offset + self.len],
        )
        .expect("shape checked at load")
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Matrix,
    wk: Matrix,
    wv: Matrix,
    wo: Matrix,
    bo: Option<Vec<f32>>,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    w_gate: Matrix,
    w_up: Matrix,
    w_down: Matrix,
}

/// Fewest rows a pool task takes in row-wise steps (RoPE, SiLU, embedding lookup).
const ROW_MIN: usize = 16;

/// Which logits a forward call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only after the last token (prefill, decode).
    Last,
    /// After every token (perplexity, teacher forcing).
    All,
}

/// One sequence's part of a batched forward pass ([`Model::forward_batch`]).
#[derive(Debug)]
pub struct BatchItem<'a> {
    /// The sequence the tokens are appended to (its K/V pages grow in the pool).
    pub seq: &'a mut Sequence,
    /// The new tokens: one for a decode step, up to a chunk for prefill.
    pub tokens: &'a [u32],
    /// Which logits this item wants back.
    pub logits: Logits,
}

/// A loaded model: configuration and weights.
pub struct Model {
    /// Configuration.
    pub config: ModelConfig,
    /// Where it was loaded from.
    pub source: PathBuf,
    embed: Matrix,
    output: Matrix,
    norm: Vec<f32>,
    layers: Vec<Layer>,
    rope: Rope,
    fingerprint: [u8; 32],
}

/// A raw tensor from either file format: encoding, shape (outermost first) and bytes.
struct Raw {
    dtype: DType,
    shape: Vec<usize>,
    map: Arc<Mmap>,
    offset: usize,
    len: usize,
}

struct Source {
    tensors: HashMap<String, Raw>,
    /// Tensors present in an encoding the kernels cannot use: name → encoding.
    unsupported: HashMap<String, String>,
    what: String,
}

impl Source {
    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.unsupported.contains_key(name)
    }
    fn take(&mut self, name: &str) -> Result<Raw, EngineError> {
        if let Some(enc) = self.unsupported.get(name) {
            return Err(EngineError::Unsupported(format!(
                "{}: tensor {name} is stored as {enc} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)",
                self.what
            )));
        }
        self.tensors
            .remove(name)
            .ok_or_else(|| EngineError::Format(format!("{}: missing tensor {name}", self.what)))
    }
    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<Matrix, EngineError> {
        let r = self.take(name)?;
        if r.shape != [rows, cols] {
            return Err(EngineError::Format(format!(
                "{}: tensor {name} has shape {:?}, expected [{rows}, {cols}]",
                self.what, r.shape
            )));
        }
        let m = Matrix {
            dtype: r.dtype,
            rows,
            cols,
            map: r.map,
            offset: r.offset,
            len: r.len,
        };
        WeightMatrix::new(m.dtype, rows, cols, &m.map[m.offset..m.offset + m.len])
            .map_err(|e| EngineError::Format(format!("{}: tensor {name}: {e}", self.what)))?;
        Ok(m)
    }
    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>, EngineError> {
        let r = self.take(name)?;
        if r.shape.iter().product::<usize>() != len || r.dtype.is_quantized() {
            return Err(EngineError::Format(format!(
                "{}: tensor {name} has shape {:?} {:?}, expected {len} floats",
                self.what, r.shape, r.dtype
            )));
        }
        let mut v = vec![0f32; len];
        strata_kernels::quant::dequantize_row(r.dtype, &r.map[r.offset..r.offset + r.len], &mut v);
        Ok(v)
    }
    fn optional_vector(&mut self, name: &str, len: usize) -> Result<Option<Vec<f32>>, EngineError> {
        if self.has(name) {
            self.vector(name, len).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// blake3 of the weight files (each once, in the order of the sorted tensor names, so the
/// same files give the same hash in every process).
fn hash_maps<'a>(tensors: impl Iterator<Item = (&'a String, &'a Arc<Mmap>)>) -> [u8; 32] {
    let mut sorted: Vec<(&String, &Arc<Mmap>)> = tensors.collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut seen: Vec<*const u8> = Vec::new();
    let mut h = blake3::Hasher::new();
    for (_, m) in sorted {
        if !seen.contains(&m.as_ptr()) {
            seen.push(m.as_ptr());
            h.update(&m[..]);
        }
    }
    *h.finalize().as_bytes()
}

impl Model {
    /// Loads a `.gguf` file, or a Hugging Face folder (`config.json` + safetensors).
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        if path.is_dir() {
            Self::load_hf(path)
        } else {
            Self::load_gguf(&GgufFile::open(path)?, path)
        }
    }

    /// Loads from an open GGUF file.
    pub fn load_gguf(g: &GgufFile, path: &Path) -> Result<Self, EngineError> {
        let arch = g
            .get("general.architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| EngineError::Format("GGUF: no general.architecture".into()))?
            .to_owned();
        let rope_layout = match arch.as_str() {
            "llama" | "mistral" => RopeLayout::Adjacent,
            "qwen2" | "qwen3" => RopeLayout::HalfSplit,
            other => {
                return Err(EngineError::Unsupported(format!(
                    "architecture {other} (supported: llama, mistral, qwen2, qwen3)"
                )));
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let uk = |k: &str| g.u64(&key(k)).map(|v| v as usize);
        let fk = |k: &str, d: f64| g.get(&key(k)).and_then(Value::as_f64).unwrap_or(d) as f32;
        let hidden = uk("embedding_length")?;
        let n_heads = uk("attention.head_count")?;
        let head_dim = uk("attention.key_length").unwrap_or(hidden / n_heads.max(1));
        let embd = g
            .tensors
            .get("token_embd.weight")
            .ok_or_else(|| EngineError::Format("GGUF: no token_embd.weight".into()))?;
        let config = ModelConfig {
            n_layers: uk("block_count")?,
            hidden,
            ffn: uk("feed_forward_length")?,
            n_heads,
            n_kv_heads: uk("attention.head_count_kv").unwrap_or(n_heads),
            head_dim,
            vocab: embd.dims.get(1).copied().unwrap_or(0) as usize,
            ctx_len: uk("context_length").unwrap_or(4096),
            rope_theta: fk("rope.freq_base", 10000.0),
            rope_dim: uk("rope.dimension_count").unwrap_or(head_dim),
            rope_layout,
            rms_eps: fk("attention.layer_norm_rms_epsilon", 1e-5),
            qkv_bias: g.tensors.contains_key("blk.0.attn_q.bias"),
            qk_norm: g.tensors.contains_key("blk.0.attn_q_norm.weight"),
            arch: arch.clone(),
        };
        let tensors = g
            .tensors
            .iter()
            .map(|(n, t)| {
                // ggml dims are innermost first; our shapes are outermost first.
                let shape = t.dims.iter().rev().map(|d| *d as usize).collect();
                (
                    n.clone(),
                    Raw {
                        dtype: t.dtype,
                        shape,
                        map: g.map().clone(),
                        offset: t.offset,
                        len: t.len,
                    },
                )
            })
            .collect();
        let unsupported = g
            .unsupported
            .iter()
            .map(|(n, t)| (n.clone(), format!("ggml type {t}")))
            .collect();
        let mut src = Source {
            tensors,
            unsupported,
            what: path.display().to_string(),
        };
        let names = |i: usize, n: &str| format!("blk.{i}.{n}");
        config.validate(path)?;
        if let Some(ty) = g.get(&key("rope.scaling.type")).and_then(Value::as_str)
            && ty != "none"
            && !(ty == "llama3" || src.has("rope_freqs.weight"))
        {
            return Err(EngineError::Unsupported(format!(
                "{}: RoPE scaling {ty:?}",
                path.display()
            )));
        }
        let freq = src.optional_vector("rope_freqs.weight", config.rope_dim / 2)?;
        let no_name = String::new();
        let fingerprint = hash_maps(std::iter::once((&no_name, g.map())));
        Self::assemble(
            config,
            &mut src,
            path,
            fingerprint,
            freq,
            &|i, n| {
                names(
                    i,
                    match n {
                        "attn_norm" => "attn_norm.weight",
                        "wq" => "attn_q.weight",
                        "wk" => "attn_k.weight",
                        "wv" => "attn_v.weight",
                        "wo" => "attn_output.weight",
                        "bo" => "attn_output.bias",
                        "bq" => "attn_q.bias",
                        "bk" => "attn_k.bias",
                        "bv" => "attn_v.bias",
                        "q_norm" => "attn_q_norm.weight",
                        "k_norm" => "attn_k_norm.weight",
                        "ffn_norm" => "ffn_norm.weight",
                        "gate" => "ffn_gate.weight",
                        "up" => "ffn_up.weight",
                        _ => "ffn_down.weight",
                    },
                )
            },
            ["token_embd.weight", "output_norm.weight", "output.weight"],
        )
    }

    /// Loads a Hugging Face folder: `config.json` and `model.safetensors` (or shards).
    pub fn load_hf(dir: &Path) -> Result<Self, EngineError> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| EngineError::Io(format!("{}: {e}", cfg_path.display())))?;
        let c: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| EngineError::Format(format!("{}: {e}", cfg_path.display())))?;
        let arch = c
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_owned();
        if !["llama", "mistral", "qwen2", "qwen3"].contains(&arch.as_str()) {
            return Err(EngineError::Unsupported(format!(
                "model_type {arch:?} (supported: llama, mistral, qwen2, qwen3)"
            )));
        }
        let u = |k: &str| {
            c.get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| EngineError::Format(format!("{}: missing {k}", cfg_path.display())))
        };
        let f = |k: &str, d: f64| c.get(k).and_then(|v| v.as_f64()).unwrap_or(d) as f32;
        let hidden = u("hidden_size")?;
        let n_heads = u("num_attention_heads")?;
        let head_dim = u("head_dim").unwrap_or(hidden / n_heads.max(1));
        let attention_bias = c
            .get("attention_bias")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let rope_theta = c
            .get("rope_theta")
            .or_else(|| c.get("rope_parameters").and_then(|r| r.get("rope_theta")))
            .and_then(|v| v.as_f64())
            .unwrap_or(10000.0) as f32;
        let mut ctx_len = u("max_position_embeddings").unwrap_or(4096);
        // Sliding-window attention equals full attention within the window: cap the context.
        let sliding = c
            .get("use_sliding_window")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        if let Some(w) = c
            .get("sliding_window")
            .and_then(|v| v.as_u64())
            .filter(|_| sliding)
        {
            ctx_len = ctx_len.min(w as usize);
        }
        let config = ModelConfig {
            n_layers: u("num_hidden_layers")?,
            hidden,
            ffn: u("intermediate_size")?,
            n_heads,
            n_kv_heads: u("num_key_value_heads").unwrap_or(n_heads),
            head_dim,
            vocab: u("vocab_size")?,
            ctx_len,
            rope_theta,
            rope_dim: head_dim,
            rope_layout: RopeLayout::HalfSplit,
            rms_eps: f("rms_norm_eps", 1e-6),
            qkv_bias: arch == "qwen2" || attention_bias,
            qk_norm: arch == "qwen3",
            arch,
        };
        config.validate(dir)?;
        let freq = llama3_freq_factors(&c, &config, dir)?;
        let tensors: HashMap<String, Raw> = crate::safetensors::load_dir(dir)?
            .into_iter()
            .map(|(n, t)| {
                (
                    n,
                    Raw {
                        dtype: t.dtype,
                        shape: t.shape,
                        map: t.map,
                        offset: t.offset,
                        len: t.len,
                    },
                )
            })
            .collect();
        let fingerprint = hash_maps(tensors.iter().map(|(n, r)| (n, &r.map)));
        let tied = c
            .get("tie_word_embeddings")
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
            || !tensors.contains_key("lm_head.weight");
        let mut src = Source {
            tensors,
            unsupported: HashMap::new(),
            what: dir.display().to_string(),
        };
        let output = if tied {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        Self::assemble(
            config,
            &mut src,
            dir,
            fingerprint,
            freq,
            &|i, n| {
                let s = match n {
                    "attn_norm" => "input_layernorm.weight",
                    "wq" => "self_attn.q_proj.weight",
                    "wk" => "self_attn.k_proj.weight",
                    "wv" => "self_attn.v_proj.weight",
                    "wo" => "self_attn.o_proj.weight",
                    "bo" => "self_attn.o_proj.bias",
                    "bq" => "self_attn.q_proj.bias",
                    "bk" => "self_attn.k_proj.bias",
                    "bv" => "self_attn.v_proj.bias",
                    "q_norm" => "self_attn.q_norm.weight",
                    "k_norm" => "self_attn.k_norm.weight",
                    "ffn_norm" => "post_attention_layernorm.weight",
                    "gate" => "mlp.gate_proj.weight",
                    "up" => "mlp.up_proj.weight",
                    _ => "mlp.down_proj.weight",
                };
                format!("model.layers.{i}.{s}")
            },
            ["model.embed_tokens.weight", "model.norm.weight", output],
        )
    }

    #[allow(clippy::type_complexity)]
    fn assemble(
        config: ModelConfig,
        src: &mut Source,
        path: &Path,
        fingerprint: [u8; 32],
        freq: Option<Vec<f32>>,
        name: &dyn Fn(usize, &str) -> String,
        [embed_name, norm_name, output_name]: [&str; 3],
    ) -> Result<Self, EngineError> {
        let c = &config;
        c.validate(path)?;
        let (q_dim, kv_dim) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let embed = src.matrix(embed_name, c.vocab, c.hidden)?;
        let output = if output_name == embed_name || !src.has(output_name) {
            embed.clone()
        } else {
            src.matrix(output_name, c.vocab, c.hidden)?
        };
        let norm = src.vector(norm_name, c.hidden)?;
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let opt = |src: &mut Source,
                       n: &str,
                       len: usize,
                       want: bool|
             -> Result<Option<Vec<f32>>, EngineError> {
                if want {
                    src.vector(&name(i, n), len).map(Some)
                } else {
                    src.optional_vector(&name(i, n), len)
                }
            };
            layers.push(Layer {
                attn_norm: src.vector(&name(i, "attn_norm"), c.hidden)?,
                wq: src.matrix(&name(i, "wq"), q_dim, c.hidden)?,
                wk: src.matrix(&name(i, "wk"), kv_dim, c.hidden)?,
                wv: src.matrix(&name(i, "wv"), kv_dim, c.hidden)?,
                wo: src.matrix(&name(i, "wo"), c.hidden, q_dim)?,
                bo: opt(src, "bo", c.hidden, false)?,
                bq: opt(src, "bq", q_dim, c.qkv_bias)?,
                bk: opt(src, "bk", kv_dim, c.qkv_bias)?,
                bv: opt(src, "bv", kv_dim, c.qkv_bias)?,
                q_norm: opt(src, "q_norm", c.head_dim, c.qk_norm)?,
                k_norm: opt(src, "k_norm", c.head_dim, c.qk_norm)?,
                ffn_norm: src.vector(&name(i, "ffn_norm"), c.hidden)?,
                w_gate: src.matrix(&name(i, "gate"), c.ffn, c.hidden)?,
                w_up: src.matrix(&name(i, "up"), c.ffn, c.hidden)?,
                w_down: src.matrix(&name(i, "down"), c.hidden, c.ffn)?,
            });
        }
        // A layer tensor the forward pass does not use would be silently ignored: refuse.
        let mut left: Vec<&String> = src
            .tensors
            .keys()
            .chain(src.unsupported.keys())
            .filter(|n| {
                (n.starts_with("blk.") || n.starts_with("model.layers."))
                    && !n.contains("rotary_emb")
            })
            .collect();
        left.sort();
        if let Some(n) = left.first() {
            return Err(EngineError::Unsupported(format!(
                "{}: tensor {n} (and {} more) is not part of the supported architectures",
                path.display(),
                left.len() - 1
            )));
        }
        let rope = Rope::new(
            c.head_dim,
            c.rope_dim,
            c.rope_theta,
            c.rope_layout,
            freq.as_deref(),
        );
        // The namespace must change when anything that shapes the KV bytes changes: the
        // weights, and the configuration read beside them (RoPE base, scaling, ...).
        let mut h = blake3::Hasher::new();
        h.update(&fingerprint);
        h.update(format!("{c:?}").as_bytes());
        for f in freq.iter().flatten() {
            h.update(&f.to_le_bytes());
        }
        let fingerprint = *h.finalize().as_bytes();
        Ok(Model {
            config,
            source: path.to_owned(),
            embed,
            output,
            norm,
            layers,
            rope,
            fingerprint,
        })
    }

    /// blake3 of the weight files: the model fingerprint of the cache namespace.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// The KV shape of one token.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            num_layers: self.config.n_layers as u32,
            num_kv_heads: self.config.n_kv_heads as u32,
            head_dim: self.config.head_dim as u32,
        }
    }

    /// The cache namespace this model's KV pages belong to: pages of `page_size` tokens in
    /// `dtype` (the pool's, [`KvPool::dtype`]), page-first. f16 and f32 pages of the same
    /// prefix have different block keys.
    pub fn namespace(
        &self,
        dtype: KvDtype,
        page_size: usize,
        tenant_salt: &[u8],
    ) -> Result<Namespace, EngineError> {
        Namespace::new(
            self.fingerprint,
            dtype.cache_dtype(),
            KvLayout::PageFirst,
            page_size as u32,
            self.kv_shape(),
            TpShape::default(),
            tenant_salt,
        )
        .map_err(|e| EngineError::BadRequest(e.to_string()))
    }

    /// Runs `tokens` through the model, appending their K/V to `seq` (pages from `pool`),
    /// and returns the logits after the last token or after every token. A batch of one:
    /// see [`Model::forward_batch`].
    pub fn forward(
        &self,
        pool: &KvPool,
        seq: &mut Sequence,
        tokens: &[u32],
        want: Logits,
    ) -> Result<Vec<f32>, EngineError> {
        let mut items = [BatchItem {
            seq,
            tokens,
            logits: want,
        }];
        let mut out = self.forward_batch(pool, &mut items)?;
        Ok(out.pop().expect("one item, one result"))
    }

    /// Runs several sequences' new tokens through the model in one pass: each item's tokens
    /// (one for a decode step, a chunk for prefill) are stacked into one activation matrix,
    /// so every weight product runs once per layer for the whole batch; RMSNorm, RoPE (each
    /// row at its own sequence's position) and the MLP gate work row by row, and K/V writes
    /// and attention per sequence over its own pages. Returns each item's logits, in item
    /// order, as [`Model::forward`] would for it alone.
    ///
    /// Every item is checked and every page reserved before anything runs: a bad item or a
    /// pool too short for the whole batch fails the call and leaves every sequence as it was.
    pub fn forward_batch(
        &self,
        pool: &KvPool,
        items: &mut [BatchItem<'_>],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        // Run the whole pass on a pool thread: the kernels' parallel loops then start from
        // inside the pool instead of each handing work over from an outside thread.
        let mut result = None;
        rayon::scope(|_| result = Some(self.forward_batch_inner(pool, items)));
        result.expect("rayon::scope runs its closure")
    }

    /// Checks every item (tokens, vocabulary, context) and the pool's shape.
    fn validate_batch(&self, pool: &KvPool, items: &[BatchItem<'_>]) -> Result<(), EngineError> {
        let c = &self.config;
        if items.is_empty() {
            return Err(EngineError::BadRequest("no sequences to run".into()));
        }
        for it in items {
            if it.tokens.is_empty() {
                return Err(EngineError::BadRequest("no tokens to run".into()));
            }
            if let Some(t) = it.tokens.iter().find(|t| **t as usize >= c.vocab) {
                return Err(EngineError::BadRequest(format!(
                    "token id {t} is outside the vocabulary of {}",
                    c.vocab
                )));
            }
            let end = it.seq.len() + it.tokens.len();
            if end > c.ctx_len {
                return Err(EngineError::BadRequest(format!(
                    "{end} tokens exceed the model's context of {}",
                    c.ctx_len
                )));
            }
        }
        pool.check_shape(c)
    }

    /// Gives every item pages for its new tokens, all or nothing: when the pool cannot hold
    /// the whole batch, no sequence gains a page.
    fn reserve_batch(pool: &KvPool, items: &mut [BatchItem<'_>]) -> Result<(), EngineError> {
        let mut wants: Vec<(&mut Sequence, usize)> = items
            .iter_mut()
            .map(|it| {
                let end = it.seq.len() + it.tokens.len();
                (&mut *it.seq, end)
            })
            .collect();
        pool.reserve_many(&mut wants)
    }

    fn forward_batch_inner(
        &self,
        pool: &KvPool,
        items: &mut [BatchItem<'_>],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        self.validate_batch(pool, items)?;
        Self::reserve_batch(pool, items)?;
        let c = &self.config;
        // Row r of the stacked activations is token `pos[r]` of sequence `owner[r]`; item i
        // owns rows `offs[i]..offs[i + 1]`.
        let mut offs = Vec::with_capacity(items.len() + 1);
        let mut tokens = Vec::new();
        let mut pos = Vec::new();
        offs.push(0);
        for it in items.iter() {
            let start = it.seq.len();
            tokens.extend_from_slice(it.tokens);
            pos.extend(start..start + it.tokens.len());
            offs.push(tokens.len());
        }
        let n = tokens.len();
        let (h, q_dim, kv_dim, hd) = (
            c.hidden,
            c.n_heads * c.head_dim,
            c.n_kv_heads * c.head_dim,
            c.head_dim,
        );
        let mut x = vec![0f32; n * h];
        let embed = self.embed.view();
        // Row-wise work runs on the calling thread for a few rows (a decode batch): waking the
        // pool costs more than the work.
        x.par_chunks_mut(h)
            .zip(tokens.par_iter())
            .with_min_len(ROW_MIN)
            .for_each(|(row, t)| embed.dequantize_row(*t as usize, row));
        let mut xn = vec![0f32; n * h];
        let mut q = vec![0f32; n * q_dim];
        let mut k = vec![0f32; n * kv_dim];
        let mut v = vec![0f32; n * kv_dim];
        let mut att = vec![0f32; n * q_dim];
        let mut gate = vec![0f32; n * c.ffn];
        let mut up = vec![0f32; n * c.ffn];
        let shape = AttnShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: hd,
            page_size: pool.page_size(),
        };
        for (li, l) in self.layers.iter().enumerate() {
            xn.copy_from_slice(&x);
            rmsnorm_rows_inplace(&mut xn, &l.attn_norm, c.rms_eps);
            matmul_many(
                &[&l.wq.view(), &l.wk.view(), &l.wv.view()],
                &xn,
                n,
                &mut [&mut q, &mut k, &mut v],
            );
            for (buf, b) in [(&mut q, &l.bq), (&mut k, &l.bk), (&mut v, &l.bv)] {
                if let Some(b) = b {
                    buf.chunks_exact_mut(b.len())
                        .for_each(|r| add_inplace(r, b));
                }
            }
            if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
                rmsnorm_rows_inplace(&mut q, qn, c.rms_eps);
                rmsnorm_rows_inplace(&mut k, kn, c.rms_eps);
            }
            q.par_chunks_mut(q_dim)
                .zip(pos.par_iter())
                .with_min_len(ROW_MIN)
                .for_each(|(r, p)| self.rope.apply(r, *p));
            k.par_chunks_mut(kv_dim)
                .zip(pos.par_iter())
                .with_min_len(ROW_MIN)
                .for_each(|(r, p)| self.rope.apply(r, *p));
            for (i, it) in items.iter().enumerate() {
                let (a, b) = (offs[i], offs[i + 1]);
                pool.write_kv(
                    it.seq,
                    li,
                    it.seq.len(),
                    &k[a * kv_dim..b * kv_dim],
                    &v[a * kv_dim..b * kv_dim],
                );
            }
            // Every sequence's attention in one parallel section (its K/V written above).
            let layer: Vec<LayerPages<'_>> = items
                .iter()
                .map(|it| pool.layer_pages(it.seq, li))
                .collect();
            let starts: Vec<usize> = items.iter().map(|it| it.seq.len()).collect();
            attend(shape, &q, q_dim, &offs, &starts, &layer, &mut att)?;
            matmul(&l.wo.view(), &att, n, &mut xn);
            if let Some(b) = &l.bo {
                xn.chunks_exact_mut(h).for_each(|r| add_inplace(r, b));
            }
            add_inplace(&mut x, &xn);
            xn.copy_from_slice(&x);
            rmsnorm_rows_inplace(&mut xn, &l.ffn_norm, c.rms_eps);
            matmul_many(
                &[&l.w_gate.view(), &l.w_up.view()],
                &xn,
                n,
                &mut [&mut gate, &mut up],
            );
            gate.par_chunks_mut(c.ffn)
                .zip(up.par_chunks(c.ffn))
                .with_min_len(ROW_MIN)
                .for_each(|(g, u)| silu_mul(g, u));
            matmul(&l.w_down.view(), &gate, n, &mut xn);
            add_inplace(&mut x, &xn);
        }
        for (i, it) in items.iter_mut().enumerate() {
            let start = it.seq.len();
            it.seq.set_len(start + offs[i + 1] - offs[i]);
        }
        // The rows that need logits (each item's last, or all of its rows), stacked so the
        // output matrix is read once for the whole batch.
        let wanted: Vec<std::ops::Range<usize>> = items
            .iter()
            .enumerate()
            .map(|(i, it)| match it.logits {
                Logits::Last => offs[i + 1] - 1..offs[i + 1],
                Logits::All => offs[i]..offs[i + 1],
            })
            .collect();
        let m: usize = wanted.iter().map(|r| r.len()).sum();
        let mut rows = Vec::with_capacity(m * h);
        for r in &wanted {
            rows.extend_from_slice(&x[r.start * h..r.end * h]);
        }
        rmsnorm_rows_inplace(&mut rows, &self.norm, c.rms_eps);
        let mut logits = vec![0f32; m * c.vocab];
        matmul(&self.output.view(), &rows, m, &mut logits);
        let mut out = Vec::with_capacity(items.len());
        let mut at = 0;
        for r in &wanted {
            let len = r.len() * c.vocab;
            out.push(logits[at..at + len].to_vec());
            at += len;
        }
        Ok(out)
    }

    /// Prefill in chunks of at most `chunk` tokens; returns the logits after the last token.
    pub fn prefill(
        &self,
        pool: &KvPool,
        seq: &mut Sequence,
        tokens: &[u32],
        chunk: usize,
    ) -> Result<Vec<f32>, EngineError> {
        let mut last = None;
        for part in tokens.chunks(chunk.max(1)) {
            last = Some(self.forward(pool, seq, part, Logits::Last)?);
        }
        last.ok_or_else(|| EngineError::BadRequest("no tokens to run".into()))
    }
}

/// Attention of every batch item over its own pages, in one call: item `i` owns query and
/// output rows `offs[i]..offs[i + 1]` and starts at position `starts[i]`.
fn attend(
    shape: AttnShape,
    q: &[f32],
    q_dim: usize,
    offs: &[usize],
    starts: &[usize],
    layer: &[LayerPages<'_>],
    att: &mut [f32],
) -> Result<(), EngineError> {
    fn run<T: strata_kernels::KvElement>(
        shape: AttnShape,
        q: &[f32],
        q_dim: usize,
        offs: &[usize],
        starts: &[usize],
        pages: &[&Vec<&[T]>],
        att: &mut [f32],
    ) -> Result<(), EngineError> {
        let mut rest = att;
        let mut items = Vec::with_capacity(pages.len());
        for (i, p) in pages.iter().enumerate() {
            let (a, b) = (offs[i], offs[i + 1]);
            let (out, tail) = std::mem::take(&mut rest).split_at_mut((b - a) * q_dim);
            rest = tail;
            items.push(AttnItem {
                q: &q[a * q_dim..b * q_dim],
                n: b - a,
                start: starts[i],
                pages: p.as_slice(),
                out,
            });
        }
        paged_attention_many(shape, &mut items).map_err(|e| EngineError::Internal(e.to_string()))
    }
    // One pool, one dtype: every item's pages are of the same kind.
    let f16: Option<Vec<_>> = layer
        .iter()
        .map(|l| match l {
            LayerPages::F16(p) => Some(p),
            LayerPages::F32(_) => None,
        })
        .collect();
    if let Some(pages) = f16 {
        return run(shape, q, q_dim, offs, starts, &pages, att);
    }
    let f32: Option<Vec<_>> = layer
        .iter()
        .map(|l| match l {
            LayerPages::F32(p) => Some(p),
            LayerPages::F16(_) => None,
        })
        .collect();
    match f32 {
        Some(pages) => run(shape, q, q_dim, offs, starts, &pages, att),
        None => Err(EngineError::Internal(
            "KV pages of two dtypes in one batch".into(),
        )),
    }
}

/// Llama 3.1 `rope_scaling` (`rope_type: llama3`) as per-pair frequency divisors.
fn llama3_freq_factors(
    c: &serde_json::Value,
    cfg: &ModelConfig,
    dir: &Path,
) -> Result<Option<Vec<f32>>, EngineError> {
    let Some(rs) = c
        .get("rope_scaling")
        .or_else(|| c.get("rope_parameters"))
        .filter(|r| r.is_object())
    else {
        return Ok(None);
    };
    let ty = rs
        .get("rope_type")
        .or_else(|| rs.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    if ty == "default" {
        return Ok(None);
    }
    if ty != "llama3" {
        return Err(EngineError::Unsupported(format!(
            "{}: RoPE scaling {ty:?} (supported: llama3)",
            dir.display()
        )));
    }
    let g = |k: &str, d: f64| rs.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
    let (factor, lo, hi, orig) = (
        g("factor", 8.0),
        g("low_freq_factor", 1.0),
        g("high_freq_factor", 4.0),
        g("original_max_position_embeddings", 8192.0),
    );
    let (lo_wl, hi_wl) = (orig / lo, orig / hi);
    let half = cfg.rope_dim / 2;
    Ok(Some(
        (0..half)
            .map(|i| {
                let freq =
                    1.0 / f64::from(cfg.rope_theta).powf(2.0 * i as f64 / cfg.rope_dim as f64);
                let wl = 2.0 * std::f64::consts::PI / freq;
                if wl < hi_wl {
                    1.0
                } else if wl > lo_wl {
                    factor as f32
                } else {
                    let smooth = (orig / wl - lo) / (hi - lo);
                    (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                }
            })
            .collect(),
    ))
}
