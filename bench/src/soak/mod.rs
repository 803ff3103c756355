//! `strata-bench soak`: the real `strata-sidecar` binary with a disk tier, driven by many
//! clients at once for a set time while a fault schedule runs, every byte read checked.
//!
//! - **Clients**: `connections` gRPC connections (half over the Unix socket, half over
//!   TCP), spread over `tenants` tenants (every other one may use shared memory), each
//!   drawing prompts with Zipf-shaped popularity and running Lookup, Get (inline and
//!   shared memory), Put (inline and through staging slots), Prefetch + PrefetchStatus and
//!   Release ([`workload`]).
//! - **Checking**: a block's bytes are a pure function of its tenant and token prefix
//!   ([`data`]), so every block read is compared with what must have been written, also
//!   after restarts; a tenant reading another's block would show up as wrong bytes.
//! - **Faults**: client processes killed with SIGKILL while they hold leases (then their
//!   leases must be gone); the disk tier's file system (ext4 in a loop device) filled to
//!   `ENOSPC` and freed; the sidecar killed with SIGKILL and restarted on the same disk
//!   (then what a lookup showed on disk just before must be found, with the right bytes);
//!   the attacks of the security review at a low rate ([`attacks`]).
//! - **Report**: ops/s and latency percentiles per call, errors by call and gRPC code
//!   (apart from those caused by a restart), wrong bytes, the sidecar's peak RSS
//!   (`VmHWM`, sampled every 100 ms, the largest over restarts) against a stated bound,
//!   fault and attack outcomes, warnings and panics in the sidecar's log.
//!
//! The disk tier's file is created sparse (its full size, no blocks), because a new tier
//! file is `fallocate`d by the sidecar and writes into reserved space never see `ENOSPC`;
//! a sparse file allocates on write, as a thin-provisioned volume would.

pub mod attacks;
pub mod data;
pub mod hist;
pub mod proc;
pub mod victim;
pub mod workload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use parking_lot::{Mutex, RwLock};
use serde_json::{Value, json};
use strata_server::client::ClientError;
use strata_server::pb;

use data::{BLOCK, PAGE, Zipf};
use hist::Hist;
use proc::{Addrs, LogSummary, LoopFs, SidecarProc, Spawner};

/// Shared-memory sessions each tenant's connections open (sidecars limit sessions per
/// tenant, by default to 4; the killed clients' tenant has one of its own).
const SHM_SESSIONS_PER_TENANT: usize = 3;

/// What to run.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// The sidecar binary.
    pub sidecar_bin: PathBuf,
    /// The program run as a killable client, and the arguments before its JSON argument
    /// (`strata-bench soak-client`, or a test's helper binary).
    pub client_cmd: (PathBuf, Vec<String>),
    /// How long the clients run.
    pub duration: Duration,
    /// gRPC connections of the legitimate clients.
    pub connections: usize,
    /// Tenants of the legitimate clients (the killed clients have one more of their own).
    pub tenants: usize,
    /// Seed of prompts, popularity and schedule.
    pub seed: u64,
    /// Run the fault schedule and the attacks.
    pub faults: bool,
    /// Distinct prompts (Zipf-ranked).
    pub prompts: usize,
    /// Host memory of the sidecar.
    pub host_capacity: u64,
    /// Size of the disk tier.
    pub disk_capacity: u64,
    /// Folder for sockets, logs and the disk image (default: a new temporary folder,
    /// removed afterwards when the soak passed).
    pub work_dir: Option<PathBuf>,
    /// How often a progress line goes to stderr.
    pub progress_every: Duration,
}

impl SoakConfig {
    /// Defaults: 64 connections, 3 tenants, 1,000 prompts, 32 MiB of host memory and a
    /// 512 MiB disk tier, faults on.
    pub fn new(
        sidecar_bin: PathBuf,
        client_cmd: (PathBuf, Vec<String>),
        duration: Duration,
    ) -> Self {
        SoakConfig {
            sidecar_bin,
            client_cmd,
            duration,
            connections: 64,
            tenants: 3,
            seed: 1,
            faults: true,
            prompts: 1000,
            host_capacity: 32 << 20,
            disk_capacity: 512 << 20,
            work_dir: None,
            progress_every: Duration::from_secs(10),
        }
    }
}

/// A tenant of the soak.
#[derive(Clone, Debug)]
pub struct Tenant {
    /// Index (the block bytes depend on it).
    pub index: u32,
    /// Name in the sidecar's configuration.
    pub name: String,
    /// Its token.
    pub token: String,
    /// May use shared memory.
    pub shm: bool,
}

#[derive(Default)]
struct Tally {
    ops: BTreeMap<&'static str, Hist>,
    errors: BTreeMap<String, u64>,
    restart_errors: BTreeMap<String, u64>,
    examples: BTreeMap<String, String>,
    wrong_bytes: u64,
    wrong_blocks: u64,
    blocks_checked: u64,
    mismatches: Vec<String>,
    protocol: BTreeMap<String, u64>,
    notes: BTreeMap<&'static str, u64>,
    puts: u64,
}

/// State shared by the clients, the fault schedule and the report.
pub struct Shared {
    /// Prompt seed.
    pub seed: u64,
    zipf: Zipf,
    /// The legitimate tenants.
    pub tenants: Vec<Tenant>,
    victim: Tenant,
    addrs: RwLock<(Addrs, u64)>,
    up: AtomicBool,
    stop: AtomicBool,
    tally: Mutex<Tally>,
    attacks: Mutex<BTreeMap<String, BTreeMap<String, u64>>>,
}

impl Shared {
    /// The sidecar's current addresses and generation (1 + restarts).
    pub fn addrs(&self) -> (Addrs, u64) {
        self.addrs.read().clone()
    }

