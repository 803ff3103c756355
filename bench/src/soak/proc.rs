//! Processes and file systems the soak runs: the sidecar (started from its binary with a
//! TOML configuration, its ready line parsed, its log kept, its memory sampled) and the
//! small ext4 file system on a loop device that holds the disk tier, so that it can be
//! filled to `ENOSPC`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use parking_lot::Mutex;

/// Where a running sidecar listens.
#[derive(Clone, Debug, Default)]
pub struct Addrs {
    /// gRPC Unix socket.
    pub socket: PathBuf,
    /// Shared-memory socket.
    pub shm: PathBuf,
    /// gRPC TCP address (`host:port`).
    pub tcp: String,
    /// Metrics address (`host:port`).
    pub metrics: String,
}

/// What the sidecar's log said, kept small: counts of warnings and errors by message, every
/// line that mentions a panic, and the last lines.
#[derive(Default)]
pub struct LogSummary {
    /// Lines that say "panicked".
    pub panics: Vec<String>,
    /// Warning and error messages (without timestamp and fields) and how often each came.
    pub messages: std::collections::BTreeMap<String, u64>,
    /// The last lines of the current process.
    pub tail: std::collections::VecDeque<String>,
    /// Lines in all.
    pub lines: u64,
    /// Blocks the disk tier recovered, from the last "disk tier open" line.
    pub recovered: Option<u64>,
    /// "disk tier open" lines with a recovered count seen so far.
    pub opens: u64,
}

impl LogSummary {
    /// Warnings and errors whose message mentions `what`.
    pub fn count(&self, what: &str) -> u64 {
        self.messages
            .iter()
            .filter(|(m, _)| m.contains(what))
            .map(|(_, n)| n)
            .sum()
    }

    fn add(&mut self, line: String) {
        let line = strip_ansi(&line);
        self.lines += 1;
        if line.contains("disk tier open")
            && let Some(v) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("recovered="))
        {
            self.recovered = v.parse().ok();
            self.opens += 1;
        }
        if line.contains("panicked") {
            self.panics.push(line.clone());
        }
        for level in [" WARN ", " ERROR "] {
            if let Some(i) = line.find(level) {
                let msg = &line[i + 1..];
                // Cut the structured fields (` key=value`) off the message.
                let cut = msg
                    .match_indices(' ')
                    .find(|(j, _)| {
                        let rest = &msg[j + 1..];
                        let word: String = rest
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        !word.is_empty() && rest[word.len()..].starts_with('=')
                    })
                    .map(|(j, _)| j)
                    .unwrap_or(msg.len());
                let key: String = msg[..cut].chars().take(160).collect();
                if self.messages.len() < 200 || self.messages.contains_key(&key) {
                    *self.messages.entry(key).or_default() += 1;
                }
            }
        }
        self.tail.push_back(line);
        if self.tail.len() > 50 {
            self.tail.pop_front();
        }
    }
}

/// The line without ANSI colour sequences.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A sidecar process.
pub struct SidecarProc {
    /// The process.
    pub child: Child,
    /// Its addresses.
    pub addrs: Addrs,
}

