//! `strata-engine`: run a Llama-family model on the CPU.
//!
//! - `strata-engine generate [--model PATH] --prompt TEXT [--chat] [--max-tokens N]
//!   [--temperature T] [--top-p P] [--seed S]` streams the generated text to stdout and
//!   prints prefill and decode tokens/s to stderr.
//! - `strata-engine perplexity [--model PATH] --file TEXT_FILE` prints the perplexity of the
//!   file's text.
//!
//! Both take `--kv-dtype f16|f32` (default f16), `--page-size`, `--chunk` and `--threads`.
//!
//! Without `--model`, the default model (SmolLM2-135M-Instruct) is fetched on first use.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use strata_engine::sampler::Sampling;
use strata_engine::{Engine, KvDtype, KvPool, Sequence};

#[derive(Parser)]
#[command(
    name = "strata-engine",
    version,
    about = "Strata's bundled Llama-family engine (CPU)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct Common {
    /// A .gguf file or a Hugging Face folder (config.json + safetensors + tokenizer.json).
    /// Default: SmolLM2-135M-Instruct, fetched into $STRATA_MODELS_DIR (default
    /// ~/.cache/strata/models) on first use.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Kernel threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Tokens per prefill chunk.
    #[arg(long, default_value_t = 512)]
    chunk: usize,
    /// Tokens per KV page (cache-core block).
    #[arg(long, default_value_t = 64)]
    page_size: usize,
    /// Element type of the KV pages: f16 (half the memory and bytes moved) or f32. Part of
    /// the cache namespace: f16 and f32 pages never share a block.
    #[arg(long, default_value_t = KvDtype::F16)]
    kv_dtype: KvDtype,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a continuation of a prompt, streamed to stdout.
    Generate {
        #[command(flatten)]
        common: Common,
        /// The prompt.
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt as a user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// Sampling temperature; 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus sampling mass.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Sampling seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Print the perplexity of a text file (every token after the first scored).
    Perplexity {
        #[command(flatten)]
        common: Common,
        /// UTF-8 text file.
        #[arg(long)]
        file: PathBuf,
    },
}

fn load(common: &Common) -> Result<(Engine, KvPool)> {
    if let Some(t) = common.threads {
        anyhow::ensure!(t > 0, "--threads must be at least 1");
        strata_kernels::init_threads(t)?;
    }
    let path = match &common.model {
        Some(p) => p.clone(),
        None => strata_engine::fetch::default_model()?,
    };
    let engine = Engine::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let c = &engine.model.config;
    anyhow::ensure!(
        (16..=256).contains(&common.page_size),
        "--page-size {} is outside 16..=256 tokens",
        common.page_size
    );
    anyhow::ensure!(common.chunk > 0, "--chunk must be at least 1");
    let pages = c.ctx_len.div_ceil(common.page_size) + 1;
    let pool = KvPool::new(c, common.kv_dtype, common.page_size, pages)?;
    eprintln!(
        "strata: {} ({}, {} layers, hidden {}, vocab {}) on {} threads, {:?} kernels, {} KV",
        path.display(),
        c.arch,
        c.n_layers,
        c.hidden,
        c.vocab,
        strata_kernels::threads(),
        strata_kernels::simd(),
        common.kv_dtype
    );
    Ok((engine, pool))
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Generate {
            common,
            prompt,
            chat,
            max_tokens,
            temperature,
            top_p,
            seed,
        } => {
            anyhow::ensure!(
                temperature >= 0.0 && temperature.is_finite(),
                "--temperature must be ≥ 0"
            );
            anyhow::ensure!(top_p > 0.0 && top_p <= 1.0, "--top-p must be in (0, 1]");
            let (engine, mut pool) = load(&common)?;
            let ids = engine.encode_prompt(&prompt, chat)?;
            anyhow::ensure!(!ids.is_empty(), "the prompt is empty");
            let mut seq = Sequence::new();
            let mut generated = Vec::new();
            let mut printed = 0usize;
            let stdout = std::io::stdout();
            let sampling = Sampling {
                temperature,
                top_p,
                seed,
            };
            let g = engine.generate(
                &mut pool,
                &mut seq,
                &ids,
                max_tokens,
                sampling,
                common.chunk,
                |t| {
                    generated.push(t);
                    // Print whatever new text the tokens so far decode to (multi-byte
                    // characters can span tokens).
                    let text = engine.decode(&generated)?;
                    if text.len() > printed
                        && text.is_char_boundary(printed)
                        && !text.ends_with('\u{FFFD}')
                    {
                        let mut out = stdout.lock();
                        let _ = out.write_all(&text.as_bytes()[printed..]);
                        let _ = out.flush();
                        printed = text.len();
                    }
                    Ok(())
                },
            )?;
            let text = engine.decode(&g.tokens)?;
            if text.len() > printed && text.is_char_boundary(printed) {
                print!("{}", &text[printed..]);
            }
            println!();
            eprintln!(
                "strata: prefill {} tokens at {:.1} tokens/s, decode {} tokens at {:.1} tokens/s{}",
                g.prefill_tokens,
                g.prefill_rate(),
                g.tokens.len(),
                g.decode_rate(),
                if g.stopped {
                    " (stopped at end of turn)"
                } else {
                    ""
                }
            );
        }
        Cmd::Perplexity { common, file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let (engine, mut pool) = load(&common)?;
            let ids = engine.encode_prompt(&text, false)?;
            let t0 = std::time::Instant::now();
            let (ppl, n) = engine.perplexity(&mut pool, &ids, common.chunk)?;
            eprintln!(
                "strata: scored {n} tokens in {:.2} s",
                t0.elapsed().as_secs_f64()
            );
            println!("perplexity {ppl:.4} over {n} tokens");
        }
    }
    Ok(())
}
