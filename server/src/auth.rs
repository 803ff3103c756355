//! Tokens → tenants. A tenant's salt is mixed into the root of every block key it makes,
//! so tenants never see each other's blocks whatever they send.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::config::{ConfigError, Quota, SidecarConfig};

/// Someone the sidecar serves.
#[derive(Debug)]
pub struct Tenant {
    /// Name from the configuration (`default` when there are no tokens).
    pub name: String,
    /// Cache salt.
    pub salt: Vec<u8>,
    /// May map the shared host pool.
    pub shm: bool,
    /// Most namespaces it may open.
    pub max_namespaces: usize,
    /// Its share of the sidecar.
    pub quota: Quota,
    /// Its cache group (the cache core counts each group's stored blocks per tier).
    pub group: u32,
    /// What it uses now.
    pub usage: Usage,
}

/// What one tenant uses at this moment (and a few running totals), for quotas, its own
/// `Stats` and `/metrics`.
#[derive(Debug, Default)]
pub struct Usage {
    /// Calls in flight over all its connections.
    pub inflight: AtomicUsize,
    /// Inline `Get` streams open.
    pub get_streams: AtomicUsize,
    /// Shared-memory sessions open.
    pub shm_sessions: AtomicUsize,
    /// Host-tier pages it holds leased (client leases and streams being sent).
    pub leased_pages: AtomicU64,
    /// Leases it holds.
    pub leases: AtomicU64,
    /// Lookups it made.
    pub lookups: AtomicU64,
    /// Block bytes it stored (inline and staged).
    pub bytes_in: AtomicU64,
    /// Block bytes it read inline.
    pub bytes_out: AtomicU64,
    /// Request bytes of its calls being received now.
    pub receiving: Arc<crate::gate::Budget>,
}

/// One unit of a counted resource (a call in flight, a stream, a session); gives it back
/// on drop.
#[derive(Debug)]
pub struct Held {
    tenant: Arc<Tenant>,
    which: fn(&Usage) -> &AtomicUsize,
}

impl Held {
    /// Takes one unit of the counter `which` of `tenant` if fewer than `limit` are held.
    pub fn take(
        tenant: &Arc<Tenant>,
        which: fn(&Usage) -> &AtomicUsize,
        limit: usize,
    ) -> Option<Held> {
        let c = which(&tenant.usage);
        let mut n = c.load(Ordering::Relaxed);
        loop {
            if n >= limit {
                return None;
            }
            match c.compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    return Some(Held {
                        tenant: tenant.clone(),
                        which,
                    });
                }
                Err(v) => n = v,
            }
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        (self.which)(&self.tenant.usage).fetch_sub(1, Ordering::AcqRel);
    }
}

/// Who may call, and as whom.
#[derive(Debug)]
pub struct Auth {
    /// blake3(token) → tenant. Tokens are compared by hash, so timing says nothing about
    /// how much of a guess was right.
    by_token: HashMap<[u8; 32], Arc<Tenant>>,
    /// The tenant of every caller when no tokens are configured.
    open: Option<Arc<Tenant>>,
    /// blake3 of the admin tokens (global `Stats`).
    admins: HashSet<[u8; 32]>,
    /// Every tenant, in configuration order.
    all: Vec<Arc<Tenant>>,
}

/// Why a call was not authenticated (the message goes back to the caller).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` metadata.
    #[error("missing token: send `authorization: Bearer <token>`")]
    Missing,
    /// Not `Bearer <token>`.
    #[error("malformed authorization header: expected `Bearer <token>`")]
    Malformed,
    /// No tenant has this token.
    #[error("unknown token")]
    Unknown,
}

