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
    pub tenant: Arc<Tenant>,
    /// Pages it holds (counted in the tenant's leased usage until it ends).
    pub pages: u64,
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
    /// Request bytes being received by the cache service, all connections together.
    pub receiving: Arc<crate::gate::Budget>,
    /// Request bytes being received by the health and reflection services.
    pub receiving_standard: Arc<crate::gate::Budget>,
    /// The listeners and their connection caps (for `/metrics`).
    pub listeners: parking_lot::Mutex<Vec<Arc<crate::conn::Listener>>>,
    /// Held while a namespace is counted against its tenant's limit and registered, so
    /// that concurrent opens cannot pass the limit together.
    pub ns_lock: parking_lot::Mutex<()>,
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
            receiving: crate::gate::Budget::new(),
            receiving_standard: crate::gate::Budget::new(),
            listeners: parking_lot::Mutex::new(Vec::new()),
            ns_lock: parking_lot::Mutex::new(()),
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

    /// Records a lease of `pages` host pages a client now holds, if the tenant's
    /// `quota.leased_bytes` allows it; otherwise the lease is ended and the error names
    /// the quota.
    pub fn hold(
        &self,
        lease: u64,
        tenant: &Arc<Tenant>,
        owner: Owner,
        ttl: Duration,
        pages: u64,
    ) -> Result<(), tonic::Status> {
        if let Err(e) = self.charge_leased(tenant, pages) {
            let _ = self.cache.release(lease);
            return Err(e);
        }
        tenant.usage.leases.fetch_add(1, Ordering::Relaxed);
        let old = self.leases.insert(
            lease,
            ClientLease {
                tenant: tenant.clone(),
                pages,
                owner,
                expires: Instant::now() + ttl,
            },
        );
        if let Some(old) = old {
            Self::uncharge(&old);
        }
        Ok(())
    }

    /// Counts `pages` leased host pages against `tenant`'s quota.
    pub fn charge_leased(&self, tenant: &Tenant, pages: u64) -> Result<(), tonic::Status> {
        let bb = self.cache.block_bytes() as u64;
        let held = tenant.usage.leased_pages.fetch_add(pages, Ordering::AcqRel) + pages;
        if let Some(q) = tenant.quota.leased_bytes(&self.cfg)
            && held.saturating_mul(bb) > q
        {
            tenant.usage.leased_pages.fetch_sub(pages, Ordering::AcqRel);
            return Err(tonic::Status::resource_exhausted(format!(
                "tenant {} would hold {} bytes leased, over its quota.leased_bytes of {q}; \
                 release leases first",
                tenant.name,
                held.saturating_mul(bb)
            )));
        }
        Ok(())
    }

    /// Gives back what a lease counted.
    fn uncharge(l: &ClientLease) {
        l.tenant
            .usage
            .leased_pages
            .fetch_sub(l.pages, Ordering::AcqRel);
        l.tenant.usage.leases.fetch_sub(1, Ordering::Relaxed);
    }

    /// Forgets client lease `id` if `tenant` holds it (ending it in the cache).
    pub fn release_lease(&self, id: u64, tenant: &Tenant) -> bool {
        match self
            .leases
            .remove_if(&id, |_, l| l.tenant.name == tenant.name)
        {
            Some((_, l)) => {
                Self::uncharge(&l);
                let _ = self.cache.release(id);
                true
            }
            None => false,
        }
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
            if let Some((_, l)) = self.leases.remove(&id) {
                Self::uncharge(&l);
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
        self.leases.retain(|_, l| {
            let keep = l.expires > now;
            if !keep {
                Self::uncharge(l);
            }
            keep
        });
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
