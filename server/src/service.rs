//! The `strata.v1.Cache` gRPC service.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::Stream;
use strata_cache_core::{
    BlockKey, CacheError, EventKind, KvDtype, KvLayout, KvShape, Namespace, NamespaceHandle,
    PrefetchPolicy, TierId, TierKind, TpShape,
};
use tonic::{Request, Response, Status};

use crate::auth::{Held, Tenant};
use crate::conn::{ConnInfo, InflightGuard};
use crate::gate::Admin;
use crate::pb;
use crate::state::{NsEntry, Owner, Shared, TicketEntry};

/// The service; cheap to clone.
#[derive(Clone)]
pub struct CacheService {
    shared: Arc<Shared>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Maps a cache error to the status a client should see (the message is the error's).
pub fn status_of(e: CacheError) -> Status {
    use CacheError::*;
    let msg = e.to_string();
    match e {
        InvalidNamespace(_)
        | NamespaceMismatch { .. }
        | PartialPage { .. }
        | TooManyTokens { .. }
        | BlockCount { .. }
        | BlockSize { .. }
        | MissingBlock { .. }
        | LeaseInPast { .. }
        | InvalidConfig(_)
        | UnknownTier(_) => Status::invalid_argument(msg),
        UnknownNamespace(_) | UnknownLease(_) => Status::not_found(msg),
        TierFull(_) | IndexFull => Status::resource_exhausted(msg),
        QuotaFull { tier, quota, .. } => Status::resource_exhausted(format!(
            "the tenant holds its quota of {quota} blocks in tier {tier} (quota.host_bytes for \
             the host tier, quota.disk_bytes for the disk tier) and none of them can leave \
             (all leased or pinned); release leases first"
        )),
        Tier { .. } => Status::unavailable(msg),
    }
}

fn tier_pb(k: Option<TierKind>) -> i32 {
    match k {
        Some(TierKind::Device) => pb::Tier::Device as i32,
        Some(TierKind::Host) => pb::Tier::Host as i32,
        Some(TierKind::Disk) => pb::Tier::Disk as i32,
        Some(TierKind::Remote) => pb::Tier::Remote as i32,
        None => pb::Tier::Unspecified as i32,
    }
}

/// What every call starts with: who is calling, and its slots on the connection and in
/// the tenant's quota.
struct Call {
    tenant: Arc<Tenant>,
    _inflight: Option<InflightGuard>,
    _tenant_inflight: Held,
    conn: Option<ConnInfo>,
}

/// An open inline `Get` stream, counted for the sidecar and its tenant.
struct StreamSlot {
    shared: Arc<Shared>,
    _held: Held,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.shared.get_streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What an inline `Get` stream holds until its answer's body is dropped.
struct StreamHold {
    _slot: StreamSlot,
    _lease: strata_cache_core::LeaseGuard,
    leased: u64,
    tenant: Arc<Tenant>,
    _call: Call,
}

impl Drop for StreamHold {
    fn drop(&mut self) {
        self.tenant
            .usage
            .leased_pages
            .fetch_sub(self.leased, Ordering::AcqRel);
    }
}

/// The answer of an inline `Get`: the producer's messages, then, if the producer gave
/// up because the client read nothing for the stall timeout, `DEADLINE_EXCEEDED` (so a
/// client that resumes reading never mistakes the short stream for a whole one).
struct GetStream {
    rx: tokio_stream::wrappers::ReceiverStream<Result<pb::GetResponse, Status>>,
    stalled: Arc<std::sync::atomic::AtomicBool>,
    stall: Duration,
    done: bool,
    _hold: StreamHold,
    _alive: Arc<()>,
}

impl Stream for GetStream {
    type Item = Result<pb::GetResponse, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.rx).poll_next(cx) {
            Poll::Ready(None) => {
                self.done = true;
                if self.stalled.load(Ordering::Acquire) {
                    let stall = self.stall;
                    return Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                        "the client read nothing for {stall:?} (stall_timeout); stream ended"
                    )))));
                }
                Poll::Ready(None)
            }
            other => other,
        }
    }
}

/// Keeps an error message short: a caller's list can be millions long.
fn list_short<T: std::fmt::Debug>(items: &[T]) -> String {
    const SHOWN: usize = 8;
    if items.len() <= SHOWN {
        format!("{items:?}")
    } else {
        format!("{:?} and {} more", &items[..SHOWN], items.len() - SHOWN)
    }
}

impl CacheService {
    /// A service over the shared state.
    pub fn new(shared: Arc<Shared>) -> Self {
        CacheService { shared }
    }

