//! # strata-engine
//!
//! Strata's bundled engine: runs Llama-family models (Llama 2/3, SmolLM2, Qwen2/2.5, Qwen3,
//! Mistral) from GGUF or Hugging Face safetensors on the CPU kernels of `strata-kernels`, and
//! is the reference client of Strata's cache.
//!
//! The core idea is that the engine's working KV ([`KvPool`]) is made of pages whose bytes
//! are exactly cache-core's blocks: `[layer][k|v][token][kv_head][head_dim]` in f16 (the
//! default) or f32 ([`KvDtype`]), one page of `page_size` tokens per block, named by the
//! namespace [`Model::namespace`] derives from the weights' blake3 and the KV dtype. A page can be exported to any tier and imported back, and prefill can
//! start after the imported prefix: one-pass prefill, chunked prefill and prefill on top of
//! imported pages give the same logits.
//!
//! ```no_run
//! use strata_engine::{Engine, KvDtype, KvPool, Sequence, sampler::Sampling};
//! let engine = Engine::load(&strata_engine::fetch::default_model()?)?;
//! let pool = KvPool::new(&engine.model.config, KvDtype::F16, 64, 256)?;
//! let prompt = engine.encode_prompt("The capital of France is", false)?;
//! let mut seq = Sequence::new();
//! let out = engine.generate(&pool, &mut seq, &prompt, 16, Sampling::default(), 512, |_| Ok(()))?;
//! println!("{}", engine.decode(&out.tokens)?);
//! # Ok::<(), strata_engine::EngineError>(())
//! ```
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod chat;
pub mod device;
pub mod fetch;
pub mod gguf;
pub mod kv;
pub mod model;
pub mod safetensors;
pub mod sampler;
pub mod serve;
pub mod tokenizer;

use std::path::Path;
use std::time::{Duration, Instant};

pub use chat::{ChatTemplate, Message};
pub use kv::{KvDtype, KvPool, Sequence};
pub use model::{BatchItem, Logits, Model, ModelConfig};
use sampler::{Sampler, Sampling};
use tokenizers::Tokenizer;

/// Engine errors.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file could not be read.
    #[error("I/O: {0}")]
    Io(String),
    /// A model file is malformed.
    #[error("bad model file: {0}")]
    Format(String),
    /// A model uses something the engine does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The caller asked for something invalid.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The KV pool has no free page.
    #[error("KV pool is full ({pages} pages)")]
    OutOfPages {
        /// Pool size.
        pages: usize,
    },
    /// The default model could not be fetched.
    #[error("fetching the default model: {0}")]
    Fetch(String),
    /// A bug: a kernel refused shapes the engine built.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A model with its tokenizer and chat template.
pub struct Engine {
    /// The model.
    pub model: Model,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template, when it has one.
    pub chat: Option<ChatTemplate>,
    /// Tokens that end a generation.
    pub stop: Vec<u32>,
    bos: Option<u32>,
    /// Plain prompts go through the tokenizer's post-processor (Hugging Face folders: it adds
    /// BOS where the model wants it).
    special: bool,
}

/// What a generation produced and how fast.
#[derive(Clone, Debug, Default)]
pub struct Generation {
    /// Generated token ids (a stop token is not included).
    pub tokens: Vec<u32>,
    /// Prompt tokens run through prefill.
    pub prefill_tokens: usize,
    /// Time spent in prefill.
    pub prefill_time: Duration,
    /// Time spent in decode steps.
    pub decode_time: Duration,
    /// Whether a stop token ended it.
    pub stopped: bool,
}