    /// Whether the sidecar is serving (false while it is being restarted).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Whether the clients should stop.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Runs a call and records its latency when it succeeds.
    pub async fn measure<T>(
        &self,
        op: &'static str,
        f: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        let t0 = Instant::now();
        let r = f.await;
        if r.is_ok() {
            let us = t0.elapsed().as_micros() as u64;
            self.tally.lock().ops.entry(op).or_default().record(us);
        }
        r
    }

    /// Counts a failed call; one that began before the current sidecar started, or
    /// while it was down, is counted as caused by the restart.
    pub fn error(&self, op: &str, kind: &str, generation: u64, e: Option<&ClientError>) {
        let restart = !self.is_up() || generation != self.addrs.read().1;
        let key = format!("{op}:{kind}");
        let mut t = self.tally.lock();
        if restart {
            *t.restart_errors.entry(key).or_default() += 1;
        } else {
            if let Some(e) = e
                && !t.examples.contains_key(&key)
            {
                let msg: String = e.to_string().chars().take(300).collect();
                t.examples.insert(key.clone(), msg);
            }
            *t.errors.entry(key).or_default() += 1;
        }
    }

    /// Checks a block read for `tenant` against the bytes of chained key `key`.
    pub fn verify(&self, got: &[u8], key: &[u8; 32], tenant: u32, op: &str) -> u64 {
        let want = data::block_bytes(key);
        let wrong = data::wrong_bytes(got, &want);
        let mut t = self.tally.lock();
        t.blocks_checked += 1;
        if wrong > 0 {
            t.wrong_bytes += wrong;
            t.wrong_blocks += 1;
            if t.mismatches.len() < 20 {
                t.mismatches.push(format!(
                    "{op}: tenant {tenant}, key {}, {wrong} of {} bytes wrong (got {} bytes)",
                    hex(&key[..8]),
                    want.len(),
                    got.len()
                ));
            }
        }
        wrong
    }

    /// Records an answer that breaks the API's promises (not a wrong byte).
    pub fn protocol(&self, what: String) {
        *self.tally.lock().protocol.entry(what).or_default() += 1;
    }

    /// Counts something worth reporting.
    pub fn note(&self, what: &'static str) {
        *self.tally.lock().notes.entry(what).or_default() += 1;
    }

    fn note_put(&self, _tenant: u32) {
        self.tally.lock().puts += 1;
    }

