//! `strata-bench run` / `compare`: TTFT studies against any OpenAI-compatible server.
//!
//! A run drives one workload (multi-turn chat, long-document QA, generated shared prefix,
//! Mooncake trace replay) against `--base-url`, streams every response and times it: TTFT,
//! inter-token latency, time per output token, end-to-end latency, throughput, the
//! server-reported cache hit rate (`usage.prompt_tokens_details.cached_tokens`, or
//! llama.cpp's `timings.cache_n`) and per-tier cached tokens where the server reports them
//! (`usage.prompt_tokens_details.cached_tokens_by_tier`). Output: a table, `--save-result`
//! JSON with vLLM `bench serve` field names, `--csv` per request, `--plots` PNG + SVG.

pub mod client;
pub mod metrics;
pub mod plot;
pub mod study;
pub mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{Barrier, Semaphore};

use crate::stats::Rng;
use client::{Api, Msg, Outcome, Request, Target};
use metrics::{Record, Summary};
use workload::{RepeatMode, Words, Workload};

/// Where requests go.
#[derive(Args, Clone, Debug)]
pub struct TargetArgs {
    /// Server base URL (the API paths are appended).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub base_url: String,
    /// `model` field of the requests.
    #[arg(long, default_value = "default")]
    pub model: String,
    /// API: chat (`/v1/chat/completions`) or completions (`/v1/completions`).
    #[arg(long, value_enum, default_value_t = Api::Chat)]
    pub api: Api,
    /// Let the server stop at end-of-sequence (by default requests ask for `ignore_eos`, so
    /// every request generates exactly its output length).
    #[arg(long)]
    pub allow_eos: bool,
    /// Whole-request timeout, seconds.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
}

/// How requests arrive, and what defines token lengths.
#[derive(Args, Clone, Debug)]
pub struct LoadArgs {
    /// Poisson arrival rate, requests/s (`inf` = as fast as `--max-parallel` allows).
    #[arg(long, default_value = "inf")]
    pub request_rate: f64,
    /// Sweep several rates (comma-separated); adds the throughput-against-rate plot.
    #[arg(long, value_delimiter = ',')]
    pub request_rates: Vec<f64>,
    /// Most requests in flight (closed loop).
    #[arg(long, default_value_t = 16)]
    pub max_parallel: usize,
    /// Seed of every random choice (texts, orders, arrivals).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tokenizer defining token lengths (`.gguf` or `tokenizer.json`); default: the default
    /// model's (SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Percentiles to report (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "50,90,99")]
    pub percentiles: Vec<f64>,
}

/// Where results go.
#[derive(Args, Clone, Debug)]
pub struct OutputArgs {
    /// Write the result JSON (vLLM `bench serve` field names) here.
    #[arg(long)]
    pub save_result: Option<PathBuf>,
    /// Write one CSV line per request here.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Write plots (PNG and SVG) into this folder.
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// Label of this run in tables and plots.
    #[arg(long, default_value = "run")]
    pub label: String,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Paces request starts as a Poisson process (or not at all).
struct Arrivals {
    rate: f64,
    state: tokio::sync::Mutex<(Rng, Instant)>,
}

impl Arrivals {
    fn new(rate: f64, seed: u64) -> Self {
        Arrivals {
            rate,
            state: tokio::sync::Mutex::new((Rng(seed ^ 0xA771_7A15 | 1), Instant::now())),
        }
    }

    async fn wait(&self) {
        if !self.rate.is_finite() || self.rate <= 0.0 {
            return;
        }
        let at = {
            let mut st = self.state.lock().await;
            let u = (st.0.below(1 << 53) as f64 + 0.5) / (1u64 << 53) as f64;
            // Capped at a day: a rate so low that the gap would overflow just means "later".
            let gap = Duration::try_from_secs_f64(-u.ln() / self.rate)
                .unwrap_or(Duration::from_secs(86_400))
                .min(Duration::from_secs(86_400));
            st.1 = st.1.max(Instant::now()) + gap;
            st.1
        };
        tokio::time::sleep_until(at.into()).await;
    }
}

struct Ctx {
    http: reqwest::Client,
    target: Target,
    sem: Semaphore,
    arrivals: Arrivals,
    start: Instant,
    bar: ProgressBar,
    records: Mutex<Vec<Record>>,
}

impl Ctx {
    async fn issue(
        &self,
        req: Request,
        round: usize,
        client: usize,
        warmup: bool,
        paced: bool,
    ) -> Outcome {
        self.issue_with(req, round, client, warmup, paced, true)
            .await
    }

