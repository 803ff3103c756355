//! The sidecar's configuration: one serde struct, loadable from TOML, every field with a
//! documented default and the common ones also CLI flags (see the binary).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this struct.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (names the field and line).
        message: String,
    },
    /// A value is out of range or settings contradict each other.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Everything `strata-sidecar` can be told. Defaults work out of the box on one machine:
/// a Unix socket in the runtime directory, 1 GiB of host memory, no disk tier, no TCP.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SidecarConfig {
    /// Unix socket for gRPC (mode 0600). Default `$XDG_RUNTIME_DIR/strata/sidecar.sock`,
    /// else `/tmp/strata-<uid>/sidecar.sock`.
    pub socket: Option<PathBuf>,
    /// Unix socket of the shared-memory data plane (mode 0600). Default: the gRPC socket's
    /// path with `.shm` appended. Only offered on the same host.
    pub shm_socket: Option<PathBuf>,
    /// Serve the shared-memory data plane (default true).
    pub shm: bool,
    /// TCP address for gRPC (`host:port`). Off by default; needs at least one tenant token.
    pub tcp: Option<String>,
    /// PEM certificate chain for TLS on the TCP listener.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the TCP listener.
    pub tls_key: Option<PathBuf>,
    /// Address of the Prometheus metrics endpoint (`GET /metrics`), default
    /// `127.0.0.1:9464`; `""` turns it off.
    pub metrics: String,
    /// Tokens per page (16..=256), shared by every namespace. Default 64.
    pub page_size: u32,
    /// Bytes of one block: 2 × layers × KV heads × head dim × page size × dtype bytes.
    /// Default 1,474,560 (SmolLM2-135M, f16, 64-token pages). Namespaces whose blocks have
    /// another size are refused.
    pub block_bytes: u64,
    /// Host memory for the G2 pool (e.g. `"1GiB"`). Default 1 GiB.
    #[serde(deserialize_with = "de_size")]
    pub host_capacity: u64,
    /// Lock the host pool in RAM (needs `RLIMIT_MEMLOCK` or `CAP_IPC_LOCK`). Default false.
    pub mlock: bool,
    /// File or block device of the G3 disk tier; none by default.
    pub disk_path: Option<PathBuf>,
    /// Size of the disk tier. Default 16 GiB.
    #[serde(deserialize_with = "de_size")]
    pub disk_capacity: u64,
    /// When blocks go to disk: `write-through` (default when a disk tier is set: every
    /// stored block also goes to disk, so a restart finds it), `write-back` (only on
    /// eviction from host memory) or `selective:<hits>`.
    pub write_policy: String,
    /// Largest gRPC message, in or out (e.g. `"64MiB"`). Default 64 MiB.
    #[serde(deserialize_with = "de_size")]
    pub max_message: u64,
    /// Most tokens one call may carry. Default 131,072.
    pub max_tokens_per_call: usize,
    /// Most calls in flight on one connection. Default 64.
    pub max_inflight_per_connection: usize,
    /// Longest lease a client may hold (also the default lease). Default 30 s.
    #[serde(with = "humantime_serde")]
    pub max_lease: Duration,
    /// Staging slots each shared-memory session gets for `Put`. Default 64.
    pub shm_staging_slots: u32,
    /// How long shutdown waits for calls in flight. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Tenants and their tokens. With none, only the Unix socket is served and every
    /// caller is the `default` tenant.
    pub tenants: Vec<TenantConfig>,
}

/// One tenant: who it is, how it proves it, and what separates its blocks.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Name (metrics, logs).
    pub name: String,
    /// Bearer tokens that authenticate as this tenant.
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Files each holding one token (trailing whitespace ignored), for secrets kept out of
    /// the configuration.
    #[serde(default)]
    pub token_files: Vec<PathBuf>,
    /// Cache salt mixed into every block key of the tenant. Default: the tenant's name.
    /// Changing it makes the tenant's earlier blocks unreachable.
    #[serde(default)]
    pub salt: Option<String>,
    /// May map the shared host pool (which holds every tenant's blocks). Default false;
    /// the `default` tenant of a token-less Unix socket always may (only the socket's owner
    /// can connect, and it can read the sidecar's memory anyway).
    #[serde(default)]
    pub shm: bool,
    /// Most namespaces the tenant may open. Default 64.
    #[serde(default = "default_max_namespaces")]
    pub max_namespaces: usize,
}

