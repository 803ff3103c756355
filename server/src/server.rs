//! Starting and stopping the sidecar: tiers, listeners, the gRPC server, the
//! shared-memory plane, metrics, and graceful shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::os::unix::fs::DirBuilderExt as _;

use anyhow::{Context, bail};
use strata_cache_core::{CacheConfig, EvictionKind, Tier, TierSpec, TieredCache};
use strata_disk_tier::{DiskTier, DiskTierConfig};
use strata_host_tier::{Backing, HostPool, HostPoolConfig};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;

use crate::auth::Auth;
use crate::config::SidecarConfig;
use crate::conn::{Conn, Listener};
use crate::pb;
use crate::service::CacheService;
use crate::state::Shared;

/// Where a started sidecar listens.
#[derive(Clone, Debug)]
pub struct Bound {
    /// gRPC Unix socket.
    pub socket: PathBuf,
    /// Shared-memory socket, if served.
    pub shm_socket: Option<PathBuf>,
    /// gRPC TCP address, if any (the real port when 0 was asked for).
    pub tcp: Option<SocketAddr>,
    /// Metrics address, if any.
    pub metrics: Option<SocketAddr>,
}

/// A sidecar bound to its sockets, ready to serve.
pub struct Sidecar {
    shared: Arc<Shared>,
    bound: Bound,
    unix: UnixListener,
    shm: Option<UnixListener>,
    tcp: Option<(TcpListener, Option<tokio_rustls::TlsAcceptor>)>,
    metrics: Option<TcpListener>,
}

/// Binds a Unix socket with mode 0600, creating its directory (0700) if needed (and, when
/// `private_dir`, refusing a directory others could have prepared) and removing a stale
/// socket file that nobody listens on.
fn bind_unix(path: &Path, private_dir: bool) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        if private_dir {
            check_private_dir(dir)?;
        }
    }
    bind_checked(path)
}

/// Refuses a default socket directory that another user could have prepared: it must be
/// a real directory owned by us and closed to everyone else.
fn check_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let md =
        std::fs::symlink_metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !md.is_dir() || md.uid() != me || md.mode() & 0o077 != 0 {
        bail!(
            "{} must be a directory owned by uid {me} with mode 0700 (it is {}, owner {}, mode {:o}); \
             fix it or choose --socket",
            dir.display(),
            if md.is_dir() {
                "a directory"
            } else {
                "not a directory"
            },
            md.uid(),
            md.mode() & 0o7777
        );
    }
    Ok(())
}

fn bind_checked(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(md) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !md.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; refusing to replace it (choose another --socket)",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another process is listening on {}; stop it or choose another --socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting mode 0600 on {}", path.display()))?;
    Ok(l)
}

fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use tokio_rustls::rustls;
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).with_context(|| format!("opening {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("reading certificates from {}", cert.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", cert.display());
    }
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("opening {}", key.display()))?,
    ))
    .with_context(|| format!("reading the private key from {}", key.display()))?
    .with_context(|| format!("no private key in {}", key.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("TLS certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

impl Sidecar {
    /// Builds the tiers and binds every socket (nothing is served until [`Sidecar::run`]).
    pub async fn bind(cfg: SidecarConfig) -> anyhow::Result<Self> {
        cfg.validate()?;
        let auth = Auth::from_config(&cfg)?;
        let block = usize::try_from(cfg.block_bytes)?;
        let mut host_cfg = HostPoolConfig::new(block, cfg.host_capacity);
        host_cfg.backing = Backing::Memfd;
        host_cfg.mlock = cfg.mlock;
        let host = Arc::new(HostPool::new(host_cfg).context("creating the host pool")?);
        let mut tiers = vec![TierSpec {
            capacity_bytes: host.slots() as u64 * block as u64,
            tier: host.clone(),
            eviction: EvictionKind::Lru,
        }];
        let disk = match &cfg.disk_path {
            Some(p) => {
                // Segments of an eighth of the tier (at most 256 MiB, at least 4 records),
                // so small tiers still have the ring of segments reclaim needs.
                let record = 4096 + block.div_ceil(4096) as u64 * 4096;
                let mut dcfg = DiskTierConfig::new(p, cfg.disk_capacity, block);
                dcfg.segment_bytes =
                    (cfg.disk_capacity / 8 / 4096 * 4096).clamp(4 * record + 8192, 256 << 20);
                let d = Arc::new(
                    DiskTier::open(dcfg)
                        .await
                        .with_context(|| format!("opening the disk tier at {}", p.display()))?,
                );
                tracing::info!(
                    path = %p.display(),
                    engine = d.engine_name(),
                    recovered = d.metrics().recovered_blocks,
                    "disk tier open"
                );
                tiers.push(TierSpec {
                    capacity_bytes: d.capacity_blocks() * block as u64,
                    tier: d.clone(),
                    eviction: EvictionKind::Lru,
                });
                Some(d)
            }
            None => None,
        };
        let cache = TieredCache::new(
            tiers,
            CacheConfig {
                page_size: cfg.page_size,
                write_policy: cfg.parse_write_policy()?,
                max_tokens_per_call: cfg.max_tokens_per_call,
                max_lease: cfg.max_lease,
                ..CacheConfig::default()
            },
        )?;
        let socket = cfg.socket_path();
        // The default directory is shared ground (/tmp): it must be ours alone.
        let unix = bind_unix(&socket, cfg.socket.is_none())?;
        let (shm, shm_socket) = if cfg.shm {
            let p = cfg.shm_socket_path();
            (
                Some(bind_unix(
                    &p,
                    cfg.shm_socket.is_none() && cfg.socket.is_none(),
                )?),
                Some(p),
            )
        } else {
            (None, None)
        };
        let tcp = match &cfg.tcp {
            Some(addr) => {
                let l = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding TCP {addr}"))?;
                let tls = match (&cfg.tls_cert, &cfg.tls_key) {
                    (Some(c), Some(k)) => Some(tls_acceptor(c, k)?),
                    _ => None,
                };
                Some((l, tls))
            }
            None => None,
        };
        let metrics = if cfg.metrics.is_empty() {
            None
        } else {
            Some(
                TcpListener::bind(&cfg.metrics)
                    .await
                    .with_context(|| format!("binding the metrics address {}", cfg.metrics))?,
            )
        };
        let bound = Bound {
            socket,
            shm_socket,
            tcp: tcp.as_ref().map(|(l, _)| l.local_addr()).transpose()?,
            metrics: metrics.as_ref().map(|l| l.local_addr()).transpose()?,
        };
        // Each tenant's blocks are a quota group of the cache.
        for t in auth.tenants() {
            let q = &t.quota;
            for (i, bytes) in [q.host_bytes, q.disk_bytes].into_iter().enumerate() {
                if i < cache.tier_count() {
                    cache.set_group_quota(
                        t.group,
                        strata_cache_core::TierId(i as u8),
                        bytes.map(|b| b / block as u64),
                    );
                }
            }
        }
        crate::codec::set_max_elements(cfg.max_request_elements());
        let nofile = raise_nofile_limit();
        let mut cfg = cfg;
        // Keep a reserve of descriptors: the listeners' caps together stay under the
        // open-file limit, the TCP cap giving way first, so a flood of remote
        // connections cannot take the descriptors local clients need.
        let reserve = 128u64;
        let local =
            (cfg.max_unix_connections + cfg.max_metrics_connections + cfg.max_shm_sessions + 16)
                as u64;
        if nofile < local + cfg.max_tcp_connections as u64 + reserve {
            let tcp = nofile.saturating_sub(reserve) / 4;
            let unix = nofile.saturating_sub(reserve) / 2;
            tracing::warn!(
                nofile,
                tcp_before = cfg.max_tcp_connections,
                tcp,
                unix_before = cfg.max_unix_connections,
                "the open-file limit is low for the connection caps; lowering them"
            );
            cfg.max_tcp_connections = cfg.max_tcp_connections.min(tcp.max(1) as usize);
            cfg.max_unix_connections = cfg.max_unix_connections.min(unix.max(1) as usize);
        }
        let shared = Arc::new(Shared::new(cache, host, disk, auth, cfg));
        Ok(Sidecar {
            shared,
            bound,
            unix,
            shm,
            tcp,
            metrics,
        })
    }

    /// Where it listens.
    pub fn bound(&self) -> &Bound {
        &self.bound
    }

    /// The shared state (for in-process use and tests).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, lets calls in flight finish
    /// (up to the configured grace), ends sessions and flushes the disk tier.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let Sidecar {
            shared,
            bound,
            unix,
            shm,
            tcp,
            metrics,
        } = self;
        let cfg = shared.cfg.clone();
        let (tx, rx) = mpsc::channel::<std::io::Result<Conn>>(64);
        let mut tasks = Vec::new();
        let unix_conns = Listener::new("unix", cfg.max_unix_connections);
        let tcp_conns = Listener::new("tcp", cfg.max_tcp_connections);
        shared
            .listeners
            .lock()
            .extend([unix_conns.clone(), tcp_conns.clone()]);
        {
            let tx = tx.clone();
            let shared = shared.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    match unix.accept().await {
                        Ok((s, _)) => {
                            // Over the cap, the socket is closed at once (dropped).
                            let Some(slot) = unix_conns.admit() else {
                                continue;
                            };
                            let c = Conn::new(Box::new(s), slot, shared.clone());
                            if tx.send(Ok(c)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!("accept on the Unix socket: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }));
        }
        if let Some((l, tls)) = tcp {
            let tx = tx.clone();
            let shared = shared.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let (s, peer) = match l.accept().await {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!("accept on TCP: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Some(slot) = tcp_conns.admit() else {
                        continue;
                    };
                    let _ = s.set_nodelay(true);
                    match &tls {
                        None => {
                            let c = Conn::new(Box::new(s), slot, shared.clone());
                            if tx.send(Ok(c)).await.is_err() {
                                return;
                            }
                        }
                        Some(acc) => {
                            // Handshakes run on their own so a slow client cannot stall
                            // accepting.
                            let (acc, tx, shared) = (acc.clone(), tx.clone(), shared.clone());
                            tokio::spawn(async move {
                                match tokio::time::timeout(Duration::from_secs(10), acc.accept(s))
                                    .await
                                {
                                    Ok(Ok(t)) => {
                                        let c = Conn::new(Box::new(t), slot, shared);
                                        let _ = tx.send(Ok(c)).await;
                                    }
                                    Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake: {e}"),
                                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                                }
                            });
                        }
                    }
                }
            }));
        }
        drop(tx);
        if let Some(l) = shm {
            let shared = shared.clone();
            // Sessions are capped after their handshake; connections still saying hello
            // are capped here.
            let shm_conns = Listener::new("shm", cfg.max_shm_sessions.saturating_add(16));
            shared.listeners.lock().push(shm_conns.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, _)) => {
                            let Some(slot) = shm_conns.admit() else {
                                continue;
                            };
                            let shared = shared.clone();
                            tokio::spawn(async move {
                                let _slot = slot;
                                crate::shm::serve_session(shared, s).await;
                            });
                        }
                        Err(e) => {
                            tracing::warn!("accept on the shared-memory socket: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }));
        }
        if let Some(l) = metrics {
            tasks.push(tokio::spawn(crate::metrics::serve(shared.clone(), l)));
        }
        {
            let shared = shared.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    shared.sweep();
                }
            }));
        }

        let (health, health_svc) = tonic_health::server::health_reporter();
        let standard = crate::gate::STANDARD_LIMIT as usize;
        let health_svc = health_svc.max_decoding_message_size(standard);
        health
            .set_serving::<pb::cache_server::CacheServer<CacheService>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?
            .max_decoding_message_size(standard);
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?
            .max_decoding_message_size(standard);
        let max = cfg.max_message as usize;
        let svc = pb::cache_server::CacheServer::new(CacheService::new(shared.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let limit_layer = crate::limits::MessageLimitLayer::new(cfg.max_message);
        let gate = crate::gate::GateLayer::new(shared.clone());
        let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            // HTTP/2 bounds the streams of a connection (and so the requests it can make us
            // buffer) at twice the in-flight limit: calls past the limit but within this
            // bound get RESOURCE_EXHAUSTED naming it, instead of queueing in the client.
            .max_concurrent_streams(Some(
                u32::try_from(cfg.max_inflight_per_connection.saturating_mul(2) + 8)
                    .unwrap_or(u32::MAX),
            ))
            // What a peer may send before the sidecar reads it is bounded by these windows:
            // no larger than what one connection may have in reception.
            .initial_stream_window_size(Some((8u64 << 20).min(cfg.max_message) as u32))
            .initial_connection_window_size(Some(
                (32u64 << 20).min(cfg.max_receiving_per_connection()) as u32,
            ))
            .max_frame_size(Some(1 << 20))
            .http2_max_header_list_size(Some(16 << 10))
            .http2_keepalive_interval(Some(cfg.keepalive_interval))
            .http2_keepalive_timeout(Some(cfg.keepalive_interval))
            .timeout(cfg.request_timeout)
            .layer(limit_layer)
            .layer(gate)
            .add_service(health_svc)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            });
        let mut server = std::pin::pin!(server);
        println!(
            "strata-sidecar ready unix={} shm={} tcp={} metrics={}",
            bound.socket.display(),
            bound
                .shm_socket
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "-".into()),
            bound
                .tcp
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            bound
                .metrics
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
        );
        tokio::select! {
            r = &mut server => {
                r.context("gRPC server failed")?;
            }
            _ = shutdown => {
                tracing::info!("shutting down: no new connections; waiting for calls in flight");
                health
                    .set_not_serving::<pb::cache_server::CacheServer<CacheService>>()
                    .await;
                // Stop accepting at once (queued and new clients are refused, not parked
                // for the grace period), then let calls in flight finish.
                for t in &tasks {
                    t.abort();
                }
                let _ = std::fs::remove_file(&bound.socket);
                if let Some(p) = &bound.shm_socket {
                    let _ = std::fs::remove_file(p);
                }
                shared.shutdown.send_replace(true);
                let _ = stop_tx.send(());
                if tokio::time::timeout(cfg.shutdown_grace, &mut server).await.is_err() {
                    tracing::warn!(
                        "calls still in flight after {:?}; closing them",
                        cfg.shutdown_grace
                    );
                }
            }
        }
        for t in tasks {
            t.abort();
        }
        if let Some(d) = &shared.disk {
            match d.flush(Duration::from_secs(5)).await {
                Ok(()) => tracing::info!("disk tier flushed"),
                Err(e) => tracing::error!("flushing the disk tier: {e}"),
            }
        }
        let _ = std::fs::remove_file(&bound.socket);
        if let Some(p) = &bound.shm_socket {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }
}

/// Raises the soft limit of open descriptors to the hard limit, so that the connection
/// caps, not the descriptor limit, are what refuses clients (and the Unix socket keeps a
/// reserve of descriptors under a flood of TCP connections).
fn raise_nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid resource and a pointer to a live rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
            tracing::warn!("could not raise the open-file limit from {}", r.rlim_cur);
        }
    }
    r.rlim_cur
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot watch SIGTERM: {e}");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
    }
}
