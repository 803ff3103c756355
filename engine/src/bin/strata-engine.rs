//! `strata-engine`: run a Llama-family model on the CPU.
//!
//! - `strata-engine generate [--model PATH] --prompt TEXT [--chat] [--max-tokens N]
//!   [--temperature T] [--top-p P] [--seed S]` streams the generated text to stdout and
//!   prints prefill and decode tokens/s to stderr.
//! - `strata-engine perplexity [--model PATH] --file TEXT_FILE` prints the perplexity of the
//!   file's text.
//!
//! - `strata-engine serve [--model PATH] [--host 127.0.0.1] [--port 8000] ...` serves an
//!   OpenAI-compatible API with continuous batching and a prefix cache (see `--help`).
//!
//! All take `--kv-dtype f16|f32` (default f16), `--page-size`, `--chunk` and `--threads`.
//!
//! Without `--model`, the default model (SmolLM2-135M-Instruct) is fetched on first use.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use strata_engine::sampler::Sampling;
use strata_engine::serve::ServeConfig;
use strata_engine::serve::sched::SchedConfig;
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
    /// Tokens per prefill chunk (serve: the token budget of one scheduler step, one per
    /// decoding stream plus prompt chunks).
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

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    common: Common,
    /// Address to listen on. Anything but loopback needs --api-key.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// TCP port (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Bearer token every request but /health must carry (also STRATA_API_KEY).
    #[arg(long, env = "STRATA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model name clients send (and /v1/models lists); "default" is accepted too.
    /// Default: the model file's name without extension.
    #[arg(long)]
    served_model_name: Option<String>,
    /// KV pool size in MiB (pages of --page-size tokens; the prefix cache lives in the
    /// pages that no running request holds).
    #[arg(long, default_value_t = 2048)]
    kv_memory_mib: usize,
    /// Most requests in the running batch.
    #[arg(long, default_value_t = 16)]
    max_running: usize,
    /// Most requests waiting for a place in the batch; more get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_waiting: usize,
    /// Turn the prefix cache off: every prompt is prefilled in full, nothing is stored.
    #[arg(long)]
    no_prefix_cache: bool,
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
    /// Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models,
    /// /health, /metrics) with continuous batching and a prefix cache over the KV pool.
    Serve(ServeArgs),
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
    let (engine, path) = load_engine(common)?;
    let c = &engine.model.config;
    let pages = c.ctx_len.div_ceil(common.page_size) + 1;
    let pool = KvPool::new(c, common.kv_dtype, common.page_size, pages)?;
    describe(&engine, &path, common);
    Ok((engine, pool))
}

fn describe(engine: &Engine, path: &std::path::Path, common: &Common) {
    let c = &engine.model.config;
    eprintln!(
        "strata: {} ({}, {} layers, hidden {}, vocab {}, context {}) on {} threads, {:?} kernels, {} KV",
        path.display(),
        c.arch,
        c.n_layers,
        c.hidden,
        c.vocab,
        c.ctx_len,
        strata_kernels::threads(),
        strata_kernels::simd(),
        common.kv_dtype
    );
}

fn load_engine(common: &Common) -> Result<(Engine, PathBuf)> {
    if let Some(t) = common.threads {
        anyhow::ensure!(t > 0, "--threads must be at least 1");
        strata_kernels::init_threads(t)?;
    }
    let path = match &common.model {
        Some(p) => p.clone(),
        None => strata_engine::fetch::default_model()?,
    };
    let engine = Engine::load(&path).with_context(|| format!("loading {}", path.display()))?;
    anyhow::ensure!(
        (16..=256).contains(&common.page_size),
        "--page-size {} is outside 16..=256 tokens",
        common.page_size
    );
    anyhow::ensure!(common.chunk > 0, "--chunk must be at least 1");
    Ok((engine, path))
}

fn serve(args: ServeArgs) -> Result<()> {
    let ServeArgs {
        common,
        host,
        port,
        api_key,
        served_model_name,
        kv_memory_mib,
        max_running,
        max_waiting,
        no_prefix_cache,
    } = args;
    let prefix_cache = !no_prefix_cache;
    anyhow::ensure!(max_running > 0, "--max-running must be at least 1");
    let (engine, path) = load_engine(&common)?;
    describe(&engine, &path, &common);
    let c = &engine.model.config;
    let page_bytes =
        c.n_layers * 2 * common.page_size * c.n_kv_heads * c.head_dim * common.kv_dtype.size();
    let kv_pages = (kv_memory_mib << 20) / page_bytes;
    anyhow::ensure!(
        kv_pages >= 2,
        "--kv-memory-mib {kv_memory_mib} holds {kv_pages} pages of {} tokens ({page_bytes} bytes each); give it at least two",
        common.page_size
    );
    let model_id = served_model_name.unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let cfg = ServeConfig {
        addr: std::net::SocketAddr::new(host, port),
        api_key,
        model_id: model_id.clone(),
        kv_dtype: common.kv_dtype,
        page_size: common.page_size,
        kv_pages,
        sched: SchedConfig {
            max_running,
            max_waiting,
            step_tokens: common.chunk,
            prefix_cache,
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(strata_engine::serve::serve(engine, cfg, shutdown(), |s| {
        eprintln!(
            "strata: KV pool {} pages of {} tokens ({:.1} MiB, {}), up to {max_running} running and {max_waiting} waiting requests, {} tokens per step, prefix cache {}",
            s.kv_pages,
            common.page_size,
            s.kv_bytes as f64 / (1 << 20) as f64,
            common.kv_dtype,
            common.chunk,
            if prefix_cache { "on" } else { "off" }
        );
        eprintln!("strata: serving model '{model_id}' at http://{}/v1", s.addr);
        eprintln!("strata: ready");
    }))?;
    eprintln!("strata: stopped");
    Ok(())
}

async fn shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = ctrl_c => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
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
            let (engine, pool) = load(&common)?;
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
                &pool,
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
        Cmd::Serve(args) => serve(args)?,
        Cmd::Perplexity { common, file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let (engine, pool) = load(&common)?;
            let ids = engine.encode_prompt(&text, false)?;
            let t0 = std::time::Instant::now();
            let (ppl, n) = engine.perplexity(&pool, &ids, common.chunk)?;
            eprintln!(
                "strata: scored {n} tokens in {:.2} s",
                t0.elapsed().as_secs_f64()
            );
            println!("perplexity {ppl:.4} over {n} tokens");
        }
    }
    Ok(())
}
