//! Prometheus metrics (`GET /metrics` on the metrics address), text exposition format.
//! Names follow `strata_<subsystem>_<what>_<unit>`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;

use crate::state::Shared;

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 1.0, 10.0,
];

#[derive(Default)]
struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

/// Request counters and latency histograms.
#[derive(Default)]
pub struct Metrics {
    requests: DashMap<(&'static str, &'static str), AtomicU64>,
    latency: DashMap<&'static str, Histogram>,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    unauthenticated: DashMap<&'static str, AtomicU64>,
    timed_out: DashMap<&'static str, AtomicU64>,
}

impl Metrics {
    /// Records one finished call.
    pub fn observe(&self, method: &'static str, code: tonic::Code, elapsed: Duration) {
        self.requests
            .entry((method, code_name(code)))
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
        let h = self.latency.entry(method).or_default();
        let s = elapsed.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        h.count.fetch_add(1, Ordering::Relaxed);
        h.sum_nanos
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Counts block bytes received inline or through staging slots.
    pub fn add_bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a request refused on its headers (no or unknown token) on a listener.
    pub fn refused_unauthenticated(&self, listener: &'static str) {
        self.unauthenticated
            .entry(listener)
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection closed by a timeout (idle, or no first request).
    pub fn connection_timed_out(&self, listener: &'static str) {
        self.timed_out
            .entry(listener)
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts block bytes sent inline.
    pub fn add_bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Ordering::Relaxed);
    }
}

fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The whole exposition text.
pub fn render(shared: &Shared) -> String {
    let mut o = String::new();
    let m = &shared.metrics;
    let _ = writeln!(
        o,
        "# HELP strata_sidecar_requests_total gRPC calls finished, by method and status.\n# TYPE strata_sidecar_requests_total counter"
    );
    for e in m.requests.iter() {
        let (method, code) = e.key();
        let _ = writeln!(
            o,
            "strata_sidecar_requests_total{{method=\"{method}\",code=\"{code}\"}} {}",
            e.value().load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        o,
        "# HELP strata_sidecar_request_duration_seconds gRPC call latency.\n# TYPE strata_sidecar_request_duration_seconds histogram"
    );
    for e in m.latency.iter() {
        let method = e.key();
        let h = e.value();
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                o,
                "strata_sidecar_request_duration_seconds_bucket{{method=\"{method}\",le=\"{b}\"}} {}",
                h.counts[i].load(Ordering::Relaxed)
            );
        }
        let n = h.count.load(Ordering::Relaxed);
        let _ = writeln!(
            o,
            "strata_sidecar_request_duration_seconds_bucket{{method=\"{method}\",le=\"+Inf\"}} {n}\nstrata_sidecar_request_duration_seconds_sum{{method=\"{method}\"}} {}\nstrata_sidecar_request_duration_seconds_count{{method=\"{method}\"}} {n}",
            h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9
        );
    }
    let gauge = |o: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    };
    gauge(
        &mut o,
        "strata_sidecar_connections",
        "Open gRPC connections.",
        shared.connections(),
    );
    gauge(
        &mut o,
        "strata_sidecar_shm_sessions",
        "Open shared-memory sessions.",
        shared.sessions.len() as u64,
    );
    gauge(
        &mut o,
        "strata_sidecar_client_leases",
        "Leases held by clients.",
        shared.leases.len() as u64,
    );
    gauge(
        &mut o,
        "strata_sidecar_get_streams",
        "Inline Get streams being served.",
        shared.get_streams.load(Ordering::Relaxed),
    );
    let _ = writeln!(
        o,
        "# HELP strata_sidecar_block_bytes_total Block bytes moved inline or by staging.\n# TYPE strata_sidecar_block_bytes_total counter\nstrata_sidecar_block_bytes_total{{direction=\"in\"}} {}\nstrata_sidecar_block_bytes_total{{direction=\"out\"}} {}",
        m.bytes_in.load(Ordering::Relaxed),
        m.bytes_out.load(Ordering::Relaxed)
    );
    let per_listener =
        |o: &mut String, name: &str, help: &str, map: &DashMap<&'static str, AtomicU64>| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            for e in map.iter() {
                let _ = writeln!(
                    o,
                    "{name}{{listener=\"{}\"}} {}",
                    e.key(),
                    e.value().load(Ordering::Relaxed)
                );
            }
        };
    per_listener(
        &mut o,
        "strata_sidecar_unauthenticated_total",
        "Requests refused on their headers (missing or unknown token).",
        &m.unauthenticated,
    );
    per_listener(
        &mut o,
        "strata_sidecar_connection_timeouts_total",
        "Connections closed because nothing was read for idle_timeout or no request came.",
        &m.timed_out,
    );
    {
        let ls = shared.listeners.lock();
        let _ = writeln!(
            o,
            "# HELP strata_sidecar_listener_connections Open connections per listener.\n# TYPE strata_sidecar_listener_connections gauge"
        );
        for l in ls.iter() {
            let _ = writeln!(
                o,
                "strata_sidecar_listener_connections{{listener=\"{}\"}} {}",
                l.kind,
                l.open()
            );
        }
        let _ = writeln!(
            o,
            "# HELP strata_sidecar_refused_connections_total Connections closed at once because their listener was at its cap.\n# TYPE strata_sidecar_refused_connections_total counter"
        );
        for l in ls.iter() {
            let _ = writeln!(
                o,
                "strata_sidecar_refused_connections_total{{listener=\"{}\"}} {}",
                l.kind,
                l.refused()
            );
        }
    }
    gauge(
        &mut o,
        "strata_sidecar_receiving_bytes",
        "Request bytes being received now (max_receiving bounds it).",
        shared.receiving.used(),
    );
    // Per-tenant usage (the endpoint is for the operator: it needs metrics_token or
    // metrics_public when several tenants share the sidecar).
    let bb = shared.cache.block_bytes() as u64;
    type TenantField = (
        &'static str,
        &'static str,
        fn(&crate::auth::Tenant, &Shared) -> u64,
    );
    let tenant_fields: [TenantField; 8] = [
        (
            "strata_tenant_host_bytes",
            "Bytes of the tenant's blocks in the host tier.",
            |t, s| {
                s.cache.group_blocks(t.group).first().copied().unwrap_or(0)
                    * s.cache.block_bytes() as u64
            },
        ),
        (
            "strata_tenant_disk_bytes",
            "Bytes of the tenant's blocks in the disk tier.",
            |t, s| {
                s.cache.group_blocks(t.group).get(1).copied().unwrap_or(0)
                    * s.cache.block_bytes() as u64
            },
        ),
        (
            "strata_tenant_leased_bytes",
            "Host-tier bytes the tenant holds leased.",
            |t, s| t.usage.leased_pages.load(Ordering::Relaxed) * s.cache.block_bytes() as u64,
        ),
        (
            "strata_tenant_leases",
            "Leases the tenant holds.",
            |t, _| t.usage.leases.load(Ordering::Relaxed),
        ),
        (
            "strata_tenant_get_streams",
            "Inline Get streams the tenant has open.",
            |t, _| t.usage.get_streams.load(Ordering::Relaxed) as u64,
        ),
        (
            "strata_tenant_shm_sessions",
            "Shared-memory sessions the tenant has open.",
            |t, _| t.usage.shm_sessions.load(Ordering::Relaxed) as u64,
        ),
        (
            "strata_tenant_inflight_calls",
            "Calls of the tenant in flight.",
            |t, _| t.usage.inflight.load(Ordering::Relaxed) as u64,
        ),
        (
            "strata_tenant_lookups_total",
            "Lookups the tenant made.",
            |t, _| t.usage.lookups.load(Ordering::Relaxed),
        ),
    ];
    let _ = bb;
    for (name, help, f) in tenant_fields {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for t in shared.auth.tenants() {
            let _ = writeln!(o, "{name}{{tenant=\"{}\"}} {}", t.name, f(t, shared));
        }
    }
    let st = shared.cache.stats();
    gauge(
        &mut o,
        "strata_cache_pages",
        "Pages in the index.",
        st.pages,
    );
    gauge(
        &mut o,
        "strata_cache_leases",
        "Leases held in the cache.",
        st.leases,
    );
    let _ = writeln!(
        o,
        "# HELP strata_cache_lookups_total Lookups.\n# TYPE strata_cache_lookups_total counter\nstrata_cache_lookups_total {}",
        st.lookups
    );
    type Field = (
        &'static str,
        &'static str,
        &'static str,
        fn(&strata_cache_core::TierStats) -> u64,
    );
    let fields: [Field; 10] = [
        (
            "strata_cache_hits_pages_total",
            "counter",
            "Pages found per tier by lookups.",
            |t| t.hits,
        ),
        (
            "strata_cache_misses_pages_total",
            "counter",
            "Pages looked up and not in the tier.",
            |t| t.misses,
        ),
        (
            "strata_cache_in_bytes_total",
            "counter",
            "Bytes written into the tier.",
            |t| t.bytes_in,
        ),
        (
            "strata_cache_out_bytes_total",
            "counter",
            "Bytes read from the tier.",
            |t| t.bytes_out,
        ),
        (
            "strata_cache_evictions_total",
            "counter",
            "Blocks evicted from the tier.",
            |t| t.evictions,
        ),
        (
            "strata_cache_demotions_total",
            "counter",
            "Blocks moved down from the tier.",
            |t| t.demotions,
        ),
        (
            "strata_cache_read_errors_total",
            "counter",
            "Failed or corrupt reads.",
            |t| t.read_errors,
        ),
        (
            "strata_cache_resident_bytes",
            "gauge",
            "Bytes of blocks in the tier.",
            |t| t.resident_bytes,
        ),
        (
            "strata_cache_pinned_bytes",
            "gauge",
            "Bytes pinned or leased.",
            |t| t.pinned_bytes,
        ),
        (
            "strata_cache_capacity_bytes",
            "gauge",
            "Bytes the tier may hold.",
            |t| t.capacity_bytes,
        ),
    ];
    for (name, kind, help, f) in fields {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for t in &st.tiers {
            let tier = t.kind.map(|k| k.as_str()).unwrap_or("unknown");
            let _ = writeln!(o, "{name}{{tier=\"{tier}\"}} {}", f(t));
        }
    }
    if let Some(d) = &shared.disk {
        let dm = d.metrics();
        let c = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        c(
            &mut o,
            "strata_disk_written_bytes_total",
            "Bytes written to disk.",
            dm.bytes_written,
        );
        c(
            &mut o,
            "strata_disk_read_bytes_total",
            "Bytes read from disk.",
            dm.bytes_read,
        );
        c(
            &mut o,
            "strata_disk_checksum_failures_total",
            "Blocks that failed their checksum.",
            dm.checksum_failures,
        );
        c(
            &mut o,
            "strata_disk_io_errors_total",
            "I/O errors.",
            dm.io_errors,
        );
        c(
            &mut o,
            "strata_disk_rejected_total",
            "Blocks refused by admission.",
            dm.rejected,
        );
        gauge(
            &mut o,
            "strata_disk_live_blocks",
            "Blocks stored on disk.",
            dm.live_blocks,
        );
        gauge(
            &mut o,
            "strata_disk_recovered_blocks",
            "Blocks found at start-up.",
            dm.recovered_blocks,
        );
    }
    o
}

