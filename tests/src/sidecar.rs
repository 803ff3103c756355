//! Running the real `strata-sidecar` binary for tests: a temporary directory for its
//! sockets and disk, the ready line parsed for its addresses, killed on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use strata_server::client::NamespaceSpec;
use strata_server::pb;

/// Tokens per page the tests run the sidecar with.
pub const PAGE: usize = 16;
/// Block bytes of [`spec`]: 2 × 2 layers × 2 heads × 64 × 16 tokens × 2 bytes.
pub const BLOCK: usize = 2 * 2 * 2 * 64 * PAGE * 2;

/// The namespace the tests use (matches `--page-size 16 --block-bytes 16384`).
pub fn spec(model: u8) -> NamespaceSpec {
    NamespaceSpec {
        model_fingerprint: [model; 32],
        dtype: pb::KvDtype::F16,
        page_size: PAGE as u32,
        num_layers: 2,
        num_kv_heads: 2,
        head_dim: 64,
    }
}

/// Distinct tokens of `pages` pages.
pub fn tokens(pages: usize, seed: u32) -> Vec<u32> {
    (0..(pages * PAGE) as u32)
        .map(|i| i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(0x9E37_79B9))
        .map(|t| t % 49_152)
        .collect()
}

/// Block `i` of a prompt seeded `seed`: every byte depends on both.
pub fn block(i: usize, seed: u8) -> Vec<u8> {
    (0..BLOCK)
        .map(|j| (j as u8).wrapping_mul(7) ^ (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/strata-<name>-<pid>-<n>`.
    pub fn new(name: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "strata-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("creating a temporary directory");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Path of a binary built next to the running test (`target/<profile>/<name>`).
pub fn built_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is not built: cargo builds it with this package's tests (`cargo test -p strata-tests`)",
        p.display()
    );
    p
}

/// A running sidecar.
pub struct Sidecar {
    /// The process.
    pub child: Child,
    /// gRPC Unix socket.
    pub socket: PathBuf,
    /// Shared-memory socket.
    pub shm: PathBuf,
    /// TCP address, when asked for.
    pub tcp: Option<String>,
    /// Metrics address.
    pub metrics: Option<String>,
    /// Lines the sidecar wrote to stderr (its log), collected in the background.
    pub log: std::sync::Arc<parking_lot::Mutex<Vec<String>>>,
}

impl Sidecar {
    /// Starts the sidecar with the test block geometry, its sockets in `dir`, plus `extra`
    /// flags, and waits for its ready line.
    pub fn start(dir: &Path, extra: &[&str]) -> Sidecar {
        Self::start_limited(dir, extra, None)
    }

    /// Like [`Sidecar::start`], with the open-file limit (soft and hard) set to `nofile`
    /// when given.
    pub fn start_limited(dir: &Path, extra: &[&str], nofile: Option<u64>) -> Sidecar {
        Self::start_with(dir, extra, nofile, &[])
    }

    /// Like [`Sidecar::start_limited`], with extra environment variables (test hooks).
    pub fn start_with(
        dir: &Path,
        extra: &[&str],
        nofile: Option<u64>,
        env: &[(&str, &str)],
    ) -> Sidecar {
        let socket = dir.join("sidecar.sock");
        let mut cmd = Command::new(built_binary("strata-sidecar-under-test"));
        cmd.arg("--socket").arg(&socket);
        // The test geometry and sizes, unless `extra` sets them itself.
        let block = BLOCK.to_string();
        for (flag, value) in [
            ("--page-size", "16"),
            ("--block-bytes", block.as_str()),
            ("--host-capacity", "8MiB"),
            ("--metrics", "127.0.0.1:0"),
        ] {
            if !extra.contains(&flag) {
                cmd.args([flag, value]);
            }
        }
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure runs in the child between fork and exec and only calls
            // setrlimit, which is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    let r = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.envs(env.iter().copied());
        cmd.args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("starting strata-sidecar");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let log = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().push(l);
                }
            });
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let line = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.starts_with("strata-sidecar ready") => break l,
                Ok(_) => continue,
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "strata-sidecar did not become ready; its log:\n{}",
                        log.lock().join("\n")
                    );
                }
            }
        };
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .filter(|v| *v != "-")
                .map(str::to_string)
        };
        Sidecar {
            child,
            socket,
            shm: PathBuf::from(field("shm").unwrap_or_default()),
            tcp: field("tcp"),
            metrics: field("metrics"),
            log,
        }
    }

    /// The sidecar's resident memory (VmRSS), in bytes.
    pub fn rss(&self) -> u64 {
        rss_of(&self.child)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited cleanly.
    pub fn terminate(mut self) -> bool {
        terminate_child(&mut self.child)
    }
}

/// The resident memory (VmRSS) of a child process, in bytes.
pub fn rss_of(child: &Child) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
        .expect("reading the child's /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in /proc status")
        * 1024
}

/// Sends SIGTERM to a child and waits up to 30 s for it to exit (then kills it); returns
/// whether it exited cleanly.
pub fn terminate_child(child: &mut Child) -> bool {
    // SAFETY: kill with a pid we own and a valid signal number.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return st.success();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