    fn begin<T>(&self, req: &Request<T>) -> Result<Call, Status> {
        // The gate authenticated calls that came over a socket; in-process calls (tests,
        // fuzzing) are authenticated here from the same header.
        let tenant = match req.extensions().get::<Arc<Tenant>>() {
            Some(t) => t.clone(),
            None => {
                let header = req.metadata().get("authorization").map(|v| v.as_bytes());
                self.shared
                    .auth
                    .tenant(header)
                    .map_err(|e| Status::unauthenticated(e.to_string()))?
            }
        };
        let tenant_inflight = Held::take(&tenant, |u| &u.inflight, tenant.quota.inflight())
            .ok_or_else(|| {
                Status::resource_exhausted(format!(
                    "tenant {} has {} calls in flight already (quota.inflight)",
                    tenant.name,
                    tenant.quota.inflight()
                ))
            })?;
        let conn = req.extensions().get::<ConnInfo>().cloned();
        let limit = self.shared.cfg.max_inflight_per_connection;
        let inflight = match &conn {
            Some(c) => Some(c.enter(limit).ok_or_else(|| {
                Status::resource_exhausted(format!(
                    "{limit} calls are already in flight on this connection \
                     (max_inflight_per_connection); wait for some to finish or open another connection"
                ))
            })?),
            None => None,
        };
        Ok(Call {
            tenant,
            _inflight: inflight,
            _tenant_inflight: tenant_inflight,
            conn,
        })
    }