fn default_max_namespaces() -> usize {
    64
}

/// Bytes of one SmolLM2-135M block: 2 × 30 layers × 3 KV heads × 64 × 64 tokens × 2 bytes.
pub const DEFAULT_BLOCK_BYTES: u64 = 2 * 30 * 3 * 64 * 64 * 2;

impl Default for SidecarConfig {
    fn default() -> Self {
        SidecarConfig {
            socket: None,
            shm_socket: None,
            shm: true,
            tcp: None,
            tls_cert: None,
            tls_key: None,
            metrics: "127.0.0.1:9464".into(),
            page_size: 64,
            block_bytes: DEFAULT_BLOCK_BYTES,
            host_capacity: 1 << 30,
            mlock: false,
            disk_path: None,
            disk_capacity: 16 << 30,
            write_policy: "write-through".into(),
            max_message: 64 << 20,
            max_tokens_per_call: 131_072,
            max_inflight_per_connection: 64,
            max_lease: Duration::from_secs(30),
            shm_staging_slots: 64,
            shutdown_grace: Duration::from_secs(10),
            tenants: Vec::new(),
        }
    }
}

impl SidecarConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// The gRPC socket path, defaulted.
    pub fn socket_path(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(default_socket)
    }

    /// The shared-memory socket path, defaulted.
    pub fn shm_socket_path(&self) -> PathBuf {
        self.shm_socket.clone().unwrap_or_else(|| {
            let mut p = self.socket_path().into_os_string();
            p.push(".shm");
            p.into()
        })
    }

    /// Checks ranges and combinations; every message names the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !(16..=256).contains(&self.page_size) {
            return bad(format!("page_size {} is outside 16..=256", self.page_size));
        }
        if self.block_bytes == 0 || self.block_bytes > 1 << 30 {
            return bad(format!(
                "block_bytes {} is outside 1..=1GiB",
                self.block_bytes
            ));
        }
        if self.host_capacity < self.block_bytes {
            return bad(format!(
                "host_capacity {} is less than one block ({} bytes)",
                self.host_capacity, self.block_bytes
            ));
        }
        if self.disk_path.is_some() && self.disk_capacity < self.block_bytes {
            return bad(format!(
                "disk_capacity {} is less than one block",
                self.disk_capacity
            ));
        }
        if self.max_message < 1024 || self.max_message > u64::from(u32::MAX) {
            return bad(format!(
                "max_message {} is outside 1KiB..4GiB",
                self.max_message
            ));
        }
        if self.max_message < self.block_bytes + 4096 {
            return bad(format!(
                "max_message {} cannot carry one block of {} bytes",
                self.max_message, self.block_bytes
            ));
        }
        if self.max_tokens_per_call < self.page_size as usize {
            return bad("max_tokens_per_call is less than one page".into());
        }
        if self.max_inflight_per_connection == 0 {
            return bad("max_inflight_per_connection must be positive".into());
        }
        if self.max_lease.is_zero() || self.max_lease > Duration::from_secs(86_400) {
            return bad(format!(
                "max_lease {:?} is outside 1ms..=24h",
                self.max_lease
            ));
        }
        if !(1..=4096).contains(&self.shm_staging_slots) {
            return bad(format!(
                "shm_staging_slots {} is outside 1..=4096",
                self.shm_staging_slots
            ));
        }
        self.parse_write_policy()?;
        if self.tcp.is_some() && self.tenants.is_empty() {
            return bad(
                "listening on TCP needs at least one tenant with a token (--token or [[tenants]])"
                    .into(),
            );
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("tls_cert and tls_key go together".into());
        }
        if self.tls_cert.is_some() && self.tcp.is_none() {
            return bad("tls_cert is set but there is no tcp listener".into());
        }
        let mut names = std::collections::HashSet::new();
        for t in &self.tenants {
            if t.name.is_empty() {
                return bad("a tenant has an empty name".into());
            }
            if !names.insert(&t.name) {
                return bad(format!("tenant {} is listed twice", t.name));
            }
            if t.tokens.is_empty() && t.token_files.is_empty() {
                return bad(format!("tenant {} has no token", t.name));
            }
            if t.tokens.iter().any(|k| k.len() < 16) {
                return bad(format!(
                    "tenant {} has a token shorter than 16 characters",
                    t.name
                ));
            }
        }
        Ok(())
    }

    /// The write policy as the cache core knows it.
    pub fn parse_write_policy(&self) -> Result<strata_cache_core::WritePolicy, ConfigError> {
        use strata_cache_core::WritePolicy;
        match self.write_policy.as_str() {
            "write-through" => Ok(WritePolicy::WriteThrough),
            "write-back" => Ok(WritePolicy::WriteBack),
            s => match s.strip_prefix("selective:").map(str::parse::<u32>) {
                Some(Ok(hits)) if hits > 0 => Ok(WritePolicy::WriteThroughSelective { hits }),
                _ => Err(ConfigError::Invalid(format!(
                    "write_policy {s:?} is not write-through, write-back or selective:<hits>"
                ))),
            },
        }
    }
}

