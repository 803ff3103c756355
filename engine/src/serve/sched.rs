//! The scheduler: one thread that owns the running batch and steps it through the model.
//!
//! Each step
//! 1. drops requests whose client went away (their pages go back at once),
//! 2. admits waiting requests first come, first served while the KV pool has room for their
//!    prompt: the longest cached prefix of whole pages is pinned in the cache and its pages
//!    are attached to the new sequence (shared, not copied), so only the rest is prefilled,
//! 3. builds one batch: one decode token for every sequence that is generating, then prompt
//!    chunks for sequences still in prefill up to the step's token budget,
//! 4. reserves the batch's pages, evicting unpinned cached pages and, when that is not
//!    enough, preempting the newest sequence (its pages are released; its full pages stay in
//!    the cache and it resumes later from what survives),
//! 5. runs the batch through the weights together ([`Model::forward_batch`]), samples the
//!    next token of every sequence whose pending tokens are done, stores every page that
//!    filled in the cache (tier 0 adopts the page in place) and re-pins the sequence's
//!    stored prefix,
//! 6. finishes sequences at a stop token or `max_tokens` and releases their pages.
//!
//! [`Model::forward_batch`]: crate::Model::forward_batch

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use strata_cache_core::{NamespaceHandle, PinGuard, TierId, TieredCache, block_on};
use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use crate::kv::{KvPool, Sequence};
use crate::model::{BatchItem, Logits};
use crate::sampler::{Sampler, Sampling};
use crate::{Engine, EngineError};

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop token (or, decided by the HTTP layer, a stop string).
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What one request used.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the cache instead of prefill (at admission).
    pub cached_tokens: usize,
    /// Tokens run through prefill for this request (recomputation after a preemption
    /// included).
    pub prefill_tokens: usize,
    /// Time from the first prefill chunk to the first token.
    pub prefill_time: Duration,
}

/// What a request's stream receives.
#[derive(Debug)]
pub enum Event {
    /// The request left the queue; `cached_tokens` of its prompt came from the cache.
    Started {
        /// Prompt tokens taken from the cache.
        cached_tokens: usize,
    },
    /// Prefill is done; the first token follows.
    Prefilled {
        /// Time from the first prefill chunk to the first token.
        prefill_time: Duration,
        /// Prompt tokens taken from the cache in all (at admission, plus pages another
        /// request computed meanwhile).
        cached_tokens: usize,
    },
    /// A generated token.
    Token(u32),
    /// The generation ended.
    Done(Finish, Usage),
    /// The generation failed.
    Failed(String),
}

/// A request handed to the scheduler.
pub struct Job {
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Most tokens to generate (at least one).
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampling: Sampling,
    /// Where events go; dropping the receiver cancels the request.
    pub events: UnboundedSender<Event>,
    /// When the HTTP layer accepted it.
    pub arrived: Instant,
    /// Keep generating past stop tokens (benchmarks that want exact output lengths).
    pub ignore_eos: bool,
    /// Set by the HTTP side when a stop string ended the text, before it drops the
    /// receiver: the request then counts as finished by a stop, not as cancelled.
    pub stopped: Arc<AtomicBool>,
}

/// Scheduler settings.
#[derive(Clone, Debug)]
pub struct SchedConfig {
    /// Most sequences in the running batch.
    pub max_running: usize,
    /// Most requests waiting for admission; more are refused.
    pub max_waiting: usize,
    /// Tokens per step: one per decoding sequence plus prefill chunks up to this total.
    pub step_tokens: usize,
    /// Reuse and store prefix pages (off: every prompt is prefilled in full).
    pub prefix_cache: bool,
}

/// The HTTP side's handle: submits jobs and refuses them when the queue is full.
#[derive(Clone)]
pub struct Submitter {
    tx: SyncSender<Job>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
}

/// Why a job was not queued.
#[derive(Debug)]
pub enum SubmitError {
    /// The waiting queue is full.
    QueueFull,
    /// The scheduler has stopped.
    Stopped,
}

