//! State shared by the gRPC service, the shared-memory plane and the metrics endpoint:
//! the cache, its tiers, and who holds which lease.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use strata_cache_core::{BlockKey, NamespaceHandle, PrefetchTicket, TieredCache};
use strata_disk_tier::DiskTier;
use strata_host_tier::HostPool;

use crate::auth::{Auth, Tenant};
use crate::config::SidecarConfig;
use crate::metrics::Metrics;
use crate::shm::ShmSession;

/// Who a client lease belongs to: it ends when its owner goes away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// A gRPC connection (prefetch leases).
    Conn(u64),
    /// A shared-memory session (slots handed out by `Get`).
    Session(u64),
}

/// A lease a client holds.
#[derive(Debug)]
pub struct ClientLease {
    /// Tenant that took it (only it may release it).
    pub tenant: String,
    /// What ends it besides `Release` and its deadline.
    pub owner: Owner,
    /// Its deadline (the cache ends it then on its own).
    pub expires: Instant,
}

/// An opened namespace.
pub struct NsEntry {
    /// Tenant that opened it.
    pub tenant: String,
    /// The cache's handle.
    pub handle: NamespaceHandle,
}

/// A prefetch in progress.
pub struct TicketEntry {
    /// Tenant that started it.
    pub tenant: String,
    /// Connection that started it.
    pub conn: u64,
    /// The cache's ticket.
    pub ticket: PrefetchTicket,
    /// When its lease ends (the ticket is forgotten then, asked about or not).
    pub expires: Instant,
}

/// Everything the sidecar's parts share.
pub struct Shared {
    /// The tiered cache.
    pub cache: TieredCache,
    /// The G2 pool (memfd-backed, mapped by shared-memory clients).
    pub host: Arc<HostPool>,
    /// The G3 tier, if configured.
    pub disk: Option<Arc<DiskTier>>,
    /// Tokens → tenants.
    pub auth: Auth,
    /// The configuration in force.
    pub cfg: SidecarConfig,
    /// Opened namespaces by id.
    pub namespaces: DashMap<BlockKey, NsEntry>,
    /// Leases held by clients.
    pub leases: DashMap<u64, ClientLease>,
    /// Prefetches by ticket.
    pub tickets: DashMap<u64, TicketEntry>,
    /// Shared-memory sessions by id.
    pub sessions: DashMap<u64, Arc<ShmSession>>,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    next_id: AtomicU64,
    connections: AtomicU64,
    /// Inline `Get` streams being served.
    pub get_streams: AtomicU64,
    /// Flips to true when shutdown starts (ends `Watch` streams).
    pub shutdown: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    /// Assembles the state.
    pub fn new(
        cache: TieredCache,
        host: Arc<HostPool>,
        disk: Option<Arc<DiskTier>>,
        auth: Auth,
        cfg: SidecarConfig,
    ) -> Self {
        Shared {
            cache,
            host,
            disk,
            auth,
            cfg,
            namespaces: DashMap::new(),
            leases: DashMap::new(),
            tickets: DashMap::new(),
            sessions: DashMap::new(),
            metrics: Metrics::default(),
            next_id: AtomicU64::new(1),
            connections: AtomicU64::new(0),
            get_streams: AtomicU64::new(0),
            shutdown: tokio::sync::watch::channel(false).0,
        }
    }

    /// A fresh id for connections, sessions and tickets.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Open connections.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub(crate) fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection closed: its prefetches stop and their leases end.
    pub(crate) fn connection_closed(&self, id: u64) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
        self.tickets.retain(|_, t| {
            if t.conn == id {
                t.ticket.stop();
                false
            } else {
                true
            }
        });
        self.release_owned(Owner::Conn(id));
    }

    /// Records a lease a client now holds.
    pub fn hold(&self, lease: u64, tenant: &Tenant, owner: Owner, ttl: Duration) {
        self.leases.insert(
            lease,
            ClientLease {
                tenant: tenant.name.clone(),
                owner,
                expires: Instant::now() + ttl,
            },
        );
    }

    /// Ends every lease `owner` holds.
    pub fn release_owned(&self, owner: Owner) {
        let ids: Vec<u64> = self
            .leases
            .iter()
            .filter(|e| e.owner == owner)
            .map(|e| *e.key())
            .collect();
        for id in ids {
            if self.leases.remove(&id).is_some() {
                // Already expired in the cache is fine: the lease is over either way.
                let _ = self.cache.release(id);
            }
        }
    }

    /// Forgets leases past their deadline (the cache has ended them) and finished
    /// prefetches nobody asked about. Called periodically.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.cache.expire_leases();
        self.leases.retain(|_, l| l.expires > now);
        self.tickets.retain(|_, t| t.expires > now);
    }

    /// The namespace `id` (hex) if `tenant` opened it.
    pub fn namespace(&self, tenant: &Tenant, id: &str) -> Option<NamespaceHandle> {
        let key = parse_key_hex(id)?;
        self.namespaces
            .get(&key)
            .filter(|e| e.tenant == tenant.name)
            .map(|e| e.handle.clone())
    }

    /// How many namespaces `tenant` has opened.
    pub fn namespace_count(&self, tenant: &Tenant) -> usize {
        self.namespaces
            .iter()
            .filter(|e| e.tenant == tenant.name)
            .count()
    }
}

/// Parses a 64-digit hex block key.
pub fn parse_key_hex(s: &str) -> Option<BlockKey> {
    if s.len() != 64 {
        return None;
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(BlockKey(k))
}
