//! `strata-engine serve`: an OpenAI-compatible HTTP server over the engine, with continuous
//! batching and a prefix cache over its KV pool.
//!
//! The HTTP front ([`api`], axum) validates requests, tokenizes them and hands them to one
//! scheduler thread ([`sched`]) over a bounded queue; the scheduler steps the running batch
//! through the model and sends tokens back over a channel per request, which the front
//! turns into text (with stop strings) and JSON or SSE. Dropping a response (the client went
//! away) drops the channel and the scheduler frees the request's pages before its next step.
//!
//! The KV pool is tier 0 of a cache-core [`TieredCache`] ([`crate::device::PoolTier`]): the
//! cache's radix index is the prefix cache, so any request reuses the full pages of any
//! earlier or concurrent request with the same prefix.

pub mod api;
pub mod metrics;
pub mod sched;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use strata_cache_core::{CacheConfig, EvictionKind, TierSpec, TieredCache, WritePolicy};

use crate::device::PoolTier;
use crate::kv::{KvDtype, KvPool};
use crate::{Engine, EngineError};
use metrics::Metrics;
use sched::{SchedConfig, Scheduler};

/// How long open connections may run on after a shutdown signal.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// Bearer token every API request must carry; required unless `addr` is loopback.
    pub api_key: Option<String>,
    /// The name clients use for the model.
    pub model_id: String,
    /// KV element type.
    pub kv_dtype: KvDtype,
    /// Tokens per KV page.
    pub page_size: usize,
    /// KV pool size in pages.
    pub kv_pages: usize,
    /// Scheduler settings.
    pub sched: SchedConfig,
}

/// What a started server reports before it accepts requests.
#[derive(Clone, Debug)]
pub struct Started {
    /// The bound address (the port is chosen when 0 was asked).
    pub addr: SocketAddr,
    /// Pool pages.
    pub kv_pages: usize,
    /// Pool bytes.
    pub kv_bytes: usize,
}

/// Runs the server until `shutdown` resolves; `on_ready` is called once the listener is
/// bound. The engine must be loaded already, so the server is ready as soon as it listens.
pub async fn serve(
    engine: Engine,
    cfg: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(&Started),
) -> Result<(), EngineError> {
    if !cfg.addr.ip().is_loopback() && cfg.api_key.as_deref().is_none_or(str::is_empty) {
        return Err(EngineError::BadRequest(format!(
            "listening on {} (not loopback) needs an API key (--api-key or STRATA_API_KEY)",
            cfg.addr
        )));
    }
    if cfg.sched.max_running == 0 || cfg.sched.step_tokens == 0 {
        return Err(EngineError::BadRequest(
            "--max-running and --step-tokens must be at least 1".into(),
        ));
    }
    let engine = Arc::new(engine);
    let pool = Arc::new(KvPool::new(
        &engine.model.config,
        cfg.kv_dtype,
        cfg.page_size,
        cfg.kv_pages,
    )?);
    let cache = TieredCache::new(
        vec![TierSpec {
            tier: Arc::new(PoolTier::new(pool.clone())),
            capacity_bytes: (pool.capacity() * pool.block_bytes()) as u64,
            eviction: EvictionKind::Lru,
        }],
        CacheConfig {
            page_size: cfg.page_size as u32,
            write_policy: WritePolicy::WriteBack,
            ..CacheConfig::default()
        },
    )
    .map_err(|e| EngineError::Internal(format!("cache: {e}")))?;
    let ns = cache
        .register(&engine.model.namespace(cfg.kv_dtype, cfg.page_size, b"")?)
        .map_err(|e| EngineError::Internal(format!("cache: {e}")))?;
    let metrics = Arc::new(Metrics::new(cfg.kv_pages));
    let stop = Arc::new(AtomicBool::new(false));
    let (scheduler, submitter) = Scheduler::new(
        engine.clone(),
        pool.clone(),
        cache,
        ns,
        cfg.sched.clone(),
        metrics.clone(),
        stop.clone(),
    );
    let sched_thread = std::thread::Builder::new()
        .name("strata-scheduler".into())
        .spawn(move || scheduler.run())
        .map_err(|e| EngineError::Io(format!("starting the scheduler: {e}")))?;
    let state = Arc::new(api::AppState::new(
        engine.clone(),
        submitter,
        metrics,
        cfg.model_id.clone(),
        cfg.kv_pages,
        cfg.page_size,
    ));
    let mut app = api::router(state);
    if let Some(key) = cfg.api_key.clone().filter(|k| !k.is_empty()) {
        let key: Arc<str> = key.into();
        app = app.layer(axum::middleware::from_fn(
            move |req: Request, next: Next| {
                let key = key.clone();
                async move { authorize(&key, req, next).await }
            },
        ));
    }
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|e| EngineError::Io(format!("binding {}: {e}", cfg.addr)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| EngineError::Io(e.to_string()))?;
    on_ready(&Started {
        addr,
        kv_pages: pool.capacity(),
        kv_bytes: pool.capacity() * pool.block_bytes(),
    });
    let r = accept_loop(listener, app, shutdown).await;
    stop.store(true, Ordering::Release);
    let _ = sched_thread.join();
    r
}

/// Most connections served at once; further clients wait in the listen backlog.
const MAX_CONNECTIONS: usize = 512;

/// How long a client may take to send a request's headers (also the idle time allowed
/// between requests on a kept-alive connection).
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves connections until `shutdown` resolves, then lets open ones finish for at most
/// [`DRAIN`]. Every connection has a header read timeout and counts against
/// [`MAX_CONNECTIONS`], so idle or slow peers cannot hold descriptors or memory without end.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), EngineError> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let (closing, closed) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: not fatal.
                    eprintln!("strata: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut closed = closed.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(64 << 10)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = closed.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN, conn).await;
                }
            }
        });
    }
    // Stop accepting; open connections finish their requests (at most DRAIN).
    let _ = closing.send(true);
    if tokio::time::timeout(DRAIN, slots.acquire_many(MAX_CONNECTIONS as u32))
        .await
        .is_err()
    {
        eprintln!("strata: connections still open {DRAIN:?} after the signal; closing them");
    }
    Ok(())
}

/// Checks `Authorization: Bearer <key>` (not on `/health`).
async fn authorize(key: &str, req: Request, next: Next) -> Response {
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        })
        .is_some_and(|t| constant_time_eq(t.as_bytes(), key.as_bytes()));
    if ok {
        return next.run(req).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        axum::Json(serde_json::json!({"error": {
            "message": "missing or wrong API key (send Authorization: Bearer <key>)",
            "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}})),
    )
        .into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