    /// `bounded`: wait for one of the `--max-parallel` slots (not for trace replay, whose
    /// timestamps are the load).
    async fn issue_with(
        &self,
        req: Request,
        round: usize,
        client: usize,
        warmup: bool,
        paced: bool,
        bounded: bool,
    ) -> Outcome {
        if paced {
            self.arrivals.wait().await;
        }
        let _permit = if bounded {
            Some(self.sem.acquire().await.expect("semaphore is never closed"))
        } else {
            None
        };
        let outcome = client::send(&self.http, &self.target, &req, self.start).await;
        self.bar.inc(1);
        if !outcome.success {
            self.bar.set_message(format!(
                "failed: {}",
                outcome.error.chars().take(60).collect::<String>()
            ));
        }
        self.records.lock().push(Record {
            outcome: outcome.clone(),
            round,
            client,
            warmup,
        });
        outcome
    }
}

/// Sends `reqs` (request, round, client) in order, each after its arrival slot, all in
/// flight up to `--max-parallel`; returns when every one has finished.
async fn submit_in_order(ctx: &Arc<Ctx>, reqs: Vec<(Request, usize, usize)>) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for (req, round, client) in reqs {
        let ctx = ctx.clone();
        // The next request is not released before this one has its arrival slot.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.push(tokio::spawn(async move {
            ctx.arrivals.wait().await;
            let _ = tx.send(());
            ctx.issue(req, round, client, false, false).await;
        }));
        let _ = rx.await;
    }
    for t in tasks {
        t.await.context("request task")?;
    }
    Ok(())
}

fn user(content: String) -> Msg {
    Msg {
        role: "user",
        content,
    }
}

