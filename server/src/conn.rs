//! Connections: every accepted socket (Unix, TCP, TLS) is wrapped so that calls know which
//! connection they came on (for the in-flight limit) and so that what a connection holds
//! (prefetch leases) is released when it closes, however it closes.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::state::Shared;

/// What calls on one connection share.
#[derive(Debug)]
pub struct ConnState {
    /// Unique id (also the owner id of leases the connection takes).
    pub id: u64,
    /// `unix`, `tcp` or `tls`.
    pub kind: &'static str,
    inflight: AtomicUsize,
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
}

/// Any byte stream a connection can run over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// An accepted connection.
pub struct Conn {
    io: Box<dyn Io>,
    state: Arc<ConnState>,
    shared: Arc<Shared>,
}

impl Conn {
    /// Wraps an accepted stream.
    pub fn new(io: Box<dyn Io>, kind: &'static str, shared: Arc<Shared>) -> Self {
        let id = shared.next_id();
        shared.connection_opened();
        Conn {
            io,
            state: Arc::new(ConnState {
                id,
                kind,
                inflight: AtomicUsize::new(0),
            }),
            shared,
        }
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
        Pin::new(&mut self.io).poll_read(cx, buf)
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
