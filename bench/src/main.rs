//! # strata-bench
//!
//! Strata's benchmark harness.
//!
//! - `strata-bench micro <suite>` runs one micro suite; every suite measures its baseline
//!   (memcmp, memcpy, fio, llama.cpp, ...) in the same run, prints progress to stderr and
//!   ends with one line per figure on stdout: `RESULT <name> <value> <unit>`.
//! - `strata-bench run <workload>` and `strata-bench compare` drive OpenAI-compatible
//!   servers with TTFT-study workloads (see the `serve` module).

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
    }
    Ok(())
}