impl SidecarProc {
    /// Starts `bin --config cfg` and waits (up to `wait`) for its ready line. Its stderr
    /// goes to `log_file` and into `log`.
    pub fn start(
        spawner: &Spawner,
        bin: &Path,
        cfg: &Path,
        log_file: &Path,
        log: Arc<Mutex<LogSummary>>,
        wait: Duration,
    ) -> anyhow::Result<SidecarProc> {
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(cfg)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawner
            .spawn(cmd)
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("sidecar stdout")?;
        let stderr = child.stderr.take().context("sidecar stderr")?;
        let mut file = std::fs::File::create(log_file)
            .with_context(|| format!("creating {}", log_file.display()))?;
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(file, "{l}");
                log.lock().add(l);
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let deadline = Instant::now() + wait;
        let line = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.starts_with("strata-sidecar ready") => break l,
                Ok(_) => continue,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!(
                        "strata-sidecar did not become ready within {wait:?} (log: {})",
                        log_file.display()
                    );
                }
            }
        };
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .filter(|v| *v != "-")
                .map(str::to_string)
                .unwrap_or_default()
        };
        Ok(SidecarProc {
            addrs: Addrs {
                socket: PathBuf::from(field("unix")),
                shm: PathBuf::from(field("shm")),
                tcp: field("tcp"),
                metrics: field("metrics"),
            },
            child,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait up to `grace`; returns whether it exited cleanly (else it is
    /// killed).
    pub fn terminate(&mut self, grace: Duration) -> bool {
        // SAFETY: kill with the pid of our own child and a valid signal.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            if Instant::now() > deadline {
                self.kill9();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for SidecarProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Children die with the soak (so that a soak that is itself killed leaves no sidecar or
/// client behind). Only spawn from threads that live as long as the child should: the
/// signal comes when the spawning thread ends.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// `VmRSS` and `VmHWM` (peak) of a process, in bytes.
pub fn rss(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A small ext4 file system in a loop device, mounted; unmounted and detached on drop.
pub struct LoopFs {
    img: PathBuf,
    dev: String,
    /// The mount point.
    pub mnt: PathBuf,
}

impl LoopFs {
    /// Makes a `bytes`-byte ext4 file system (no reserved blocks) mounted under `dir`.
    /// Needs root, `losetup`, `mkfs.ext4` and `mount`.
    pub fn new(dir: &Path, bytes: u64) -> anyhow::Result<LoopFs> {
        let img = dir.join("disk.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(bytes))
            .with_context(|| format!("creating {}", img.display()))?;
        let dev = match run(Command::new("losetup").args(["--find", "--show"]).arg(&img)) {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_file(&img);
                return Err(e.context("attaching a loop device (needs root and losetup)"));
            }
        };
        let mut fs = LoopFs {
            img,
            dev,
            mnt: dir.join("mnt"),
        };
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0", &fs.dev]))?;
        std::fs::create_dir_all(&fs.mnt)?;
        run(Command::new("mount").arg(&fs.dev).arg(&fs.mnt)).inspect_err(|_| {
            // Nothing mounted: Drop must not try to unmount someone else's file system.
            fs.mnt = PathBuf::new();
        })?;
        Ok(fs)
    }

    /// Bytes free for us on the file system.
    pub fn free_bytes(&self) -> u64 {
        let Ok(c) = std::ffi::CString::new(self.mnt.as_os_str().as_encoded_bytes()) else {
            return 0;
        };
        // SAFETY: statvfs writes into the zeroed struct we own; the path is a valid C string.
        unsafe {
            let mut s: libc::statvfs = std::mem::zeroed();
            if libc::statvfs(c.as_ptr(), &mut s) != 0 {
                return 0;
            }
            s.f_bavail as u64 * s.f_frsize as u64
        }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if !self.mnt.as_os_str().is_empty() {
            for i in 0..50 {
                let ok = Command::new("umount")
                    .arg(&self.mnt)
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    break;
                }
                if i == 49 {
                    let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        let _ = std::fs::remove_file(&self.img);
    }
}

/// Fills the file system at `dir` with `file` until writes fail with `ENOSPC`; returns the
/// bytes written. Reserves most of the space with `fallocate` at once, then writes until
/// the last blocks are gone.
pub fn fill(file: &Path, free: u64) -> anyhow::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut f =
        std::fs::File::create(file).with_context(|| format!("creating {}", file.display()))?;
    let bulk = free.saturating_sub(8 << 20) / 4096 * 4096;
    let mut written = 0;
    if bulk > 0 {
        // SAFETY: fallocate on our own open descriptor with a valid range.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, bulk as i64) };
        if rc == 0 {
            written = bulk;
        }
    }
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(written))?;
    let chunk = vec![0xA5u8; 64 << 10];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => return Err(e).context("filling the file system"),
        }
    }
    // Small writes for the last partial chunk's worth of blocks.
    loop {
        match f.write(&chunk[..4096]) {
            Ok(n) if n > 0 => written += n as u64,
            _ => break,
        }
    }
    let _ = f.sync_all();
    Ok(written)
}

/// A command to spawn and where its child goes.
type SpawnRequest = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);

/// Spawns child processes from one thread that lives as long as the soak, so that
/// [`die_with_parent`] kills them when the soak ends and not when some pool thread exits.
pub struct Spawner {
    tx: Mutex<std::sync::mpsc::Sender<SpawnRequest>>,
}

impl Default for Spawner {
    fn default() -> Self {
        Self::new()
    }
}

impl Spawner {
    /// Starts the spawning thread.
    pub fn new() -> Spawner {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("soak-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("starting a thread");
        Spawner { tx: Mutex::new(tx) }
    }

    /// Spawns `cmd` (with [`die_with_parent`]).
    pub fn spawn(&self, mut cmd: Command) -> std::io::Result<Child> {
        die_with_parent(&mut cmd);
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx
            .lock()
            .send((cmd, tx))
            .map_err(|_| std::io::Error::other("spawner thread is gone"))?;
        rx.recv()
            .map_err(|_| std::io::Error::other("spawner thread is gone"))?
    }
}