impl Generation {
    /// Prefill tokens per second.
    pub fn prefill_rate(&self) -> f64 {
        self.prefill_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }
    /// Decode tokens per second (the first token comes from prefill).
    pub fn decode_rate(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

impl Engine {
    /// Loads a `.gguf` file or a Hugging Face folder, with its tokenizer: `tokenizer.json`
    /// beside the weights when present, else (GGUF) one built from the file's metadata.
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        if path.is_dir() {
            let model = Model::load_hf(path)?;
            let tokenizer = tokenizer::from_file(&path.join("tokenizer.json"))?;
            let cfg: serde_json::Value =
                std::fs::read_to_string(path.join("tokenizer_config.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .unwrap_or_default();
            let tok_str = |k: &str| match cfg.get(k) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(v) => v.get("content").and_then(|c| c.as_str()).map(str::to_owned),
                None => None,
            };
            let chat = match cfg.get("chat_template").and_then(|t| t.as_str()) {
                Some(src) => Some(ChatTemplate::Jinja {
                    source: src.to_owned(),
                    bos: tok_str("bos_token").unwrap_or_default(),
                    eos: tok_str("eos_token").unwrap_or_default(),
                }),
                None => builtin_template(&tokenizer),
            };
            let mut stop: Vec<u32> = tok_str("eos_token")
                .and_then(|e| tokenizer.token_to_id(&e))
                .into_iter()
                .collect();
            add_stop_tokens(&tokenizer, &mut stop);
            return Ok(Engine {
                model,
                tokenizer,
                chat,
                stop,
                bos: None,
                special: true,
            });
        }
        let g = gguf::GgufFile::open(path)?;
        let model = Model::load_gguf(&g, path)?;
        let beside = path.with_file_name("tokenizer.json");
        let tokenizer = if beside.is_file() {
            tokenizer::from_file(&beside)?
        } else {
            tokenizer::from_gguf(&g)?
        };
        let id = |k: &str| g.get(k).and_then(gguf::Value::as_u64).map(|v| v as u32);
        let token_str =
            |i: Option<u32>| i.and_then(|i| tokenizer.id_to_token(i)).unwrap_or_default();
        let add_bos = g
            .get("tokenizer.ggml.add_bos_token")
            .and_then(gguf::Value::as_bool)
            .unwrap_or(false);
        let chat = match g
            .get("tokenizer.chat_template")
            .and_then(gguf::Value::as_str)
        {
            Some(src) => Some(ChatTemplate::Jinja {
                source: src.to_owned(),
                bos: token_str(id("tokenizer.ggml.bos_token_id")),
                eos: token_str(id("tokenizer.ggml.eos_token_id")),
            }),
            None => builtin_template(&tokenizer),
        };
        let mut stop: Vec<u32> = id("tokenizer.ggml.eos_token_id").into_iter().collect();
        add_stop_tokens(&tokenizer, &mut stop);
        let bos = if add_bos {
            id("tokenizer.ggml.bos_token_id")
        } else {
            None
        };
        Ok(Engine {
            model,
            tokenizer,
            chat,
            stop,
            bos,
            special: false,
        })
    }

    /// Token ids of a prompt: as a single user message through the chat template when
    /// `chat`, else the plain text (with BOS when the model wants one).
    pub fn encode_prompt(&self, text: &str, chat: bool) -> Result<Vec<u32>, EngineError> {
        if chat {
            let t = self
                .chat
                .as_ref()
                .ok_or_else(|| EngineError::BadRequest("this model has no chat template".into()))?;
            let rendered = t.render(&[Message::user(text)])?;
            return tokenizer::encode(&self.tokenizer, &rendered);
        }
        if self.special {
            return self
                .tokenizer
                .encode(text, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| EngineError::BadRequest(format!("tokenizer: {e}")));
        }
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        ids.extend(tokenizer::encode(&self.tokenizer, text)?);
        Ok(ids)
    }

    /// Text of token ids.
    pub fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        tokenizer::decode(&self.tokenizer, ids)
    }

    /// Prefills `prompt` (in chunks of `chunk`) after what `seq` holds, then decodes up to
    /// `max_tokens` tokens, calling `on_token` with each as it is chosen.
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        &self,
        pool: &KvPool,
        seq: &mut Sequence,
        prompt: &[u32],
        max_tokens: usize,
        sampling: Sampling,
        chunk: usize,
        mut on_token: impl FnMut(u32) -> Result<(), EngineError>,
    ) -> Result<Generation, EngineError> {
        let mut out = Generation {
            prefill_tokens: prompt.len(),
            ..Default::default()
        };
        let t0 = Instant::now();
        let mut logits = self.model.prefill(pool, seq, prompt, chunk)?;
        out.prefill_time = t0.elapsed();
        let mut sampler = Sampler::new(sampling);
        let t1 = Instant::now();
        while out.tokens.len() < max_tokens {
            let next = sampler.pick(&logits);
            if self.stop.contains(&next) {
                out.stopped = true;
                break;
            }
            out.tokens.push(next);
            on_token(next)?;
            if out.tokens.len() == max_tokens || seq.len() >= self.model.config.ctx_len {
                break;
            }
            logits = self.model.forward(pool, seq, &[next], Logits::Last)?;
        }
        out.decode_time = t1.elapsed();
        Ok(out)
    }

    /// Perplexity of `ids`: exp of the mean negative log-likelihood of every token after the
    /// first, each given all tokens before it in the same context. Text longer than the
    /// model's context is cut into windows of the context length, and the first token of each
    /// window is not scored. Also returns the number of tokens scored.
    pub fn perplexity(
        &self,
        pool: &KvPool,
        ids: &[u32],
        chunk: usize,
    ) -> Result<(f64, usize), EngineError> {
        if let Some(t) = ids.iter().find(|t| **t as usize >= self.model.config.vocab) {
            return Err(EngineError::BadRequest(format!(
                "token id {t} is outside the vocabulary of {}",
                self.model.config.vocab
            )));
        }
        if ids.len() < 2 {
            return Err(EngineError::BadRequest(
                "perplexity needs at least two tokens".into(),
            ));
        }
        let vocab = self.model.config.vocab;
        let (mut nll, mut count) = (0f64, 0usize);
        for window in ids.chunks(self.model.config.ctx_len) {
            let mut seq = Sequence::new();
            let mut done = 0;
            for part in window.chunks(chunk.max(1)) {
                let logits = self.model.forward(pool, &mut seq, part, Logits::All);
                let logits = match logits {
                    Ok(l) => l,
                    Err(e) => {
                        pool.release(&mut seq);
                        return Err(e);
                    }
                };
                for (i, row) in logits.chunks_exact(vocab).enumerate() {
                    let Some(&next) = window.get(done + i + 1) else {
                        break;
                    };
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let z: f64 = row.iter().map(|l| f64::from(l - max).exp()).sum();
                    nll -= f64::from(row[next as usize] - max) - z.ln();
                    count += 1;
                }
                done += part.len();
            }
            pool.release(&mut seq);
        }
        Ok(((nll / count.max(1) as f64).exp(), count))
    }
}

fn builtin_template(t: &Tokenizer) -> Option<ChatTemplate> {
    if t.token_to_id("<|im_start|>").is_some() {
        Some(ChatTemplate::ChatMl)
    } else if t.token_to_id("<|start_header_id|>").is_some() {
        Some(ChatTemplate::Llama3)
    } else {
        None
    }
}

fn add_stop_tokens(t: &Tokenizer, stop: &mut Vec<u32>) {
    for s in [
        "<|im_end|>",
        "<|eot_id|>",
        "<|end_of_text|>",
        "<|endoftext|>",
    ] {
        if let Some(id) = t.token_to_id(s)
            && !stop.contains(&id)
        {
            stop.push(id);
        }
    }
}