    fn ops_total(&self) -> u64 {
        self.tally.lock().ops.values().map(Hist::count).sum()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The sidecar as the fault schedule sees it.
struct Ctl {
    cfg: SoakConfig,
    shared: Arc<Shared>,
    spawner: Spawner,
    sidecar: tokio::sync::Mutex<Option<SidecarProc>>,
    pid: AtomicU32,
    log: Arc<Mutex<LogSummary>>,
    work: PathBuf,
    config_file: PathBuf,
    disk: PathBuf,
    tenants_all: Vec<Tenant>,
    modern: AtomicBool,
    fs: Option<LoopFs>,
    faults: Mutex<Faults>,
    peak_hwm: AtomicU64,
    rss_now: AtomicU64,
}

#[derive(Default)]
struct Faults {
    kills: Vec<Value>,
    leases_checked: u64,
    leases_released: u64,
    leases_leaked: u64,
    victim_wrong_bytes: u64,
    victim_not_cleared: u64,
    victim_failures: BTreeMap<String, u64>,
    enospc: Vec<Value>,
    restarts: Vec<Value>,
    restart_pages_expected: u64,
    restart_pages_found: u64,
    restart_failures: Vec<String>,
    enospc_skipped: Option<String>,
}

/// The outcome of a soak.
pub struct SoakReport {
    /// Everything, as JSON (what `--json` writes).
    pub json: Value,
    /// Bytes read that differ from what was written.
    pub wrong_bytes: u64,
    /// Lines of the sidecar's log that say it panicked.
    pub panics: Vec<String>,
    /// Calls per second, all kinds together.
    pub ops_per_s: f64,
    /// Largest peak RSS of the sidecar processes, MiB.
    pub peak_rss_mib: f64,
    /// Acceptance checks that failed (empty: passed).
    pub failures: Vec<String>,
    /// A human-readable summary.
    pub text: String,
}

fn toml_str(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// Writes the sidecar's configuration. `modern` adds settings that sidecars with per-tenant
/// Stats know (an admin token for global Stats, metrics served without a token so the
/// slow-metrics attack has its target); older ones refuse unknown fields, so the soak
/// falls back to a configuration without them.
fn write_config(
    path: &Path,
    cfg: &SoakConfig,
    socket: &Path,
    disk: &Path,
    tenants: &[Tenant],
    modern: bool,
) -> anyhow::Result<()> {
    let mut s = format!(
        "socket = {}\ntcp = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\npage_size = {PAGE}\n\
         block_bytes = {BLOCK}\nhost_capacity = {}\ndisk_path = {}\ndisk_capacity = {}\n\
         write_policy = \"write-through\"\nmax_lease = \"30s\"\n",
        toml_str(socket),
        cfg.host_capacity,
        toml_str(disk),
        cfg.disk_capacity
    );
    if modern {
        s += &format!(
            "metrics_public = true\nadmin_tokens = [\"{}\"]\n",
            admin_token(cfg.seed)
        );
    }
    for t in tenants {
        s += &format!(
            "\n[[tenants]]\nname = \"{}\"\ntokens = [\"{}\"]\nshm = {}\n",
            t.name, t.token, t.shm
        );
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

fn admin_token(seed: u64) -> String {
    format!("soak-admin-token-{seed:016x}")
}

/// Runs a soak (on its own tokio runtime: call it from a plain thread).
pub fn run(cfg: SoakConfig) -> anyhow::Result<SoakReport> {
    anyhow::ensure!(cfg.connections > 0, "--connections must be positive");
    anyhow::ensure!(cfg.tenants > 0, "--tenants must be positive");
    anyhow::ensure!(cfg.prompts > 0, "--prompts must be positive");
    anyhow::ensure!(
        cfg.sidecar_bin.exists(),
        "{} does not exist (build it: cargo build --release -p strata-server)",
        cfg.sidecar_bin.display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    rt.block_on(run_async(cfg))
}

async fn run_async(cfg: SoakConfig) -> anyhow::Result<SoakReport> {
    static N: AtomicU32 = AtomicU32::new(0);
    let (work, temp) = match &cfg.work_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!(
                "strata-soak-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            )),
            true,
        ),
    };
    let _ = std::fs::remove_dir_all(work.join("mnt"));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    let tenants: Vec<Tenant> = (0..cfg.tenants)
        .map(|i| Tenant {
            index: i as u32,
            name: format!("t{i}"),
            token: format!("soak-token-t{i}-{:016x}", cfg.seed),
            shm: i % 2 == 0,
        })
        .collect();
    let victim = Tenant {
        index: cfg.tenants as u32,
        name: "victim".into(),
        token: format!("soak-token-victim-{:016x}", cfg.seed),
        shm: true,
    };

    // The disk tier on its own small file system, so that it can be filled.
    let mut enospc_skipped = None;
    let fs = if cfg.faults {
        let bytes = cfg.disk_capacity + cfg.disk_capacity / 4 + (64 << 20);
        match LoopFs::new(&work, bytes) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("soak: no loop file system ({e:#}); the ENOSPC fault is skipped");
                enospc_skipped = Some(format!("{e:#}"));
                None
            }
        }
    } else {
        enospc_skipped = Some("--no-faults".into());
        None
    };
    let disk_dir = fs.as_ref().map_or_else(|| work.clone(), |f| f.mnt.clone());
    let disk = disk_dir.join("g3.data");
    let _ = std::fs::remove_file(&disk);
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(cfg.disk_capacity))
        .with_context(|| format!("creating {}", disk.display()))?;
    let config_file = work.join("sidecar.toml");
    let mut all = tenants.clone();
    all.push(victim.clone());
    write_config(
        &config_file,
        &cfg,
        &work.join("sidecar.sock"),
        &disk,
        &all,
        true,
    )?;

    let shared = Arc::new(Shared {
        seed: cfg.seed,
        zipf: Zipf::new(cfg.prompts, 0.9),
        tenants,
        victim,
        addrs: RwLock::new((Addrs::default(), 0)),
        up: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        tally: Mutex::new(Tally::default()),
        attacks: Mutex::new(BTreeMap::new()),
    });
    let ctl = Arc::new(Ctl {
        cfg: cfg.clone(),
        shared: shared.clone(),
        spawner: Spawner::new(),
        sidecar: tokio::sync::Mutex::new(None),
        pid: AtomicU32::new(0),
        log: Arc::new(Mutex::new(LogSummary::default())),
        work: work.clone(),
        config_file,
        disk,
        tenants_all: all,
        modern: AtomicBool::new(true),
        fs,
        faults: Mutex::new(Faults {
            enospc_skipped,
            ..Faults::default()
        }),
        peak_hwm: AtomicU64::new(0),
        rss_now: AtomicU64::new(0),
    });
    let result = drive(&ctl).await;
    // Whatever happened: the sidecar stops before its file system goes away.
    let clean_exit = {
        let mut g = ctl.sidecar.lock().await;
        let clean = g
            .as_mut()
            .map(|s| tokio::task::block_in_place(|| s.terminate(Duration::from_secs(30))));
        *g = None;
        clean
    };
    let report =
        result.map(|(elapsed, final_stats)| report(&ctl, elapsed, final_stats, clean_exit));
    // The last reference unmounts and detaches the loop device (else that happens when
    // the runtime drops the tasks that still hold one).
    let unmounted = Arc::try_unwrap(ctl).map(drop).is_ok();
    let logs = work.display().to_string();
    let report = report?;
    if temp && unmounted && report.failures.is_empty() {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        eprintln!("soak: sidecar logs are in {logs}");
    }
    Ok(report)
}

async fn start_sidecar(ctl: &Arc<Ctl>) -> anyhow::Result<()> {
    let mut last = None;
    for attempt in 0..3 {
        let generation = ctl.shared.addrs.read().1 + 1;
        let c = ctl.clone();
        let log_file = ctl.work.join(format!("sidecar-{generation}.log"));
        let r = tokio::task::spawn_blocking(move || {
            SidecarProc::start(
                &c.spawner,
                &c.cfg.sidecar_bin,
                &c.config_file,
                &log_file,
                c.log.clone(),
                Duration::from_secs(120),
            )
        })
        .await?;
        match r {
            Ok(p) => {
                ctl.pid.store(p.pid(), Ordering::Release);
                *ctl.shared.addrs.write() = (p.addrs.clone(), generation);
                *ctl.sidecar.lock().await = Some(p);
                ctl.shared.up.store(true, Ordering::Release);
                return Ok(());
            }
            Err(e) => {
                let said =
                    std::fs::read_to_string(ctl.work.join(format!("sidecar-{generation}.log")))
                        .unwrap_or_default();
                if said.contains("unknown field") && ctl.modern.swap(false, Ordering::AcqRel) {
                    eprintln!(
                        "soak: this sidecar has no admin tokens; global Stats come from a tenant's Stats"
                    );
                    write_config(
                        &ctl.config_file,
                        &ctl.cfg,
                        &ctl.work.join("sidecar.sock"),
                        &ctl.disk,
                        &ctl.tenants_all,
                        false,
                    )?;
                    continue;
                }
                eprintln!(
                    "soak: starting the sidecar (attempt {}): {e:#}",
                    attempt + 1
                );
                last = Some(e);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("the sidecar did not start")))
}

/// The whole run, up to the final checks; returns the clients' run time and the final
/// Stats.
async fn drive(ctl: &Arc<Ctl>) -> anyhow::Result<(Duration, Option<pb::StatsResponse>)> {
    let cfg = &ctl.cfg;
    let shared = ctl.shared.clone();
    start_sidecar(ctl).await?;

    // Peak RSS, every 100 ms.
    let sampler = {
        let c = ctl.clone();
        std::thread::spawn(move || {
            // Through the final checks too: the pid is zeroed after them.
            while !c.shared.stopping() || c.pid.load(Ordering::Acquire) != 0 {
                let pid = c.pid.load(Ordering::Acquire);
                if pid != 0
                    && let Some((rss, hwm)) = proc::rss(pid)
                {
                    c.peak_hwm.fetch_max(hwm, Ordering::Relaxed);
                    c.rss_now.store(rss, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let start = Instant::now();
    let deadline = start + cfg.duration;
    let mut workers = Vec::new();
    for i in 0..cfg.connections {
        let tenant = shared.tenants[i % shared.tenants.len()].clone();
        let w = workload::Worker {
            tenant,
            tcp: (i / shared.tenants.len()) % 2 == 1,
            shm: i / shared.tenants.len() < SHM_SESSIONS_PER_TENANT,
            seed: cfg.seed ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93),
        };
        workers.push(tokio::spawn(w.run(shared.clone())));
    }
    let mut tasks = Vec::new();
    if cfg.faults {
        tasks.push(tokio::spawn(kill_clients(ctl.clone(), deadline)));
        tasks.push(tokio::spawn(restarts(ctl.clone(), start, deadline)));
        if ctl.fs.is_some() {
            tasks.push(tokio::spawn(enospc(ctl.clone(), start, deadline)));
        }
        tasks.push(tokio::spawn(attack_loop(ctl.clone(), deadline)));
    }
    // Ctrl-C ends the run early, cleanly (the loop device is unmounted).
    {
        let shared = shared.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("soak: interrupted; stopping");
                shared.stop.store(true, Ordering::Release);
            }
        });
    }
    // Progress until the deadline.
    let mut next = start + cfg.progress_every;
    while Instant::now() < deadline && !shared.stopping() {
        let wake = next
            .min(deadline)
            .min(Instant::now() + Duration::from_millis(500));
        tokio::time::sleep_until(wake.into()).await;
        if Instant::now() >= next {
            eprintln!("{}", progress(ctl, start.elapsed()));
            next += cfg.progress_every;
        }
    }
    let elapsed = start.elapsed();
    shared.stop.store(true, Ordering::Release);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(120), w).await;
    }
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(180), t).await;
    }
    // Everything released once every client is gone?
    let admin = ctl
        .modern
        .load(Ordering::Acquire)
        .then(|| admin_token(cfg.seed));
    let final_stats = final_check(&shared, admin).await;
    ctl.pid.store(0, Ordering::Release);
    let _ = sampler.join();
    Ok((elapsed, final_stats))
}

async fn final_check(shared: &Shared, admin: Option<String>) -> Option<pb::StatsResponse> {
    if !shared.is_up() {
        return None;
    }
    let mut c = match admin {
        Some(token) => strata_server::Client::connect_unix(&shared.addrs().0.socket)
            .await
            .ok()?
            .with_token(token),
        // Sidecars without admin tokens answer every tenant with global figures.
        None => {
            workload::connect(shared, &shared.tenants[0], false)
                .await
                .ok()?
                .0
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = c.stats().await.ok();
        let done = s
            .as_ref()
            .is_some_and(|s| s.client_leases == 0 && s.leases == 0 && s.get_streams == 0);
        if done || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn progress(ctl: &Ctl, elapsed: Duration) -> String {
    let ops = ctl.shared.ops_total();
    let t = ctl.shared.tally.lock();
    let errors: u64 = t.errors.values().sum();
    let restart_errors: u64 = t.restart_errors.values().sum();
    let f = ctl.faults.lock();
    let attacks: u64 = ctl
        .shared
        .attacks
        .lock()
        .values()
        .flat_map(|m| m.values())
        .sum();
    format!(
        "soak {:>5}s/{}s: {ops} calls ({:.0}/s), {} blocks checked, wrong bytes {}, errors {errors} (+{restart_errors} around restarts), rss {} MiB (peak {}), clients killed {}, ENOSPC episodes {}, restarts {}, attacks {attacks}",
        elapsed.as_secs(),
        ctl.cfg.duration.as_secs(),
        ops as f64 / elapsed.as_secs_f64().max(1e-9),
        t.blocks_checked,
        t.wrong_bytes,
        ctl.rss_now.load(Ordering::Relaxed) >> 20,
        ctl.peak_hwm.load(Ordering::Relaxed) >> 20,
        f.kills.len(),
        f.enospc.len(),
        f.restarts.len(),
    )
}

async fn sleep_until_or_stop(shared: &Shared, at: Instant) -> bool {
    while Instant::now() < at {
        if shared.stopping() {
            return false;
        }
        let step = at
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(200));
        tokio::time::sleep(step).await;
    }
    !shared.stopping()
}

/// Client processes killed with SIGKILL while holding leases, one after the other.
async fn kill_clients(ctl: Arc<Ctl>, deadline: Instant) {
    let every = (ctl.cfg.duration / 30).clamp(Duration::from_secs(8), Duration::from_secs(30));
    let mut rng = data::Rng::new(ctl.cfg.seed ^ 0x4B1);
    let mut n = 0u64;
    let mut next = Instant::now() + Duration::from_secs(3);
    while sleep_until_or_stop(&ctl.shared, next).await
        && Instant::now() + Duration::from_secs(8) < deadline
    {
        next += every;
        if !ctl.shared.is_up() {
            continue;
        }
        let r = victim_cycle(&ctl, n, &mut rng).await;
        n += 1;
        match r {
            Ok(v) => ctl.faults.lock().kills.push(v),
            Err(e) => {
                let msg: String = format!("{e:#}").chars().take(120).collect();
                *ctl.faults.lock().victim_failures.entry(msg).or_default() += 1;
            }
        }
    }
}

async fn victim_cycle(ctl: &Arc<Ctl>, n: u64, rng: &mut data::Rng) -> anyhow::Result<Value> {
    let shared = &ctl.shared;
    let (addrs, generation) = shared.addrs();
    let args = victim::VictimArgs {
        socket: addrs.socket.display().to_string(),
        shm: addrs.shm.display().to_string(),
        tcp_addr: addrs.tcp.clone(),
        tcp: n % 2 == 1,
        token: shared.victim.token.clone(),
        tenant: shared.victim.index,
        seed: shared.seed,
        first_prompt: (n * 6) % ctl.cfg.prompts as u64,
    };
    let (bin, pre) = &ctl.cfg.client_cmd;
    let mut cmd = Command::new(bin);
    cmd.args(pre)
        .arg(serde_json::to_string(&args)?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ctl
        .spawner
        .spawn(cmd)
        .context("starting a client process")?;
    let stdout = child.stdout.take().context("client stdout")?;
    let stderr = child.stderr.take().context("client stderr")?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(l);
        }
    });
    let err_tail = Arc::new(Mutex::new(String::new()));
    {
        let err_tail = err_tail.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let mut t = err_tail.lock();
                t.clear();
                t.push_str(&l);
            }
        });
    }
    let holding = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(l) = rx.recv().await {
            if let Some(ids) = l.strip_prefix("HOLDING ") {
                return Some(ids.to_string());
            }
        }
        None
    })
    .await;
    let ids = match holding {
        Ok(Some(ids)) => ids,
        other => {
            let _ = child.kill();
            let _ = child.wait();
            let why = if other.is_err() {
                "no HOLDING in 60 s"
            } else {
                "exited"
            };
            anyhow::bail!("client process {why}: {}", err_tail.lock());
        }
    };
    let leases: Vec<u64> = ids.split(',').filter_map(|s| s.parse().ok()).collect();
    tokio::time::sleep(Duration::from_millis(200 + rng.below(1800))).await;
    let _ = child.kill(); // SIGKILL
    let _ = tokio::task::block_in_place(|| child.wait());
    let mut wrong = 0;
    while let Ok(l) = rx.try_recv() {
        if let Some(w) = l.strip_prefix("WRONG ") {
            wrong += w.parse::<u64>().unwrap_or(1);
        }
    }
    // Its connections are closed by the kernel; the sidecar must end what it held well
    // before the leases would expire (30 s). Sidecars with per-tenant Stats show the
    // victims' tenant's leases, streams and sessions going back to 0; older ones answer
    // with global figures, so there the check is only the Release below, after 5 s.
    let mut cleared = Value::Null;
    if ctl.modern.load(Ordering::Acquire) {
        let t0 = Instant::now();
        let (mut c, _, _) = retrying("connecting to check the tenant's Stats", || {
            workload::connect(shared, &shared.victim, false)
        })
        .await?;
        let mut last = None;
        cleared = loop {
            if let Ok(s) = c.stats().await {
                if s.client_leases == 0 && s.get_streams == 0 && s.shm_sessions == 0 {
                    break json!(t0.elapsed().as_millis() as u64);
                }
                last = Some(s);
            }
            if t0.elapsed() > Duration::from_secs(10) {
                // Only an answer that still shows what the victim held is a failure; no
                // answer at all leaves the check to the Release below.
                if last.is_some() {
                    ctl.faults.lock().victim_not_cleared += 1;
                }
                break json!(format!("not within 10 s: {last:?}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
    } else {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    if shared.addrs().1 != generation || !shared.is_up() {
        ctl.faults.lock().victim_wrong_bytes += wrong;
        return Ok(json!({"leases": leases.len(), "check": "skipped: sidecar restarted"}));
    }
    let (c, _, _) = retrying("connecting to check leases", || {
        workload::connect(shared, &shared.victim, false)
    })
    .await?;
    let (mut released, mut leaked) = (0, 0);
    for id in &leases {
        let r = retrying("Release while checking leases", || {
            let mut c = c.clone();
            let id = *id;
            async move {
                match c.release(&[id]).await {
                    Ok(n) => Ok(n > 0),
                    Err(e) if e.code() == Some(tonic::Code::NotFound) => Ok(false),
                    Err(e) => Err(e),
                }
            }
        })
        .await?;
        if r {
            leaked += 1;
        } else {
            released += 1;
        }
    }
    let mut f = ctl.faults.lock();
    f.leases_checked += leases.len() as u64;
    f.leases_released += released;
    f.leases_leaked += leaked;
    f.victim_wrong_bytes += wrong;
    Ok(json!({
        "leases": leases.len(),
        "tenant_stats_clear_ms": cleared,
        "released_by_server": released,
        "still_held": leaked,
        "wrong_bytes": wrong,
    }))
}

/// ENOSPC episodes: fill the disk tier's file system, hold, free it.
async fn enospc(ctl: Arc<Ctl>, start: Instant, deadline: Instant) {
    let d = ctl.cfg.duration;
    let n = (d.as_secs() / 360).max(1) as u32;
    let hold = (d / 20).clamp(Duration::from_secs(8), Duration::from_secs(60));
    for i in 0..n {
        let at = start + d.mul_f64((f64::from(i) + 0.3) / f64::from(n));
        if !sleep_until_or_stop(&ctl.shared, at).await || at + hold > deadline {
            return;
        }
        let Some(fs) = ctl.fs.as_ref() else { return };
        let free_before = fs.free_bytes();
        let filler = fs.mnt.join("filler");
        let before = ctl.log.lock().count("ENOSPC");
        let f2 = filler.clone();
        let t0 = Instant::now();
        let filled = tokio::task::spawn_blocking(move || proc::fill(&f2, free_before)).await;
        let filled = match filled {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                let _ = std::fs::remove_file(&filler);
                ctl.faults
                    .lock()
                    .enospc
                    .push(json!({"error": format!("{e:#}")}));
                continue;
            }
            Err(_) => continue,
        };
        let free_full = fs.free_bytes();
        let fill_s = t0.elapsed().as_secs_f64();
        sleep_until_or_stop(&ctl.shared, Instant::now() + hold).await;
        let during = ctl.log.lock().count("ENOSPC").saturating_sub(before);
        let _ = std::fs::remove_file(&filler);
        let free_after = fs.free_bytes();
        ctl.faults.lock().enospc.push(json!({
            "free_before_mib": free_before >> 20,
            "filled_mib": filled >> 20,
            "free_while_full_kib": free_full >> 10,
            "fill_s": fill_s,
            "held_s": hold.as_secs(),
            "enospc_warnings_logged": during,
            "free_after_mib": free_after >> 20,
        }));
    }
}

/// Sidecar restarts: note what a lookup shows on disk, SIGKILL, restart on the same disk,
/// find it again.
async fn restarts(ctl: Arc<Ctl>, start: Instant, deadline: Instant) {
    let d = ctl.cfg.duration;
    let n = (d.as_secs() / 300).max(1) as u32;
    for i in 0..n {
        let at = start + d.mul_f64((f64::from(i) + 0.5) / f64::from(n));
        if !sleep_until_or_stop(&ctl.shared, at).await || at + Duration::from_secs(5) > deadline {
            return;
        }
        let r = restart_once(&ctl).await;
        let mut f = ctl.faults.lock();
        match r {
            Ok(v) => f.restarts.push(v),
            Err(e) => {
                f.restart_failures.push(format!("{e:#}"));
                if !ctl.shared.is_up() {
                    // Without a sidecar the soak cannot go on.
                    ctl.shared.stop.store(true, Ordering::Release);
                    return;
                }
            }
        }
    }
}

/// Whether a check's failed call should be tried again: refused for load (a quota or cap
/// the legitimate clients hold at that moment) or its connection dropped.
fn transient(e: &ClientError) -> bool {
    matches!(e, ClientError::Transport(_))
        || matches!(
            e.code(),
            Some(tonic::Code::ResourceExhausted | tonic::Code::Unavailable | tonic::Code::Unknown)
        )
}

/// Runs a check's call, trying again for up to 60 s while it fails transiently.
async fn retrying<T, Fut>(what: &str, mut call: impl FnMut() -> Fut) -> anyhow::Result<T>
where
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if transient(&e) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => anyhow::bail!("{what}: {e}"),
        }
    }
}

