//! Prometheus metrics of the serving engine, named after vLLM's (`vllm:` becomes
//! `strata:`) so dashboards built for vLLM map over: `strata:num_requests_running`,
//! `strata:time_to_first_token_seconds`, `strata:prompt_tokens_total`, ...

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::sched::{Finish, Usage};

/// A monotonically increasing count.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

const BUCKETS: [f64; 20] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0,
];

/// A latency histogram in seconds with fixed buckets.
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            d.as_micros().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        cum += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let _ = writeln!(
            out,
            "{name}_sum {}\n{name}_count {cum}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
    }
}

/// Every metric of the server.
#[derive(Default)]
pub struct Metrics {
    running: AtomicU64,
    waiting: AtomicU64,
    pages_used: AtomicU64,
    pages_free: AtomicU64,
    pages_cached: AtomicU64,
    pages_total: AtomicU64,
    /// Time to first token, from arrival.
    pub ttft: Histogram,
    /// Time between tokens of one stream.
    pub itl: Histogram,
    /// Arrival to last token.
    pub e2e: Histogram,
    /// Arrival to admission.
    pub queue_time: Histogram,
    /// Prompt tokens of finished requests.
    pub prompt_tokens: Counter,
    /// Tokens generated.
    pub generation_tokens: Counter,
    /// Tokens run through prefill (a cached prefix is not).
    pub prefill_tokens: Counter,
    /// Prompt tokens served from the cache, by tier (device, host, disk, remote).
    pub cached_by_tier: [Counter; 4],
    /// Requests finished by a stop token.
    pub finished_stop: Counter,
    /// Requests finished by length.
    pub finished_length: Counter,
    /// Requests cancelled (client gone).
    pub cancelled: Counter,
    /// Requests refused because the queue was full.
    pub rejected: Counter,
    /// Requests refused as malformed.
    pub bad_requests: Counter,
    /// Sequences preempted for lack of pages.
    pub preemptions: Counter,
    /// Cached pages evicted from the KV pool.
    pub evictions: Counter,
    /// Pages stored in the cache.
    pub cache_stored: Counter,
    /// Stores the cache refused.
    pub cache_store_errors: Counter,
}

/// Tier names, in `cached_by_tier` order.
pub const TIERS: [&str; 4] = ["device", "host", "disk", "remote"];

impl Metrics {
    /// Metrics for a pool of `pages` pages.
    pub fn new(pages: usize) -> Self {
        let m = Metrics::default();
        m.pages_total.store(pages as u64, Ordering::Relaxed);
        m.pages_free.store(pages as u64, Ordering::Relaxed);
        m
    }

    /// Prompt tokens taken from the device tier (G1) at admission.
    pub fn cached_tokens(&self, n: usize) {
        self.cached_by_tier[0].add(n as u64);
    }

    /// A request finished.
    pub fn finished(&self, why: Finish, e2e: Duration, usage: &Usage) {
        self.e2e.observe(e2e);
        self.prompt_tokens.add(usage.prompt_tokens as u64);
        match why {
            Finish::Stop => self.finished_stop.inc(),
            Finish::Length => self.finished_length.inc(),
        }
    }

    /// The scheduler's gauges.
    pub fn set_gauges(
        &self,
        running: usize,
        waiting: usize,
        used: usize,
        free: usize,
        cached: usize,
    ) {
        self.running.store(running as u64, Ordering::Relaxed);
        self.waiting.store(waiting as u64, Ordering::Relaxed);
        self.pages_used.store(used as u64, Ordering::Relaxed);
        self.pages_free.store(free as u64, Ordering::Relaxed);
        self.pages_cached.store(cached as u64, Ordering::Relaxed);
    }

