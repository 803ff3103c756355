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
    /// Tokens that may read global `Stats` (every tenant's figures added up). Tenants'
    /// tokens only ever see their own usage. Default: none.
    pub admin_tokens: Vec<String>,
    /// Bearer token `GET /metrics` requires. The metrics endpoint reports every tenant's
    /// usage, so with two or more tenants it needs either this or `metrics_public = true`
    /// (a deliberate choice: pods sharing a network namespace all reach loopback).
    pub metrics_token: Option<String>,
    /// Serve `/metrics` without a token even though tenants are configured. Default false.
    pub metrics_public: bool,
    /// Most open TCP (and TLS) connections; more are closed at once. Default 256.
    pub max_tcp_connections: usize,
    /// Most open connections on the gRPC Unix socket. Default 1024.
    pub max_unix_connections: usize,
    /// Most open connections to the metrics endpoint. Default 16.
    pub max_metrics_connections: usize,
    /// Most shared-memory sessions, all tenants together. Default 64.
    pub max_shm_sessions: usize,
    /// Most inline `Get` streams open at once, all tenants together. Default 128.
    pub max_get_streams: usize,
    /// A connection with no call in flight that has started no call for this long is
    /// closed (clients reconnect on their next call). Default 5 min.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A TCP connection that has not started an authenticated call within this time is
    /// closed. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub first_request_timeout: Duration,
    /// A request body that makes no progress for this long fails with
    /// `DEADLINE_EXCEEDED`, and an inline `Get` whose client reads nothing for this long
    /// ends. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// Longest unary call, from its headers to its answer. Default 90 s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// HTTP/2 keepalive: a ping this often on every connection (a peer that does not
    /// answer within as long is dropped). Default 20 s.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// Request bytes being received on one connection at once (e.g. `"128MiB"`).
    /// Default 2 × `max_message`.
    #[serde(deserialize_with = "de_opt_size")]
    pub max_receiving_per_connection: Option<u64>,
    /// Request bytes being received by the whole sidecar at once. Default 4 ×
    /// `max_message`.
    #[serde(deserialize_with = "de_opt_size")]
    pub max_receiving: Option<u64>,
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
    /// What the tenant may use at once; over a quota a call gets `RESOURCE_EXHAUSTED`
    /// naming it, and nothing of another tenant's is evicted to make room.
    #[serde(default)]
    pub quota: Quota,
}

fn default_max_namespaces() -> usize {
    64
}

/// One tenant's share of the sidecar. Unset fields are unlimited except where a default
/// is given.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Quota {
    /// Bytes of host-tier blocks the tenant may hold leased or pinned (prefetch leases,
    /// shared-memory `Get` leases, blocks being streamed). Default: half the host pool
    /// when two or more tenants share the sidecar, else unlimited.
    #[serde(deserialize_with = "de_opt_size")]
    pub leased_bytes: Option<u64>,
    /// Bytes of blocks the tenant may have stored in the host tier; past it, its own
    /// least recently used blocks leave first. Default: unlimited.
    #[serde(deserialize_with = "de_opt_size")]
    pub host_bytes: Option<u64>,
    /// Bytes of blocks the tenant may have stored in the disk tier (as `host_bytes`).
    #[serde(deserialize_with = "de_opt_size")]
    pub disk_bytes: Option<u64>,
    /// Inline `Get` streams open at once. Default 32.
    pub get_streams: Option<usize>,
    /// Shared-memory sessions open at once. Default 4.
    pub shm_sessions: Option<usize>,
    /// Calls in flight, over all its connections. Default 256.
    pub inflight: Option<usize>,
    /// Request bytes its calls may have in reception at once. Default: half of
    /// `max_receiving` when two or more tenants share the sidecar, else all of it.
    #[serde(deserialize_with = "de_opt_size")]
    pub receiving_bytes: Option<u64>,
}

