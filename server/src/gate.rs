//! The gate every gRPC request passes before any of its body is read.
//!
//! - **Authentication on the headers**: a `strata.v1.Cache` call whose `authorization`
//!   header names no tenant is answered `UNAUTHENTICATED` at once; its body is never
//!   read, so a peer without a token cannot make the sidecar hold its bytes. The tenant
//!   found rides on the request (an extension) to the handler. A connection that keeps
//!   sending refused requests is closed.
//! - **The standard services**: health checks are open (probes carry no token);
//!   reflection and health watches are open on the Unix socket and need a token on TCP.
//! - **A size limit per method**: only `Put` carries blocks and may be `max_message` long;
//!   every other call is limited to what `max_tokens_per_call` tokens need; the standard
//!   services to 64 KiB. A declared length over the limit is refused from the message's
//!   gRPC prefix, before the decoder reserves room for it.
//! - **Budgets of bytes being received**, per connection, per tenant and for the whole
//!   sidecar, and a small one of their own for the standard services: a message counts
//!   with its declared length as soon as its prefix arrives (the decoder reserves that
//!   much at once) until the call is answered. A request that would pass a budget fails
//!   with `RESOURCE_EXHAUSTED` naming it.
//! - **A stall timeout**: a request body that makes no progress for `stall_timeout`
//!   fails with `DEADLINE_EXCEEDED`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http_body::Frame;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;

use crate::auth::Tenant;
use crate::conn::ConnInfo;
use crate::state::Shared;

/// Prefix of the paths of our own service (the others are health and reflection).
const CACHE_PREFIX: &str = "/strata.v1.Cache/";
/// Largest message of the standard health and reflection services.
pub const STANDARD_LIMIT: u64 = 64 << 10;
/// Bytes all requests to the standard services may have in reception at once: they may
/// come without a token, so they get a small budget of their own.
const STANDARD_BUDGET: u64 = 4 << 20;
/// Requests refused on their headers after which a connection is closed.
pub const MAX_REFUSALS: u64 = 16;

/// A caller that presented an admin token (only `Stats` accepts one).
#[derive(Clone, Copy, Debug)]
pub struct Admin;

/// Bytes being received against a limit: by one connection, one tenant, the standard
/// services or the whole sidecar.
#[derive(Debug, Default)]
pub struct Budget {
    used: AtomicU64,
}

impl Budget {
    /// A budget, shared.
    pub fn new() -> Arc<Self> {
        Arc::new(Budget::default())
    }

    /// Bytes counted now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, n: u64, limit: u64) -> bool {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            if cur.saturating_add(n) > limit {
                return false;
            }
            match self
                .used
                .compare_exchange_weak(cur, cur + n, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(v) => cur = v,
            }
        }
    }

    fn give(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// One budget a request counts against, with its limit and the setting that sets it.
struct Part {
    budget: Arc<Budget>,
    limit: u64,
    setting: &'static str,
}

/// What one request has counted against its budgets (each message's declared length as
/// soon as its gRPC prefix arrives, plus what its handler copies in itself); given back
/// when both its body and its answer are gone. Handlers reach it as a request extension.
pub struct ReceiveCharge {
    parts: Vec<Part>,
    bytes: AtomicU64,
}

impl ReceiveCharge {
    /// Counts `n` more bytes against every budget, or none and an error naming the one
    /// that is full.
    pub fn take(&self, n: u64) -> Result<(), Status> {
        for (i, p) in self.parts.iter().enumerate() {
            if !p.budget.take(n, p.limit) {
                for q in &self.parts[..i] {
                    q.budget.give(n);
                }
                return Err(Status::resource_exhausted(format!(
                    "{} bytes of requests are being received already; {n} more would pass {} \
                     ({} bytes); retry later",
                    p.budget.used(),
                    p.setting,
                    p.limit
                )));
            }
        }
        self.bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for ReceiveCharge {
    fn drop(&mut self) {
        let n = *self.bytes.get_mut();
        for p in &self.parts {
            p.budget.give(n);
        }
    }
}

/// Where a body is within the gRPC framing: in a 5-byte prefix or in a message's bytes.
#[derive(Default)]
struct Framing {
    prefix: [u8; 5],
    have: usize,
    remaining: u64,
}

/// A request body under the gate: framed, counted, limited and timed.
struct GatedBody {
    inner: Body,
    charge: Arc<ReceiveCharge>,
    framing: Framing,
    limit: u64,
    method: String,
    stall: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    failed: bool,
}

impl GatedBody {
    /// Follows the gRPC framing through `d`: each message's declared length is checked
    /// against the method's limit and counted before the decoder reserves room for it.
    fn account(&mut self, mut d: &[u8]) -> Result<(), Status> {
        while !d.is_empty() {
            let f = &mut self.framing;
            if f.remaining > 0 {
                let take = f.remaining.min(d.len() as u64);
                f.remaining -= take;
                d = &d[take as usize..];
                continue;
            }
            let take = (5 - f.have).min(d.len());
            f.prefix[f.have..f.have + take].copy_from_slice(&d[..take]);
            f.have += take;
            d = &d[take..];
            if f.have < 5 {
                break;
            }
            f.have = 0;
            let p = f.prefix;
            let len = u64::from(u32::from_be_bytes([p[1], p[2], p[3], p[4]]));
            if len > self.limit {
                return Err(Status::resource_exhausted(format!(
                    "{} request message of {len} bytes is over {} bytes, the most this method \
                     takes (max_message for Put; what max_tokens_per_call needs for the others)",
                    self.method, self.limit
                )));
            }
            self.charge.take(len)?;
            self.framing.remaining = len;
        }
        Ok(())
    }
}

impl http_body::Body for GatedBody {
    type Data = prost::bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref()
                    && let Err(s) = this.account(d)
                {
                    this.failed = true;
                    return Poll::Ready(Some(Err(s)));
                }
                let deadline = tokio::time::Instant::now() + this.stall;
                this.timer.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                ready!(this.timer.as_mut().poll(cx));
                this.failed = true;
                Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                    "{} request body made no progress for {:?} (stall_timeout)",
                    this.method, this.stall
                )))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Puts the gate in front of a service.
#[derive(Clone)]
pub struct GateLayer {
    shared: Arc<Shared>,
}

impl GateLayer {
    /// A gate over the sidecar's state.
    pub fn new(shared: Arc<Shared>) -> Self {
        GateLayer { shared }
    }
}

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gate<S>;
    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`GateLayer`] makes.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// Who a request's headers say is calling.
