//! The legitimate clients: each holds one gRPC connection (Unix socket or TCP) of one
//! tenant, and, for tenants allowed to, a shared-memory session; draws prompts with
//! Zipf-shaped popularity and runs Lookup, Get (inline and shared memory), Put (inline and
//! through staging slots), Prefetch with PrefetchStatus, and Release; checks every byte
//! it reads.

use std::sync::Arc;
use std::time::Duration;

use prost::bytes::Bytes;
use strata_server::Client;
use strata_server::client::ClientError;
use strata_server::pb;
use strata_server::shm::ShmClient;

use super::data::{self, PAGE, Rng};
use super::{Shared, Tenant};

/// Longest a call may take before it counts as a `timeout` error.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// One connection's settings.
pub struct Worker {
    /// Its tenant.
    pub tenant: Tenant,
    /// TCP (else the Unix socket).
    pub tcp: bool,
    /// Opens a shared-memory session (when its tenant may): a few connections per tenant
    /// do, as a few engine processes would (sessions are limited per tenant).
    pub shm: bool,
    /// Random seed.
    pub seed: u64,
}

struct Conn {
    client: Client,
    ns: String,
    shm: Option<ShmClient>,
    generation: u64,
}

/// The error kind of a failed call: the gRPC code, or what failed on the client side.
pub fn error_kind(e: &ClientError) -> String {
    match e {
        ClientError::Status(s) => format!("{:?}", s.code()),
        ClientError::Transport(_) => "transport".into(),
        ClientError::Shm(_) => "shm".into(),
        ClientError::Invalid(_) => "client".into(),
    }
}

fn broken(e: &ClientError) -> bool {
    match e {
        ClientError::Status(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ),
        ClientError::Transport(_) | ClientError::Shm(_) => true,
        ClientError::Invalid(_) => false,
    }
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Invalid("timeout".into())),
    }
}

/// Connects as `tenant` over the Unix socket or TCP and opens the soak namespace.
pub async fn connect(
    shared: &Shared,
    tenant: &Tenant,
    tcp: bool,
) -> Result<(Client, String, u64), ClientError> {
    let (addrs, generation) = shared.addrs();
    let c = if tcp {
        Client::connect_tcp(&format!("http://{}", addrs.tcp)).await?
    } else {
        Client::connect_unix(&addrs.socket).await?
    };
    let mut c = c.with_token(tenant.token.clone());
    let ns = timed(c.open_namespace(&data::spec())).await?.namespace;
    Ok((c, ns, generation))
}

