//! `strata-bench serve-study`: Strata's `strata-engine serve` against llama.cpp's
//! `llama-server`, both started here on the same GGUF file and thread count.
//!
//! The servers run one at a time (start, measure, stop; then the other), so that neither
//! takes CPU from the other. Against each, three studies:
//!
//! 1. **multi-turn** — concurrent conversations that share one long system prompt, each
//!    turn adding a short user message: TTFT per round and its distribution.
//! 2. **decode** — short prompts, long outputs, one request in flight and then eight:
//!    output tokens/s, and how batching scales it (the figure is Strata's; llama-server's
//!    is kept for the record).
//! 3. **rate sweep** — shared-prefix prompts at several Poisson rates: completed
//!    requests/s against the offered rate.
//!
//! Every run's result JSON, per-request CSV, report and plots go under `--out/<study>/
//! <server>/`, side-by-side plots under `--out/<study>/`, every figure and the command line
//! into `--out/summary.json`; the figures end stdout as `RESULT` lines.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};
use strata_bench::soak::proc::die_with_parent;

use super::client::Api;
use super::metrics::Summary;
use super::plot::{self, Series};
use super::workload::{MultiTurn, SharedPrefix, Words, Workload};
use super::{LoadArgs, OutputArgs, TargetArgs};

/// `serve-study` flags.
#[derive(Args, Debug)]
pub struct StudyArgs {
    /// The `strata-engine` binary [default: strata-engine next to this binary].
    #[arg(long)]
    pub strata_bin: Option<PathBuf>,
    /// The `llama-server` binary [default: the one bench/scripts/build-llamacpp.sh builds,
    /// built first if it is not there yet].
    #[arg(long)]
    pub llama_server: Option<PathBuf>,
    /// GGUF model both servers load, also the tokenizer of the workloads [default: the
    /// default model, fetched on first use].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// CPU threads of each server (strata-engine `--threads`, llama-server `-t`).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Folder for results, plots, server logs and summary.json.
    #[arg(long, default_value = "bench/results/serve-vs-llamaserver")]
    pub out: PathBuf,
    /// Seed of every text and arrival (the same for both servers).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Smaller sizes, for a smoke test (figures are not comparable).
    #[arg(long)]
    pub quick: bool,
}

/// The two servers, in the order they are measured.
const SERVERS: [&str; 2] = ["strata", "llama-server"];

/// llama-server's context and slots: 4 slots of 4,096 tokens (as
/// `bench/scripts/llama-server-study.sh` runs it).
const LLAMA_CTX: &str = "16384";
const LLAMA_SLOTS: &str = "4";

/// Sizes of the three studies.
struct Plan {
    multi_turn: MultiTurn,
    multi_turn_parallel: usize,
    decode: SharedPrefix,
    /// `--max-parallel` of the two decode runs; the figure is the second over the first.
    decode_parallel: [usize; 2],
    sweep: SharedPrefix,
    rates: Vec<f64>,
    sweep_parallel: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            return Plan {
                multi_turn: MultiTurn {
                    clients: 4,
                    rounds: 2,
                    first_len: 32,
                    new_tokens: 32,
                    output_len: 16,
                    barrier: false,
                    system_len: 256,
                },
                multi_turn_parallel: 16,
                decode: SharedPrefix {
                    groups: 1,
                    prompts_per_group: 8,
                    system_len: 32,
                    question_len: 16,
                    output_len: 32,
                },
                decode_parallel: [1, 8],
                sweep: SharedPrefix {
                    groups: 1,
                    prompts_per_group: 4,
                    system_len: 64,
                    question_len: 16,
                    output_len: 8,
                },
                rates: vec![1.0, 4.0],
                sweep_parallel: 16,
            };
        }
        Plan {
            multi_turn: MultiTurn {
                clients: 16,
                rounds: 4,
                first_len: 64,
                new_tokens: 64,
                output_len: 64,
                barrier: false,
                system_len: 2048,
            },
            multi_turn_parallel: 16,
            decode: SharedPrefix {
                groups: 2,
                prompts_per_group: 8,
                system_len: 64,
                question_len: 32,
                output_len: 128,
            },
            decode_parallel: [1, 8],
            sweep: SharedPrefix {
                groups: 2,
                prompts_per_group: 8,
                system_len: 256,
                question_len: 32,
                output_len: 32,
            },
            rates: vec![0.5, 1.0, 2.0, 4.0],
            sweep_parallel: 16,
        }
    }

    fn describe(&self) -> Value {
        let m = &self.multi_turn;
        json!({
            "multi_turn": {
                "conversations": m.clients, "turns": m.rounds, "system_len": m.system_len,
                "first_len": m.first_len, "new_tokens": m.new_tokens, "output_len": m.output_len,
                "max_parallel": self.multi_turn_parallel, "request_rate": "inf",
            },
            "decode": {
                "workload": format!("{:?}", self.decode), "max_parallel": self.decode_parallel,
                "request_rate": "inf",
            },
            "rate_sweep": {
                "workload": format!("{:?}", self.sweep), "rates": self.rates,
                "max_parallel": self.sweep_parallel,
            },
        })
    }
}

