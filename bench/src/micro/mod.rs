//! Micro suites.

mod disk;
pub(crate) mod engine;
mod host;
mod index;
mod sidecar;

/// The micro suites.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Suite {
    /// Radix index: match time against memcmp, memory per page, insert rate.
    Index,
    /// G2 host pool: block read/write throughput against memcpy.
    Host,
    /// G3 disk tier against fio: sequential writes, random reads, recovery, write
    /// amplification.
    Disk,
    /// The engine against llama.cpp's llama-bench: prefill (pp512) and decode (tg128)
    /// tokens/s on the same GGUF file and thread count.
    Engine,
    /// The sidecar: lookup latency over the Unix socket, shared-memory Get against an
    /// in-process read, inline gRPC Get over TCP against Redis GET.
    Sidecar,
}

/// One figure.
pub struct Figure {
    /// Name, `suite.what`.
    pub name: String,
    /// Value.
    pub value: String,
    /// Unit.
    pub unit: &'static str,
}

impl Figure {
    fn new(name: &str, value: f64, digits: usize, unit: &'static str) -> Self {
        Figure {
            name: name.to_string(),
            value: format!("{value:.digits$}"),
            unit,
        }
    }
}

/// Runs a suite.
pub fn run(
    suite: Suite,
    quick: bool,
    dir: Option<std::path::PathBuf>,
    threads: Option<usize>,
) -> anyhow::Result<Vec<Figure>> {
    match suite {
        Suite::Index => index::run(quick),
        Suite::Host => host::run(quick),
        Suite::Disk => disk::run(quick, dir),
        Suite::Engine => engine::run(quick, threads),
        Suite::Sidecar => sidecar::run(quick),
    }
}

/// Makes sure the baseline `program` runs (`program <version_arg>`), installing the Debian
/// `package` with apt-get when running as root; otherwise stops with a message saying how.
pub(crate) fn ensure_debian_tool(
    program: &str,
    version_arg: &str,
    package: &str,
    suite: &str,
) -> anyhow::Result<()> {
    use std::process::Command;
    let runs = || Command::new(program).arg(version_arg).output().is_ok();
    if runs() {
        return Ok(());
    }
    eprintln!("{suite}: {program} is not installed; installing the Debian package {package}...");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-qq", package])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        let ok = install()
            || (Command::new("apt-get")
                .args(["update", "-qq"])
                .status()
                .is_ok()
                && install());
        if ok && runs() {
            return Ok(());
        }
    }
    anyhow::bail!(
        "the {suite} suite needs {program} as its baseline: install it with `apt-get install {package}` (Debian/Ubuntu) and run again"
    )
}