/// Runs `w` once at `rate` and summarises it.
pub async fn run_once(
    t: &TargetArgs,
    l: &LoadArgs,
    o: &OutputArgs,
    w: &Workload,
    words: &Arc<Words>,
    rate: f64,
    seed: u64,
) -> anyhow::Result<Summary> {
    let target = Target {
        base_url: t.base_url.clone(),
        model: t.model.clone(),
        api: t.api,
        ignore_eos: !t.allow_eos,
        timeout: Duration::from_secs_f64(t.timeout),
    };
    let total = match w {
        Workload::MultiTurn(m) => m.clients * m.rounds,
        Workload::LongDocQa(q) => {
            q.documents * q.questions + if q.no_warmup { 0 } else { q.documents }
        }
        Workload::SharedPrefix(s) => s.groups * s.prompts_per_group,
        Workload::Trace(tr) => workload::read_trace(tr)?.len(),
    };
    if total == 0 {
        bail!("the workload has no requests");
    }
    let bar = if o.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} requests {msg}",
        )
        .expect("valid template"),
    );
    bar.set_prefix(format!("{} {}", o.label, w.name()));
    let ctx = Arc::new(Ctx {
        // A fresh connection per request: servers close idle keep-alive connections, and a
        // request sent on one the server just closed would fail for the client's reasons.
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .context("HTTP client")?,
        target,
        sem: Semaphore::new(l.max_parallel.max(1)),
        arrivals: Arrivals::new(rate, seed),
        start: Instant::now(),
        bar,
        records: Mutex::new(Vec::new()),
    });

    match w {
        Workload::MultiTurn(m) => {
            let barrier = Arc::new(Barrier::new(m.clients));
            let mut tasks = Vec::new();
            for c in 0..m.clients {
                let (ctx, words, m, barrier) =
                    (ctx.clone(), words.clone(), m.clone(), barrier.clone());
                tasks.push(tokio::spawn(async move {
                    let mut conv = workload::Conversation::new(&words, &m, seed, c);
                    for round in 0..m.rounds {
                        if m.barrier {
                            barrier.wait().await;
                        }
                        let out = ctx.issue(conv.request(), round, c, false, true).await;
                        conv.reply(&words, out.text, out.output_tokens);
                    }
                }));
            }
            for t in tasks {
                t.await.context("client task")?;
            }
        }
        Workload::LongDocQa(q) => {
            let mut rng = Rng(seed ^ 0xD0C5 | 1);
            let docs: Vec<String> = (0..q.documents)
                .map(|_| words.text(&mut rng, q.doc_len))
                .collect();
            let questions: Vec<String> = (0..q.questions)
                .map(|_| words.text(&mut rng, q.question_len))
                .collect();
            let prompt = |d: usize, k: usize| format!("{}\n\nQuestion:{}", docs[d], questions[k]);
            let tokens = q.doc_len + q.question_len;
            if !q.no_warmup {
                let q_doc_len = q.doc_len;
                let mut tasks = Vec::new();
                for (d, doc) in docs.iter().enumerate() {
                    // The document alone: the measured questions then share its prefix, and none
                    // of them repeats the warm-up's whole prompt.
                    let (ctx, p) = (ctx.clone(), doc.clone());
                    let out_len = q.output_len;
                    tasks.push(tokio::spawn(async move {
                        let req = Request {
                            messages: vec![user(p)],
                            input_tokens: q_doc_len,
                            output_tokens: out_len,
                        };
                        ctx.issue(req, 0, d, true, false).await;
                    }));
                }
                for t in tasks {
                    t.await.context("warm-up task")?;
                }
            }
            let mut order: Vec<(usize, usize)> = match q.repeat_mode {
                RepeatMode::Tile | RepeatMode::Random => (0..q.questions)
                    .flat_map(|k| (0..q.documents).map(move |d| (d, k)))
                    .collect(),
                RepeatMode::Interleave => (0..q.documents)
                    .flat_map(|d| (0..q.questions).map(move |k| (d, k)))
                    .collect(),
            };
            if q.repeat_mode == RepeatMode::Random {
                for i in (1..order.len()).rev() {
                    order.swap(i, rng.below(i as u64 + 1) as usize);
                }
            }
            let reqs = order
                .into_iter()
                .map(|(d, k)| {
                    let req = Request {
                        messages: vec![user(prompt(d, k))],
                        input_tokens: tokens,
                        output_tokens: q.output_len,
                    };
                    (req, 1, d)
                })
                .collect();
            submit_in_order(&ctx, reqs).await?;
        }
        Workload::SharedPrefix(s) => {
            let mut rng = Rng(seed ^ 0x5A3D | 1);
            let systems: Vec<String> = (0..s.groups)
                .map(|_| words.text(&mut rng, s.system_len))
                .collect();
            let mut order: Vec<usize> = (0..s.groups)
                .flat_map(|g| std::iter::repeat_n(g, s.prompts_per_group))
                .collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let reqs = order
                .into_iter()
                .map(|g| {
                    let messages = vec![
                        Msg {
                            role: "system",
                            content: systems[g].clone(),
                        },
                        user(words.text(&mut rng, s.question_len)),
                    ];
                    let req = Request {
                        messages,
                        input_tokens: s.system_len + s.question_len,
                        output_tokens: s.output_len,
                    };
                    (req, 0, g)
                })
                .collect();
            submit_in_order(&ctx, reqs).await?;
        }
        Workload::Trace(tr) => {
            let lines = workload::read_trace(tr)?;
            let t0 = lines
                .iter()
                .map(|l| l.timestamp)
                .fold(f64::INFINITY, f64::min);
            let mut tasks = Vec::new();
            for (i, line) in lines.into_iter().enumerate() {
                let prompt = workload::trace_prompt(words, &line, tr.block_tokens, seed);
                let offset = Duration::try_from_secs_f64(
                    ((line.timestamp - t0) / 1e3 * tr.time_scale).max(0.0),
                )
                .ok()
                .filter(|d| *d < Duration::from_secs(30 * 86_400))
                .with_context(|| {
                    format!(
                        "trace line {}: timestamp {} is too far in the future",
                        i + 1,
                        line.timestamp
                    )
                })?;
                let at = ctx.start + offset;
                let req = Request {
                    messages: vec![user(prompt)],
                    input_tokens: line.input_length,
                    output_tokens: line.output_length.max(1),
                };
                let ctx = ctx.clone();
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep_until(at.into()).await;
                    ctx.issue_with(req, 0, i, false, false, false).await;
                }));
            }
            for t in tasks {
                t.await.context("trace task")?;
            }
        }
    }
    ctx.bar.finish_and_clear();
    let mut records = std::mem::take(&mut *ctx.records.lock());
    let warm_failed = records
        .iter()
        .filter(|r| r.warmup && !r.outcome.success)
        .count();
    if warm_failed > 0 {
        eprintln!(
            "warning: {warm_failed} warm-up request(s) failed; the measured pass may have run cold"
        );
    }
    records.retain(|r| !r.warmup);
    let first = records
        .iter()
        .map(|r| r.outcome.start)
        .fold(f64::INFINITY, f64::min);
    let last = records
        .iter()
        .map(|r| r.outcome.start + r.outcome.e2e)
        .fold(0f64, f64::max);
    Ok(Summary {
        duration: (last - first).max(1e-9),
        records,
        percentiles: l.percentiles.clone(),
    })
}