fn disk_pages(r: &pb::LookupResponse) -> u64 {
    r.tiers
        .iter()
        .find(|t| t.tier == pb::Tier::Disk as i32)
        .map_or(0, |t| t.pages)
}

/// The longest prefix of `tokens` whose every page the disk tier holds, in pages.
async fn disk_prefix(
    c: &mut strata_server::Client,
    ns: &str,
    tokens: &[u32],
) -> Result<usize, ClientError> {
    let r = c.lookup(ns, tokens).await?;
    let m = r.matched_pages as usize;
    if disk_pages(&r) as usize == m {
        return Ok(m);
    }
    for j in (1..m).rev() {
        let r = c.lookup(ns, &tokens[..j * PAGE]).await?;
        if disk_pages(&r) as usize == j && r.matched_pages as usize == j {
            return Ok(j);
        }
    }
    Ok(0)
}

async fn restart_once(ctl: &Arc<Ctl>) -> anyhow::Result<Value> {
    let shared = &ctl.shared;
    let mut rng = data::Rng::new(shared.seed ^ ctl.shared.addrs().1);
    // What is on disk now (popular prompts of every tenant).
    let mut expect = Vec::new();
    for t in &shared.tenants {
        let Ok((mut c, ns, _)) = workload::connect(shared, t, false).await else {
            continue;
        };
        let mut seen = std::collections::HashSet::new();
        for _ in 0..24 {
            let p = shared.zipf.sample(&mut rng) as u64;
            if !seen.insert(p) {
                continue;
            }
            let tokens = data::prompt_tokens(shared.seed, p);
            if let Ok(j) = disk_prefix(&mut c, &ns, &tokens).await
                && j > 0
            {
                expect.push((t.clone(), p, j));
            }
        }
    }
    let (recovered_before, opens_before) = {
        let l = ctl.log.lock();
        (l.recovered, l.opens)
    };
    shared.up.store(false, Ordering::Release);
    let t0 = Instant::now();
    {
        let mut g = ctl.sidecar.lock().await;
        if let Some(s) = g.as_mut() {
            tokio::task::block_in_place(|| s.kill9());
        }
        ctl.pid.store(0, Ordering::Release);
        *g = None;
    }
    start_sidecar(ctl).await?;
    let downtime = t0.elapsed();
    // The new process's "disk tier open" line comes before its ready line, but its log
    // is read by another thread: give it a moment.
    for _ in 0..50 {
        if ctl.log.lock().opens > opens_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered = ctl.log.lock().recovered;
    // Everything noted must be found, with its bytes.
    let (mut pages, mut found, mut wrong) = (0u64, 0u64, 0u64);
    let mut missing = Vec::new();
    for (t, p, j) in &expect {
        let (c, ns, _) = retrying("connecting after the restart", || {
            workload::connect(shared, t, false)
        })
        .await?;
        let mut tokens = data::prompt_tokens(shared.seed, *p);
        tokens.truncate(j * PAGE);
        let tokens = &tokens;
        pages += *j as u64;
        let r = retrying("lookup after the restart", || {
            let (mut c, ns) = (c.clone(), ns.clone());
            async move { c.lookup(&ns, tokens).await }
        })
        .await?;
        let got = retrying("get after the restart", || {
            let (mut c, ns) = (c.clone(), ns.clone());
            async move { c.get(&ns, tokens).await }
        })
        .await?;
        let keys = data::page_keys(t.index, tokens);
        for (b, k) in got.iter().zip(&keys) {
            wrong += shared.verify(b, k, t.index, "restart_check");
        }
        let n = (got.len() as u64).min(*j as u64);
        found += n;
        if n < *j as u64 && missing.len() < 10 {
            missing.push(format!(
                "tenant {} prompt {p}: {j} pages on disk before, lookup matched {} after, Get returned {}",
                t.name,
                r.matched_pages,
                got.len()
            ));
        }
    }
    let mut f = ctl.faults.lock();
    f.restart_pages_expected += pages;
    f.restart_pages_found += found;
    Ok(json!({
        "downtime_s": downtime.as_secs_f64(),
        "prompts_checked": expect.len(),
        "pages_on_disk_before": pages,
        "pages_found_after": found,
        "wrong_bytes": wrong,
        "missing": missing,
        "recovered_blocks_logged": recovered,
        "recovered_before": recovered_before,
    }))
}

/// One attack every few seconds, the kinds in turn, each in its own task.
async fn attack_loop(ctl: Arc<Ctl>, deadline: Instant) {
    let every = if ctl.cfg.duration <= Duration::from_secs(300) {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(6)
    };
    let mut running = Vec::new();
    let mut i = 0usize;
    let mut next = Instant::now() + Duration::from_secs(2);
    while sleep_until_or_stop(&ctl.shared, next).await
        && Instant::now() + Duration::from_secs(5) < deadline
    {
        next += every;
        if !ctl.shared.is_up() {
            continue;
        }
        let kind = attacks::KINDS[i % attacks::KINDS.len()];
        i += 1;
        let c = ctl.clone();
        running.push(tokio::spawn(async move {
            let generation = c.shared.addrs().1;
            let outcome = attacks::run(&c.shared, kind).await;
            let outcome = if c.shared.addrs().1 != generation {
                format!("{outcome} [sidecar restarted meanwhile]")
            } else {
                outcome
            };
            *c.shared
                .attacks
                .lock()
                .entry(kind.to_string())
                .or_default()
                .entry(outcome)
                .or_default() += 1;
        }));
        running.retain(|t| !t.is_finished());
    }
    for t in running {
        let _ = tokio::time::timeout(Duration::from_secs(90), t).await;
    }
}

fn report(
    ctl: &Ctl,
    elapsed: Duration,
    final_stats: Option<pb::StatsResponse>,
    clean_exit: Option<bool>,
) -> SoakReport {
    let cfg = &ctl.cfg;
    let t = ctl.shared.tally.lock();
    let f = ctl.faults.lock();
    let log = ctl.log.lock();
    let secs = elapsed.as_secs_f64().max(1e-9);
    let total: u64 = t.ops.values().map(Hist::count).sum();
    let ops_per_s = total as f64 / secs;
    let mut ops = serde_json::Map::new();
    let mut text = String::new();
    text += &format!(
        "soak: {:.0} s, {} connections, {} tenants, {} prompts, seed {}, faults {}\n",
        secs,
        cfg.connections,
        cfg.tenants,
        cfg.prompts,
        cfg.seed,
        if cfg.faults { "on" } else { "off" }
    );
    text += &format!(
        "{:<16} {:>10} {:>9} {:>9} {:>9} {:>9}\n",
        "call", "count", "per s", "p50 us", "p99 us", "p999 us"
    );
    for (k, h) in &t.ops {
        let (p50, p99, p999) = (h.quantile(0.5), h.quantile(0.99), h.quantile(0.999));
        text += &format!(
            "{k:<16} {:>10} {:>9.1} {p50:>9} {p99:>9} {p999:>9}\n",
            h.count(),
            h.count() as f64 / secs
        );
        ops.insert(
            k.to_string(),
            json!({"count": h.count(), "per_s": h.count() as f64 / secs, "p50_us": p50, "p99_us": p99, "p999_us": p999, "max_us": h.quantile(1.0)}),
        );
    }
    let peak = ctl.peak_hwm.load(Ordering::Relaxed);
    let shm_sessions = ctl.shared.tenants.iter().filter(|t| t.shm).count() as u64
        * SHM_SESSIONS_PER_TENANT as u64
        + 2;
    let rss_bound = cfg.host_capacity + shm_sessions * 64 * BLOCK as u64 + (256 << 20);
    let peak_rss_mib = peak as f64 / (1 << 20) as f64;

    let mut failures = Vec::new();
    let wrong_bytes = t.wrong_bytes + f.victim_wrong_bytes;
    if wrong_bytes > 0 {
        failures.push(format!("{wrong_bytes} wrong bytes read"));
    }
    if !log.panics.is_empty() {
        failures.push(format!("the sidecar panicked: {}", log.panics[0]));
    }
    if f.leases_leaked > 0 {
        failures.push(format!(
            "{} leases of killed clients were still held 5 s after the kill",
            f.leases_leaked
        ));
    }
    if f.victim_not_cleared > 0 {
        failures.push(format!(
            "{} killed clients' tenant still had leases, Get streams or shared-memory sessions 10 s after the kill",
            f.victim_not_cleared
        ));
    }
    if f.restart_pages_found < f.restart_pages_expected {
        failures.push(format!(
            "restarts found {} of {} pages that were on disk",
            f.restart_pages_found, f.restart_pages_expected
        ));
    }
    if !f.restart_failures.is_empty() {
        failures.push(format!("restart failed: {}", f.restart_failures[0]));
    }
    if peak > rss_bound {
        failures.push(format!(
            "peak RSS {} MiB is over the bound of {} MiB",
            peak >> 20,
            rss_bound >> 20
        ));
    }
    match &final_stats {
        Some(s) if s.client_leases == 0 && s.leases == 0 && s.get_streams == 0 => {}
        Some(s) => failures.push(format!(
            "after every client stopped: {} client leases, {} leases, {} Get streams still open",
            s.client_leases, s.leases, s.get_streams
        )),
        None => failures.push("no final Stats (sidecar not reachable)".into()),
    }
    if !t.protocol.is_empty() {
        failures.push(format!(
            "answers that break the API: {:?}",
            t.protocol.keys().take(3).collect::<Vec<_>>()
        ));
    }
    if total == 0 {
        failures.push("no call succeeded".into());
    }
    if clean_exit == Some(false) {
        failures.push("SIGTERM did not end the sidecar cleanly within 30 s".into());
    }
    if cfg.faults && f.kills.is_empty() {
        failures.push("no client was killed".into());
    }
    if cfg.faults && f.restarts.is_empty() && f.restart_failures.is_empty() {
        failures.push("the sidecar was never restarted".into());
    }
    if cfg.faults && f.leases_checked == 0 {
        failures.push(format!(
            "no killed client's leases were checked (client failures: {:?})",
            f.victim_failures.keys().take(2).collect::<Vec<_>>()
        ));
    }

    let errors: u64 = t.errors.values().sum();
    let restart_errors: u64 = t.restart_errors.values().sum();
    text += &format!(
        "blocks checked {}, wrong bytes {wrong_bytes} ({} blocks), puts {}\n",
        t.blocks_checked, t.wrong_blocks, t.puts
    );
    text += &format!(
        "errors {errors}: {:?}\nerrors caused by restarts {restart_errors}: {:?}\n",
        t.errors, t.restart_errors
    );
    for (k, v) in &t.examples {
        text += &format!("  e.g. {k}: {v}\n");
    }
    text += &format!(
        "peak RSS {peak_rss_mib:.1} MiB (bound {} MiB = host {} MiB + {} shm sessions x 64 staging slots + 256 MiB)\n",
        rss_bound >> 20,
        cfg.host_capacity >> 20,
        shm_sessions
    );
    text += &format!(
        "clients killed {}: leases checked {}, released by the sidecar {}, still held {}; tenant not clear 10 s after a kill {}; client failures {:?}\n",
        f.kills.len(),
        f.leases_checked,
        f.leases_released,
        f.leases_leaked,
        f.victim_not_cleared,
        f.victim_failures
    );
    text += &format!(
        "ENOSPC episodes {}: {}{}\n",
        f.enospc.len(),
        serde_json::to_string(&f.enospc).unwrap_or_default(),
        f.enospc_skipped
            .as_ref()
            .map(|s| format!(" (skipped: {s})"))
            .unwrap_or_default()
    );
    text += &format!(
        "restarts {}: pages on disk before {}, found after {}; {}\n",
        f.restarts.len(),
        f.restart_pages_expected,
        f.restart_pages_found,
        serde_json::to_string(&f.restarts).unwrap_or_default()
    );
    let attacks = ctl.shared.attacks.lock().clone();
    text += "attacks:\n";
    for (k, m) in &attacks {
        text += &format!("  {k}: {m:?}\n");
    }
    text += &format!(
        "sidecar log: {} lines, {} panics; warnings/errors: {:?}\n",
        log.lines,
        log.panics.len(),
        log.messages
    );
    if let Some(s) = &final_stats {
        text += &format!(
            "final Stats: pages {}, leases {}, client leases {}, Get streams {}, shm sessions {}, connections {}\n",
            s.pages, s.leases, s.client_leases, s.get_streams, s.shm_sessions, s.connections
        );
    }
    text += &format!(
        "shutdown with SIGTERM: {}\n",
        match clean_exit {
            Some(true) => "clean",
            Some(false) => "NOT clean",
            None => "no sidecar",
        }
    );
    if !t.notes.is_empty() {
        text += &format!("notes: {:?}\n", t.notes);
    }
    if !t.mismatches.is_empty() {
        text += &format!("mismatches: {:#?}\n", t.mismatches);
    }
    text += &if failures.is_empty() {
        "PASSED\n".to_string()
    } else {
        format!("FAILED: {failures:#?}\n")
    };

    let json = json!({
        "duration_s": secs,
        "connections": cfg.connections,
        "tenants": cfg.tenants,
        "prompts": cfg.prompts,
        "seed": cfg.seed,
        "faults": cfg.faults,
        "host_capacity": cfg.host_capacity,
        "disk_capacity": cfg.disk_capacity,
        "ops_per_s": ops_per_s,
        "ops": ops,
        "blocks_checked": t.blocks_checked,
        "wrong_bytes": wrong_bytes,
        "wrong_blocks": t.wrong_blocks,
        "mismatches": t.mismatches,
        "protocol_violations": t.protocol,
        "errors": t.errors,
        "error_examples": t.examples,
        "errors_around_restarts": t.restart_errors,
        "notes": t.notes,
        "peak_rss_mib": peak_rss_mib,
        "rss_bound_mib": rss_bound >> 20,
        "client_kills": f.kills,
        "killed_client_leases": {"checked": f.leases_checked, "released_by_server": f.leases_released, "still_held": f.leases_leaked, "tenant_not_clear_after_10s": f.victim_not_cleared},
        "killable_client_failures": f.victim_failures,
        "enospc": f.enospc,
        "enospc_skipped": f.enospc_skipped,
        "restarts": f.restarts,
        "restart_failures": f.restart_failures,
        "restart_pages": {"on_disk_before": f.restart_pages_expected, "found_after": f.restart_pages_found},
        "attacks": attacks,
        "sidecar_log": {"lines": log.lines, "panics": log.panics, "warnings_and_errors": log.messages},
        "final_stats": final_stats.as_ref().map(|s| json!({"pages": s.pages, "leases": s.leases, "client_leases": s.client_leases, "get_streams": s.get_streams, "shm_sessions": s.shm_sessions, "connections": s.connections})),
        "clean_shutdown": clean_exit,
        "failures": failures,
    });
    SoakReport {
        json,
        wrong_bytes,
        panics: log.panics.clone(),
        ops_per_s,
        peak_rss_mib,
        failures,
        text,
    }
}