/// Serves `GET /metrics` on `listener` until `shutdown` flips. Connections are capped
/// (`max_metrics_connections`), a request's headers must arrive within 5 s and a
/// connection lives at most 30 s; with `metrics_token` set, requests must carry it.
pub async fn serve(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let mut rx = shared.shutdown.subscribe();
    let conns = crate::conn::Listener::new("metrics", shared.cfg.max_metrics_connections);
    shared.listeners.lock().push(conns.clone());
    let token = shared
        .cfg
        .metrics_token
        .as_ref()
        .map(|t| *blake3::hash(t.as_bytes()).as_bytes());
    loop {
        let (stream, _): (_, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("metrics listener: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = rx.changed() => return,
        };
        let Some(slot) = conns.admit() else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let shared = shared.clone();
                    async move {
                        let authorized = token.is_none_or(|want| {
                            req.headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.strip_prefix("Bearer "))
                                .is_some_and(|t| {
                                    blake3::hash(t.trim().as_bytes()).as_bytes() == &want
                                })
                        });
                        if !authorized {
                            hyper::Response::builder()
                                .status(401)
                                .header("www-authenticate", "Bearer")
                                .body(Full::new(Bytes::from_static(
                                    b"unauthorized: send `Authorization: Bearer <metrics_token>`\n",
                                )))
                        } else if req.uri().path() == "/metrics" {
                            hyper::Response::builder()
                                .header("content-type", "text/plain; version=0.0.4")
                                .body(Full::new(Bytes::from(render(&shared))))
                        } else {
                            hyper::Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::from_static(b"not found: try /metrics\n")))
                        }
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .max_buf_size(16 << 10)
                .serve_connection(io, svc);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}