fn meta(t: &TargetArgs, w: &Workload, label: &str, rate: f64, l: &LoadArgs) -> Value {
    json!({
        "label": label,
        "base_url": t.base_url,
        "model_id": t.model,
        "backend": match t.api { Api::Chat => "openai-chat", Api::Completions => "openai" },
        "workload": w.name(),
        "workload_args": format!("{w:?}"),
        "request_rate": if rate.is_finite() { json!(rate) } else { json!("inf") },
        "max_concurrency": l.max_parallel,
        "seed": l.seed,
        "date": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    })
}

fn load_words(l: &LoadArgs) -> anyhow::Result<Arc<Words>> {
    let path = match &l.tokenizer {
        Some(p) => p.clone(),
        None => strata_engine::fetch::default_model()?,
    };
    Ok(Arc::new(Words::from_tokenizer(&path).with_context(
        || format!("tokenizer {}", path.display()),
    )?))
}

/// `strata-bench run`.
pub fn run(t: TargetArgs, l: LoadArgs, o: OutputArgs, w: Workload) -> anyhow::Result<()> {
    validate(&t, &l, &w)?;
    let words = load_words(&l)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let rates = if l.request_rates.is_empty() {
        vec![l.request_rate]
    } else {
        l.request_rates.clone()
    };
    let mut runs = Vec::new();
    for (i, rate) in rates.iter().enumerate() {
        // A fresh seed per rate: a server must not serve one rate's prompts from the cache
        // the previous rate filled.
        let seed = l.seed.wrapping_add(i as u64 * 1_000_003);
        let s = rt.block_on(run_once(&t, &l, &o, &w, &words, *rate, seed))?;
        let title = format!(
            "{} {} rate {}",
            o.label,
            w.name(),
            if rate.is_finite() {
                format!("{rate}/s")
            } else {
                "inf".into()
            }
        );
        print!("{}", s.table(&title));
        runs.push((*rate, s));
    }
    write_outputs(&t, &l, &o, &w, &runs)
}

