//! Summaries of a run: percentiles, throughput, cache hits, the JSON vLLM's `bench serve`
//! writes (same field names), per-request CSV and a readable table.

use std::fmt::Write as _;

use serde_json::{Map, Value, json};

use super::client::Outcome;

/// Percentile `p` (0–100) of `v` with linear interpolation between closest ranks (numpy's
/// default); NaN for an empty set.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = p.clamp(0.0, 100.0) / 100.0 * (s.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (rank - lo as f64)
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn std(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
}

/// One request with the workload's labels.
#[derive(Clone, Debug)]
pub struct Record {
    /// The measurement.
    pub outcome: Outcome,
    /// Round (multi-turn) or pass (long-document QA); 0 otherwise.
    pub round: usize,
    /// Client / conversation / document / group index.
    pub client: usize,
    /// Whether it belongs to a warm-up pass (excluded from the summary).
    pub warmup: bool,
}

/// A run's summary, with the raw per-request series.
pub struct Summary {
    /// Wall time of the measured requests, s.
    pub duration: f64,
    /// Records in the summary (warm-up excluded).
    pub records: Vec<Record>,
    /// Percentiles to report.
    pub percentiles: Vec<f64>,
}

impl Summary {
    fn ok(&self) -> impl Iterator<Item = &Outcome> {
        self.records
            .iter()
            .map(|r| &r.outcome)
            .filter(|o| o.success)
    }

    /// TTFTs of the successful requests, s.
    pub fn ttfts(&self) -> Vec<f64> {
        self.ok().map(|o| o.ttft).collect()
    }

    fn tpots(&self) -> Vec<f64> {
        self.ok()
            .filter(|o| o.output_tokens > 1)
            .map(|o| (o.e2e - o.ttft) / (o.output_tokens - 1) as f64)
            .collect()
    }

    fn itls(&self) -> Vec<f64> {
        self.ok().flat_map(|o| o.itls.iter().copied()).collect()
    }

    fn e2els(&self) -> Vec<f64> {
        self.ok().map(|o| o.e2e).collect()
    }

    /// Completed (successful) requests.
    pub fn completed(&self) -> usize {
        self.ok().count()
    }

    /// Failed requests.
    pub fn failed(&self) -> usize {
        self.records.len() - self.completed()
    }

    /// Successful requests per second.
    pub fn request_throughput(&self) -> f64 {
        self.completed() as f64 / self.duration.max(1e-9)
    }

    /// Generated tokens of the successful requests per second.
    pub fn output_throughput(&self) -> f64 {
        self.ok().map(|o| o.output_tokens).sum::<usize>() as f64 / self.duration.max(1e-9)
    }

    /// TTFT minus the server's own prompt time (`timings.prompt_ms`), ms, for the successful
    /// requests whose server reports it: what the client adds (network, HTTP, queueing).
    pub fn ttft_minus_server(&self) -> Vec<f64> {
        self.ok()
            .filter_map(|o| o.server_prompt_ms.map(|p| o.ttft * 1e3 - p))
            .collect()
    }

    /// Cache hit rate over the requests whose server reported cached tokens.
    pub fn cache_hit_rate(&self) -> Option<f64> {
        let (c, p) = self
            .ok()
            .filter_map(|o| o.cached_tokens.map(|c| (c, o.input_tokens)))
            .fold((0usize, 0usize), |(a, b), (c, p)| (a + c, b + p));
        (p > 0).then(|| c as f64 / p as f64)
    }

    fn rounds(&self) -> Vec<usize> {
        let mut r: Vec<usize> = self.records.iter().map(|r| r.round).collect();
        r.sort_unstable();
        r.dedup();
        r
    }

