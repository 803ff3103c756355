//! The sidecar's gRPC service on decoded requests with arbitrary field values: a sequence of
//! calls (OpenNamespace of valid and invalid shapes, Lookup, Put with blocks of right and
//! wrong sizes, Prefetch, PrefetchStatus, Get with its stream drained, Release, Stats), each
//! with no token, a wrong token or one of two tenants' tokens, through `CacheService` over a
//! fresh real sidecar state per input. Errors are fine; a panic, a call that does not
//! finish within 5 s, or a Get block of the wrong size is a failure.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use futures_util::StreamExt;
use libfuzzer_sys::fuzz_target;
use strata_server::Sidecar;
use strata_server::pb;
use strata_server::pb::cache_server::Cache;
use strata_server::service::CacheService;
use tonic::Request;

#[derive(Arbitrary, Debug, Clone)]
enum Who {
    None,
    A,
    B,
    NoBearer,
    Other(String),
}

#[derive(Arbitrary, Debug, Clone)]
enum Ns {
    Opened(u8),
    Raw(String),
    Empty,
}

#[derive(Arbitrary, Debug, Clone)]
struct Toks {
    pages: u8,
    extra: u8,
    seed: u8,
    split: u8,
    as_le: bool,
    /// Raw `tokens_le` bytes instead (any length), with or without `tokens`.
    raw_le: Option<(Vec<u8>, bool)>,
}

#[derive(Arbitrary, Debug, Clone)]
struct Shape {
    fingerprint: Vec<u8>,
    dtype: i32,
    layout: i32,
    page_size: u32,
    num_layers: u32,
    num_kv_heads: u32,
    head_dim: u32,
    tp_world_size: u32,
    tp_rank: u32,
}

#[derive(Arbitrary, Debug, Clone)]
enum Size {
    Right,
    Empty,
    Short(u16),
    Long(u16),
}

#[derive(Arbitrary, Debug, Clone)]
enum Sel {
    Seen(u8),
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone)]
enum Call {
    Open {
        valid: bool,
        fp: u8,
        shape: Shape,
    },
    Lookup {
        ns: Ns,
        toks: Toks,
        keys: Vec<Vec<u8>>,
    },
    Prefetch {
        ns: Ns,
        toks: Toks,
        target: i32,
        policy: i32,
        lease_ms: u64,
    },
    Status {
        ticket: Sel,
        wait_ms: u8,
    },
    Put {
        ns: Ns,
        toks: Toks,
        blocks: Vec<(Size, u8)>,
        slots: Vec<u32>,
        session: Option<String>,
    },
    Get {
        ns: Ns,
        toks: Toks,
        skip: u64,
        max: u64,
        session: Option<String>,
        lease_ms: u64,
    },
    Release {
        leases: Vec<Sel>,
    },
    Stats,
}

#[derive(Arbitrary, Debug)]
struct Input {
    calls: Vec<(Who, Call)>,
}

#[derive(Default)]
struct Seen {
    namespaces: Vec<String>,
    tickets: Vec<u64>,
    leases: Vec<u64>,
}

fn pick(v: &[u64], s: &Sel) -> u64 {
    match s {
        Sel::Seen(i) if !v.is_empty() => v[usize::from(*i) % v.len()],
        Sel::Seen(i) => u64::from(*i),
        Sel::Raw(x) => *x,
    }
}

fn ns(seen: &Seen, n: &Ns) -> String {
    match n {
        Ns::Opened(i) if !seen.namespaces.is_empty() => {
            seen.namespaces[usize::from(*i) % seen.namespaces.len()].clone()
        }
        Ns::Opened(_) | Ns::Empty => String::new(),
        Ns::Raw(s) => s.chars().take(128).collect(),
    }
}