/// A server process, killed and reaped when dropped (also on an error or a panic); it also
/// dies with this process's main thread (`PR_SET_PDEATHSIG`), e.g. on Ctrl-C.
struct Server {
    name: &'static str,
    child: Child,
    base_url: String,
    log: PathBuf,
}

impl Server {
    /// `strata-engine serve` on a free port, once it has printed its ready line.
    fn strata(bin: &Path, model: &Path, threads: usize, log: &Path) -> anyhow::Result<Server> {
        let mut file = log_file(log)?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(["--served-model-name", "strata"])
            .args(["--threads", &threads.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut server = Server {
            name: "strata",
            child,
            base_url: String::new(),
            log: log.to_owned(),
        };
        let stderr = server
            .child
            .stderr
            .take()
            .context("strata-engine's stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Copies stderr into the log for the server's whole life (a full pipe would stall
        // it), and hands the lines over until the ready line.
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(file, "{l}");
                let _ = tx.send(l);
            }
        });
        let wait = Duration::from_secs(180);
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.trim() == "strata: ready" => break,
                Ok(l) => {
                    if let Some(url) = serving_url(&l) {
                        server.base_url = url;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let status = server.child.wait()?;
                    bail!(
                        "strata-engine serve exited ({status}) before it was ready; its log ({}):\n{}",
                        log.display(),
                        tail(log)
                    );
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => bail!(
                    "strata-engine serve was not ready within {wait:?}; its log ({}):\n{}",
                    log.display(),
                    tail(log)
                ),
            }
        }
        if server.base_url.is_empty() {
            bail!(
                "strata-engine serve was ready but never said where it listens; its log ({}):\n{}",
                log.display(),
                tail(log)
            );
        }
        Ok(server)
    }