    /// Per round: (round, requests, mean TTFT ms, median TTFT ms, mean input tokens, hit rate).
    pub fn per_round(&self) -> Vec<(usize, usize, f64, f64, f64, Option<f64>)> {
        self.rounds()
            .into_iter()
            .map(|round| {
                let o: Vec<&Outcome> = self
                    .records
                    .iter()
                    .filter(|r| r.round == round)
                    .map(|r| &r.outcome)
                    .filter(|o| o.success)
                    .collect();
                let t: Vec<f64> = o.iter().map(|o| o.ttft * 1e3).collect();
                let inp = mean(&o.iter().map(|o| o.input_tokens as f64).collect::<Vec<_>>());
                let (c, p) = o
                    .iter()
                    .filter_map(|o| o.cached_tokens.map(|c| (c, o.input_tokens)))
                    .fold((0, 0), |(a, b), (c, p)| (a + c, b + p));
                (
                    round,
                    o.len(),
                    mean(&t),
                    percentile(&t, 50.0),
                    inp,
                    (p > 0).then(|| c as f64 / p as f64),
                )
            })
            .collect()
    }

    /// The result JSON, with vLLM `bench serve`'s field names (`ttfts` and `itls` in
    /// seconds, `*_ms` figures in milliseconds) plus Strata's additions.
    pub fn to_json(&self, meta: Value) -> Value {
        let ok: Vec<&Outcome> = self.ok().collect();
        let total_in: usize = ok.iter().map(|o| o.input_tokens).sum();
        let total_out: usize = ok.iter().map(|o| o.output_tokens).sum();
        let mut m = Map::new();
        if let Value::Object(meta) = meta {
            m.extend(meta);
        }
        m.insert("duration".into(), json!(self.duration));
        m.insert("completed".into(), json!(ok.len()));
        m.insert("failed".into(), json!(self.failed()));
        m.insert("total_input_tokens".into(), json!(total_in));
        m.insert("total_output_tokens".into(), json!(total_out));
        m.insert(
            "request_throughput".into(),
            json!(self.request_throughput()),
        );
        m.insert(
            "input_throughput".into(),
            json!(total_in as f64 / self.duration.max(1e-9)),
        );
        m.insert("output_throughput".into(), json!(self.output_throughput()));
        m.insert(
            "total_token_throughput".into(),
            json!((total_in + total_out) as f64 / self.duration.max(1e-9)),
        );
        for (name, v) in [
            ("ttft", self.ttfts()),
            ("tpot", self.tpots()),
            ("itl", self.itls()),
            ("e2el", self.e2els()),
        ] {
            let ms: Vec<f64> = v.iter().map(|x| x * 1e3).collect();
            m.insert(format!("mean_{name}_ms"), json!(mean(&ms)));
            m.insert(format!("median_{name}_ms"), json!(percentile(&ms, 50.0)));
            m.insert(format!("std_{name}_ms"), json!(std(&ms)));
            for p in &self.percentiles {
                m.insert(
                    format!("p{}_{name}_ms", fmt_p(*p)),
                    json!(percentile(&ms, *p)),
                );
            }
        }
        m.insert("cache_hit_rate".into(), json!(self.cache_hit_rate()));
        let d = self.ttft_minus_server();
        if !d.is_empty() {
            m.insert(
                "server_prompt_ms".into(),
                json!(
                    self.records
                        .iter()
                        .map(|r| r.outcome.server_prompt_ms)
                        .collect::<Vec<_>>()
                ),
            );
            m.insert(
                "ttft_minus_server_prompt_ms".into(),
                json!({"mean": mean(&d), "median": percentile(&d, 50.0), "p99": percentile(&d, 99.0), "min": percentile(&d, 0.0), "max": percentile(&d, 100.0)}),
            );
        }
        m.insert(
            "input_lens".into(),
            json!(
                self.records
                    .iter()
                    .map(|r| r.outcome.input_tokens)
                    .collect::<Vec<_>>()
            ),
        );
        m.insert(
            "output_lens".into(),
            json!(
                self.records
                    .iter()
                    .map(|r| r.outcome.output_tokens)
                    .collect::<Vec<_>>()
            ),
        );
        m.insert(
            "ttfts".into(),
            json!(
                self.records
                    .iter()
                    .map(|r| r.outcome.ttft)
                    .collect::<Vec<_>>()
            ),
        );
        m.insert(
            "itls".into(),
            json!(
                self.records
                    .iter()
                    .map(|r| r.outcome.itls.clone())
                    .collect::<Vec<_>>()
            ),
        );
        m.insert(
            "errors".into(),
            json!(
                self.records
                    .iter()
                    .map(|r| r.outcome.error.clone())
                    .collect::<Vec<_>>()
            ),
        );
        m.insert(
            "generated_texts".into(),
            json!(
                self.records
                    .iter()
                    .map(|r| r.outcome.text.clone())
                    .collect::<Vec<_>>()
            ),
        );
        m.insert(
            "per_round".into(),
            json!(self.per_round().iter().map(|(r, n, mean, med, inp, hit)| json!({"round": r, "requests": n, "mean_ttft_ms": mean, "median_ttft_ms": med, "mean_input_tokens": inp, "cache_hit_rate": hit})).collect::<Vec<_>>()),
        );
        Value::Object(m)
    }

