//! # strata-bench
//!
//! Strata's benchmark harness.
//!
//! - `strata-bench micro <suite>` runs one micro suite; every suite measures its baseline
//!   (memcmp, memcpy, fio, llama.cpp, ...) in the same run, prints progress to stderr and
//!   ends with one line per figure on stdout: `RESULT <name> <value> <unit>`.
//! - `strata-bench run <workload>` and `strata-bench compare` drive OpenAI-compatible
//!   servers with TTFT-study workloads (see the `serve` module); `strata-bench serve-study`
//!   starts `strata-engine serve` and llama.cpp's `llama-server` itself and compares them
//!   (see `serve::study`).
//! - `strata-bench soak` runs the real sidecar under many clients and a fault schedule,
//!   checking every byte (see `strata_bench::soak`).

mod alloc_count;
mod micro;
mod serve;
mod stats;

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOC: alloc_count::Counting = alloc_count::Counting;

#[derive(Parser)]
#[command(name = "strata-bench", version, about = "Strata benchmark harness")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Drive an OpenAI-compatible server with a workload and report TTFT, ITL, throughput
    /// and cache hits.
    Run {
        #[command(flatten)]
        target: serve::TargetArgs,
        #[command(flatten)]
        load: serve::LoadArgs,
        #[command(flatten)]
        output: serve::OutputArgs,
        #[command(subcommand)]
        workload: serve::workload::Workload,
    },
    /// The same workload against two endpoints (or one with its cache on and off),
    /// alternating, with ratios.
    Compare {
        #[command(flatten)]
        target: serve::TargetArgs,
        /// The second endpoint's base URL.
        #[arg(long)]
        other_url: String,
        /// Label of the first endpoint.
        #[arg(long, default_value = "A")]
        label_a: String,
        /// Label of the second endpoint.
        #[arg(long, default_value = "B")]
        label_b: String,
        /// Runs per endpoint (alternating A, B, A, B, ...).
        #[arg(long, default_value_t = 2)]
        repeats: usize,
        #[command(flatten)]
        load: serve::LoadArgs,
        #[command(flatten)]
        output: serve::OutputArgs,
        #[command(subcommand)]
        workload: serve::workload::Workload,
    },
    /// Strata's `strata-engine serve` against llama.cpp's `llama-server`, both started here
    /// one at a time: multi-turn TTFT, decode batching, a request-rate sweep.
    ServeStudy(serve::study::StudyArgs),
    /// Micro benchmarks of one component against a baseline measured in the same run.
    Micro {
        /// Which suite.
        #[arg(value_enum)]
        suite: micro::Suite,
        /// Smaller sizes and fewer rounds, for a smoke test (figures are not comparable).
        #[arg(long)]
        quick: bool,
        /// Folder for the disk suite's files (default target/strata-bench-disk); put it on
        /// the device you want to measure.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// Threads for the engine suite (both engines; default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Drive a strata-sidecar with a disk tier from many clients for a set time under a
    /// fault schedule (killed clients, a full disk, sidecar restarts, attacks); every byte
    /// read is checked.
    Soak(SoakArgs),
    /// A killable soak client (started by `soak`; not for direct use).
    #[command(hide = true)]
    SoakClient {
        /// The client's JSON arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(clap::Args)]
struct SoakArgs {
    /// How long the clients run (e.g. 60s, 30m).
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    duration: std::time::Duration,
    /// gRPC connections of the legitimate clients (half Unix socket, half TCP).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Tenants of the legitimate clients (every other one uses shared memory too).
    #[arg(long, default_value_t = 3)]
    tenants: usize,
    /// The sidecar binary [default: strata-sidecar next to this binary].
    #[arg(long)]
    sidecar_bin: Option<std::path::PathBuf>,
    /// Seed of prompts, popularity and the schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// No fault schedule and no attacks: only the clients.
    #[arg(long)]
    no_faults: bool,
    /// Distinct prompts (Zipf-ranked popularity).
    #[arg(long, default_value_t = 1000)]
    prompts: usize,
    /// Host memory of the sidecar, e.g. 32MiB.
    #[arg(long, default_value = "32MiB", value_parser = strata_server::config::parse_size)]
    host_capacity: u64,
    /// Disk tier size, e.g. 512MiB (its file system is a little larger).
    #[arg(long, default_value = "512MiB", value_parser = strata_server::config::parse_size)]
    disk_capacity: u64,
    /// Folder for sockets, logs and the disk image [default: a temporary folder, removed
    /// when the soak passes].
    #[arg(long)]
    work_dir: Option<std::path::PathBuf>,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn soak(a: SoakArgs) -> anyhow::Result<()> {
    use strata_bench::soak;
    let exe = std::env::current_exe()?;
    let sidecar_bin = match a.sidecar_bin {
        Some(p) => p,
        None => exe
            .parent()
            .map(|d| d.join("strata-sidecar"))
            .ok_or_else(|| anyhow::anyhow!("no folder around {}", exe.display()))?,
    };
    let mut cfg = soak::SoakConfig::new(sidecar_bin, (exe, vec!["soak-client".into()]), a.duration);
    cfg.connections = a.connections;
    cfg.tenants = a.tenants;
    cfg.seed = a.seed;
    cfg.faults = !a.no_faults;
    cfg.prompts = a.prompts;
    cfg.host_capacity = a.host_capacity;
    cfg.disk_capacity = a.disk_capacity;
    cfg.work_dir = a.work_dir;
    let r = soak::run(cfg)?;
    print!("{}", r.text);
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&r.json)?)?;
    }
    println!("RESULT soak.wrong_bytes {} count", r.wrong_bytes);
    println!("RESULT soak.ops_per_s {:.1} ops/s", r.ops_per_s);
    println!("RESULT soak.peak_rss_mib {:.1} MiB", r.peak_rss_mib);
    if r.wrong_bytes > 0 || !r.panics.is_empty() || !r.failures.is_empty() {
        anyhow::bail!("soak failed: {}", r.failures.join("; "));
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            target,
            load,
            output,
            workload,
        } => serve::run(target, load, output, workload)?,
        Cmd::Compare {
            target,
            other_url,
            label_a,
            label_b,
            repeats,
            load,
            output,
            workload,
        } => serve::compare(
            target,
            other_url,
            (label_a, label_b),
            repeats,
            load,
            output,
            workload,
        )?,
        Cmd::ServeStudy(a) => serve::study::run(a)?,
        Cmd::Micro {
            suite,
            quick,
            dir,
            threads,
        } => {
            let results = micro::run(suite, quick, dir, threads)?;
            for r in results {
                println!("RESULT {} {} {}", r.name, r.value, r.unit);
            }
        }
        Cmd::Soak(a) => soak(a)?,
        Cmd::SoakClient { args } => strata_bench::soak::victim::main(&args)?,
    }
    Ok(())
}