    /// `llama-server` on a free port, once `GET /health` answers 200 (the model is loaded).
    fn llama(bin: &Path, model: &Path, threads: usize, log: &Path) -> anyhow::Result<Server> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port")?
            .port();
        let file = log_file(log)?;
        let mut cmd = Command::new(bin);
        cmd.arg("-m")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-c", LLAMA_CTX, "-np", LLAMA_SLOTS])
            .args(["-t", &threads.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file));
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut server = Server {
            name: "llama-server",
            child,
            base_url: format!("http://127.0.0.1:{port}"),
            log: log.to_owned(),
        };
        let wait = Duration::from_secs(180);
        let deadline = Instant::now() + wait;
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "llama-server exited ({status}) before it was ready; its log ({}):\n{}",
                    log.display(),
                    tail(log)
                );
            }
            if http_status(port, "/health") == Some(200) {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!(
                    "llama-server did not answer /health with 200 within {wait:?}; its log ({}):\n{}",
                    log.display(),
                    tail(log)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    fn stop(mut self, grace: Duration) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on the pid of our own child, which is not reaped yet (so the
            // pid is still ours), with a valid signal number; no memory is involved.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + grace;
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() > deadline {
                    eprintln!(
                        "serve-study: {} did not stop within {grace:?} of SIGTERM; killing it",
                        self.name
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // Drop kills it if it is still there, and reaps it.
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A fresh (emptied) log file, opened for appending: every handle cloned from it writes at
/// the end, so stdout and stderr interleave.
fn log_file(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// The last lines of a log, for an error message.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// The base URL in strata-engine's `strata: serving model 'NAME' at http://HOST:PORT/v1`.
fn serving_url(line: &str) -> Option<String> {
    let rest = line.trim().strip_prefix("strata: serving model '")?;
    let (_, url) = rest.rsplit_once("' at ")?;
    let base = url.trim().strip_suffix("/v1")?;
    let port = base.strip_prefix("http://")?.rsplit_once(':')?.1;
    port.parse::<u16>().ok().filter(|p| *p != 0)?;
    Some(base.to_owned())
}

/// The status code of `GET path` on the loopback `port`, or `None` if there is no answer.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).ok()?;
    status_code(&String::from_utf8_lossy(&head[..n]))
}

/// The status code of an HTTP/1.x response head.
fn status_code(head: &str) -> Option<u16> {
    let mut parts = head.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/1."))?;
    parts.next()?.parse().ok()
}

/// What one server measured.
struct Measured {
    multi_turn: Summary,
    /// (max-parallel, run), in `Plan::decode_parallel` order.
    decode: Vec<(usize, Summary)>,
    /// (rate, run), in `Plan::rates` order.
    sweep: Vec<(f64, Summary)>,
    wall_s: f64,
    /// Share of the machine's CPU time that other processes (neither this one nor the
    /// server) used while the studies ran: anything above a few % skews the figures.
    others_busy: Option<f64>,
}

/// CPU time in clock ticks since boot: of all CPUs together, busy, and of this process plus
/// one child.
#[derive(Clone, Copy)]
struct CpuTimes {
    total: u64,
    busy: u64,
    ours: u64,
}

impl CpuTimes {
    fn now(child: Option<u32>) -> Option<CpuTimes> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let (total, busy) = machine_ticks(stat.lines().next()?)?;
        let mut ours = process_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
        if let Some(pid) = child {
            ours += process_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
        }
        Some(CpuTimes { total, busy, ours })
    }

    /// Share of all CPU time from `self` to `later` that went to other processes.
    fn others_until(&self, later: &CpuTimes) -> Option<f64> {
        let total = later.total.checked_sub(self.total).filter(|t| *t > 0)?;
        let others = (later.busy.saturating_sub(self.busy))
            .saturating_sub(later.ours.saturating_sub(self.ours));
        Some(others as f64 / total as f64)
    }
}

/// (all, busy) ticks of the `cpu` line of /proc/stat (busy = all but idle and iowait;
/// guest time is already inside user time, so it is left out of the sum).
fn machine_ticks(line: &str) -> Option<(u64, u64)> {
    let mut f = line.split_whitespace();
    if f.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = f.take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    Some((total, total - v[3] - v[4]))
}

/// utime + stime of a /proc/PID/stat line (fields 14 and 15; the command name before them
/// is in parentheses and may hold spaces).
fn process_ticks(stat: &str) -> Option<u64> {
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Share of the machine's CPU time busy over `window` (while no server of ours runs).
fn idle_check(window: Duration) -> Option<f64> {
    let a = CpuTimes::now(None)?;
    std::thread::sleep(window);
    a.others_until(&CpuTimes::now(None)?)
}

/// Warns when other processes took more than this share of the CPUs.
const BUSY_WARNING: f64 = 0.05;

/// The seed of run `k` of a study: far apart, since `seed ^ constant | 1` would make
/// neighbouring seeds collide.
fn seed_of(base: u64, k: u64) -> u64 {
    base.wrapping_add(k.wrapping_mul(1_000_003))
}

struct Study<'a> {
    rt: &'a tokio::runtime::Runtime,
    plan: &'a Plan,
    words: &'a Arc<Words>,
    load: LoadArgs,
    out: &'a Path,
}

impl Study<'_> {
    fn target(&self, server: &Server) -> TargetArgs {
        TargetArgs {
            base_url: server.base_url.clone(),
            model: "default".into(),
            api: Api::Chat,
            allow_eos: false,
            timeout: 600.0,
        }
    }

    /// Runs `w` at each of `rates` (run i with `seed_of(seed, i)`) and writes the results
    /// into `dir`: result JSON, CSV, plots and the tables in report.txt.
    fn runs(
        &self,
        server: &Server,
        dir: &Path,
        w: &Workload,
        max_parallel: usize,
        rates: &[f64],
        seed: u64,
    ) -> anyhow::Result<Vec<(f64, Summary)>> {
        let t = self.target(server);
        let l = LoadArgs {
            max_parallel,
            seed,
            ..self.load.clone()
        };
        super::validate(&t, &l, w)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let o = OutputArgs {
            save_result: Some(dir.join("result.json")),
            csv: Some(dir.join("requests.csv")),
            plots: Some(dir.to_owned()),
            label: server.name.into(),
            quiet: false,
        };
        let mut runs = Vec::new();
        let mut report = String::new();
        for (i, rate) in rates.iter().enumerate() {
            if rates.len() > 1 {
                eprintln!(
                    "serve-study: [{}] {} at {rate} requests/s ({}/{})",
                    server.name,
                    w.name(),
                    i + 1,
                    rates.len()
                );
            }
            let s = self.rt.block_on(super::run_once(
                &t,
                &l,
                &o,
                w,
                self.words,
                *rate,
                seed_of(seed, i as u64),
            ))?;
            if s.failed() > 0 {
                eprintln!(
                    "serve-study: WARNING: [{}] {} of {} requests failed (see {})",
                    server.name,
                    s.failed(),
                    s.records.len(),
                    dir.join("report.txt").display()
                );
            }
            report.push_str(&s.table(&format!("{} {} rate {rate}", server.name, w.name())));
            runs.push((*rate, s));
        }
        std::fs::write(dir.join("report.txt"), report)?;
        super::write_outputs(&t, &l, &o, w, &runs)?;
        Ok(runs)
    }

    /// One short request, so that neither server's first measured request pays for its
    /// start (thread pools, first touch of the weights).
    fn warm_up(&self, server: &Server) -> anyhow::Result<()> {
        let w = Workload::SharedPrefix(SharedPrefix {
            groups: 1,
            prompts_per_group: 1,
            system_len: 16,
            question_len: 16,
            output_len: 4,
        });
        let o = OutputArgs {
            save_result: None,
            csv: None,
            plots: None,
            label: format!("{} warm-up", server.name),
            quiet: true,
        };
        let s = self.rt.block_on(super::run_once(
            &self.target(server),
            &self.load,
            &o,
            &w,
            self.words,
            f64::INFINITY,
            seed_of(self.load.seed, 999),
        ))?;
        if s.completed() != 1 {
            bail!(
                "the warm-up request to {} failed: {}; its log: {}",
                server.name,
                s.records
                    .first()
                    .map_or("no request", |r| r.outcome.error.as_str()),
                server.log.display()
            );
        }
        Ok(())
    }

    fn measure(&self, server: &Server) -> anyhow::Result<Measured> {
        let t0 = Instant::now();
        let p = self.plan;
        let name = server.name;
        self.warm_up(server)?;
        let pid = server.child.id();
        let cpu0 = CpuTimes::now(Some(pid));
        let m = &p.multi_turn;
        eprintln!(
            "serve-study: [{name}] multi-turn: {} conversations x {} turns, {}-token shared system prompt, {} new + {} output tokens per turn",
            m.clients, m.rounds, m.system_len, m.new_tokens, m.output_len
        );
        let multi_turn = self
            .runs(
                server,
                &self.out.join("multi-turn").join(name),
                &Workload::MultiTurn(m.clone()),
                p.multi_turn_parallel,
                &[f64::INFINITY],
                seed_of(self.load.seed, 0),
            )?
            .pop()
            .context("no multi-turn run")?
            .1;
        let mut decode = Vec::new();
        for (k, par) in p.decode_parallel.iter().enumerate() {
            eprintln!(
                "serve-study: [{name}] decode: {} requests of {} output tokens, max-parallel {par}",
                p.decode.groups * p.decode.prompts_per_group,
                p.decode.output_len
            );
            let s = self
                .runs(
                    server,
                    &self
                        .out
                        .join("decode")
                        .join(name)
                        .join(format!("max-parallel-{par}")),
                    &Workload::SharedPrefix(p.decode.clone()),
                    *par,
                    &[f64::INFINITY],
                    seed_of(self.load.seed, 1 + k as u64),
                )?
                .pop()
                .context("no decode run")?
                .1;
            decode.push((*par, s));
        }
        eprintln!(
            "serve-study: [{name}] rate sweep: {} groups x {} prompts, {}-token system prompts, rates {:?}/s",
            p.sweep.groups, p.sweep.prompts_per_group, p.sweep.system_len, p.rates
        );
        let sweep = self.runs(
            server,
            &self.out.join("rate-sweep").join(name),
            &Workload::SharedPrefix(p.sweep.clone()),
            p.sweep_parallel,
            &p.rates,
            seed_of(self.load.seed, 10),
        )?;
        let others_busy = cpu0
            .zip(CpuTimes::now(Some(pid)))
            .and_then(|(a, b)| a.others_until(&b));
        Ok(Measured {
            multi_turn,
            decode,
            sweep,
            wall_s: t0.elapsed().as_secs_f64(),
            others_busy,
        })
    }
}

/// Finds the binaries and the model, or says how to get them.
fn locate(a: &StudyArgs) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let strata = match &a.strata_bin {
        Some(p) => p.clone(),
        None => {
            let exe = std::env::current_exe()?;
            exe.parent()
                .map(|d| d.join("strata-engine"))
                .with_context(|| format!("no folder around {}", exe.display()))?
        }
    };
    if !strata.is_file() {
        bail!(
            "no strata-engine at {}: build it with `cargo build --release -p strata-engine`, or pass --strata-bin",
            strata.display()
        );
    }
    let llama = match &a.llama_server {
        Some(p) => p.clone(),
        None => crate::micro::engine::llama_bench()
            .context(
                "building llama.cpp (bench/scripts/build-llamacpp.sh); or pass --llama-server",
            )?
            .with_file_name("llama-server"),
    };
    if !llama.is_file() {
        bail!(
            "no llama-server at {}: build it with bench/scripts/build-llamacpp.sh, or pass --llama-server",
            llama.display()
        );
    }
    let model = match &a.model {
        Some(p) => p.clone(),
        None => strata_engine::fetch::default_model()?,
    };
    if !model.is_file() {
        bail!("no model at {}", model.display());
    }
    Ok((strata, llama, model))
}

/// The first line of `llama-server --version` that names the version.
fn llama_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .find(|l| l.contains("version"))
                .map(|l| l.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The figures of a run that summary.json keeps (the rest is in its result.json).
fn figures(s: &Summary) -> Value {
    let j = s.to_json(json!({}));
    let mut m = serde_json::Map::new();
    for k in [
        "completed",
        "failed",
        "duration",
        "request_throughput",
        "output_throughput",
        "mean_ttft_ms",
        "median_ttft_ms",
        "p99_ttft_ms",
        "mean_tpot_ms",
        "mean_itl_ms",
        "mean_e2el_ms",
        "cache_hit_rate",
        "per_round",
    ] {
        m.insert(k.into(), j[k].clone());
    }
    Value::Object(m)
}

fn mean_ttft_ms(s: &Summary) -> f64 {
    let t = s.ttfts();
    t.iter().sum::<f64>() / t.len() as f64 * 1e3
}

/// Side-by-side plots of the multi-turn study and the rate sweep.
fn compare_plots(out: &Path, m: &[(&str, &Measured)]) -> anyhow::Result<()> {
    let dir = out.join("multi-turn");
    let per_round: Vec<Series> = m
        .iter()
        .map(|(n, r)| Series {
            label: format!("{n} mean"),
            points: r
                .multi_turn
                .per_round()
                .iter()
                .map(|x| (x.0 as f64, x.2))
                .collect(),
        })
        .collect();
    plot::lines(
        &dir.join("ttft_per_round"),
        "Multi-turn: TTFT per round",
        "round",
        "mean TTFT (ms)",
        &per_round,
        true,
    )?;
    let cdf: Vec<Series> = m
        .iter()
        .map(|(n, r)| Series {
            label: (*n).into(),
            points: plot::cdf(
                &r.multi_turn
                    .ttfts()
                    .iter()
                    .map(|x| x * 1e3)
                    .collect::<Vec<_>>(),
            ),
        })
        .collect();
    plot::lines(
        &dir.join("ttft_cdf"),
        "Multi-turn: TTFT distribution",
        "TTFT (ms)",
        "fraction of requests",
        &cdf,
        false,
    )?;
    let mut tput: Vec<Series> = m
        .iter()
        .map(|(n, r)| Series {
            label: (*n).into(),
            points: r
                .sweep
                .iter()
                .map(|(rate, s)| (*rate, s.request_throughput()))
                .collect(),
        })
        .collect();
    if let Some((_, r)) = m.first() {
        tput.push(Series {
            label: "offered rate".into(),
            points: r.sweep.iter().map(|(rate, _)| (*rate, *rate)).collect(),
        });
    }
    plot::lines(
        &out.join("rate-sweep").join("throughput_vs_rate"),
        "Throughput against request rate",
        "request rate (requests/s)",
        "completed requests/s",
        &tput,
        true,
    )?;
    Ok(())
}

/// `strata-bench serve-study`.
pub fn run(a: StudyArgs) -> anyhow::Result<()> {
    if a.threads == 0 {
        bail!("--threads must be at least 1");
    }
    let started = Instant::now();
    let (strata_bin, llama_bin, model) = locate(&a)?;
    let version = llama_version(&llama_bin);
    let plan = Plan::new(a.quick);
    let load = LoadArgs {
        request_rate: f64::INFINITY,
        request_rates: Vec::new(),
        max_parallel: 16,
        seed: a.seed,
        tokenizer: Some(model.clone()),
        percentiles: vec![50.0, 90.0, 99.0],
    };
    let words = super::load_words(&load)?;
    let logs = a.out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let study = Study {
        rt: &rt,
        plan: &plan,
        words: &words,
        load,
        out: &a.out,
    };
    eprintln!(
        "serve-study: {} ({}), {} threads per server, {}; results in {}",
        model.display(),
        if a.quick {
            "quick sizes, figures not comparable"
        } else {
            "full sizes"
        },
        a.threads,
        version,
        a.out.display()
    );
    let mut measured = Vec::new();
    let mut idle = Vec::new();
    for name in SERVERS {
        let busy = idle_check(Duration::from_secs(2));
        if let Some(b) = busy.filter(|b| *b > BUSY_WARNING) {
            eprintln!(
                "serve-study: WARNING: the CPUs were {:.0} % busy before {name} started: the machine is not idle, and the figures will be skewed (llama.cpp's spinning threads suffer most)",
                b * 100.0
            );
        }
        idle.push(busy);
        let log = logs.join(format!("{name}.log"));
        eprintln!("serve-study: starting {name} (log: {})", log.display());
        let server = if name == "strata" {
            Server::strata(&strata_bin, &model, a.threads, &log)?
        } else {
            Server::llama(&llama_bin, &model, a.threads, &log)?
        };
        eprintln!("serve-study: {name} ready at {}", server.base_url);
        let m = study.measure(&server)?;
        server.stop(Duration::from_secs(15));
        eprintln!("serve-study: {name} done in {:.0} s", m.wall_s);
        if let Some(b) = m.others_busy.filter(|b| *b > BUSY_WARNING) {
            eprintln!(
                "serve-study: WARNING: other processes took {:.0} % of the CPUs while {name} was measured: its figures are skewed",
                b * 100.0
            );
        }
        measured.push((name, m));
    }
    let (st, ll) = (&measured[0].1, &measured[1].1);
    compare_plots(&a.out, &[(SERVERS[0], st), (SERVERS[1], ll)])?;

    let mt_strata = mean_ttft_ms(&st.multi_turn);
    let mt_llama = mean_ttft_ms(&ll.multi_turn);
    let decode_tps = |m: &Measured| -> Vec<f64> {
        m.decode
            .iter()
            .map(|(_, s)| s.output_throughput())
            .collect()
    };
    let (dec_st, dec_ll) = (decode_tps(st), decode_tps(ll));
    let sweep_ratios: Vec<f64> = st
        .sweep
        .iter()
        .zip(&ll.sweep)
        .map(|((_, a), (_, b))| a.request_throughput() / b.request_throughput())
        .collect();
    let min_ratio = sweep_ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let failed: usize = measured
        .iter()
        .map(|(_, m)| {
            m.multi_turn.failed()
                + m.decode.iter().map(|(_, s)| s.failed()).sum::<usize>()
                + m.sweep.iter().map(|(_, s)| s.failed()).sum::<usize>()
        })
        .sum();

    let mut csv = String::from("request_rate,strata_req_per_s,llamaserver_req_per_s,ratio\n");
    for (((rate, a), (_, b)), r) in st.sweep.iter().zip(&ll.sweep).zip(&sweep_ratios) {
        csv.push_str(&format!(
            "{rate},{:.4},{:.4},{r:.4}\n",
            a.request_throughput(),
            b.request_throughput()
        ));
    }
    std::fs::write(a.out.join("rate-sweep").join("throughput.csv"), csv)?;

    let per_server = |m: &Measured| {
        json!({
            "multi_turn": figures(&m.multi_turn),
            "decode": m.decode.iter().map(|(p, s)| json!({"max_parallel": p, "figures": figures(s)})).collect::<Vec<_>>(),
            "decode_ratio": decode_tps(m)[1] / decode_tps(m)[0],
            "rate_sweep": m.sweep.iter().map(|(r, s)| json!({"request_rate": r, "figures": figures(s)})).collect::<Vec<_>>(),
            "wall_s": m.wall_s,
            "other_processes_cpu_share": m.others_busy,
        })
    };
    let summary = json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "quick": a.quick,
        "seed": a.seed,
        "model": model.display().to_string(),
        "threads_per_server": a.threads,
        "machine": {
            "cpu": cpu_model(),
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        },
        "strata": {"binary": strata_bin.display().to_string(), "args": "serve --threads N (defaults otherwise)"},
        "llama_server": {
            "binary": llama_bin.display().to_string(),
            "version": version,
            "args": format!("-c {LLAMA_CTX} -np {LLAMA_SLOTS} -t N"),
        },
        "plan": plan.describe(),
        "servers": {"strata": per_server(st), "llama-server": per_server(ll)},
        "figures": {
            "multiturn_mean_ttft_strata_ms": mt_strata,
            "multiturn_mean_ttft_llamaserver_ms": mt_llama,
            "multiturn_ttft_vs_llamaserver": mt_strata / mt_llama,
            "decode1_output_tps": dec_st[0],
            "decode8_output_tps": dec_st[1],
            "decode8_vs_decode1": dec_st[1] / dec_st[0],
            "llamaserver_decode1_output_tps": dec_ll[0],
            "llamaserver_decode8_output_tps": dec_ll[1],
            "llamaserver_decode8_vs_decode1": dec_ll[1] / dec_ll[0],
            "rate_sweep_ratios": sweep_ratios,
            "rate_sweep_min_throughput_ratio": min_ratio,
        },
        "failed_requests": failed,
        "cpu_busy_before_start": {"strata": idle[0], "llama-server": idle[1]},
        "wall_s": started.elapsed().as_secs_f64(),
    });
    let path = a.out.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("serve-study: summary in {}", path.display());

    print!("{}", table(&plan, &version, a.threads, (st, ll)));
    println!(
        "RESULT serve.multiturn_ttft_vs_llamaserver {:.3} x",
        mt_strata / mt_llama
    );
    println!(
        "RESULT serve.decode8_vs_decode1 {:.3} x",
        dec_st[1] / dec_st[0]
    );
    println!("RESULT serve.rate_sweep_min_throughput_ratio {min_ratio:.3} x");
    println!("RESULT serve.multiturn_mean_ttft_strata {mt_strata:.1} ms");
    println!("RESULT serve.multiturn_mean_ttft_llamaserver {mt_llama:.1} ms");
    println!("RESULT serve.decode1_output_tps {:.1} tokens/s", dec_st[0]);
    println!("RESULT serve.decode8_output_tps {:.1} tokens/s", dec_st[1]);
    if failed > 0 {
        bail!(
            "{failed} request(s) failed: the figures above leave them out (see the report.txt files under {})",
            a.out.display()
        );
    }
    Ok(())
}

/// The readable comparison.
fn table(plan: &Plan, version: &str, threads: usize, (st, ll): (&Measured, &Measured)) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let row = |s: &mut String, k: &str, a: f64, b: f64, digits: usize| {
        let _ = writeln!(s, "{k:<28}{a:>14.digits$}{b:>14.digits$}{:>14.3}", a / b);
    };
    let header = |s: &mut String, title: String| {
        let _ = writeln!(s, "{:-^70}", format!(" {title} "));
        let _ = writeln!(
            s,
            "{:<28}{:>14}{:>14}{:>14}",
            "", "strata", "llama-server", "strata/llama"
        );
    };
    let _ = writeln!(
        s,
        "{:=^70}",
        format!(" serve-study: strata vs llama-server, {threads} threads each ")
    );
    let _ = writeln!(s, "llama-server: {version}");
    let m = &plan.multi_turn;
    header(
        &mut s,
        format!(
            "multi-turn: {} conv x {} turns, {}-token system prompt",
            m.clients, m.rounds, m.system_len
        ),
    );
    let (a, b) = (figures(&st.multi_turn), figures(&ll.multi_turn));
    for (k, label) in [
        ("mean_ttft_ms", "mean TTFT (ms)"),
        ("median_ttft_ms", "median TTFT (ms)"),
        ("p99_ttft_ms", "p99 TTFT (ms)"),
        ("mean_tpot_ms", "mean TPOT (ms)"),
    ] {
        row(
            &mut s,
            label,
            a[k].as_f64().unwrap_or(f64::NAN),
            b[k].as_f64().unwrap_or(f64::NAN),
            1,
        );
    }
    for (x, y) in st
        .multi_turn
        .per_round()
        .iter()
        .zip(ll.multi_turn.per_round())
    {
        row(
            &mut s,
            &format!("  round {} mean TTFT (ms)", x.0),
            x.2,
            y.2,
            1,
        );
    }
    let hit = |s: &Summary| s.cache_hit_rate().map_or(f64::NAN, |h| h * 100.0);
    row(
        &mut s,
        "cache hit rate (%)",
        hit(&st.multi_turn),
        hit(&ll.multi_turn),
        1,
    );
    let d = &plan.decode;
    header(
        &mut s,
        format!(
            "decode: {} requests, {}-token prompts, {} out (tok/s)",
            d.groups * d.prompts_per_group,
            d.system_len + d.question_len,
            d.output_len
        ),
    );
    for ((p, x), (_, y)) in st.decode.iter().zip(&ll.decode) {
        row(
            &mut s,
            &format!("max-parallel {p}"),
            x.output_throughput(),
            y.output_throughput(),
            1,
        );
    }
    let scale =
        |m: &Measured| m.decode[1].1.output_throughput() / m.decode[0].1.output_throughput();
    row(
        &mut s,
        &format!(
            "ratio {} / {}",
            plan.decode_parallel[1], plan.decode_parallel[0]
        ),
        scale(st),
        scale(ll),
        3,
    );
    let w = &plan.sweep;
    header(
        &mut s,
        format!(
            "rate sweep: {} x {} prompts, {}-token system (req/s)",
            w.groups, w.prompts_per_group, w.system_len
        ),
    );
    for ((rate, x), (_, y)) in st.sweep.iter().zip(&ll.sweep) {
        row(
            &mut s,
            &format!("offered {rate}/s"),
            x.request_throughput(),
            y.request_throughput(),
            3,
        );
    }
    let pct = |m: &Measured| {
        m.others_busy
            .map_or("-".into(), |b| format!("{:.1} %", b * 100.0))
    };
    let _ = writeln!(s, "{:-^70}", " machine ");
    let _ = writeln!(
        s,
        "{:<28}{:>14}{:>14}",
        "CPU used by other processes",
        pct(st),
        pct(ll)
    );
    let _ = writeln!(s, "{}", "=".repeat(70));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_line_gives_the_base_url() {
        assert_eq!(
            serving_url("strata: serving model 'strata' at http://127.0.0.1:43121/v1").as_deref(),
            Some("http://127.0.0.1:43121")
        );
        // A model name with a quote and " at " in it does not confuse the parser.
        assert_eq!(
            serving_url("strata: serving model 'a' at b' at http://127.0.0.1:8/v1\n").as_deref(),
            Some("http://127.0.0.1:8")
        );
        for bad in [
            "strata: ready",
            "strata: serving model 'x' at http://127.0.0.1:0/v1",
            "strata: serving model 'x' at http://127.0.0.1:99999/v1",
            "strata: serving model 'x' at http://127.0.0.1:8000",
            "strata: KV pool 10 pages",
        ] {
            assert_eq!(serving_url(bad), None, "{bad}");
        }
    }

    #[test]
    fn cpu_ticks_parse() {
        assert_eq!(
            machine_ticks("cpu  100 5 50 800 20 3 2 0 0 0"),
            Some((980, 160))
        );
        assert_eq!(machine_ticks("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(machine_ticks("cpu 1 2"), None);
        // A command name with spaces and a parenthesis.
        let stat = "4242 (llama (x) srv) S 1 4242 4242 0 -1 4194560 500 0 0 0 731 42 0 0 20 0 5 0";
        assert_eq!(process_ticks(stat), Some(773));
        let (a, b) = (
            CpuTimes {
                total: 1000,
                busy: 300,
                ours: 100,
            },
            CpuTimes {
                total: 1200,
                busy: 450,
                ours: 220,
            },
        );
        // 150 busy ticks of 200, 120 of them ours: others took 30 of 200.
        assert_eq!(a.others_until(&b), Some(0.15));
        assert_eq!(a.others_until(&a), None);
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(
            status_code("HTTP/1.1 200 OK\r\nContent-Length: 2"),
            Some(200)
        );
        assert_eq!(
            status_code("HTTP/1.1 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(status_code("SSH-2.0-OpenSSH"), None);
        assert_eq!(status_code(""), None);
    }

    #[test]
    fn seeds_of_a_study_do_not_collide_under_the_workloads_mixing() {
        // Shared-prefix seeds its texts with `seed ^ 0x5A3D | 1`: seeds 0 and 1 would be
        // the same texts.
        let mixed: Vec<u64> = (0..20).map(|k| seed_of(0, k) ^ 0x5A3D | 1).collect();
        let mut dedup = mixed.clone();
        dedup.sort_unstable();
        dedup.dedup();
        assert_eq!(dedup.len(), mixed.len());
    }
}