    /// One CSV line per request.
    pub fn to_csv(&self) -> String {
        let mut s = String::from(
            "index,round,client,warmup,success,start_s,input_tokens,output_tokens,ttft_ms,tpot_ms,e2e_ms,cached_tokens,server_prompt_ms,tiers,error\n",
        );
        for (i, r) in self.records.iter().enumerate() {
            let o = &r.outcome;
            let tpot = if o.output_tokens > 1 {
                (o.e2e - o.ttft) / (o.output_tokens - 1) as f64 * 1e3
            } else {
                f64::NAN
            };
            let tiers: Vec<String> = o.tiers.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(
                s,
                "{i},{},{},{},{},{:.6},{},{},{:.3},{:.3},{:.3},{},{},{},\"{}\"",
                r.round,
                r.client,
                r.warmup,
                o.success,
                o.start,
                o.input_tokens,
                o.output_tokens,
                o.ttft * 1e3,
                tpot,
                o.e2e * 1e3,
                o.cached_tokens.map_or(String::new(), |c| c.to_string()),
                o.server_prompt_ms
                    .map_or(String::new(), |c| format!("{c:.3}")),
                tiers.join(" "),
                o.error.replace('"', "'")
            );
        }
        s
    }

    /// The readable table.
    pub fn table(&self, title: &str) -> String {
        let mut s = String::new();
        let line = |s: &mut String, k: &str, v: String| {
            let _ = writeln!(s, "{k:<40}{v:>14}");
        };
        let _ = writeln!(s, "{:=^54}", format!(" {title} "));
        line(&mut s, "Successful requests:", self.completed().to_string());
        line(&mut s, "Failed requests:", self.failed().to_string());
        line(
            &mut s,
            "Benchmark duration (s):",
            format!("{:.2}", self.duration),
        );
        let ok: Vec<&Outcome> = self.ok().collect();
        let (tin, tout): (usize, usize) = (
            ok.iter().map(|o| o.input_tokens).sum(),
            ok.iter().map(|o| o.output_tokens).sum(),
        );
        line(&mut s, "Total input tokens:", tin.to_string());
        line(&mut s, "Total generated tokens:", tout.to_string());
        line(
            &mut s,
            "Request throughput (req/s):",
            format!("{:.2}", self.request_throughput()),
        );
        line(
            &mut s,
            "Input token throughput (tok/s):",
            format!("{:.2}", tin as f64 / self.duration.max(1e-9)),
        );
        line(
            &mut s,
            "Output token throughput (tok/s):",
            format!("{:.2}", tout as f64 / self.duration.max(1e-9)),
        );
        if let Some(h) = self.cache_hit_rate() {
            line(
                &mut s,
                "Cache hit rate (server-reported):",
                format!("{:.1} %", h * 100.0),
            );
        }
        for (name, label, v) in [
            ("TTFT", "Time to First Token", self.ttfts()),
            (
                "TPOT",
                "Time per Output Token (excl. 1st token)",
                self.tpots(),
            ),
            ("ITL", "Inter-token Latency", self.itls()),
            ("E2EL", "End-to-end Latency", self.e2els()),
        ] {
            let ms: Vec<f64> = v.iter().map(|x| x * 1e3).collect();
            let _ = writeln!(s, "{:-^54}", label);
            line(
                &mut s,
                &format!("Mean {name} (ms):"),
                format!("{:.2}", mean(&ms)),
            );
            line(
                &mut s,
                &format!("Median {name} (ms):"),
                format!("{:.2}", percentile(&ms, 50.0)),
            );
            for p in &self.percentiles {
                line(
                    &mut s,
                    &format!("P{} {name} (ms):", fmt_p(*p)),
                    format!("{:.2}", percentile(&ms, *p)),
                );
            }
        }
        let d = self.ttft_minus_server();
        if !d.is_empty() {
            let _ = writeln!(s, "{:-^54}", "TTFT minus server prompt time");
            line(&mut s, "Mean (ms):", format!("{:.2}", mean(&d)));
            line(
                &mut s,
                "Median (ms):",
                format!("{:.2}", percentile(&d, 50.0)),
            );
            line(&mut s, "Max (ms):", format!("{:.2}", percentile(&d, 100.0)));
        }
        let rounds = self.per_round();
        if rounds.len() > 1 {
            let _ = writeln!(s, "{:-^54}", "Per round");
            let _ = writeln!(
                s,
                "{:>6}{:>10}{:>13}{:>13}{:>12}",
                "round", "requests", "mean TTFT", "median TTFT", "hit rate"
            );
            for (r, n, m, med, _, hit) in rounds {
                let _ = writeln!(
                    s,
                    "{r:>6}{n:>10}{m:>10.2} ms{med:>10.2} ms{:>12}",
                    hit.map_or("-".into(), |h| format!("{:.1} %", h * 100.0))
                );
            }
        }
        let errors: Vec<&str> = self
            .records
            .iter()
            .filter(|r| !r.outcome.success)
            .map(|r| r.outcome.error.as_str())
            .take(3)
            .collect();
        if !errors.is_empty() {
            let _ = writeln!(s, "{:-^54}", "First errors");
            for e in errors {
                let _ = writeln!(s, "{e}");
            }
        }
        let _ = writeln!(s, "{}", "=".repeat(54));
        s
    }
}

