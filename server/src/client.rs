//! The Rust client of the sidecar: a typed wrapper over the generated gRPC client that
//! connects over a Unix socket, TCP or TLS, adds the bearer token to every call, and moves
//! blocks inline or through a shared-memory session.
//!
//! ```no_run
//! # async fn demo() -> Result<(), strata_server::client::ClientError> {
//! use strata_server::client::{Client, NamespaceSpec};
//! let mut c = Client::connect_unix("/run/user/1000/strata/sidecar.sock").await?;
//! let ns = c.open_namespace(&NamespaceSpec::smollm2_f16([7; 32])).await?;
//! let tokens: Vec<u32> = (0..128).collect();
//! let hit = c.lookup(&ns.namespace, &tokens).await?;
//! println!("{} pages cached", hit.matched_pages);
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use prost::bytes::Bytes;
use tonic::Request;
use tonic::transport::{Channel, Endpoint};

use crate::pb;
use crate::pb::cache_client::CacheClient;
use crate::shm::{ShmClient, ShmError};

/// What can go wrong on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect.
    #[error("connecting to the sidecar: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The sidecar answered with an error status.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// Shared-memory session failure.
    #[error(transparent)]
    Shm(#[from] ShmError),
    /// A call was used wrongly (the message says how).
    #[error("{0}")]
    Invalid(String),
}

impl ClientError {
    /// The gRPC status code, when the sidecar answered with one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

/// A namespace description (what `OpenNamespace` takes).
#[derive(Clone, Debug)]
pub struct NamespaceSpec {
    /// 32 bytes identifying the weights.
    pub model_fingerprint: [u8; 32],
    /// KV element type.
    pub dtype: pb::KvDtype,
    /// Tokens per page.
    pub page_size: u32,
    /// Layers.
    pub num_layers: u32,
    /// KV heads (after tensor-parallel split).
    pub num_kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
}

impl NamespaceSpec {
    /// SmolLM2-135M with f16 KV and 64-token pages (the sidecar's default block size).
    pub fn smollm2_f16(model_fingerprint: [u8; 32]) -> Self {
        NamespaceSpec {
            model_fingerprint,
            dtype: pb::KvDtype::F16,
            page_size: 64,
            num_layers: 30,
            num_kv_heads: 3,
            head_dim: 64,
        }
    }
}

/// Blocks handed out through the shared pool under a lease.
#[derive(Debug)]
pub struct ShmBlocks {
    /// The lease that keeps the slots; release it when done.
    pub lease: u64,
    /// One slot per block, in page order.
    pub slots: Vec<pb::ShmSlot>,
}

/// A connected client.
#[derive(Clone)]
pub struct Client {
    inner: CacheClient<Channel>,
    token: Option<String>,
}

const WINDOW: u32 = 8 << 20;
const CONN_WINDOW: u32 = 32 << 20;
const MAX_MESSAGE: usize = 1 << 30;

/// Tokens as little-endian u32s (the `tokens_le` field: far cheaper than varints).
fn le(tokens: &[u32]) -> Bytes {
    let mut b = Vec::with_capacity(tokens.len() * 4);
    for t in tokens {
        b.extend_from_slice(&t.to_le_bytes());
    }
    b.into()
}

fn endpoint(url: &str) -> Result<Endpoint, ClientError> {
    Ok(Endpoint::from_shared(url.to_string())?
        .initial_stream_window_size(Some(WINDOW))
        .initial_connection_window_size(Some(CONN_WINDOW))
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10)))
}

impl Client {
    fn from_channel(ch: Channel) -> Self {
        Client {
            inner: CacheClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            token: None,
        }
    }