impl Submitter {
    /// Queues `job`, or refuses it when `max_waiting` requests already wait.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let max = self.max_waiting;
        if self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < max).then_some(w + 1)
            })
            .is_err()
        {
            return Err(SubmitError::QueueFull);
        }
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull,
                    TrySendError::Disconnected(_) => SubmitError::Stopped,
                })
            }
        }
    }

    /// Requests waiting for admission.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

/// A request the scheduler holds, waiting or running.
struct Active {
    job: Job,
    /// Prompt then generated tokens; `tokens[..seq.len()]` have KV in `seq`.
    tokens: Vec<u32>,
    seq: Sequence,
    /// Pins the sequence's pages that are in the cache (while it runs).
    pin: Option<PinGuard>,
    /// Whole pages of `tokens` stored in the cache.
    stored_pages: usize,
    sampler: Sampler,
    generated: usize,
    usage: Usage,
    /// Counted in the HTTP side's waiting count (until first admitted).
    counted: bool,
    started: bool,
    /// Preempted at least once: pages it attaches after that are its own earlier work, not
    /// cache hits of its prompt.
    preempted: bool,
    prefill_started: Option<Instant>,
    last_token: Option<Instant>,
}

impl Active {
    fn pending(&self) -> usize {
        self.tokens.len() - self.seq.len()
    }
}

/// The scheduler loop's state.
pub struct Scheduler {
    engine: Arc<Engine>,
    pool: Arc<KvPool>,
    cache: TieredCache,
    ns: NamespaceHandle,
    cfg: SchedConfig,
    rx: Receiver<Job>,
    waiting_count: Arc<AtomicUsize>,
    waiting: VecDeque<Active>,
    running: Vec<Active>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
}

const T0: TierId = TierId(0);

impl Scheduler {
    /// A scheduler over `pool`, whose pages are tier 0 of `cache`, and the handle that
    /// submits to it.
    pub fn new(
        engine: Arc<Engine>,
        pool: Arc<KvPool>,
        cache: TieredCache,
        ns: NamespaceHandle,
        cfg: SchedConfig,
        metrics: Arc<Metrics>,
        stop: Arc<AtomicBool>,
    ) -> (Self, Submitter) {
        let (tx, rx) = std::sync::mpsc::sync_channel(cfg.max_waiting.max(1));
        let waiting = Arc::new(AtomicUsize::new(0));
        let sub = Submitter {
            tx,
            waiting: waiting.clone(),
            max_waiting: cfg.max_waiting,
        };
        (
            Scheduler {
                engine,
                pool,
                cache,
                ns,
                cfg,
                rx,
                waiting_count: waiting,
                waiting: VecDeque::new(),
                running: Vec::new(),
                metrics,
                stop,
            },
            sub,
        )
    }