impl Worker {
    /// Runs until `shared.stop` is set.
    pub async fn run(self, shared: Arc<Shared>) {
        let mut rng = Rng::new(self.seed);
        let mut conn: Option<Conn> = None;
        while !shared.stopping() {
            let (addrs, generation) = shared.addrs();
            if !shared.is_up() {
                conn = None;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            if conn.as_ref().is_none_or(|c| c.generation != generation) {
                conn = None;
                match connect(&shared, &self.tenant, self.tcp).await {
                    Ok((client, ns, generation)) => {
                        let shm = if self.tenant.shm && self.shm {
                            match client.open_shm(&addrs.shm) {
                                Ok(s) => Some(s),
                                Err(e) => {
                                    shared.error("open_shm", &error_kind(&e), generation, None);
                                    None
                                }
                            }
                        } else {
                            None
                        };
                        conn = Some(Conn {
                            client,
                            ns,
                            shm,
                            generation,
                        });
                    }
                    Err(e) => {
                        shared.error("connect", &error_kind(&e), generation, None);
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            let p = shared.zipf.sample(&mut rng) as u64;
            let tokens = data::prompt_tokens(shared.seed, p);
            let r = self.one_op(&shared, c, &mut rng, &tokens).await;
            if let Err((op, e)) = r {
                let kind = error_kind(&e);
                shared.error(op, &kind, c.generation, Some(&e));
                if broken(&e) {
                    conn = None;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                } else if matches!(&e, ClientError::Status(s) if s.code() == tonic::Code::NotFound && s.message().contains("namespace"))
                {
                    conn = None;
                }
            }
        }
    }

    /// One operation on prompt `tokens`; an error names the call that failed.
    async fn one_op(
        &self,
        shared: &Shared,
        c: &mut Conn,
        rng: &mut Rng,
        tokens: &[u32],
    ) -> Result<(), (&'static str, ClientError)> {
        let t = self.tenant.index;
        let pick = rng.below(100);
        let shm_ok = c.shm.is_some();
        match pick {
            0..30 => {
                let r = shared
                    .measure("lookup", timed(c.client.lookup(&c.ns, tokens)))
                    .await
                    .map_err(|e| ("lookup", e))?;
                let pages = (tokens.len() / PAGE) as u64;
                if r.requested_pages != pages || r.matched_pages > pages {
                    shared.protocol(format!(
                        "lookup of {pages} pages answered matched {} of {}",
                        r.matched_pages, r.requested_pages
                    ));
                }
            }
            30..60 => {
                let use_shm = shm_ok && rng.below(3) == 0;
                let matched = if use_shm {
                    let shm = c.shm.as_ref().expect("checked");
                    let got = shared
                        .measure(
                            "get_shm",
                            timed(
                                c.client
                                    .get_shm(shm, &c.ns, tokens, Duration::from_secs(20)),
                            ),
                        )
                        .await
                        .map_err(|e| ("get_shm", e))?;
                    let keys = data::page_keys(t, tokens);
                    if got.slots.len() > keys.len() {
                        shared.protocol(format!(
                            "shared-memory Get of {} pages returned {} slots",
                            keys.len(),
                            got.slots.len()
                        ));
                    }
                    for (s, k) in got.slots.iter().zip(&keys) {
                        match shm.block(s.offset, s.len) {
                            Some(b) => {
                                shared.verify(b, k, t, "get_shm");
                            }
                            None => shared.protocol(format!(
                                "slot at {} (+{}) is outside the pool",
                                s.offset, s.len
                            )),
                        }
                    }
                    let n = got.slots.len();
                    if got.lease != 0 {
                        shared
                            .measure("release", timed(c.client.release(&[got.lease])))
                            .await
                            .map_err(|e| ("release", e))?;
                    }
                    n
                } else {
                    let got = shared
                        .measure("get", timed(get_checked(shared, c, tokens)))
                        .await
                        .map_err(|e| ("get", e))?;
                    let keys = data::page_keys(t, tokens);
                    if got.len() > keys.len() {
                        shared.protocol(format!(
                            "Get of {} pages returned {} blocks",
                            keys.len(),
                            got.len()
                        ));
                    }
                    for (b, k) in got.iter().zip(&keys) {
                        let _ = shared.verify(b, k, t, "get");
                    }
                    got.len()
                };
                // What was not cached is "computed" and stored, as an engine would.
                if matched < tokens.len() / PAGE {
                    self.put(shared, c, rng, tokens).await?;
                }
            }
            60..85 => self.put(shared, c, rng, tokens).await?,
            _ => {
                let policy = if rng.below(2) == 0 {
                    pb::PrefetchPolicy::BestEffort
                } else {
                    pb::PrefetchPolicy::WaitComplete
                };
                let p = shared
                    .measure(
                        "prefetch",
                        timed(c.client.prefetch(
                            &c.ns,
                            tokens,
                            pb::Tier::Host,
                            policy,
                            Duration::from_secs(10),
                        )),
                    )
                    .await
                    .map_err(|e| ("prefetch", e))?;
                if p.ticket != 0 {
                    let st = shared
                        .measure(
                            "prefetch_status",
                            timed(c.client.prefetch_status(p.ticket, Duration::from_secs(2))),
                        )
                        .await;
                    match st {
                        Ok(st) if st.ready_pages > st.total_pages => shared.protocol(format!(
                            "prefetch status: {} of {} pages ready",
                            st.ready_pages, st.total_pages
                        )),
                        Ok(_) => {}
                        // The ticket may be gone once its prefetch finished and its lease
                        // ended; not an error of the server.
                        Err(e) if e.code() == Some(tonic::Code::NotFound) => {}
                        Err(e) => return Err(("prefetch_status", e)),
                    }
                }
                if p.lease != 0 {
                    shared
                        .measure("release", timed(c.client.release(&[p.lease])))
                        .await
                        .map_err(|e| ("release", e))?;
                }
            }
        }
        Ok(())
    }

    async fn put(
        &self,
        shared: &Shared,
        c: &mut Conn,
        rng: &mut Rng,
        tokens: &[u32],
    ) -> Result<(), (&'static str, ClientError)> {
        let keys = data::page_keys(self.tenant.index, tokens);
        let blocks: Vec<Vec<u8>> = keys.iter().map(data::block_bytes).collect();
        let use_shm = c.shm.is_some() && rng.below(3) == 0;
        let rep = if use_shm {
            let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
            let shm = c.shm.as_mut().expect("checked");
            shared
                .measure(
                    "put_shm",
                    timed(c.client.put_shm(shm, &c.ns, tokens, &refs, PAGE)),
                )
                .await
                .map_err(|e| ("put_shm", e))?
        } else {
            let inline: Vec<Bytes> = blocks.into_iter().map(Bytes::from).collect();
            shared
                .measure("put", timed(c.client.put(&c.ns, tokens, inline)))
                .await
                .map_err(|e| ("put", e))?
        };
        if rep.pages != keys.len() as u64 {
            shared.protocol(format!(
                "Put of {} pages answered pages={}",
                keys.len(),
                rep.pages
            ));
        }
        shared.note_put(self.tenant.index);
        Ok(())
    }
}

/// An inline Get that also checks the stream's page numbers.
async fn get_checked(
    shared: &Shared,
    c: &mut Conn,
    tokens: &[u32],
) -> Result<Vec<Bytes>, ClientError> {
    let mut s = c.client.get_stream(&c.ns, tokens, 0, 0).await?;
    let mut out = Vec::new();
    let mut matched = None;
    while let Some(m) = s.message().await? {
        if matched.is_none() {
            matched = Some(m.matched_pages);
        }
        if !m.block.is_empty() {
            if m.page != out.len() as u64 {
                shared.protocol(format!(
                    "Get sent page {} where page {} was due",
                    m.page,
                    out.len()
                ));
                break;
            }
            out.push(m.block);
        }
    }
    if matched.is_some_and(|n| n != out.len() as u64) {
        // A page that cannot be read (a failed or corrupt disk read) is a miss: fewer
        // blocks than announced is allowed, and counted.
        shared.note("get_fewer_blocks_than_announced");
    }
    Ok(out)
}