enum Caller {
    /// A tenant's call to the cache service.
    Tenant(Arc<Tenant>),
    /// An admin's `Stats`.
    Admin,
    /// A call to a standard service (health, reflection) that may be made without a
    /// token.
    Standard,
}

impl<S> Gate<S> {
    /// Who is calling and the largest message the method takes, or the refusal.
    fn judge(
        &self,
        req: &http::Request<Body>,
        conn: Option<&ConnInfo>,
    ) -> Result<(Caller, u64), Status> {
        let path = req.uri().path();
        let header = req.headers().get("authorization").map(|v| v.as_bytes());
        let auth = &self.shared.auth;
        let Some(method) = path.strip_prefix(CACHE_PREFIX) else {
            let open = path == "/grpc.health.v1.Health/Check"
                || conn.is_none_or(|c| c.kind == "unix")
                || !auth.required()
                || auth.is_admin(header)
                || auth.tenant(header).is_ok();
            if !open {
                return Err(Status::unauthenticated(
                    "reflection and health watches over TCP need a token: send \
                     `authorization: Bearer <token>`",
                ));
            }
            return Ok((Caller::Standard, STANDARD_LIMIT));
        };
        let cfg = &self.shared.cfg;
        let limit = if method == "Put" {
            cfg.max_message
        } else {
            cfg.max_control_message()
        };
        if method == "Stats" && auth.is_admin(header) {
            return Ok((Caller::Admin, limit));
        }
        let t = auth
            .tenant(header)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        Ok((Caller::Tenant(t), limit))
    }

    /// The budgets a request of `caller` counts against.
    fn budgets(&self, caller: &Caller, conn: Option<&ConnInfo>) -> Vec<Part> {
        let cfg = &self.shared.cfg;
        let mut parts = Vec::with_capacity(3);
        if let Caller::Standard = caller {
            parts.push(Part {
                budget: self.shared.receiving_standard.clone(),
                limit: STANDARD_BUDGET,
                setting: "the budget of the health and reflection services",
            });
            return parts;
        }
        if let Some(c) = conn {
            parts.push(Part {
                budget: c.receiving.clone(),
                limit: cfg.max_receiving_per_connection(),
                setting: "max_receiving_per_connection",
            });
        }
        if let Caller::Tenant(t) = caller {
            parts.push(Part {
                budget: t.usage.receiving.clone(),
                limit: t.quota.receiving_bytes(cfg),
                setting: "quota.receiving_bytes",
            });
        }
        parts.push(Part {
            budget: self.shared.receiving.clone(),
            limit: cfg.max_receiving(),
            setting: "max_receiving",
        });
        parts
    }
}

impl<S, ResBody> tower::Service<http::Request<Body>> for Gate<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let conn = req.extensions().get::<ConnInfo>().cloned();
        let (caller, limit) = match self.judge(&req, conn.as_ref()) {
            Ok(x) => x,
            Err(status) => {
                // The body is dropped unread; a connection that keeps sending requests
                // without a valid token is closed (see `Conn`).
                if let Some(c) = &conn {
                    c.refused();
                    self.shared.metrics.refused_unauthenticated(c.kind);
                }
                return Box::pin(async move { Ok(status.into_http()) });
            }
        };
        if let (Some(c), Caller::Tenant(_) | Caller::Admin) = (&conn, &caller) {
            // Only calls that passed authentication keep a connection open.
            c.request_started();
        }
        let charge = Arc::new(ReceiveCharge {
            parts: self.budgets(&caller, conn.as_ref()),
            bytes: AtomicU64::new(0),
        });
        let stall = self.shared.cfg.stall_timeout;
        let (mut parts, body) = req.into_parts();
        let method = parts
            .uri
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        match caller {
            Caller::Tenant(t) => {
                parts.extensions.insert(t);
            }
            Caller::Admin => {
                parts.extensions.insert(Admin);
            }
            Caller::Standard => {}
        }
        parts.extensions.insert(charge.clone());
        let gated = GatedBody {
            inner: body,
            charge: charge.clone(),
            framing: Framing::default(),
            limit,
            method,
            stall,
            timer: Box::pin(tokio::time::sleep(stall)),
            failed: false,
        };
        let fut = self
            .inner
            .call(http::Request::from_parts(parts, Body::new(gated)));
        Box::pin(async move {
            let r = fut.await;
            // The answer is ready: what the request counted is free once its body is gone.
            drop(charge);
            r
        })
    }
}
