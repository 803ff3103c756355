//! # strata-bench
//!
//! Strata's benchmark harness. `strata-bench micro <suite>` runs one micro suite; every
//! suite measures its baseline (memcmp, memcpy, ...) in the same run, prints progress to
//! stderr and ends with one line per figure on stdout: `RESULT <name> <value> <unit>`.

mod alloc_count;
mod micro;
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
