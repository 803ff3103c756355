//! `strata-sidecar`: Strata's KV-block cache as a gRPC service next to an inference pod.
//!
//! Defaults work out of the box: a Unix socket (mode 0600) in the runtime directory, 1 GiB
//! of host memory, metrics on 127.0.0.1:9464. Settings come from `--config FILE` (TOML)
//! and then from flags, which win.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use strata_server::config::{TenantConfig, parse_size};
use strata_server::{Sidecar, SidecarConfig};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Strata's KV-block cache as a gRPC service (Unix socket by default)"
)]
struct Args {
    /// TOML configuration file (every setting; flags override it).
    #[arg(long, env = "STRATA_SIDECAR_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC Unix socket [default: $XDG_RUNTIME_DIR/strata/sidecar.sock or /tmp/strata-<uid>/sidecar.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Shared-memory socket [default: <socket>.shm].
    #[arg(long)]
    shm_socket: Option<PathBuf>,
    /// Do not serve the shared-memory data plane.
    #[arg(long)]
    no_shm: bool,
    /// Also listen on TCP (host:port); needs --token or tenants in the config.
    #[arg(long)]
    tcp: Option<String>,
    /// Bearer token of a single tenant named `default` (at least 16 characters).
    #[arg(long, env = "STRATA_SIDECAR_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Bearer token that GET /metrics requires (needed with two or more tenants, unless
    /// the config says metrics_public = true).
    #[arg(long, env = "STRATA_METRICS_TOKEN", hide_env_values = true)]
    metrics_token: Option<String>,
    /// A token that may read global Stats (repeatable).
    #[arg(long, env = "STRATA_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Vec<String>,
    /// PEM certificate chain: serve TLS on the TCP listener.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Prometheus metrics address, "" to turn off [default: 127.0.0.1:9464].
    #[arg(long)]
    metrics: Option<String>,
    /// Host memory for blocks, e.g. 4GiB [default: 1GiB].
    #[arg(long, value_parser = parse_size)]
    host_capacity: Option<u64>,
    /// File or block device for the disk tier [default: none].
    #[arg(long)]
    disk_path: Option<PathBuf>,
    /// Size of the disk tier, e.g. 100GiB [default: 16GiB].
    #[arg(long, value_parser = parse_size)]
    disk_capacity: Option<u64>,
    /// Tokens per page [default: 64].
    #[arg(long)]
    page_size: Option<u32>,
    /// Bytes per block [default: 1474560, SmolLM2-135M f16 with 64-token pages].
    #[arg(long)]
    block_bytes: Option<u64>,
    /// write-through, write-back or selective:<hits> [default: write-through].
    #[arg(long)]
    write_policy: Option<String>,
    /// Largest gRPC message, e.g. 64MiB [default: 64MiB].
    #[arg(long, value_parser = parse_size)]
    max_message: Option<u64>,
    /// Most tokens per call [default: 131072].
    #[arg(long)]
    max_tokens_per_call: Option<usize>,
    /// Most calls in flight per connection [default: 64].
    #[arg(long)]
    max_inflight: Option<usize>,
    /// Longest client lease, e.g. 30s [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration)]
    max_lease: Option<Duration>,
    /// Log filter (RUST_LOG syntax) [default: info].
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    strata_server::tune_allocator();
    let a = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&a.log).context("--log")?)
        .with_writer(std::io::stderr)
        .init();
    let mut cfg = match &a.config {
        Some(p) => SidecarConfig::from_file(p)?,
        None => SidecarConfig::default(),
    };
    macro_rules! set {
        ($($f:ident => $t:ident),*) => { $( if let Some(v) = a.$f.clone() { cfg.$t = v; } )* };
    }
    set!(host_capacity => host_capacity, disk_capacity => disk_capacity, page_size => page_size,
         block_bytes => block_bytes, write_policy => write_policy, max_message => max_message,
         max_tokens_per_call => max_tokens_per_call, max_inflight => max_inflight_per_connection,
         max_lease => max_lease, metrics => metrics);
    if a.socket.is_some() {
        cfg.socket = a.socket.clone();
    }
    if a.shm_socket.is_some() {
        cfg.shm_socket = a.shm_socket.clone();
    }
    if a.no_shm {
        cfg.shm = false;
    }
    if a.tcp.is_some() {
        cfg.tcp = a.tcp.clone();
    }
    if a.tls_cert.is_some() {
        cfg.tls_cert = a.tls_cert.clone();
        cfg.tls_key = a.tls_key.clone();
    }
    if a.metrics_token.is_some() {
        cfg.metrics_token = a.metrics_token.clone();
    }
    cfg.admin_tokens.extend(a.admin_token.iter().cloned());
    if a.disk_path.is_some() {
        cfg.disk_path = a.disk_path.clone();
    }
    if let Some(t) = &a.token {
        cfg.tenants.push(TenantConfig {
            name: "default".into(),
            tokens: vec![t.clone()],
            token_files: vec![],
            salt: None,
            shm: true,
            max_namespaces: 64,
            quota: Default::default(),
        });
    }
    let sidecar = Sidecar::bind(cfg).await?;
    sidecar
        .run(strata_server::server::shutdown_signal())
        .await?;
    tracing::info!("stopped");
    Ok(())
}