    /// Runs until the stop flag is set (checked between steps) or every submitter is gone.
    pub fn run(mut self) {
        while !self.stop.load(Ordering::Acquire) {
            let idle = self.running.is_empty() && self.waiting.is_empty();
            if idle {
                match self.rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(job) => self.accept(job),
                    Err(RecvTimeoutError::Timeout) => {
                        self.publish();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            while let Ok(job) = self.rx.try_recv() {
                self.accept(job);
            }
            self.drop_cancelled();
            self.admit();
            if let Err(e) = self.step() {
                // A step failed as a whole (a bug, not a request's fault): fail the batch
                // rather than loop on it.
                for mut a in std::mem::take(&mut self.running) {
                    let _ = a.job.events.send(Event::Failed(e.to_string()));
                    self.pool.release(&mut a.seq);
                }
            }
            self.publish();
        }
        for mut a in self.running.drain(..).chain(self.waiting.drain(..)) {
            let _ = a
                .job
                .events
                .send(Event::Failed("the server is shutting down".into()));
            self.pool.release(&mut a.seq);
        }
    }

    fn accept(&mut self, mut job: Job) {
        // The prompt moves into `tokens`, where generated tokens are appended.
        let tokens = std::mem::take(&mut job.prompt);
        let prompt_len = tokens.len();
        let sampler = Sampler::new(job.sampling);
        self.waiting.push_back(Active {
            tokens,
            seq: Sequence::new(),
            pin: None,
            stored_pages: 0,
            sampler,
            generated: 0,
            usage: Usage {
                prompt_tokens: prompt_len,
                ..Usage::default()
            },
            counted: true,
            started: false,
            preempted: false,
            prefill_started: None,
            last_token: None,
            job,
        });
    }

    fn uncount(&self, a: &mut Active) {
        if a.counted {
            a.counted = false;
            self.waiting_count.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Requests whose receiver is gone: released now.
    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].job.events.is_closed() {
                let mut a = self.running.swap_remove(i);
                self.pool.release(&mut a.seq);
                if a.job.stopped.load(Ordering::Acquire) {
                    a.usage.completion_tokens = a.generated;
                    self.metrics
                        .finished(Finish::Stop, a.job.arrived.elapsed(), &a.usage);
                } else {
                    self.metrics.cancelled.inc();
                }
            } else {
                i += 1;
            }
        }
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for mut a in std::mem::take(&mut self.waiting) {
            if a.job.events.is_closed() {
                self.uncount(&mut a);
                self.pool.release(&mut a.seq);
                self.metrics.cancelled.inc();
            } else {
                kept.push_back(a);
            }
        }
        self.waiting = kept;
        // Keep first-come order among running sequences (preemption takes the newest).
        self.running.sort_by_key(|a| a.job.arrived);
    }

    /// Frees at least `pages` pool pages if the cache can give them up.
    fn make_room(&self, pages: usize) -> bool {
        let free = self.pool.free_pages();
        if free >= pages {
            return true;
        }
        if let Ok(n) = block_on(self.cache.evict(T0, pages - free)) {
            self.metrics.evictions.add(n as u64);
        }
        self.pool.free_pages() >= pages
    }

    /// First come, first served, while the pool has room for the head's prompt.
    fn admit(&mut self) {
        let ps = self.pool.page_size();
        // Pages promised to the requests admitted in this pass (none is reserved until the
        // step runs, so each admission must leave room for the ones before it).
        let mut promised = 0;
        while self.running.len() < self.cfg.max_running {
            let Some(mut a) = self.waiting.pop_front() else {
                break;
            };
            // Reuse whole cached pages, but leave at least one token to run: its logits
            // choose the next token.
            let reusable = (a.tokens.len() - 1) / ps * ps;
            let mut attached = 0;
            let pinned = if self.cfg.prefix_cache {
                self.cache.pin(&self.ns, &a.tokens[..reusable]).ok()
            } else {
                None
            };
            if let Some(pin) = pinned {
                for h in pin.handles(T0) {
                    if self.pool.attach(&mut a.seq, h.0 as u32).is_err() {
                        break;
                    }
                    attached += 1;
                }
                a.pin = Some(pin);
                a.stored_pages = attached;
            }
            // Room for the rest of the prompt and the first generated token.
            let need = self.pool.missing(&a.seq, a.tokens.len() + 1);
            if !self.make_room(promised + need) {
                self.pool.release(&mut a.seq);
                a.pin = None;
                a.stored_pages = 0;
                self.waiting.push_front(a);
                break;
            }
            promised += need;
            self.uncount(&mut a);
            if !a.started {
                a.started = true;
                a.usage.cached_tokens = attached * ps;
                self.metrics.cached_tokens(attached * ps);
                self.metrics.queue_time.observe(a.job.arrived.elapsed());
                let _ = a.job.events.send(Event::Started {
                    cached_tokens: attached * ps,
                });
            }
            self.running.push(a);
        }
    }

    /// One forward pass over the running batch.
    fn step(&mut self) -> Result<(), EngineError> {
        if self.running.is_empty() {
            return Ok(());
        }
        if self.cfg.prefix_cache {
            self.attach_computed();
        }
        // Plan: decode tokens first, then prefill chunks within the budget.
        let plan = loop {
            let mut budget = self.cfg.step_tokens.max(1);
            let mut plan = vec![0usize; self.running.len()];
            for (i, a) in self.running.iter().enumerate() {
                if a.pending() == 1 && a.generated > 0 {
                    plan[i] = 1;
                    budget = budget.saturating_sub(1);
                }
            }
            let ps = self.pool.page_size();
            for (i, a) in self.running.iter().enumerate() {
                if plan[i] == 0 && budget > 0 && !self.waits_for_earlier(i) {
                    let mut n = a.pending().min(budget);
                    // A chunk that stops short of the prompt's end stops on a page boundary,
                    // so the sequence can still take pages others compute (when there is a
                    // whole page to stop at).
                    let end = (a.seq.len() + n) / ps * ps;
                    if n < a.pending() && end > a.seq.len() {
                        n = end - a.seq.len();
                    }
                    plan[i] = n;
                    budget -= n;
                }
            }
            let missing: usize = self
                .running
                .iter()
                .zip(&plan)
                .map(|(a, n)| self.pool.missing(&a.seq, a.seq.len() + n))
                .sum();
            if self.make_room(missing) || self.running.len() == 1 {
                break plan;
            }
            // Preempt the newest sequence: its pages go; its full pages stay cached.
            let mut v = self.running.pop().expect("more than one running");
            self.pool.release(&mut v.seq);
            v.pin = None;
            v.stored_pages = 0;
            v.preempted = true;
            self.metrics.preemptions.inc();
            self.waiting.push_front(v);
        };
        let now = Instant::now();
        for (a, n) in self.running.iter_mut().zip(&plan) {
            if *n > 0 && a.generated == 0 && a.prefill_started.is_none() {
                a.prefill_started = Some(now);
            }
        }
        let logits = {
            let mut items: Vec<BatchItem<'_>> = Vec::with_capacity(self.running.len());
            let mut owners = Vec::with_capacity(self.running.len());
            for (i, (a, n)) in self.running.iter_mut().zip(&plan).enumerate() {
                if *n == 0 {
                    continue;
                }
                let start = a.seq.len();
                items.push(BatchItem {
                    seq: &mut a.seq,
                    tokens: &a.tokens[start..start + n],
                    logits: Logits::Last,
                });
                owners.push(i);
            }
            let out = self.engine.model.forward_batch(&self.pool, &mut items)?;
            owners.into_iter().zip(out).collect::<Vec<_>>()
        };
        let mut prefilled = 0;
        for (i, _) in &logits {
            let a = &mut self.running[*i];
            // A decode step runs the one token sampled last; anything else is prefill.
            if !(plan[*i] == 1 && a.generated > 0 && a.pending() == 0) {
                a.usage.prefill_tokens += plan[*i];
                prefilled += plan[*i];
            }
        }
        self.metrics.prefill_tokens.add(prefilled as u64);
        let mut finished = Vec::new();
        for (i, row) in logits {
            self.store_pages(i);
            let a = &mut self.running[i];
            if a.pending() > 0 {
                continue; // more prompt to prefill
            }
            let next = a.sampler.pick(&row);
            let t = Instant::now();
            if a.generated == 0 {
                a.usage.prefill_time = a
                    .prefill_started
                    .map(|s| t.duration_since(s))
                    .unwrap_or_default();
                self.metrics.ttft.observe(t.duration_since(a.job.arrived));
                let _ = a.job.events.send(Event::Prefilled {
                    prefill_time: a.usage.prefill_time,
                    cached_tokens: a.usage.cached_tokens,
                });
            } else if let Some(l) = a.last_token {
                self.metrics.itl.observe(t.duration_since(l));
            }
            a.last_token = Some(t);
            if !a.job.ignore_eos && self.engine.stop.contains(&next) {
                finished.push((i, Finish::Stop));
                continue;
            }
            a.tokens.push(next);
            a.generated += 1;
            self.metrics.generation_tokens.inc();
            if a.job.events.send(Event::Token(next)).is_err() {
                continue; // cancelled: dropped before the next step
            }
            if a.generated >= a.job.max_tokens || a.tokens.len() >= self.engine.model.config.ctx_len
            {
                finished.push((i, Finish::Length));
            }
        }
        if finished.is_empty() {
            return Ok(());
        }
        finished.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        let mut done = Vec::with_capacity(finished.len());
        for (i, why) in finished {
            let mut a = self.running.remove(i);
            self.pool.release(&mut a.seq);
            a.pin = None;
            a.usage.completion_tokens = a.generated;
            self.metrics
                .finished(why, a.job.arrived.elapsed(), &a.usage);
            done.push((a, why));
        }
        // The gauges first: a client that reads /metrics right after its response sees its
        // request gone and its pages released.
        self.publish();
        for (a, why) in done {
            let _ = a.job.events.send(Event::Done(why, a.usage.clone()));
        }
        Ok(())
    }

    /// In-batch prefix sharing: a sequence in prefill that stands at a page boundary takes
    /// the whole pages that other requests have computed and stored since it was admitted
    /// (requests that arrive together with one long shared prefix compute it once).
    fn attach_computed(&mut self) {
        let ps = self.pool.page_size();
        for a in &mut self.running {
            let at = a.seq.len();
            let reusable = (a.tokens.len() - 1) / ps * ps;
            if a.pending() < 2
                || at >= reusable
                || !at.is_multiple_of(ps)
                || a.seq.pages().len() != at / ps
            {
                continue;
            }
            let Ok(pin) = self.cache.pin(&self.ns, &a.tokens[..reusable]) else {
                continue;
            };
            let handles = pin.handles(T0);
            if handles.len() <= at / ps {
                continue;
            }
            let mut added = 0;
            for h in &handles[at / ps..] {
                if self.pool.attach(&mut a.seq, h.0 as u32).is_err() {
                    break;
                }
                added += 1;
            }
            a.stored_pages = at / ps + added;
            a.pin = Some(pin);
            if !a.preempted {
                // Pages of the prompt that another request computed meanwhile.
                let prompt_pages = (a.usage.prompt_tokens / ps).saturating_sub(at / ps);
                let hits = added.min(prompt_pages) * ps;
                a.usage.cached_tokens += hits;
                self.metrics.cached_tokens(hits);
            }
        }
    }

    /// Whether running sequence `j` should not prefill this step because an earlier
    /// sequence is computing the very page `j` would compute next (it attaches that page once
    /// it is stored instead of computing a copy).
    fn waits_for_earlier(&self, j: usize) -> bool {
        if !self.cfg.prefix_cache {
            return false;
        }
        let ps = self.pool.page_size();
        let b = &self.running[j];
        let at = b.seq.len();
        if !at.is_multiple_of(ps) || at + ps > (b.tokens.len() - 1) / ps * ps {
            return false;
        }
        let page = &b.tokens[at..at + ps];
        self.running[..j].iter().any(|a| {
            let l = a.seq.len();
            l >= at
                && l < at + ps
                && a.tokens.len() >= at + ps
                && a.tokens[at..at + ps] == *page
                && a.tokens[..at] == b.tokens[..at]
        })
    }

    /// Stores the pages of running sequence `i` that filled since the last store, and pins
    /// its whole stored prefix.
    fn store_pages(&mut self, i: usize) {
        let ps = self.pool.page_size();
        let a = &mut self.running[i];
        let full = a.seq.len() / ps;
        if full <= a.stored_pages || !self.cfg.prefix_cache {
            return;
        }
        let blocks: Result<Vec<&[u8]>, _> =
            (0..full).map(|p| self.pool.export(&a.seq, p)).collect();
        let Ok(blocks) = blocks else { return };
        let tokens = &a.tokens[..full * ps];
        match block_on(self.cache.insert(&self.ns, tokens, &blocks)) {
            Ok(r) => {
                self.metrics.cache_stored.add(r.stored as u64);
            }
            Err(_) => self.metrics.cache_store_errors.inc(),
        }
        // Pin the new prefix before letting go of the old pin, so no page is unpinned in
        // between.
        if let Ok(pin) = self.cache.pin(&self.ns, tokens) {
            a.pin = Some(pin);
        }
        a.stored_pages = full;
    }

    /// Updates the gauges.
    fn publish(&self) {
        let stats = self.cache.stats();
        let cached_pages = stats
            .tiers
            .first()
            .map(|t| t.resident_bytes / self.pool.block_bytes().max(1) as u64)
            .unwrap_or(0);
        self.metrics.set_gauges(
            self.running.len(),
            self.waiting_count.load(Ordering::Acquire)
                + self.waiting.iter().filter(|a| !a.counted).count(),
            self.pool.used_pages(),
            self.pool.free_pages(),
            cached_pages as usize,
        );
    }
}