/// `99` → "99", `99.9` → "99.9".
fn fmt_p(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("{}", p as u64)
    } else {
        format!("{p}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.5);
        assert!((percentile(&v, 90.0) - 90.1).abs() < 1e-9);
        assert!((percentile(&v, 99.0) - 99.01).abs() < 1e-9);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        // Order of the input does not matter; a single value is every percentile.
        let mut r = v.clone();
        r.reverse();
        assert_eq!(percentile(&r, 25.0), 25.75);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn failed_requests_are_not_fast() {
        let ok = Outcome {
            success: true,
            ttft: 0.2,
            e2e: 1.0,
            output_tokens: 5,
            input_tokens: 10,
            ..Default::default()
        };
        let bad = Outcome {
            success: false,
            error: "HTTP 500".into(),
            ..Default::default()
        };
        let s = Summary {
            duration: 2.0,
            records: vec![
                Record {
                    outcome: ok,
                    round: 0,
                    client: 0,
                    warmup: false,
                },
                Record {
                    outcome: bad,
                    round: 0,
                    client: 1,
                    warmup: false,
                },
            ],
            percentiles: vec![99.0],
        };
        let j = s.to_json(json!({}));
        assert_eq!(j["completed"], 1);
        assert_eq!(j["failed"], 1);
        assert_eq!(j["mean_ttft_ms"], 200.0);
        assert_eq!(j["request_throughput"], 0.5);
        assert!(j["p99_ttft_ms"].is_number() && j["median_tpot_ms"].is_number());
    }
}
