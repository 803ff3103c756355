//! The message-size limit as a clear `RESOURCE_EXHAUSTED`. tonic refuses an oversized
//! request with `OUT_OF_RANGE` and its own wording; this layer turns that answer into
//! `RESOURCE_EXHAUSTED` naming the setting, as gRPC clients expect for a size limit.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http;

/// Rewrites tonic's message-too-large answer.
#[derive(Clone, Copy, Debug)]
pub struct MessageLimitLayer {
    limit: u64,
}

impl MessageLimitLayer {
    /// For a server whose `max_message` is `limit` bytes.
    pub fn new(limit: u64) -> Self {
        MessageLimitLayer { limit }
    }
}

impl<S> tower::Layer<S> for MessageLimitLayer {
    type Service = MessageLimit<S>;
    fn layer(&self, inner: S) -> MessageLimit<S> {
        MessageLimit {
            inner,
            limit: self.limit,
        }
    }
}

/// The service [`MessageLimitLayer`] makes.
#[derive(Clone, Debug)]
pub struct MessageLimit<S> {
    inner: S,
    limit: u64,
}

/// Whether a response is tonic's answer to an oversized message.
fn is_too_large<B>(resp: &http::Response<B>) -> bool {
    let h = resp.headers();
    h.get("grpc-status").map(|v| v.as_bytes()) == Some(b"11")
        && h.get("grpc-message").is_some_and(|m| {
            let m = m.as_bytes();
            m.windows(9).any(|w| w == b"too large") || m.windows(11).any(|w| w == b"too%20large")
        })
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for MessageLimit<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let limit = self.limit;
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            if is_too_large(&resp) {
                return Ok(tonic::Status::resource_exhausted(format!(
                    "request message exceeds the max_message limit of {limit} bytes; \
                     send fewer blocks per call"
                ))
                .into_http());
            }
            Ok(resp)
        })
    }
}