impl Auth {
    /// Builds the table from the configuration (reads token files).
    pub fn from_config(cfg: &SidecarConfig) -> Result<Self, ConfigError> {
        let admins = cfg
            .admin_tokens
            .iter()
            .map(|t| *blake3::hash(t.as_bytes()).as_bytes())
            .collect();
        if cfg.tenants.is_empty() {
            let t = Arc::new(Tenant {
                name: "default".into(),
                salt: Vec::new(),
                shm: true,
                max_namespaces: 1024,
                quota: Quota::default(),
                group: 0,
                usage: Usage::default(),
            });
            return Ok(Auth {
                by_token: HashMap::new(),
                open: Some(t.clone()),
                admins,
                all: vec![t],
            });
        }
        let mut by_token = HashMap::new();
        let mut all = Vec::new();
        for (group, t) in cfg.tenants.iter().enumerate() {
            let tenant = Arc::new(Tenant {
                name: t.name.clone(),
                salt: t
                    .salt
                    .clone()
                    .unwrap_or_else(|| t.name.clone())
                    .into_bytes(),
                shm: t.shm,
                max_namespaces: t.max_namespaces,
                quota: t.quota.clone(),
                group: group as u32,
                usage: Usage::default(),
            });
            all.push(tenant.clone());
            let mut tokens = t.tokens.clone();
            for f in &t.token_files {
                let text = std::fs::read_to_string(f).map_err(|source| ConfigError::Read {
                    path: f.display().to_string(),
                    source,
                })?;
                let tok = text.trim_end().to_string();
                if tok.len() < 16 {
                    return Err(ConfigError::Invalid(format!(
                        "token in {} is shorter than 16 characters",
                        f.display()
                    )));
                }
                tokens.push(tok);
            }
            for tok in tokens {
                let h = *blake3::hash(tok.as_bytes()).as_bytes();
                if by_token.insert(h, tenant.clone()).is_some() {
                    return Err(ConfigError::Invalid(format!(
                        "a token of tenant {} is also another tenant's",
                        t.name
                    )));
                }
            }
        }
        for h in &admins {
            if by_token.contains_key(h) {
                return Err(ConfigError::Invalid(
                    "an admin token is also a tenant's token".into(),
                ));
            }
        }
        Ok(Auth {
            by_token,
            open: None,
            admins,
            all,
        })
    }

    /// Every tenant (the single `default` one when no tokens are configured).
    pub fn tenants(&self) -> &[Arc<Tenant>] {
        &self.all
    }

    /// Whether the caller sees the whole sidecar: it carries an admin token, or no tokens
    /// are configured (the socket's owner is the only tenant).
    pub fn is_admin(&self, header: Option<&[u8]>) -> bool {
        if self.open.is_some() {
            return true;
        }
        let Some(tok) = header.and_then(bearer) else {
            return false;
        };
        self.admins
            .contains(blake3::hash(tok.as_bytes()).as_bytes())
    }

    /// Whether callers must present a token.
    pub fn required(&self) -> bool {
        self.open.is_none()
    }

    /// The tenant of a call, from its `authorization` header value (if any).
    pub fn tenant(&self, header: Option<&[u8]>) -> Result<Arc<Tenant>, AuthError> {
        if let Some(t) = &self.open {
            return Ok(t.clone());
        }
        let h = header.ok_or(AuthError::Missing)?;
        let tok = bearer(h).ok_or(AuthError::Malformed)?;
        self.by_token
            .get(blake3::hash(tok.as_bytes()).as_bytes())
            .cloned()
            .ok_or(AuthError::Unknown)
    }
}

/// The token of a `Bearer <token>` header value.
fn bearer(h: &[u8]) -> Option<&str> {
    let h = std::str::from_utf8(h).ok()?;
    Some(
        h.strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))?
            .trim(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TenantConfig;

    fn tenant(name: &str, tok: &str) -> TenantConfig {
        TenantConfig {
            name: name.into(),
            tokens: vec![tok.into()],
            token_files: vec![],
            salt: None,
            shm: false,
            max_namespaces: 4,
            quota: Default::default(),
        }
    }

    #[test]
    fn tokens_map_to_their_tenant_and_nothing_else_passes() {
        let cfg = SidecarConfig {
            tenants: vec![
                tenant("a", "aaaaaaaaaaaaaaaaaaaa"),
                tenant("b", "bbbbbbbbbbbbbbbbbbbb"),
            ],
            ..SidecarConfig::default()
        };
        let auth = Auth::from_config(&cfg).unwrap();
        assert!(auth.required());
        let a = auth.tenant(Some(b"Bearer aaaaaaaaaaaaaaaaaaaa")).unwrap();
        assert_eq!((a.name.as_str(), a.salt.as_slice()), ("a", &b"a"[..]));
        let b = auth.tenant(Some(b"Bearer bbbbbbbbbbbbbbbbbbbb")).unwrap();
        assert_eq!(b.name, "b");
        assert!(matches!(auth.tenant(None), Err(AuthError::Missing)));
        assert!(matches!(
            auth.tenant(Some(b"aaaaaaaaaaaaaaaaaaaa")),
            Err(AuthError::Malformed)
        ));
        assert!(matches!(
            auth.tenant(Some(b"Bearer aaaaaaaaaaaaaaaaaaab")),
            Err(AuthError::Unknown)
        ));
        let dup = SidecarConfig {
            tenants: vec![
                tenant("a", "aaaaaaaaaaaaaaaaaaaa"),
                tenant("b", "aaaaaaaaaaaaaaaaaaaa"),
            ],
            ..SidecarConfig::default()
        };
        assert!(Auth::from_config(&dup).is_err());
    }
}
