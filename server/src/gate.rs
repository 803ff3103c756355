//! The gate every gRPC request passes before any of its body is read.
//!
//! - **Authentication on the headers**: a `strata.v1.Cache` call whose `authorization`
//!   header names no tenant is answered `UNAUTHENTICATED` at once; its body is never
//!   read, so a peer without a token cannot make the sidecar hold its bytes. The tenant
//!   found rides on the request (an extension) to the handler.
//! - **A size limit per method**: only `Put` carries blocks and may be `max_message` long;
//!   every other call is limited to what `max_tokens_per_call` tokens need; the standard
//!   health and reflection services to 64 KiB.
//! - **A budget of bytes being received**, per connection and for the whole sidecar:
//!   bytes count from the moment they arrive until the call is answered. A request that
//!   would pass a budget fails with `RESOURCE_EXHAUSTED` naming it.
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
/// Request limit of the standard health and reflection services.
const STANDARD_LIMIT: u64 = 64 << 10;

/// A caller that presented an admin token (only `Stats` accepts one).
#[derive(Clone, Copy, Debug)]
pub struct Admin;

/// Bytes being received: by one connection or by the whole sidecar.
#[derive(Debug, Default)]
pub struct Budget {
    used: AtomicU64,
}

impl Budget {
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

/// The bytes one request has counted against its connection's and the sidecar's budgets;
/// given back when both its body and its answer are gone.
struct Counted {
    conn: Option<ConnInfo>,
    shared: Arc<Shared>,
    bytes: AtomicU64,
}

impl Counted {
    fn take(&self, n: u64) -> Result<(), Status> {
        let cfg = &self.shared.cfg;
        let global = &self.shared.receiving;
        if !global.take(n, cfg.max_receiving()) {
            return Err(Status::resource_exhausted(format!(
                "the sidecar is receiving {} bytes of requests already (max_receiving {}); retry later",
                global.used(),
                cfg.max_receiving()
            )));
        }
        if let Some(c) = &self.conn
            && !c.receiving.take(n, cfg.max_receiving_per_connection())
        {
            global.give(n);
            return Err(Status::resource_exhausted(format!(
                "this connection is receiving {} bytes of requests already \
                 (max_receiving_per_connection {}); wait for answers first",
                c.receiving.used(),
                cfg.max_receiving_per_connection()
            )));
        }
        self.bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let n = *self.bytes.get_mut();
        self.shared.receiving.give(n);
        if let Some(c) = &self.conn {
            c.receiving.give(n);
        }
    }
}

/// A request body under the gate: counted, limited and timed.
struct GatedBody {
    inner: Body,
    counted: Arc<Counted>,
    seen: u64,
    limit: u64,
    method: String,
    stall: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    failed: bool,
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
                if let Some(d) = frame.data_ref() {
                    let n = d.len() as u64;
                    this.seen += n;
                    if this.seen > this.limit {
                        this.failed = true;
                        return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                            "{} request is over {} bytes, the most this method takes \
                             (max_message for Put; what max_tokens_per_call needs for the others)",
                            this.method, this.limit
                        )))));
                    }
                    if let Err(s) = this.counted.take(n) {
                        this.failed = true;
                        return Poll::Ready(Some(Err(s)));
                    }
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

/// What the gate decided about a request's headers.
enum Verdict {
    Pass {
        tenant: Option<Arc<Tenant>>,
        admin: bool,
        limit: u64,
    },
    Refuse(Status),
}

impl<S> Gate<S> {
    fn judge(&self, req: &http::Request<Body>) -> Verdict {
        let path = req.uri().path();
        let Some(method) = path.strip_prefix(CACHE_PREFIX) else {
            return Verdict::Pass {
                tenant: None,
                admin: false,
                limit: STANDARD_LIMIT,
            };
        };
        let cfg = &self.shared.cfg;
        let limit = if method == "Put" {
            cfg.max_message
        } else {
            cfg.max_control_message()
        };
        let header = req.headers().get("authorization").map(|v| v.as_bytes());
        if method == "Stats" && self.shared.auth.is_admin(header) {
            return Verdict::Pass {
                tenant: None,
                admin: true,
                limit,
            };
        }
        match self.shared.auth.tenant(header) {
            Ok(t) => Verdict::Pass {
                tenant: Some(t),
                admin: false,
                limit,
            },
            Err(e) => Verdict::Refuse(Status::unauthenticated(e.to_string())),
        }
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
        if let Some(c) = &conn {
            c.request_started();
        }
        let (tenant, admin, limit) = match self.judge(&req) {
            Verdict::Pass {
                tenant,
                admin,
                limit,
            } => (tenant, admin, limit),
            Verdict::Refuse(status) => {
                // The body is dropped unread.
                if let Some(c) = &conn {
                    self.shared.metrics.refused_unauthenticated(c.kind);
                }
                return Box::pin(async move { Ok(status.into_http()) });
            }
        };
        let counted = Arc::new(Counted {
            conn,
            shared: self.shared.clone(),
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
        if let Some(t) = tenant {
            parts.extensions.insert(t);
        }
        if admin {
            parts.extensions.insert(Admin);
        }
        let gated = GatedBody {
            inner: body,
            counted: counted.clone(),
            seen: 0,
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
            drop(counted);
            r
        })
    }
}