    /// Requests in the running batch.
    pub fn running(&self) -> u64 {
        self.running.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let g = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let c = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        g(
            &mut o,
            "strata:num_requests_running",
            "Requests in the running batch.",
            l(&self.running),
        );
        g(
            &mut o,
            "strata:num_requests_waiting",
            "Requests waiting for admission.",
            l(&self.waiting),
        );
        let _ = writeln!(
            o,
            "# HELP strata:kv_pages KV pool pages by state: used (held by a sequence or the cache), free, cached (indexed by the prefix cache), total.\n# TYPE strata:kv_pages gauge"
        );
        for (s, v) in [
            ("used", l(&self.pages_used)),
            ("free", l(&self.pages_free)),
            ("cached", l(&self.pages_cached)),
            ("total", l(&self.pages_total)),
        ] {
            let _ = writeln!(o, "strata:kv_pages{{state=\"{s}\"}} {v}");
        }
        let total = l(&self.pages_total).max(1) as f64;
        let _ = writeln!(
            o,
            "# HELP strata:kv_cache_usage_perc Fraction of KV pool pages in use.\n# TYPE strata:kv_cache_usage_perc gauge\nstrata:kv_cache_usage_perc {}",
            l(&self.pages_used) as f64 / total
        );
        self.ttft.render(
            &mut o,
            "strata:time_to_first_token_seconds",
            "Arrival to first token.",
        );
        self.itl.render(
            &mut o,
            "strata:inter_token_latency_seconds",
            "Time between two tokens of a stream.",
        );
        self.e2e.render(
            &mut o,
            "strata:e2e_request_latency_seconds",
            "Arrival to the last token.",
        );
        self.queue_time.render(
            &mut o,
            "strata:request_queue_time_seconds",
            "Arrival to admission into the running batch.",
        );
        c(
            &mut o,
            "strata:prompt_tokens_total",
            "Prompt tokens of finished requests.",
            self.prompt_tokens.get(),
        );
        c(
            &mut o,
            "strata:generation_tokens_total",
            "Tokens generated.",
            self.generation_tokens.get(),
        );
        c(
            &mut o,
            "strata:prefill_tokens_total",
            "Tokens run through prefill (cached prefixes are not).",
            self.prefill_tokens.get(),
        );
        let _ = writeln!(
            o,
            "# HELP strata:cached_tokens_total Prompt tokens served from the cache instead of prefill, by tier.\n# TYPE strata:cached_tokens_total counter"
        );
        for (t, n) in TIERS.iter().zip(&self.cached_by_tier) {
            let _ = writeln!(o, "strata:cached_tokens_total{{tier=\"{t}\"}} {}", n.get());
        }
        let _ = writeln!(
            o,
            "# HELP strata:request_success_total Finished requests by finish reason.\n# TYPE strata:request_success_total counter\nstrata:request_success_total{{finished_reason=\"stop\"}} {}\nstrata:request_success_total{{finished_reason=\"length\"}} {}",
            self.finished_stop.get(),
            self.finished_length.get()
        );
        c(
            &mut o,
            "strata:request_cancelled_total",
            "Requests cancelled because the client went away.",
            self.cancelled.get(),
        );
        c(
            &mut o,
            "strata:request_rejected_total",
            "Requests refused with 503 because the waiting queue was full.",
            self.rejected.get(),
        );
        c(
            &mut o,
            "strata:request_invalid_total",
            "Requests refused with 4xx.",
            self.bad_requests.get(),
        );
        c(
            &mut o,
            "strata:num_preemptions_total",
            "Sequences preempted for lack of KV pages.",
            self.preemptions.get(),
        );
        c(
            &mut o,
            "strata:kv_evictions_total",
            "Cached pages evicted from the KV pool.",
            self.evictions.get(),
        );
        c(
            &mut o,
            "strata:kv_pages_stored_total",
            "Full pages stored in the prefix cache.",
            self.cache_stored.get(),
        );
        c(
            &mut o,
            "strata:kv_store_errors_total",
            "Page stores the cache refused.",
            self.cache_store_errors.get(),
        );
        o
    }
}