impl Quota {
    /// Inline `Get` streams, defaulted.
    pub fn get_streams(&self) -> usize {
        self.get_streams.unwrap_or(32)
    }
    /// Shared-memory sessions, defaulted.
    pub fn shm_sessions(&self) -> usize {
        self.shm_sessions.unwrap_or(4)
    }
    /// Calls in flight, defaulted.
    pub fn inflight(&self) -> usize {
        self.inflight.unwrap_or(256)
    }
    /// Request bytes in reception, defaulted.
    pub fn receiving_bytes(&self, cfg: &SidecarConfig) -> u64 {
        self.receiving_bytes.unwrap_or(if cfg.tenants.len() > 1 {
            cfg.max_receiving() / 2
        } else {
            cfg.max_receiving()
        })
    }
    /// Leased host bytes, defaulted: with two or more tenants, half the host pool, so that
    /// no tenant can lease the whole of it; otherwise unlimited.
    pub fn leased_bytes(&self, cfg: &SidecarConfig) -> Option<u64> {
        self.leased_bytes
            .or((cfg.tenants.len() > 1).then_some(cfg.host_capacity / 2))
    }
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
            admin_tokens: Vec::new(),
            metrics_token: None,
            metrics_public: false,
            max_tcp_connections: 256,
            max_unix_connections: 1024,
            max_metrics_connections: 16,
            max_shm_sessions: 64,
            max_get_streams: 128,
            idle_timeout: Duration::from_secs(300),
            first_request_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(90),
            keepalive_interval: Duration::from_secs(20),
            max_receiving_per_connection: None,
            max_receiving: None,
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
        for (name, v) in [
            ("max_tcp_connections", self.max_tcp_connections),
            ("max_unix_connections", self.max_unix_connections),
            ("max_metrics_connections", self.max_metrics_connections),
            ("max_shm_sessions", self.max_shm_sessions),
            ("max_get_streams", self.max_get_streams),
        ] {
            if v == 0 || v > 1_000_000 {
                return bad(format!("{name} {v} is outside 1..=1000000"));
            }
        }
        for (name, d) in [
            ("idle_timeout", self.idle_timeout),
            ("first_request_timeout", self.first_request_timeout),
            ("stall_timeout", self.stall_timeout),
            ("request_timeout", self.request_timeout),
            ("keepalive_interval", self.keepalive_interval),
        ] {
            if d < Duration::from_millis(100) || d > Duration::from_secs(86_400) {
                return bad(format!("{name} {d:?} is outside 100ms..=24h"));
            }
        }
        if self.max_receiving_per_connection() < self.max_message {
            return bad(format!(
                "max_receiving_per_connection {} is less than max_message {}",
                self.max_receiving_per_connection(),
                self.max_message
            ));
        }
        if self.max_receiving() < self.max_receiving_per_connection() {
            return bad(format!(
                "max_receiving {} is less than max_receiving_per_connection {}",
                self.max_receiving(),
                self.max_receiving_per_connection()
            ));
        }
        if self.tenants.len() > 1
            && !self.metrics.is_empty()
            && self.metrics_token.is_none()
            && !self.metrics_public
        {
            return bad(
                "with tenants configured, the metrics endpoint shows every tenant's usage: set \
                 metrics_token, or metrics_public = true to serve it without one, or metrics = \"\" \
                 to turn it off"
                    .into(),
            );
        }
        if let Some(t) = &self.metrics_token
            && t.len() < 16
        {
            return bad("metrics_token is shorter than 16 characters".into());
        }
        if self.admin_tokens.iter().any(|t| t.len() < 16) {
            return bad("an admin token is shorter than 16 characters".into());
        }
        let mut salts = std::collections::HashMap::new();
        let mut names = std::collections::HashSet::new();
        for t in &self.tenants {
            // Equal salts would give two tenants the same namespace ids and block keys:
            // each could read the other's blocks (after a restart with a disk tier, too).
            let salt = t.salt.clone().unwrap_or_else(|| t.name.clone());
            if let Some(other) = salts.insert(salt, &t.name) {
                return bad(format!(
                    "tenants {other} and {} have the same cache salt; each tenant needs its own \
                     (salt defaults to the tenant's name)",
                    t.name
                ));
            }
            if t.name.is_empty() {
                return bad("a tenant has an empty name".into());
            }
            if !names.insert(&t.name) {
                return bad(format!("tenant {} is listed twice", t.name));
            }
            if t.tokens.is_empty() && t.token_files.is_empty() {
                return bad(format!("tenant {} has no token", t.name));
            }
            for (name, v) in [
                ("leased_bytes", t.quota.leased_bytes),
                ("host_bytes", t.quota.host_bytes),
                ("disk_bytes", t.quota.disk_bytes),
            ] {
                if let Some(v) = v
                    && v < self.block_bytes
                {
                    return bad(format!(
                        "tenant {}: quota.{name} {v} is less than one block ({} bytes)",
                        t.name, self.block_bytes
                    ));
                }
            }
            if t.quota
                .receiving_bytes
                .is_some_and(|v| v < self.max_message)
            {
                return bad(format!(
                    "tenant {}: quota.receiving_bytes is less than max_message {}",
                    t.name, self.max_message
                ));
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

    /// Request bytes one connection may have in reception at once, defaulted.
    pub fn max_receiving_per_connection(&self) -> u64 {
        self.max_receiving_per_connection
            .unwrap_or(self.max_message.saturating_mul(2))
    }

    /// Request bytes the sidecar may have in reception at once, defaulted.
    pub fn max_receiving(&self) -> u64 {
        self.max_receiving
            .unwrap_or(self.max_message.saturating_mul(4))
    }

    /// Largest request of a call that carries no blocks (everything but `Put`): enough for
    /// `max_tokens_per_call` tokens at the varint worst case of 5 bytes each, plus room for
    /// the other fields.
    pub fn max_control_message(&self) -> u64 {
        (self.max_tokens_per_call as u64)
            .saturating_mul(5)
            .saturating_add(64 << 10)
            .min(self.max_message)
    }

    /// Most repeated elements (tokens, keys, blocks, slots, lease ids) one request may
    /// carry: the tokens of `max_tokens_per_call` plus two per page of them.
    pub fn max_request_elements(&self) -> usize {
        let pages = self.max_tokens_per_call / self.page_size.max(1) as usize;
        self.max_tokens_per_call
            .saturating_add(pages.saturating_mul(2))
            .saturating_add(64)
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

fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_size(d).map(Some)
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
