//! Helpers shared by Strata's fuzz targets: per-process scratch directories, a small GGUF
//! writer and one tokio runtime per process.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A directory private to this fuzzing process, created once, under `base`
/// (`/dev/shm` for files that are only memory-mapped, `/tmp` where O_DIRECT needs a real
/// file system). Removed at exit is not attempted: libFuzzer exits through `_exit`.
pub fn scratch(base: &str, name: &str) -> PathBuf {
    let base = if Path::new(base).is_dir() {
        PathBuf::from(base)
    } else {
        std::env::temp_dir()
    };
    let p = base.join(format!("strata-fuzz-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&p).expect("creating the fuzz scratch directory");
    p
}

/// One multi-threaded runtime for the whole process (two workers, timers and I/O on).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("building the fuzz runtime")
    })
}

/// A GGUF metadata value to write.
#[derive(Clone, Debug)]
pub enum GgufValue {
    /// Type 4.
    U32(u32),
    /// Type 8.
    Str(String),
    /// Type 9 of type 8.
    StrArray(Vec<String>),
    /// Type 9 of type 5.
    I32Array(Vec<i32>),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// The bytes of a GGUF v3 file with `kv` as metadata and no tensors.
pub fn gguf_bytes(kv: &[(String, GgufValue)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        put_str(&mut b, k);
        match v {
            GgufValue::U32(x) => {
                b.extend(4u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            GgufValue::Str(s) => {
                b.extend(8u32.to_le_bytes());
                put_str(&mut b, s);
            }
            GgufValue::StrArray(a) => {
                b.extend(9u32.to_le_bytes());
                b.extend(8u32.to_le_bytes());
                b.extend((a.len() as u64).to_le_bytes());
                for s in a {
                    put_str(&mut b, s);
                }
            }
            GgufValue::I32Array(a) => {
                b.extend(9u32.to_le_bytes());
                b.extend(5u32.to_le_bytes());
                b.extend((a.len() as u64).to_le_bytes());
                for x in a {
                    b.extend(x.to_le_bytes());
                }
            }
        }
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b
}

#[cfg(feature = "server")]
pub mod sidecar {
    //! A small sidecar for the server targets.

    use std::path::Path;

    /// Token of tenant `a` (may map shared memory) in [`config`].
    pub const TOKEN_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaa";
    /// Token of tenant `b` (no shared memory, at most 2 namespaces) in [`config`].
    pub const TOKEN_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbb";
    /// Block bytes of [`config`]: 2 × 1 layer × 1 KV head × 16 × 16 tokens × 2 (f16).
    pub const BLOCK_BYTES: u64 = 1024;

    /// A small sidecar configuration with its sockets in `dir`: no metrics, no TCP, 64 blocks
    /// of host memory, two tenants with tokens.
    pub fn config(dir: &Path) -> strata_server::SidecarConfig {
        // Through TOML, as an operator writes it: fields added later keep their defaults.
        let text = format!(
            r#"
socket = "{sock}"
shm_socket = "{shm}"
metrics = ""
page_size = 16
block_bytes = {BLOCK_BYTES}
host_capacity = {host}
max_tokens_per_call = 1024
max_lease = "5s"
shm_staging_slots = 4
shutdown_grace = "100ms"

[[tenants]]
name = "a"
tokens = ["{TOKEN_A}"]
shm = true

[[tenants]]
name = "b"
tokens = ["{TOKEN_B}"]
max_namespaces = 2
"#,
            sock = dir.join("s.sock").display(),
            shm = dir.join("s.shm").display(),
            host = 64 * BLOCK_BYTES,
        );
        toml::from_str(&text).expect("the fuzz sidecar configuration parses")
    }
}