    /// Connects over the sidecar's Unix socket.
    pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path: PathBuf = path.as_ref().to_path_buf();
        // The URL is not used for routing: the connector dials the socket.
        let ch = endpoint("http://localhost")?
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(TokioIo::new)
                }
            }))
            .await?;
        Ok(Self::from_channel(ch))
    }

    /// Connects over plain TCP (`http://host:port`).
    pub async fn connect_tcp(url: &str) -> Result<Self, ClientError> {
        Ok(Self::from_channel(endpoint(url)?.connect().await?))
    }

    /// Connects over TLS (`https://host:port`), trusting `ca_pem` for a server certificate
    /// issued to `domain`.
    pub async fn connect_tls(url: &str, ca_pem: &[u8], domain: &str) -> Result<Self, ClientError> {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
            .domain_name(domain);
        let ch = endpoint(url)?.tls_config(tls)?.connect().await?;
        Ok(Self::from_channel(ch))
    }

    /// Sends `token` as `authorization: Bearer <token>` on every call.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The generated client underneath, for requests this type has no method for (tests,
    /// tools); pair it with [`Client::request`].
    pub fn raw(&mut self) -> &mut CacheClient<Channel> {
        &mut self.inner
    }

    /// A request carrying this client's token.
    pub fn request<T>(&self, msg: T) -> Result<Request<T>, ClientError> {
        self.req(msg)
    }

    fn req<T>(&self, msg: T) -> Result<Request<T>, ClientError> {
        let mut r = Request::new(msg);
        if let Some(t) = &self.token {
            let v = format!("Bearer {t}")
                .parse()
                .map_err(|_| ClientError::Invalid("token is not a valid header value".into()))?;
            r.metadata_mut().insert("authorization", v);
        }
        Ok(r)
    }

    /// Opens (registers) a namespace and returns its id and block size.
    pub async fn open_namespace(
        &mut self,
        spec: &NamespaceSpec,
    ) -> Result<pb::OpenNamespaceResponse, ClientError> {
        let r = self.req(pb::OpenNamespaceRequest {
            model_fingerprint: Bytes::copy_from_slice(&spec.model_fingerprint),
            dtype: spec.dtype as i32,
            layout: pb::KvLayout::PageFirst as i32,
            page_size: spec.page_size,
            num_layers: spec.num_layers,
            num_kv_heads: spec.num_kv_heads,
            head_dim: spec.head_dim,
            tp_world_size: 1,
            tp_rank: 0,
        })?;
        Ok(self.inner.open_namespace(r).await?.into_inner())
    }

    /// Cached pages of a prompt.
    pub async fn lookup(
        &mut self,
        ns: &str,
        tokens: &[u32],
    ) -> Result<pb::LookupResponse, ClientError> {
        let r = self.req(pb::LookupRequest {
            namespace: ns.into(),
            tokens: vec![],
            tokens_le: le(tokens),
            keys: vec![],
        })?;
        Ok(self.inner.lookup(r).await?.into_inner())
    }

    /// Cached pages of a chain of block keys.
    pub async fn lookup_keys(
        &mut self,
        ns: &str,
        keys: &[[u8; 32]],
    ) -> Result<pb::LookupResponse, ClientError> {
        let r = self.req(pb::LookupRequest {
            namespace: ns.into(),
            tokens: vec![],
            tokens_le: Bytes::new(),
            keys: keys.iter().map(|k| Bytes::copy_from_slice(k)).collect(),
        })?;
        Ok(self.inner.lookup(r).await?.into_inner())
    }

    /// Starts a prefetch toward `target`.
    pub async fn prefetch(
        &mut self,
        ns: &str,
        tokens: &[u32],
        target: pb::Tier,
        policy: pb::PrefetchPolicy,
        lease: Duration,
    ) -> Result<pb::PrefetchResponse, ClientError> {
        let r = self.req(pb::PrefetchRequest {
            namespace: ns.into(),
            tokens: vec![],
            tokens_le: le(tokens),
            target: target as i32,
            policy: policy as i32,
            lease_ms: lease.as_millis() as u64,
        })?;
        Ok(self.inner.prefetch(r).await?.into_inner())
    }

    /// Progress of a prefetch, waiting up to `wait` for it to finish.
    pub async fn prefetch_status(
        &mut self,
        ticket: u64,
        wait: Duration,
    ) -> Result<pb::PrefetchStatusResponse, ClientError> {
        let r = self.req(pb::PrefetchStatusRequest {
            ticket,
            wait_ms: wait.as_millis() as u64,
        })?;
        Ok(self.inner.prefetch_status(r).await?.into_inner())
    }

    /// Stores blocks inline (one per page; empty for pages already cached).
    pub async fn put(
        &mut self,
        ns: &str,
        tokens: &[u32],
        blocks: Vec<Bytes>,
    ) -> Result<pb::PutResponse, ClientError> {
        let r = self.req(pb::PutRequest {
            namespace: ns.into(),
            tokens: vec![],
            tokens_le: le(tokens),
            blocks,
            staging_slots: vec![],
            shm_session: String::new(),
        })?;
        Ok(self.inner.put(r).await?.into_inner())
    }

    /// Stores blocks through the session's staging slots, as many pages per call as there
    /// are slots (the pages before each call's first are sent as already cached).
    pub async fn put_shm(
        &mut self,
        shm: &mut ShmClient,
        ns: &str,
        tokens: &[u32],
        blocks: &[&[u8]],
        page_size: usize,
    ) -> Result<pb::PutResponse, ClientError> {
        if blocks.len() * page_size != tokens.len() {
            return Err(ClientError::Invalid(format!(
                "{} tokens need {} blocks of {page_size}-token pages, got {}",
                tokens.len(),
                tokens.len() / page_size.max(1),
                blocks.len()
            )));
        }
        let per_call = shm.staging_slots().max(1) as usize;
        let mut total = pb::PutResponse::default();
        let mut start = 0;
        while start < blocks.len() || (blocks.is_empty() && start == 0) {
            let end = (start + per_call).min(blocks.len());
            let mut slots = vec![u32::MAX; start];
            for (i, b) in blocks[start..end].iter().enumerate() {
                let dst = shm
                    .staging_mut(i as u32)
                    .ok_or_else(|| ClientError::Invalid("staging slot missing".into()))?;
                if b.len() != dst.len() {
                    return Err(ClientError::Invalid(format!(
                        "block {} is {} bytes; blocks are {} bytes",
                        start + i,
                        b.len(),
                        dst.len()
                    )));
                }
                dst.copy_from_slice(b);
                slots.push(i as u32);
            }
            let r = self.req(pb::PutRequest {
                namespace: ns.into(),
                tokens: vec![],
                tokens_le: le(&tokens[..end * page_size]),
                blocks: vec![],
                staging_slots: slots,
                shm_session: shm.session().to_string(),
            })?;
            let rep = self.inner.put(r).await?.into_inner();
            total.pages = rep.pages;
            total.stored += rep.stored;
            if start == 0 {
                total.existing = rep.existing;
            }
            if end == blocks.len() {
                break;
            }
            start = end;
        }
        Ok(total)
    }

    /// The streamed `Get`: the first message carries `matched_pages`, then one block per
    /// message.
    pub async fn get_stream(
        &mut self,
        ns: &str,
        tokens: &[u32],
        skip_pages: u64,
        max_pages: u64,
    ) -> Result<tonic::Streaming<pb::GetResponse>, ClientError> {
        let r = self.req(pb::GetRequest {
            namespace: ns.into(),
            tokens: vec![],
            tokens_le: le(tokens),
            skip_pages,
            max_pages,
            shm_session: String::new(),
            lease_ms: 0,
        })?;
        Ok(self.inner.get(r).await?.into_inner())
    }

    /// Fetches the blocks of the cached prefix inline.
    pub async fn get(&mut self, ns: &str, tokens: &[u32]) -> Result<Vec<Bytes>, ClientError> {
        let mut s = self.get_stream(ns, tokens, 0, 0).await?;
        let mut out = Vec::new();
        while let Some(m) = s.message().await? {
            if !m.block.is_empty() {
                out.push(m.block);
            }
        }
        Ok(out)
    }

    /// Leases the cached prefix in the shared pool and returns its slots (read them with
    /// [`ShmClient::block`], then [`Client::release`] the lease).
    pub async fn get_shm(
        &mut self,
        shm: &ShmClient,
        ns: &str,
        tokens: &[u32],
        lease: Duration,
    ) -> Result<ShmBlocks, ClientError> {
        let r = self.req(pb::GetRequest {
            namespace: ns.into(),
            tokens: vec![],
            tokens_le: le(tokens),
            skip_pages: 0,
            max_pages: 0,
            shm_session: shm.session().to_string(),
            lease_ms: lease.as_millis() as u64,
        })?;
        let mut s = self.inner.get(r).await?.into_inner();
        let m = s
            .message()
            .await?
            .ok_or_else(|| ClientError::Invalid("empty Get answer".into()))?;
        Ok(ShmBlocks {
            lease: m.lease,
            slots: m.slots,
        })
    }

    /// Ends leases.
    pub async fn release(&mut self, leases: &[u64]) -> Result<u64, ClientError> {
        let r = self.req(pb::ReleaseRequest {
            leases: leases.to_vec(),
        })?;
        Ok(self.inner.release(r).await?.into_inner().released)
    }

    /// Counters and occupancy.
    pub async fn stats(&mut self) -> Result<pb::StatsResponse, ClientError> {
        let r = self.req(pb::StatsRequest {})?;
        Ok(self.inner.stats(r).await?.into_inner())
    }

    /// Stored/removed events of a namespace.
    pub async fn watch(
        &mut self,
        ns: &str,
    ) -> Result<tonic::Streaming<pb::WatchEvent>, ClientError> {
        let r = self.req(pb::WatchRequest {
            namespace: ns.into(),
        })?;
        Ok(self.inner.watch(r).await?.into_inner())
    }

    /// Opens a shared-memory session on the sidecar's `.shm` socket with this client's
    /// token.
    pub fn open_shm(&self, path: impl AsRef<Path>) -> Result<ShmClient, ClientError> {
        Ok(ShmClient::connect(path.as_ref(), self.token.as_deref())?)
    }
}