/// Writes what `o` asks for (result JSON, per-request CSV, plots) of `runs`, (rate, summary)
/// pairs of workload `w`.
fn write_outputs(
    t: &TargetArgs,
    l: &LoadArgs,
    o: &OutputArgs,
    w: &Workload,
    runs: &[(f64, Summary)],
) -> anyhow::Result<()> {
    if let Some(path) = &o.save_result {
        let j: Vec<Value> = runs
            .iter()
            .map(|(r, s)| s.to_json(meta(t, w, &o.label, *r, l)))
            .collect();
        let v = if j.len() == 1 {
            j.into_iter().next().expect("one")
        } else {
            Value::Array(j)
        };
        std::fs::write(path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("result JSON: {}", path.display());
    }
    if let Some(path) = &o.csv {
        let mut csv = String::new();
        for (i, (_, s)) in runs.iter().enumerate() {
            let body = s.to_csv();
            csv.push_str(if i == 0 {
                &body
            } else {
                body.split_once('\n').map_or("", |x| x.1)
            });
        }
        std::fs::write(path, csv).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("per-request CSV: {}", path.display());
    }
    if let Some(dir) = &o.plots {
        std::fs::create_dir_all(dir)?;
        write_plots(dir, &o.label, runs)?;
        eprintln!("plots: {}", dir.display());
    }
    Ok(())
}

fn write_plots(dir: &std::path::Path, label: &str, runs: &[(f64, Summary)]) -> anyhow::Result<()> {
    use plot::{Series, cdf, lines};
    let name = |r: f64| {
        if r.is_finite() {
            format!("{label} @ {r}/s")
        } else {
            label.to_owned()
        }
    };
    let series: Vec<Series> = runs
        .iter()
        .map(|(r, s)| Series {
            label: name(*r),
            points: cdf(&s.ttfts().iter().map(|x| x * 1e3).collect::<Vec<_>>()),
        })
        .collect();
    lines(
        &dir.join("ttft_cdf"),
        "TTFT distribution",
        "TTFT (ms)",
        "fraction of requests",
        &series,
        false,
    )?;
    let per_round: Vec<Series> = runs
        .iter()
        .filter(|(_, s)| s.per_round().len() > 1)
        .flat_map(|(r, s)| {
            let pr = s.per_round();
            [
                Series {
                    label: format!("{} mean", name(*r)),
                    points: pr.iter().map(|x| (x.0 as f64, x.2)).collect(),
                },
                Series {
                    label: format!("{} median", name(*r)),
                    points: pr.iter().map(|x| (x.0 as f64, x.3)).collect(),
                },
            ]
        })
        .collect();
    if !per_round.is_empty() {
        lines(
            &dir.join("ttft_per_round"),
            "TTFT per round",
            "round",
            "TTFT (ms)",
            &per_round,
            true,
        )?;
    }
    let swept: Vec<&(f64, Summary)> = runs.iter().filter(|(r, _)| r.is_finite()).collect();
    if swept.len() > 1 {
        let req = Series {
            label: format!("{label} requests/s"),
            points: swept
                .iter()
                .map(|(r, s)| (*r, s.request_throughput()))
                .collect(),
        };
        lines(
            &dir.join("throughput_vs_rate"),
            "Throughput against request rate",
            "request rate (requests/s)",
            "completed requests/s",
            &[req],
            true,
        )?;
    }
    Ok(())
}

/// Refuses flags that would make a meaningless or impossible run.
fn validate(t: &TargetArgs, l: &LoadArgs, w: &Workload) -> anyhow::Result<()> {
    if !(t.timeout.is_finite() && t.timeout > 0.0 && t.timeout <= 86_400.0) {
        bail!(
            "--timeout must be between 0 and 86400 seconds (got {})",
            t.timeout
        );
    }
    for r in std::iter::once(&l.request_rate).chain(&l.request_rates) {
        if !(*r == f64::INFINITY || (r.is_finite() && *r > 0.0)) {
            bail!("a request rate must be positive or inf (got {r})");
        }
    }
    if let Some(p) = l.percentiles.iter().find(|p| !(0.0..=100.0).contains(*p)) {
        bail!("percentiles must be within 0..=100 (got {p})");
    }
    if !(1..=1 << 20).contains(&l.max_parallel) {
        bail!(
            "--max-parallel must be between 1 and {} (got {})",
            1 << 20,
            l.max_parallel
        );
    }
    let counts: Vec<(&str, usize)> = match w {
        Workload::MultiTurn(m) => vec![
            ("--clients", m.clients),
            ("--rounds", m.rounds),
            ("--first-len", m.first_len),
            ("--output-len", m.output_len),
        ],
        Workload::LongDocQa(q) => vec![
            ("--documents", q.documents),
            ("--questions", q.questions),
            ("--doc-len", q.doc_len),
            ("--output-len", q.output_len),
        ],
        Workload::SharedPrefix(s) => vec![
            ("--groups", s.groups),
            ("--prompts-per-group", s.prompts_per_group),
            ("--output-len", s.output_len),
        ],
        Workload::Trace(tr) => {
            if !(tr.time_scale.is_finite() && tr.time_scale >= 0.0) {
                bail!(
                    "--time-scale must be a finite number ≥ 0 (got {})",
                    tr.time_scale
                );
            }
            vec![
                ("--block-tokens", tr.block_tokens),
                ("--limit", tr.limit.unwrap_or(1)),
            ]
        }
    };
    let zero = counts.into_iter().find(|x| x.1 == 0);
    if let Some((flag, _)) = zero {
        bail!("{flag} must be at least 1");
    }
    Ok(())
}

/// `strata-bench compare`: the same workload against two endpoints, alternating.
pub fn compare(
    t: TargetArgs,
    other: String,
    labels: (String, String),
    repeats: usize,
    l: LoadArgs,
    o: OutputArgs,
    w: Workload,
) -> anyhow::Result<()> {
    validate(&t, &l, &w)?;
    let words = load_words(&l)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let tb = TargetArgs {
        base_url: other,
        ..t.clone()
    };
    let mut a_runs = Vec::new();
    let mut b_runs = Vec::new();
    for rep in 0..repeats.max(1) {
        // Same prompts for A and B within a repeat, fresh ones for the next repeat (so no
        // endpoint serves a repeat from its own earlier one); the order alternates.
        let seed = l.seed.wrapping_add(rep as u64 * 1_000_003);
        let order = if rep % 2 == 0 {
            [(0, &t, &labels.0), (1, &tb, &labels.1)]
        } else {
            [(1, &tb, &labels.1), (0, &t, &labels.0)]
        };
        for (which, target, label) in order {
            let oo = OutputArgs {
                label: format!("{label} #{}", rep + 1),
                ..o.clone()
            };
            let s = rt.block_on(run_once(target, &l, &oo, &w, &words, l.request_rate, seed))?;
            if which == 0 {
                a_runs.push(s)
            } else {
                b_runs.push(s)
            }
        }
    }
    let merge = |runs: Vec<Summary>| Summary {
        duration: runs.iter().map(|s| s.duration).sum(),
        records: runs.iter().flat_map(|s| s.records.clone()).collect(),
        percentiles: l.percentiles.clone(),
    };
    let (a, b) = (merge(a_runs), merge(b_runs));
    let (ja, jb) = (
        a.to_json(meta(&t, &w, &labels.0, l.request_rate, &l)),
        b.to_json(meta(&tb, &w, &labels.1, l.request_rate, &l)),
    );
    println!(
        "{:<28}{:>14}{:>14}{:>10}",
        "metric", labels.0, labels.1, "B/A"
    );
    for k in [
        "mean_ttft_ms",
        "median_ttft_ms",
        "p99_ttft_ms",
        "mean_itl_ms",
        "mean_tpot_ms",
        "mean_e2el_ms",
        "request_throughput",
        "output_throughput",
        "cache_hit_rate",
        "failed",
    ] {
        let (x, y) = (
            ja[k].as_f64().unwrap_or(f64::NAN),
            jb[k].as_f64().unwrap_or(f64::NAN),
        );
        println!("{k:<28}{x:>14.2}{y:>14.2}{:>10.3}", y / x);
    }
    if let Some(path) = &o.save_result {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&json!({"a": ja, "b": jb}))?,
        )?;
    }
    if let Some(dir) = &o.plots {
        std::fs::create_dir_all(dir)?;
        let series = [(&labels.0, &a), (&labels.1, &b)].map(|(n, s)| plot::Series {
            label: n.clone(),
            points: plot::cdf(&s.ttfts().iter().map(|x| x * 1e3).collect::<Vec<_>>()),
        });
        plot::lines(
            &dir.join("ttft_cdf_compare"),
            "TTFT distribution",
            "TTFT (ms)",
            "fraction of requests",
            &series,
            false,
        )?;
    }
    Ok(())
}