fn default_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("strata").join("sidecar.sock"),
        _ => {
            // SAFETY: getuid has no preconditions and cannot fail.
            let uid = unsafe { libc::getuid() };
            PathBuf::from(format!("/tmp/strata-{uid}")).join("sidecar.sock")
        }
    }
}

/// Parses a byte size: a number with an optional unit `B`, `K`/`KB`/`KiB`, `M`/`MiB`,
/// `G`/`GiB`, `T`/`TiB` (binary multiples; `KB`, `MB`, ... decimal).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512MiB, 4GiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "KB" | "kB" => 1000,
        "M" | "MiB" => 1 << 20,
        "MB" => 1_000_000,
        "G" | "GiB" => 1 << 30,
        "GB" => 1_000_000_000,
        "T" | "TiB" => 1 << 40,
        "TB" => 1_000_000_000_000,
        u => return Err(format!("{s:?}: unknown size unit {u:?}")),
    };
    let v = n * mult as f64;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(v as u64)
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        N(u64),
        S(String),
    }
    match Size::deserialize(d)? {
        Size::N(n) => Ok(n),
        Size::S(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("1.5MiB").unwrap(), 3 << 19);
        assert_eq!(parse_size("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("4 parsecs").is_err());
    }

    #[test]
    fn toml_round_trip_and_validation_messages() {
        let c: SidecarConfig = toml::from_str(
            r#"
            host_capacity = "2GiB"
            max_lease = "90s"
            tcp = "127.0.0.1:7000"
            [[tenants]]
            name = "a"
            tokens = ["0123456789abcdef0123"]
            "#,
        )
        .unwrap();
        assert_eq!(c.host_capacity, 2 << 30);
        assert_eq!(c.max_lease, Duration::from_secs(90));
        c.validate().unwrap();
        let e = toml::from_str::<SidecarConfig>("hots_capacity = 1").unwrap_err();
        assert!(e.to_string().contains("hots_capacity"), "{e}");
        let no_token = SidecarConfig {
            tcp: Some("127.0.0.1:1".into()),
            ..SidecarConfig::default()
        };
        assert!(
            no_token
                .validate()
                .unwrap_err()
                .to_string()
                .contains("needs at least one tenant")
        );
        let bad_policy = SidecarConfig {
            write_policy: "sometimes".into(),
            ..SidecarConfig::default()
        };
        assert!(bad_policy.validate().is_err());
    }
}
