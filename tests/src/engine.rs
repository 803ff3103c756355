//! The serving engine (`strata-engine serve`) as a child process, for tests over HTTP.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sidecar::{built_binary, rss_of, terminate_child};

/// The real model (SmolLM2-135M-Instruct Q4_1), fetched into the git-ignored `models/` of
/// the workspace on first use (`$STRATA_MODELS_DIR` overrides). A failed fetch fails the
/// test with the reason.
pub fn model_path() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::var_os("STRATA_MODELS_DIR").map_or_else(
            || {
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .parent()
                    .expect("workspace")
                    .join("models")
            },
            PathBuf::from,
        );
        strata_engine::fetch::default_model_in(&dir)
            .unwrap_or_else(|e| panic!("the tests need the default model: {e}"))
    })
    .clone()
}

/// A running `strata-engine serve`.
pub struct EngineServer {
    /// The process.
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Its stderr lines.
    pub log: Arc<parking_lot::Mutex<Vec<String>>>,
}

impl EngineServer {
    /// Starts the server on the real model on a free loopback port with `extra` flags and
    /// waits for its ready line.
    pub fn start(extra: &[&str]) -> EngineServer {
        let model = model_path();
        let mut child = Command::new(built_binary("strata-engine-under-test"))
            .arg("serve")
            .arg("--model")
            .arg(&model)
            .args(["--port", "0", "--served-model-name", "smollm2"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting strata-engine serve");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().push(l.clone());
                    let _ = tx.send(l);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut base = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains(" at http://") => {
                    base = l
                        .split(" at ")
                        .nth(1)
                        .map(|u| u.trim_end_matches("/v1").to_string());
                }
                Ok(l) if l == "strata: ready" => break,
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "strata-engine serve did not become ready; its log:\n{}",
                        log.lock().join("\n")
                    );
                }
            }
        }
        EngineServer {
            child,
            base: base.expect("the server printed its address"),
            log,
        }
    }

    /// The server's resident memory (VmRSS), in bytes.
    pub fn rss(&self) -> u64 {
        rss_of(&self.child)
    }

    /// Sends SIGTERM and waits; returns whether it exited cleanly.
    pub fn terminate(mut self) -> bool {
        terminate_child(&mut self.child)
    }
}

impl Drop for EngineServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "strata-engine serve log (the test failed):\n{}",
                self.log.lock().join("\n")
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of an unlabelled metric, or of `name{labels}` when `name` carries them.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name).then(|| v.parse().ok())?
    })
}
