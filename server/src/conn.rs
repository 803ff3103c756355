//! Connections: every accepted socket (Unix, TCP, TLS) is wrapped so that calls know which
//! connection they came on (for the in-flight limit) and so that what a connection holds
//! (prefetch leases) is released when it closes, however it closes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::gate::Budget;
use crate::state::Shared;

/// Open connections of one listener, against its cap.
#[derive(Debug)]
pub struct Listener {
    /// `unix`, `tcp`, `tls` or `metrics`.
    pub kind: &'static str,
    open: AtomicUsize,
    max: usize,
    refused: AtomicU64,
}

impl Listener {
    /// A listener of `kind` that holds at most `max` connections.
    pub fn new(kind: &'static str, max: usize) -> Arc<Self> {
        Arc::new(Listener {
            kind,
            open: AtomicUsize::new(0),
            max,
            refused: AtomicU64::new(0),
        })
    }

    /// Takes a connection slot; `None` (and the refusal counted) at the cap.
    pub fn admit(self: &Arc<Self>) -> Option<ListenerSlot> {
        let mut n = self.open.load(Ordering::Relaxed);
        loop {
            if n >= self.max {
                let r = self.refused.fetch_add(1, Ordering::Relaxed);
                // Logged once per 1,000 refusals: an attack must not flood the log.
                if r.is_multiple_of(1000) {
                    tracing::warn!(
                        listener = self.kind,
                        max = self.max,
                        refused = r + 1,
                        "connection refused: the listener is at its connection cap"
                    );
                }
                return None;
            }
            match self
                .open
                .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(ListenerSlot(self.clone())),
                Err(v) => n = v,
            }
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections refused at the cap so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// One open connection of a [`Listener`]; frees its slot on drop.
#[derive(Debug)]
pub struct ListenerSlot(Arc<Listener>);

impl Drop for ListenerSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What calls on one connection share.
#[derive(Debug)]
pub struct ConnState {
    /// Unique id (also the owner id of leases the connection takes).
    pub id: u64,
    /// `unix`, `tcp` or `tls`.
    pub kind: &'static str,
    inflight: AtomicUsize,
    /// Request bytes being received on this connection.
    pub receiving: Arc<Budget>,
    /// Authenticated requests started.
    requests: AtomicU64,
    /// Requests refused on their headers.
    refusals: AtomicU64,
    /// When the last authenticated request started (ms since the connection opened).
    last_request_ms: AtomicU64,
    opened: Instant,
    /// Set when the connection must close (a stream on it stalled past its grace).
    doomed: std::sync::atomic::AtomicBool,
    /// Wakes the connection's reader so that it sees `doomed`.
    waker: futures_util::task::AtomicWaker,
}

/// The connection info tonic attaches to each request.
pub type ConnInfo = Arc<ConnState>;

/// Counts one call in flight on a connection; the count drops with the guard.
pub struct InflightGuard(Arc<ConnState>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnState {
    /// Enters a call; `None` when `limit` calls are already in flight.
    pub fn enter(self: &Arc<Self>, limit: usize) -> Option<InflightGuard> {
        let n = self.inflight.fetch_add(1, Ordering::AcqRel);
        let guard = InflightGuard(self.clone());
        (n < limit).then_some(guard)
    }

    /// An authenticated request arrived (seen by the gate): the connection is in use.
    pub fn request_started(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_request_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// A request was refused on its headers (no or unknown token).
    pub fn refused(&self) {
        self.refusals.fetch_add(1, Ordering::Relaxed);
    }

    /// Closes the connection: its next read fails, ending every call on it. Used when a
    /// stream's client has read nothing for twice the stall timeout (HTTP/2 would
    /// otherwise keep the stream, and what it holds, for as long as the client answers
    /// pings).
    pub fn close(&self) {
        self.doomed.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Calls in flight (cache calls, including streams being sent).
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// Requests seen on this connection.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// Any byte stream a connection can run over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// An accepted connection. It closes itself (the next read fails) when it has had no
/// call in flight and started no authenticated call for `idle_timeout`, when it has sent
/// [`MAX_REFUSALS`](crate::gate::MAX_REFUSALS) requests without a valid token, and, on TCP,
/// when it has not started an authenticated call within `first_request_timeout`.
pub struct Conn {
    io: Box<dyn Io>,
    state: Arc<ConnState>,
    shared: Arc<Shared>,
    _slot: ListenerSlot,
    idle: Duration,
    idle_timer: Pin<Box<Sleep>>,
    first_request: Option<Pin<Box<Sleep>>>,
}

impl Conn {
    /// Wraps an accepted stream that holds `slot` of its listener.
    pub fn new(io: Box<dyn Io>, slot: ListenerSlot, shared: Arc<Shared>) -> Self {
        let id = shared.next_id();
        let kind = slot.0.kind;
        shared.connection_opened();
        let idle = shared.cfg.idle_timeout;
        let first_request = (kind != "unix")
            .then(|| Box::pin(tokio::time::sleep(shared.cfg.first_request_timeout)));
        Conn {
            io,
            state: Arc::new(ConnState {
                id,
                kind,
                inflight: AtomicUsize::new(0),
                receiving: Budget::new(),
                requests: AtomicU64::new(0),
                refusals: AtomicU64::new(0),
                last_request_ms: AtomicU64::new(0),
                opened: Instant::now(),
                doomed: std::sync::atomic::AtomicBool::new(false),
                waker: futures_util::task::AtomicWaker::new(),
            }),
            shared,
            _slot: slot,
            idle,
            idle_timer: Box::pin(tokio::time::sleep(idle)),
            first_request,
        }
    }

    /// Whether the connection should close (checked while a read waits).
    fn timed_out(&mut self, cx: &mut Context<'_>) -> Option<&'static str> {
        while self.idle_timer.as_mut().poll(cx).is_ready() {
            // Idle means no call in flight and none started for idle_timeout: answering
            // pings does not keep a connection open.
            let last = self.state.opened
                + Duration::from_millis(self.state.last_request_ms.load(Ordering::Relaxed));
            let next = (last + self.idle).max(Instant::now() + Duration::from_millis(10));
            if self.state.inflight() == 0 && last + self.idle <= Instant::now() {
                return Some("no call for idle_timeout");
            }
            let next = if self.state.inflight() > 0 {
                Instant::now() + self.idle
            } else {
                next
            };
            self.idle_timer.as_mut().reset(next);
        }
        if let Some(t) = &mut self.first_request {
            if self.state.requests() > 0 {
                self.first_request = None;
            } else if t.as_mut().poll(cx).is_ready() {
                return Some("no request within first_request_timeout");
            }
        }
        None
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shared.connection_closed(self.state.id);
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.state.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.state.waker.register(cx.waker());
        if self.state.doomed.load(Ordering::Acquire) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "a stream on this connection made no progress",
            )));
        }
        if self.state.refusals.load(Ordering::Relaxed) >= crate::gate::MAX_REFUSALS {
            self.shared.metrics.connection_timed_out(self.state.kind);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "too many requests without a valid token",
            )));
        }
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Pending => match self.timed_out(cx) {
                Some(why) => {
                    tracing::debug!(
                        conn = self.state.id,
                        kind = self.state.kind,
                        "closing: {why}"
                    );
                    self.shared.metrics.connection_timed_out(self.state.kind);
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)))
                }
                None => Poll::Pending,
            },
            other => other,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