/// Tokens (16 per page) sharing a prefix of `split` tokens across seeds; `(tokens, le)`.
fn toks(t: &Toks) -> (Vec<u32>, Vec<u8>) {
    if let Some((raw, with_ids)) = &t.raw_le {
        let ids = if *with_ids { vec![1, 2, 3] } else { Vec::new() };
        return (ids, raw.iter().copied().take(4096).collect());
    }
    let n =
        usize::from(t.pages % 9) * 16 + usize::from(t.extra % 4 == 0) * usize::from(t.extra % 16);
    let ids: Vec<u32> = (0..n)
        .map(|j| {
            j as u32
                + if j >= usize::from(t.split) {
                    u32::from(t.seed) << 8
                } else {
                    0
                }
        })
        .collect();
    if t.as_le {
        (
            Vec::new(),
            ids.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    } else {
        (ids, Vec::new())
    }
}

fn req<T>(who: &Who, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    let v = match who {
        Who::None => return r,
        Who::A => format!("Bearer {}", strata_fuzz::sidecar::TOKEN_A),
        Who::B => format!("Bearer {}", strata_fuzz::sidecar::TOKEN_B),
        Who::NoBearer => strata_fuzz::sidecar::TOKEN_A.to_owned(),
        Who::Other(s) => s.chars().take(256).collect(),
    };
    if let Ok(v) = v.parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

const BB: usize = strata_fuzz::sidecar::BLOCK_BYTES as usize;

async fn call(svc: &CacheService, seen: &mut Seen, who: &Who, c: Call) {
    match c {
        Call::Open { valid, fp, shape } => {
            let m = if valid {
                pb::OpenNamespaceRequest {
                    model_fingerprint: vec![fp; 32].into(),
                    dtype: pb::KvDtype::F16 as i32,
                    layout: pb::KvLayout::PageFirst as i32,
                    page_size: 16,
                    num_layers: 1,
                    num_kv_heads: 1,
                    head_dim: 16,
                    tp_world_size: 1,
                    tp_rank: 0,
                }
            } else {
                pb::OpenNamespaceRequest {
                    model_fingerprint: shape
                        .fingerprint
                        .into_iter()
                        .take(256)
                        .collect::<Vec<u8>>()
                        .into(),
                    dtype: shape.dtype,
                    layout: shape.layout,
                    page_size: shape.page_size,
                    num_layers: shape.num_layers,
                    num_kv_heads: shape.num_kv_heads,
                    head_dim: shape.head_dim,
                    tp_world_size: shape.tp_world_size,
                    tp_rank: shape.tp_rank,
                }
            };
            if let Ok(r) = svc.open_namespace(req(who, m)).await {
                let r = r.into_inner();
                assert_eq!(
                    r.block_bytes,
                    strata_fuzz::sidecar::BLOCK_BYTES,
                    "namespace block size"
                );
                seen.namespaces.push(r.namespace);
            }
        }
        Call::Lookup {
            ns: n,
            toks: t,
            keys,
        } => {
            let (tokens, tokens_le) = toks(&t);
            let m = pb::LookupRequest {
                namespace: ns(seen, &n),
                tokens,
                keys: keys.into_iter().take(16).map(Into::into).collect(),
                tokens_le: tokens_le.into(),
            };
            let _ = svc.lookup(req(who, m)).await;
        }
        Call::Prefetch {
            ns: n,
            toks: t,
            target,
            policy,
            lease_ms,
        } => {
            let (tokens, tokens_le) = toks(&t);
            let m = pb::PrefetchRequest {
                namespace: ns(seen, &n),
                tokens,
                target,
                policy,
                lease_ms: lease_ms % 10_000,
                tokens_le: tokens_le.into(),
            };
            if let Ok(r) = svc.prefetch(req(who, m)).await {
                let r = r.into_inner();
                seen.tickets.push(r.ticket);
                seen.leases.push(r.lease);
            }
        }
        Call::Status { ticket, wait_ms } => {
            let m = pb::PrefetchStatusRequest {
                ticket: pick(&seen.tickets, &ticket),
                wait_ms: u64::from(wait_ms % 20),
            };
            let _ = svc.prefetch_status(req(who, m)).await;
        }
        Call::Put {
            ns: n,
            toks: t,
            blocks,
            slots,
            session,
        } => {
            let (tokens, tokens_le) = toks(&t);
            let blocks = blocks
                .into_iter()
                .take(10)
                .map(|(s, fill)| {
                    let len = match s {
                        Size::Right => BB,
                        Size::Empty => 0,
                        Size::Short(d) => BB.saturating_sub(usize::from(d) % BB + 1),
                        Size::Long(d) => BB + usize::from(d) % 4096 + 1,
                    };
                    vec![fill; len].into()
                })
                .collect();
            let m = pb::PutRequest {
                namespace: ns(seen, &n),
                tokens,
                blocks,
                staging_slots: slots.into_iter().take(16).collect(),
                shm_session: session
                    .map(|s| s.chars().take(32).collect())
                    .unwrap_or_default(),
                tokens_le: tokens_le.into(),
            };
            let _ = svc.put(req(who, m)).await;
        }
        Call::Get {
            ns: n,
            toks: t,
            skip,
            max,
            session,
            lease_ms,
        } => {
            let (tokens, tokens_le) = toks(&t);
            let m = pb::GetRequest {
                namespace: ns(seen, &n),
                tokens,
                skip_pages: skip,
                max_pages: max,
                shm_session: session
                    .map(|s| s.chars().take(32).collect())
                    .unwrap_or_default(),
                lease_ms: lease_ms % 10_000,
                tokens_le: tokens_le.into(),
            };
            if let Ok(r) = svc.get(req(who, m)).await {
                let mut s = r.into_inner();
                while let Some(item) = s.next().await {
                    let Ok(item) = item else {
                        break;
                    };
                    if !item.block.is_empty() {
                        assert_eq!(
                            item.block.len(),
                            BB,
                            "Get returned a block of the wrong size"
                        );
                    }
                    if item.lease != 0 {
                        seen.leases.push(item.lease);
                    }
                }
            }
        }
        Call::Release { leases } => {
            let m = pb::ReleaseRequest {
                leases: leases
                    .iter()
                    .take(16)
                    .map(|s| pick(&seen.leases, s))
                    .collect(),
            };
            let _ = svc.release(req(who, m)).await;
        }
        Call::Stats => {
            let _ = svc.stats(req(who, pb::StatsRequest {})).await;
        }
    }
}

fuzz_target!(|inp: Input| {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static BASE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let base = BASE.get_or_init(|| strata_fuzz::scratch("/tmp", "service"));
    let dir = base.join(
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_string(),
    );
    std::fs::create_dir_all(&dir).expect("creating the socket directory");
    strata_fuzz::runtime().block_on(async {
        let sc = Sidecar::bind(strata_fuzz::sidecar::config(&dir))
            .await
            .expect("binding the sidecar");
        let svc = CacheService::new(sc.shared());
        let mut seen = Seen::default();
        for (who, c) in inp.calls.into_iter().take(24) {
            let what = format!("{c:?}");
            tokio::time::timeout(Duration::from_secs(5), call(&svc, &mut seen, &who, c))
                .await
                .unwrap_or_else(|_| panic!("call did not finish within 5 s: {what}"));
        }
        drop(svc);
        drop(sc);
    });
    let _ = std::fs::remove_dir_all(&dir);
});
