//! Tokens → tenants. A tenant's salt is mixed into the root of every block key it makes,
//! so tenants never see each other's blocks whatever they send.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{ConfigError, SidecarConfig};

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
}

/// Who may call, and as whom.
#[derive(Debug)]
pub struct Auth {
    /// blake3(token) → tenant. Tokens are compared by hash, so timing says nothing about
    /// how much of a guess was right.
    by_token: HashMap<[u8; 32], Arc<Tenant>>,
    /// The tenant of every caller when no tokens are configured.
    open: Option<Arc<Tenant>>,
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
        if cfg.tenants.is_empty() {
            return Ok(Auth {
                by_token: HashMap::new(),
                open: Some(Arc::new(Tenant {
                    name: "default".into(),
                    salt: Vec::new(),
                    shm: true,
                    max_namespaces: 1024,
                })),
            });
        }
        let mut by_token = HashMap::new();
        for t in &cfg.tenants {
            let tenant = Arc::new(Tenant {
                name: t.name.clone(),
                salt: t
                    .salt
                    .clone()
                    .unwrap_or_else(|| t.name.clone())
                    .into_bytes(),
                shm: t.shm,
                max_namespaces: t.max_namespaces,
            });
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
        Ok(Auth {
            by_token,
            open: None,
        })
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
        let h = std::str::from_utf8(h).map_err(|_| AuthError::Malformed)?;
        let tok = h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
            .ok_or(AuthError::Malformed)?
            .trim();
        self.by_token
            .get(blake3::hash(tok.as_bytes()).as_bytes())
            .cloned()
            .ok_or(AuthError::Unknown)
    }
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