    fn ns(&self, call: &Call, id: &str) -> Result<NamespaceHandle, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument(
                "namespace is empty: open one with OpenNamespace and pass its id",
            ));
        }
        self.shared.namespace(&call.tenant, id).ok_or_else(|| {
            Status::not_found(format!(
                "unknown namespace {id:?}: open it with OpenNamespace first (ids are per tenant)"
            ))
        })
    }

    fn lease_ttl(&self, ms: u64) -> Result<Duration, Status> {
        let max = self.shared.cfg.max_lease;
        if ms == 0 {
            return Ok(max);
        }
        let ttl = Duration::from_millis(ms);
        if ttl > max {
            return Err(Status::invalid_argument(format!(
                "lease of {ms} ms exceeds the max_lease limit of {} ms",
                max.as_millis()
            )));
        }
        Ok(ttl)
    }

    fn tokens_limit(&self, n: usize) -> Result<(), Status> {
        let limit = self.shared.cfg.max_tokens_per_call;
        if n > limit {
            return Err(Status::invalid_argument(format!(
                "{n} tokens exceeds the max_tokens_per_call limit of {limit}"
            )));
        }
        Ok(())
    }

    /// The call's tokens, from `tokens` or `tokens_le` (not both), within the limit.
    fn tokens(&self, ids: Vec<u32>, le: &[u8]) -> Result<Vec<u32>, Status> {
        if le.is_empty() {
            self.tokens_limit(ids.len())?;
            return Ok(ids);
        }
        if !ids.is_empty() {
            return Err(Status::invalid_argument(
                "send tokens or tokens_le, not both",
            ));
        }
        if !le.len().is_multiple_of(4) {
            return Err(Status::invalid_argument(format!(
                "tokens_le is {} bytes, not a whole number of u32s",
                le.len()
            )));
        }
        self.tokens_limit(le.len() / 4)?;
        Ok(le
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    fn tier_index(&self, t: i32) -> Result<TierId, Status> {
        let want = match pb::Tier::try_from(t) {
            Ok(pb::Tier::Unspecified) | Ok(pb::Tier::Host) => TierKind::Host,
            Ok(pb::Tier::Disk) => TierKind::Disk,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "tier {t} is not served by this sidecar (host or disk)"
                )));
            }
        };
        let stats = self.shared.cache.stats();
        stats
            .tiers
            .iter()
            .position(|s| s.kind == Some(want))
            .map(|i| TierId(i as u8))
            .ok_or_else(|| {
                Status::invalid_argument(format!("this sidecar has no {} tier", want.as_str()))
            })
    }

    fn session(&self, call: &Call, id: u64) -> Result<Arc<crate::shm::ShmSession>, Status> {
        self.shared
            .sessions
            .get(&id)
            .filter(|s| s.tenant == call.tenant.name)
            .map(|s| s.clone())
            .ok_or_else(|| {
                Status::not_found(format!(
                    "unknown shared-memory session {id} (sessions end when their socket closes)"
                ))
            })
    }

    fn observe<T>(&self, method: &'static str, start: Instant, r: &Result<T, Status>) {
        let code = match r {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.shared.metrics.observe(method, code, start.elapsed());
    }

    async fn open_namespace_inner(
        &self,
        req: Request<pb::OpenNamespaceRequest>,
    ) -> Result<pb::OpenNamespaceResponse, Status> {
        let call = self.begin(&req)?;
        let r = req.into_inner();
        let fp: [u8; 32] = r.model_fingerprint.as_ref().try_into().map_err(|_| {
            Status::invalid_argument(format!(
                "model_fingerprint is {} bytes; it must be 32",
                r.model_fingerprint.len()
            ))
        })?;
        let dtype = match pb::KvDtype::try_from(r.dtype) {
            Ok(pb::KvDtype::F32) => KvDtype::F32,
            Ok(pb::KvDtype::F16) => KvDtype::F16,
            Ok(pb::KvDtype::Bf16) => KvDtype::Bf16,
            Ok(pb::KvDtype::Fp8E4m3) => KvDtype::Fp8E4m3,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "dtype {} is not one of F32, F16, BF16, FP8_E4M3",
                    r.dtype
                )));
            }
        };
        let layout = match pb::KvLayout::try_from(r.layout) {
            Ok(pb::KvLayout::PageFirst) | Ok(pb::KvLayout::Unspecified) => KvLayout::PageFirst,
            Ok(pb::KvLayout::PageFirstHeadMajor) => KvLayout::PageFirstHeadMajor,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "layout {} is unknown",
                    r.layout
                )));
            }
        };
        let tp = if r.tp_world_size == 0 && r.tp_rank == 0 {
            TpShape::default()
        } else {
            TpShape {
                world_size: u16::try_from(r.tp_world_size)
                    .map_err(|_| Status::invalid_argument("tp_world_size is over 65535"))?,
                rank: u16::try_from(r.tp_rank)
                    .map_err(|_| Status::invalid_argument("tp_rank is over 65535"))?,
            }
        };
        let ns = Namespace::new(
            fp,
            dtype,
            layout,
            r.page_size,
            KvShape {
                num_layers: r.num_layers,
                num_kv_heads: r.num_kv_heads,
                head_dim: r.head_dim,
            },
            tp,
            &call.tenant.salt,
        )
        .map_err(status_of)?;
        let cfg = &self.shared.cfg;
        if ns.page_size() != cfg.page_size {
            return Err(Status::invalid_argument(format!(
                "page_size {} differs from this sidecar's {} (--page-size)",
                ns.page_size(),
                cfg.page_size
            )));
        }
        if ns.block_bytes() as u64 != cfg.block_bytes {
            return Err(Status::invalid_argument(format!(
                "this namespace's blocks are {} bytes; this sidecar stores blocks of {} bytes (--block-bytes)",
                ns.block_bytes(),
                cfg.block_bytes
            )));
        }
        let id = ns.root_key();
        {
            // Counted and registered under one lock: concurrent opens cannot pass the
            // limit together.
            let _g = self.shared.ns_lock.lock();
            if !self.shared.namespaces.contains_key(&id)
                && self.shared.namespace_count(&call.tenant) >= call.tenant.max_namespaces
            {
                return Err(Status::resource_exhausted(format!(
                    "tenant {} already has {} namespaces (max_namespaces)",
                    call.tenant.name, call.tenant.max_namespaces
                )));
            }
            // Test hook: widens the window between the count and the insert, so that a test
            // shows concurrent opens cannot pass the limit together.
            #[cfg(feature = "testing")]
            if let Some(ms) = std::env::var("STRATA_TEST_NAMESPACE_DELAY_MS")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
            {
                std::thread::sleep(Duration::from_millis(ms));
            }
            let handle = self.shared.cache.register(&ns).map_err(status_of)?;
            self.shared.cache.set_group(&handle, call.tenant.group);
            self.shared.namespaces.entry(id).or_insert(NsEntry {
                tenant: call.tenant.name.clone(),
                handle,
            });
        }
        Ok(pb::OpenNamespaceResponse {
            namespace: id.to_hex(),
            block_bytes: ns.block_bytes() as u64,
            page_size: ns.page_size(),
            max_tokens_per_call: cfg.max_tokens_per_call as u64,
        })
    }

    async fn lookup_inner(
        &self,
        req: Request<pb::LookupRequest>,
    ) -> Result<pb::LookupResponse, Status> {
        let call = self.begin(&req)?;
        let r = req.into_inner();
        let ns = self.ns(&call, &r.namespace)?;
        call.tenant.usage.lookups.fetch_add(1, Ordering::Relaxed);
        let res = if !r.keys.is_empty() {
            if !r.tokens.is_empty() || !r.tokens_le.is_empty() {
                return Err(Status::invalid_argument("send tokens or keys, not both"));
            }
            let mut keys = Vec::with_capacity(r.keys.len());
            for (i, k) in r.keys.iter().enumerate() {
                let k: [u8; 32] = k.as_ref().try_into().map_err(|_| {
                    Status::invalid_argument(format!(
                        "key {i} is {} bytes; block keys are 32 bytes",
                        k.len()
                    ))
                })?;
                keys.push(BlockKey(k));
            }
            self.tokens_limit(
                keys.len()
                    .saturating_mul(self.shared.cfg.page_size as usize),
            )?;
            self.shared.cache.lookup_keys(&ns, &keys)
        } else {
            let tokens = self.tokens(r.tokens, &r.tokens_le)?;
            self.shared.cache.lookup(&ns, &tokens)
        }
        .map_err(status_of)?;
        let stats = self.shared.cache.stats();
        Ok(pb::LookupResponse {
            matched_pages: res.matched_pages as u64,
            requested_pages: res.requested_pages as u64,
            tiers: res
                .resident
                .iter()
                .zip(&stats.tiers)
                .map(|(&n, t)| pb::TierPages {
                    tier: tier_pb(t.kind),
                    pages: u64::from(n),
                })
                .collect(),
            estimated_load_us: res.estimated_load.map(|d| d.as_micros() as u64),
        })
    }

    async fn prefetch_inner(
        &self,
        req: Request<pb::PrefetchRequest>,
    ) -> Result<pb::PrefetchResponse, Status> {
        let call = self.begin(&req)?;
        let r = req.into_inner();
        let ns = self.ns(&call, &r.namespace)?;
        let tokens = self.tokens(r.tokens, &r.tokens_le)?;
        let target = self.tier_index(r.target)?;
        let ttl = self.lease_ttl(r.lease_ms)?;
        let policy = match pb::PrefetchPolicy::try_from(r.policy) {
            Ok(pb::PrefetchPolicy::BestEffort) => PrefetchPolicy::BestEffort,
            Ok(pb::PrefetchPolicy::Timeout) => PrefetchPolicy::Timeout {
                base: Duration::from_millis(100),
                per_page: Duration::from_millis(5),
            },
            Ok(_) => PrefetchPolicy::WaitComplete,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "prefetch policy {} is unknown",
                    r.policy
                )));
            }
        };
        let (ticket, job) = self
            .shared
            .cache
            .prefetch(&ns, &tokens, target, policy, ttl)
            .map_err(status_of)?;
        let lease = ticket.lease();
        let matched = ticket.total();
        let conn = call.conn.as_ref().map(|c| c.id).unwrap_or(0);
        if let Err(e) =
            self.shared
                .hold(lease, &call.tenant, Owner::Conn(conn), ttl, matched as u64)
        {
            ticket.stop();
            return Err(e);
        }
        tokio::spawn(job.run());
        let id = self.shared.next_id();
        self.shared.tickets.insert(
            id,
            TicketEntry {
                tenant: call.tenant.name.clone(),
                conn,
                ticket,
                expires: Instant::now() + ttl,
            },
        );
        Ok(pb::PrefetchResponse {
            ticket: id,
            lease,
            matched_pages: matched as u64,
        })
    }

    async fn prefetch_status_inner(
        &self,
        req: Request<pb::PrefetchStatusRequest>,
    ) -> Result<pb::PrefetchStatusResponse, Status> {
        let call = self.begin(&req)?;
        let r = req.into_inner();
        let unknown = || Status::not_found(format!("unknown prefetch ticket {}", r.ticket));
        let wait = Duration::from_millis(r.wait_ms.min(60_000));
        let mine = |id: &u64| {
            self.shared
                .tickets
                .get(id)
                .filter(|e| e.tenant == call.tenant.name)
                .map(|e| e.ticket.is_done())
        };
        // Poll without holding the map's lock across the sleep.
        let deadline = Instant::now() + wait;
        while !mine(&r.ticket).ok_or_else(unknown)? && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let (done, ready, total, lease, error) = {
            let e = self.shared.tickets.get(&r.ticket).ok_or_else(unknown)?;
            let t = &e.ticket;
            (t.is_done(), t.ready(), t.total(), t.lease(), t.error())
        };
        if done {
            // Reported finished: the ticket is no longer needed (the lease stays).
            self.shared.tickets.remove(&r.ticket);
        }
        Ok(pb::PrefetchStatusResponse {
            ready_pages: ready as u64,
            total_pages: total as u64,
            done,
            error: error.unwrap_or_default(),
            lease,
        })
    }

    async fn put_inner(&self, req: Request<pb::PutRequest>) -> Result<pb::PutResponse, Status> {
        let call = self.begin(&req)?;
        let charge = req
            .extensions()
            .get::<Arc<crate::gate::ReceiveCharge>>()
            .cloned();
        let r = req.into_inner();
        let ns = self.ns(&call, &r.namespace)?;
        let tokens = self.tokens(r.tokens, &r.tokens_le)?;
        let staged: Vec<Vec<u8>>;
        let blocks: Vec<&[u8]> = if !r.staging_slots.is_empty() {
            if !r.blocks.is_empty() {
                return Err(Status::invalid_argument(
                    "send blocks inline or as staging slots, not both",
                ));
            }
            let id: u64 = r.shm_session.parse().map_err(|_| {
                Status::invalid_argument("staging_slots need the shm_session they belong to")
            })?;
            let session = self.session(&call, id)?;
            let pages = tokens.len() / self.shared.cfg.page_size as usize;
            if r.staging_slots.len() != pages {
                return Err(Status::invalid_argument(format!(
                    "{} staging slots for {pages} pages: send one per page (u32::MAX for a cached page)",
                    r.staging_slots.len()
                )));
            }
            let used = r.staging_slots.iter().filter(|&&s| s != u32::MAX).count();
            if used > session.slots as usize {
                return Err(Status::invalid_argument(format!(
                    "{used} staging slots used; the session has {} (shm_staging_slots)",
                    session.slots
                )));
            }
            if let Some(&s) = r
                .staging_slots
                .iter()
                .find(|&&s| s != u32::MAX && s >= session.slots)
            {
                return Err(Status::invalid_argument(format!(
                    "staging slot {s} does not exist (the session has {}, shm_staging_slots)",
                    session.slots
                )));
            }
            // Slots of pages already cached are not read: only new pages are copied out
            // of the client's memory (a page evicted meanwhile fails as MissingBlock, and
            // the client sends it again).
            let cached = self
                .shared
                .cache
                .lookup(&ns, &tokens)
                .map_err(status_of)?
                .matched_pages;
            let bb = self.shared.cache.block_bytes();
            // What is copied out of the client's memory counts against the same budgets
            // as bytes received inline.
            let copies = r
                .staging_slots
                .iter()
                .enumerate()
                .filter(|&(i, &s)| s != u32::MAX && i >= cached)
                .count();
            if let Some(c) = &charge {
                c.take(copies as u64 * bb as u64)?;
            }
            staged = r
                .staging_slots
                .iter()
                .enumerate()
                .map(|(i, &s)| {
                    if s == u32::MAX || i < cached {
                        return Ok(Vec::new());
                    }
                    session.copy_slot(s, bb).ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "staging slot {s} does not exist (the session has {}, shm_staging_slots)",
                            session.slots
                        ))
                    })
                })
                .collect::<Result<_, _>>()?;
            staged.iter().map(|b| b.as_slice()).collect()
        } else {
            r.blocks.iter().map(|b| b.as_ref()).collect()
        };
        let bytes: u64 = blocks.iter().map(|b| b.len() as u64).sum();
        call.tenant
            .usage
            .bytes_in
            .fetch_add(bytes, Ordering::Relaxed);
        let rep = self
            .shared
            .cache
            .insert(&ns, &tokens, &blocks)
            .await
            .map_err(status_of)?;
        self.shared.metrics.add_bytes_in(bytes);
        Ok(pb::PutResponse {
            pages: rep.pages as u64,
            existing: rep.existing as u64,
            stored: rep.stored as u64,
        })
    }

    async fn get_inner(
        &self,
        req: Request<pb::GetRequest>,
    ) -> Result<BoxStream<pb::GetResponse>, Status> {
        let call = self.begin(&req)?;
        let r = req.into_inner();
        let ns = self.ns(&call, &r.namespace)?;
        let tokens = self.tokens(r.tokens, &r.tokens_le)?;
        let skip = usize::try_from(r.skip_pages).unwrap_or(usize::MAX);
        let max = match r.max_pages {
            0 => usize::MAX,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let cache = &self.shared.cache;
        if !r.shm_session.is_empty() {
            let id: u64 = r
                .shm_session
                .parse()
                .map_err(|_| Status::invalid_argument("shm_session is not a session id"))?;
            let session = self.session(&call, id)?;
            let ttl = self.lease_ttl(r.lease_ms)?;
            // Bring what only the disk holds up to the host pool first.
            let look = cache.lookup(&ns, &tokens).map_err(status_of)?;
            if look.resident.first().copied().unwrap_or(0) < look.matched_pages as u32 {
                let (ticket, job) = cache
                    .prefetch(&ns, &tokens, TierId(0), PrefetchPolicy::WaitComplete, ttl)
                    .map_err(status_of)?;
                job.run().await;
                let out = ticket.finish().await;
                let _ = cache.release(out.lease);
            }
            let (lease, handles) = cache
                .lease_in_tier(&ns, &tokens, ttl, TierId(0))
                .map_err(status_of)?;
            self.shared.hold(
                lease,
                &call.tenant,
                Owner::Session(session.id),
                ttl,
                handles.len() as u64,
            )?;
            let bb = cache.block_bytes() as u64;
            let slots: Vec<pb::ShmSlot> = handles
                .iter()
                .skip(skip)
                .take(max)
                .filter_map(|&h| self.shared.host.slot_offset(h))
                .map(|off| pb::ShmSlot {
                    offset: off as u64,
                    len: bb,
                })
                .collect();
            let msg = pb::GetResponse {
                page: 0,
                block: Default::default(),
                tier: pb::Tier::Host as i32,
                matched_pages: slots.len() as u64,
                slots,
                lease,
            };
            return Ok(Box::pin(futures_util::stream::iter([Ok(msg)])));
        }
        // Inline: lease the prefix for the stream's life, send one block per message.
        let slot = self.get_stream_slot(&call)?;
        let lease = cache
            .lease_guard(&ns, &tokens, self.shared.cfg.max_lease)
            .map_err(status_of)?;
        let leased = lease.pages() as u64;
        self.shared.charge_leased(&call.tenant, leased)?;
        let matched = lease.pages().saturating_sub(skip).min(max);
        // One block read ahead and one waiting in the channel: with the one being encoded,
        // a stream holds at most three blocks (plus HTTP/2's send buffer) however slowly
        // its client reads.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let shared = self.shared.clone();
        let stall = self.shared.cfg.stall_timeout;
        let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tenant = call.tenant.clone();
        let conn = call.conn.clone();
        // What the stream holds (its slot in the caps, the lease, the leased charge, the
        // call's place in flight) is given back when the answer's body is dropped, not when
        // the producer stops: a body nobody reads still holds its blocks.
        let hold = StreamHold {
            _slot: slot,
            _lease: lease,
            leased,
            tenant: tenant.clone(),
            _call: call,
        };
        // Alive while the answer's body is: a body still held a stall timeout after the
        // producer gave up means its client keeps its window closed; the connection is
        // closed then, which frees the stream and what it holds.
        let alive = Arc::new(());
        {
            let stalled = stalled.clone();
            let alive = Arc::downgrade(&alive);
            tokio::spawn(async move {
                // A send that waits longer than the stall timeout ends the stream: the
                // client stopped reading.
                let send = |msg| {
                    let tx = tx.clone();
                    let stalled = stalled.clone();
                    async move {
                        match tokio::time::timeout(stall, tx.send(msg)).await {
                            Ok(r) => r.is_ok(),
                            Err(_) => {
                                stalled.store(true, Ordering::Release);
                                false
                            }
                        }
                    }
                };
                let header = pb::GetResponse {
                    matched_pages: matched as u64,
                    ..Default::default()
                };
                let mut ok = send(Ok(header)).await;
                let stats = shared.cache.stats();
                // Read two pages per call: each read matches the prompt and pins its prefix
                // again, so the matching costs O(pages²/2) token comparisons for a long
                // prompt (memcmp speed: a few ms for the longest prompt a call may carry),
                // while a stream never holds more than a few blocks.
                const CHUNK: usize = 2;
                let mut i = 0;
                'stream: while ok && i < matched {
                    let n = CHUNK.min(matched - i);
                    let mut out = vec![Vec::new(); n];
                    let rep = match shared
                        .cache
                        .read_from(&ns, &tokens, skip + i, &mut out)
                        .await
                    {
                        Ok(rep) => rep,
                        Err(e) => {
                            let _ = send(Err(status_of(e))).await;
                            break;
                        }
                    };
                    // Where the chunk's blocks came from, when that was one tier.
                    let tiers: Vec<usize> = (0..rep.from_tier.len())
                        .filter(|&t| rep.from_tier[t] > 0)
                        .collect();
                    let tier = match tiers.as_slice() {
                        [t] => stats.tiers.get(*t).and_then(|t| t.kind),
                        _ => None,
                    };
                    for block in out.into_iter().take(rep.read) {
                        shared.metrics.add_bytes_out(block.len() as u64);
                        tenant
                            .usage
                            .bytes_out
                            .fetch_add(block.len() as u64, Ordering::Relaxed);
                        let msg = pb::GetResponse {
                            page: i as u64,
                            block: block.into(),
                            tier: tier_pb(tier),
                            ..Default::default()
                        };
                        ok = send(Ok(msg)).await;
                        i += 1;
                        if !ok {
                            break 'stream;
                        }
                    }
                    // A page left every tier meanwhile (or failed its check): the stream
                    // ends short; the client sees fewer blocks than matched_pages.
                    if rep.read < n {
                        break;
                    }
                }
                drop(tx);
                if stalled.load(Ordering::Acquire) {
                    tokio::time::sleep(stall).await;
                    if alive.upgrade().is_some()
                        && let Some(c) = conn
                    {
                        tracing::debug!(conn = c.id, "closing: a Get stream's client read nothing");
                        c.close();
                    }
                }
            });
        }
        Ok(Box::pin(GetStream {
            rx: tokio_stream::wrappers::ReceiverStream::new(rx),
            stalled,
            stall,
            done: false,
            _hold: hold,
            _alive: alive,
        }))
    }

    async fn release_inner(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<pb::ReleaseResponse, Status> {
        let call = self.begin(&req)?;
        let r = req.into_inner();
        let mut released = 0;
        let mut unknown = Vec::new();
        for id in r.leases {
            if self.shared.release_lease(id, &call.tenant) {
                released += 1;
            } else {
                unknown.push(id);
            }
        }
        if !unknown.is_empty() {
            return Err(Status::not_found(format!(
                "unknown or expired leases {} ({released} others released)",
                list_short(&unknown)
            )));
        }
        Ok(pb::ReleaseResponse { released })
    }

    async fn stats_inner(
        &self,
        req: Request<pb::StatsRequest>,
    ) -> Result<pb::StatsResponse, Status> {
        let admin = req.extensions().get::<Admin>().is_some()
            || self
                .shared
                .auth
                .is_admin(req.metadata().get("authorization").map(|v| v.as_bytes()));
        let s = self.shared.cache.stats();
        let bb = self.shared.cache.block_bytes() as u64;
        if admin {
            return Ok(pb::StatsResponse {
                tiers: s
                    .tiers
                    .iter()
                    .map(|t| pb::TierStats {
                        tier: tier_pb(t.kind),
                        hits: t.hits,
                        misses: t.misses,
                        bytes_in: t.bytes_in,
                        bytes_out: t.bytes_out,
                        evictions: t.evictions,
                        resident_bytes: t.resident_bytes,
                        pinned_bytes: t.pinned_bytes,
                        capacity_bytes: t.capacity_bytes,
                        read_errors: t.read_errors,
                    })
                    .collect(),
                pages: s.pages,
                leases: s.leases,
                lookups: s.lookups,
                connections: self.shared.connections(),
                shm_sessions: self.shared.sessions.len() as u64,
                client_leases: self.shared.leases.len() as u64,
                get_streams: self.shared.get_streams.load(Ordering::Relaxed),
                block_bytes: bb,
                scope: "global".into(),
            });
        }
        let call = self.begin(&req)?;
        let t = &call.tenant;
        let u = &t.usage;
        let stored = self.shared.cache.group_blocks(t.group);
        let tiers = s
            .tiers
            .iter()
            .enumerate()
            .map(|(i, ts)| {
                let host = ts.kind == Some(TierKind::Host);
                let quota = match ts.kind {
                    Some(TierKind::Host) => t.quota.host_bytes,
                    Some(TierKind::Disk) => t.quota.disk_bytes,
                    _ => None,
                };
                pb::TierStats {
                    tier: tier_pb(ts.kind),
                    resident_bytes: stored.get(i).copied().unwrap_or(0) * bb,
                    pinned_bytes: if host {
                        u.leased_pages.load(Ordering::Relaxed) * bb
                    } else {
                        0
                    },
                    capacity_bytes: quota.unwrap_or(ts.capacity_bytes).min(ts.capacity_bytes),
                    bytes_in: if host {
                        u.bytes_in.load(Ordering::Relaxed)
                    } else {
                        0
                    },
                    bytes_out: if host {
                        u.bytes_out.load(Ordering::Relaxed)
                    } else {
                        0
                    },
                    ..Default::default()
                }
            })
            .collect();
        Ok(pb::StatsResponse {
            tiers,
            pages: stored.first().copied().unwrap_or(0),
            leases: u.leases.load(Ordering::Relaxed),
            lookups: u.lookups.load(Ordering::Relaxed),
            connections: 0,
            shm_sessions: u.shm_sessions.load(Ordering::Relaxed) as u64,
            client_leases: u.leases.load(Ordering::Relaxed),
            get_streams: u.get_streams.load(Ordering::Relaxed) as u64,
            block_bytes: bb,
            scope: format!("tenant:{}", t.name),
        })
    }

    /// A slot for an inline `Get` stream, within the sidecar's and the tenant's caps.
    fn get_stream_slot(&self, call: &Call) -> Result<StreamSlot, Status> {
        let t = &call.tenant;
        let held = Held::take(t, |u| &u.get_streams, t.quota.get_streams()).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "tenant {} has {} Get streams open already (quota.get_streams)",
                t.name,
                t.quota.get_streams()
            ))
        })?;
        let max = self.shared.cfg.max_get_streams as u64;
        let n = self.shared.get_streams.fetch_add(1, Ordering::AcqRel);
        let slot = StreamSlot {
            shared: self.shared.clone(),
            _held: held,
        };
        if n >= max {
            return Err(Status::resource_exhausted(format!(
                "{max} Get streams are open already (max_get_streams); retry later"
            )));
        }
        Ok(slot)
    }

    async fn watch_inner(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<BoxStream<pb::WatchEvent>, Status> {
        let call = self.begin(&req)?;
        let r = req.into_inner();
        let ns = self.ns(&call, &r.namespace)?;
        let id = ns.id();
        let mut events = self.shared.cache.subscribe();
        let kinds: Vec<Option<TierKind>> = self
            .shared
            .cache
            .stats()
            .tiers
            .iter()
            .map(|t| t.kind)
            .collect();
        let mut stop = self.shared.shutdown.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            let _call = call;
            loop {
                let ev = tokio::select! {
                    ev = events.recv() => ev,
                    _ = stop.changed() => break,
                    _ = tx.closed() => break,
                };
                let msg = match ev {
                    Ok(e) if e.namespace == id => pb::WatchEvent {
                        kind: match e.kind {
                            EventKind::Stored => pb::watch_event::Kind::Stored as i32,
                            EventKind::Removed => pb::watch_event::Kind::Removed as i32,
                        },
                        tier: tier_pb(kinds.get(e.tier.0 as usize).copied().flatten()),
                        key: e.key.0.to_vec().into(),
                        lagged: 0,
                    },
                    Ok(_) => continue,
                    // How many were missed counts every tenant's events: not told.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => pb::WatchEvent {
                        kind: pb::watch_event::Kind::Lagged as i32,
                        lagged: 0,
                        ..Default::default()
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                };
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl pb::cache_server::Cache for CacheService {
    async fn open_namespace(
        &self,
        req: Request<pb::OpenNamespaceRequest>,
    ) -> Result<Response<pb::OpenNamespaceResponse>, Status> {
        let start = Instant::now();
        let r = self.open_namespace_inner(req).await;
        self.observe("OpenNamespace", start, &r);
        r.map(Response::new)
    }

    async fn lookup(
        &self,
        req: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::LookupResponse>, Status> {
        let start = Instant::now();
        let r = self.lookup_inner(req).await;
        self.observe("Lookup", start, &r);
        r.map(Response::new)
    }

    async fn prefetch(
        &self,
        req: Request<pb::PrefetchRequest>,
    ) -> Result<Response<pb::PrefetchResponse>, Status> {
        let start = Instant::now();
        let r = self.prefetch_inner(req).await;
        self.observe("Prefetch", start, &r);
        r.map(Response::new)
    }

    async fn prefetch_status(
        &self,
        req: Request<pb::PrefetchStatusRequest>,
    ) -> Result<Response<pb::PrefetchStatusResponse>, Status> {
        let start = Instant::now();
        let r = self.prefetch_status_inner(req).await;
        self.observe("PrefetchStatus", start, &r);
        r.map(Response::new)
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let start = Instant::now();
        let r = self.put_inner(req).await;
        self.observe("Put", start, &r);
        r.map(Response::new)
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let start = Instant::now();
        let r = self.release_inner(req).await;
        self.observe("Release", start, &r);
        r.map(Response::new)
    }

    async fn stats(
        &self,
        req: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let start = Instant::now();
        let r = self.stats_inner(req).await;
        self.observe("Stats", start, &r);
        r.map(Response::new)
    }

    type GetStream = BoxStream<pb::GetResponse>;
    type WatchStream = BoxStream<pb::WatchEvent>;

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<Self::GetStream>, Status> {
        let start = Instant::now();
        let r = self.get_inner(req).await;
        self.observe("Get", start, &r);
        r.map(Response::new)
    }

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let start = Instant::now();
        let r = self.watch_inner(req).await;
        self.observe("Watch", start, &r);
        r.map(Response::new)
    }
}
