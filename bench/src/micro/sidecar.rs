//! `micro sidecar`: the sidecar's gRPC API measured from a client on the same machine.
//!
//! - Lookup latency of 8,192-token prompts over the Unix socket (p50, p99), with the
//!   in-process lookup for reference.
//! - 1.5 MiB blocks through the shared-memory data plane (`Get` → slot offsets, copy out of
//!   the mapped pool, `Release`) against an in-process G2 read of the same blocks into the
//!   same buffers.
//! - Inline gRPC `Get` of 1.5 MiB blocks over TCP loopback against Redis `GET` of values
//!   of the same size (`redis-server` from Debian, started here; the faster of one-by-one
//!   and pipelined GETs is the baseline).
//!
//! The sidecar runs in this process on its own runtime (one worker thread) and is reached
//! only through its sockets; the client runs on another thread.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use strata_cache_core::{KvDtype, KvLayout, KvShape, Namespace, TpShape};
use strata_server::client::{Client, NamespaceSpec};
use strata_server::config::TenantConfig;
use strata_server::{Sidecar, SidecarConfig, pb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Figure;
use crate::stats::median;

const BLOCK: usize = 3 << 19; // 1.5 MiB
const PAGE: usize = 64;
const TOKEN: &str = "strata-bench-token-0123456789";

/// 2 × 24 layers × 4 heads × 64 × 64 tokens × 2 bytes = 1.5 MiB.
fn spec() -> NamespaceSpec {
    NamespaceSpec {
        model_fingerprint: [0xB5; 32],
        dtype: pb::KvDtype::F16,
        page_size: PAGE as u32,
        num_layers: 24,
        num_kv_heads: 4,
        head_dim: 64,
    }
}

fn namespace(salt: &[u8]) -> anyhow::Result<Namespace> {
    Ok(Namespace::new(
        [0xB5; 32],
        KvDtype::F16,
        KvLayout::PageFirst,
        PAGE as u32,
        KvShape {
            num_layers: 24,
            num_kv_heads: 4,
            head_dim: 64,
        },
        TpShape::default(),
        salt,
    )?)
}

fn block(i: usize) -> Vec<u8> {
    (0..BLOCK)
        .map(|j| (j as u8).wrapping_mul(13) ^ (i as u8).wrapping_mul(29))
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis(dir: &std::path::Path) -> anyhow::Result<(Redis, SocketAddr)> {
    super::ensure_debian_tool("redis-server", "--version", "redis-server", "sidecar")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
        ])
        .args(["--proto-max-bulk-len", "64mb", "--loglevel", "warning"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context(
            "starting redis-server (the baseline): install it with `apt-get install redis-server`",
        )?;
    let redis = Redis(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("redis-server did not start listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((redis, addr))
}

/// A minimal RESP client: enough for SET and GET of binary values, nothing in the way.
struct Resp {
    r: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Resp {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        Ok(Resp {
            r: tokio::io::BufReader::with_capacity(4 << 20, r),
            w,
        })
    }

    fn command(parts: &[&[u8]]) -> Vec<u8> {
        let mut c = format!("*{}\r\n", parts.len()).into_bytes();
        for p in parts {
            c.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
            c.extend_from_slice(p);
            c.extend_from_slice(b"\r\n");
        }
        c
    }

    async fn line(&mut self) -> anyhow::Result<String> {
        use tokio::io::AsyncBufReadExt;
        let mut l = String::new();
        self.r.read_line(&mut l).await?;
        if l.starts_with('-') {
            bail!("redis: {}", l.trim_end());
        }
        Ok(l)
    }

    async fn set(&mut self, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        self.w
            .write_all(&Self::command(&[b"SET", key, value]))
            .await?;
        let l = self.line().await?;
        if !l.starts_with("+OK") {
            bail!("redis SET answered {l:?}");
        }
        Ok(())
    }

    /// Reads one bulk reply into `out` (resized to its length).
    async fn bulk(&mut self, out: &mut Vec<u8>) -> anyhow::Result<()> {
        let l = self.line().await?;
        let n: usize = l
            .strip_prefix('$')
            .and_then(|x| x.trim_end().parse().ok())
            .with_context(|| format!("redis GET answered {l:?}"))?;
        out.resize(n, 0);
        self.r.read_exact(out).await?;
        let mut crlf = [0u8; 2];
        self.r.read_exact(&mut crlf).await?;
        Ok(())
    }

    async fn get_each(&mut self, keys: &[Vec<u8>], out: &mut [Vec<u8>]) -> anyhow::Result<()> {
        for (k, o) in keys.iter().zip(out) {
            self.w.write_all(&Self::command(&[b"GET", k])).await?;
            self.bulk(o).await?;
        }
        Ok(())
    }

    async fn get_pipelined(&mut self, keys: &[Vec<u8>], out: &mut [Vec<u8>]) -> anyhow::Result<()> {
        let mut all = Vec::new();
        for k in keys {
            all.extend_from_slice(&Self::command(&[b"GET", k]));
        }
        self.w.write_all(&all).await?;
        for o in out {
            self.bulk(o).await?;
        }
        Ok(())
    }
}

pub fn run(quick: bool) -> anyhow::Result<Vec<Figure>> {
    // As the sidecar binary does (and for the Redis client's buffers alike).
    strata_server::tune_allocator();
    let get_blocks: usize = if quick { 8 } else { 32 };
    let rounds = if quick { 3 } else { 11 };
    let lookups = if quick { 200 } else { 3000 };
    let prompt_pages = 8192 / PAGE;

    let dir = std::env::temp_dir().join(format!("strata-bench-sidecar-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());

    // The sidecar, on its own runtime and thread.
    let cfg = SidecarConfig {
        socket: Some(dir.join("sidecar.sock")),
        tcp: Some("127.0.0.1:0".into()),
        metrics: String::new(),
        block_bytes: BLOCK as u64,
        host_capacity: ((prompt_pages + 2 * get_blocks + 8) * BLOCK) as u64,
        max_message: 64 << 20,
        tenants: vec![TenantConfig {
            name: "bench".into(),
            tokens: vec![TOKEN.into()],
            token_files: vec![],
            salt: None,
            shm: true,
            max_namespaces: 4,
            quota: Default::default(),
        }],
        ..SidecarConfig::default()
    };
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let sidecar = server_rt.block_on(Sidecar::bind(cfg))?;
    let bound = sidecar.bound().clone();
    let shared = sidecar.shared();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        server_rt.block_on(sidecar.run(async {
            let _ = stop_rx.await;
        }))
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let mut uds = Client::connect_unix(&bound.socket).await?.with_token(TOKEN);
        let ns = uds.open_namespace(&spec()).await?.namespace;
        let tokens: Vec<u32> = (0..(prompt_pages * PAGE) as u32)
            .map(|i| i.wrapping_mul(2_654_435_761) % 49_152)
            .collect();
        eprintln!(
            "sidecar: storing a {}-token prompt ({prompt_pages} blocks of 1.5 MiB)",
            tokens.len()
        );
        let blocks: Vec<Vec<u8>> = (0..prompt_pages).map(block).collect();
        // Stored a few pages per call, extending the prefix (cached pages go empty).
        for end in (8..=prompt_pages).step_by(8) {
            let mut msg: Vec<prost::bytes::Bytes> = vec![prost::bytes::Bytes::new(); end - 8];
            msg.extend(
                blocks[end - 8..end]
                    .iter()
                    .map(|b| prost::bytes::Bytes::from(b.clone())),
            );
            uds.put(&ns, &tokens[..end * PAGE], msg).await?;
        }
        let look = uds.lookup(&ns, &tokens).await?;
        if look.matched_pages as usize != prompt_pages {
            bail!(
                "stored {prompt_pages} pages, lookup found {}",
                look.matched_pages
            );
        }

        // 1. Lookup latency over the Unix socket, and in-process for reference.
        eprintln!("sidecar: {lookups} lookups of {} tokens", tokens.len());
        let handle = shared.cache.register(&namespace(b"bench")?)?;
        let mut lat = Vec::with_capacity(lookups);
        let mut inproc = Vec::with_capacity(lookups);
        for _ in 0..lookups / 10 {
            uds.lookup(&ns, &tokens).await?;
        }
        for _ in 0..lookups {
            let t = Instant::now();
            let r = uds.lookup(&ns, std::hint::black_box(&tokens)).await?;
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            std::hint::black_box(r);
            let t = Instant::now();
            let r = shared
                .cache
                .lookup(&handle, std::hint::black_box(&tokens))?;
            inproc.push(t.elapsed().as_secs_f64() * 1e6);
            std::hint::black_box(r);
        }
        lat.sort_by(f64::total_cmp);
        inproc.sort_by(f64::total_cmp);
        let mut small = Vec::with_capacity(lookups);
        for _ in 0..lookups {
            let t = Instant::now();
            std::hint::black_box(uds.lookup(&ns, &tokens[..PAGE]).await?);
            small.push(t.elapsed().as_secs_f64() * 1e6);
        }
        small.sort_by(f64::total_cmp);
        eprintln!(
            "sidecar: one-page lookup p50 {:.1} µs",
            percentile(&small, 0.5)
        );

        // 2. Shared memory against an in-process G2 read into the same buffers.
        eprintln!("sidecar: {rounds} rounds of {get_blocks} blocks, shared memory vs in-process");
        let get_tokens = &tokens[..get_blocks * PAGE];
        let shm = uds.open_shm(bound.shm_socket.as_ref().context("no shm socket")?)?;
        let mut bufs: Vec<Vec<u8>> = vec![vec![0u8; BLOCK]; get_blocks];
        let (mut t_inproc, mut t_shm) = (Vec::new(), Vec::new());
        for round in 0..=rounds {
            let t = Instant::now();
            let r = shared.cache.read(&handle, get_tokens, &mut bufs).await?;
            let a = t.elapsed().as_secs_f64();
            if r.read != get_blocks || bufs[get_blocks - 1] != blocks[get_blocks - 1] {
                bail!("in-process read returned other blocks");
            }
            let t = Instant::now();
            let got = uds
                .get_shm(&shm, &ns, get_tokens, Duration::from_secs(10))
                .await?;
            for (s, buf) in got.slots.iter().zip(bufs.iter_mut()) {
                let src = shm
                    .block(s.offset, s.len)
                    .context("slot outside the pool")?;
                buf.copy_from_slice(src);
            }
            uds.release(&[got.lease]).await?;
            let b = t.elapsed().as_secs_f64();
            if got.slots.len() != get_blocks || bufs[get_blocks - 1] != blocks[get_blocks - 1] {
                bail!("shared-memory Get returned other blocks");
            }
            if round > 0 {
                t_inproc.push(a);
                t_shm.push(b);
            }
        }
        drop(shm);

        // 3. Inline gRPC Get over TCP against Redis GET.
        eprintln!("sidecar: {rounds} rounds of {get_blocks} blocks, gRPC over TCP vs Redis");
        let tcp_addr = bound.tcp.context("no TCP listener")?;
        let mut tcp = Client::connect_tcp(&format!("http://{tcp_addr}"))
            .await?
            .with_token(TOKEN);
        let (redis, raddr) = start_redis(&dir)?;
        let mut resp = Resp::connect(raddr).await?;
        let keys: Vec<Vec<u8>> = (0..get_blocks)
            .map(|i| format!("blk:{i}").into_bytes())
            .collect();
        for (k, b) in keys.iter().zip(&blocks) {
            resp.set(k, b).await?;
        }
        let mut rbufs: Vec<Vec<u8>> = vec![Vec::new(); get_blocks];
        let (mut t_grpc, mut t_redis_each, mut t_redis_pipe) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..=rounds {
            let t = Instant::now();
            let got = tcp.get(&ns, get_tokens).await?;
            let g = t.elapsed().as_secs_f64();
            if got.len() != get_blocks
                || got[get_blocks - 1].as_ref() != blocks[get_blocks - 1].as_slice()
            {
                bail!("gRPC Get returned other blocks");
            }
            drop(got);
            let t = Instant::now();
            resp.get_each(&keys, &mut rbufs).await?;
            let e = t.elapsed().as_secs_f64();
            let t = Instant::now();
            resp.get_pipelined(&keys, &mut rbufs).await?;
            let p = t.elapsed().as_secs_f64();
            if rbufs[get_blocks - 1] != blocks[get_blocks - 1] {
                bail!("redis returned other bytes");
            }
            if round > 0 {
                t_grpc.push(g);
                t_redis_each.push(e);
                t_redis_pipe.push(p);
            }
        }
        drop(redis);
        Ok::<_, anyhow::Error>((
            lat,
            inproc,
            t_inproc,
            t_shm,
            t_grpc,
            t_redis_each,
            t_redis_pipe,
        ))
    });
    let _ = stop_tx.send(());
    match server.join() {
        Ok(r) => r?,
        Err(_) => bail!("the sidecar thread panicked"),
    }
    let (lat, inproc, t_inproc, t_shm, t_grpc, t_each, t_pipe) = result?;

    let gib = (get_blocks * BLOCK) as f64 / (1u64 << 30) as f64;
    let (mi, ms) = (median(t_inproc), median(t_shm));
    let (mg, me, mp) = (median(t_grpc), median(t_each), median(t_pipe));
    let redis_best = me.min(mp);
    eprintln!(
        "sidecar: lookup p50 {:.1} µs p99 {:.1} µs over UDS (in-process p50 {:.1} µs)",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&inproc, 0.5)
    );
    eprintln!(
        "sidecar: in-process G2 read {:.2} GiB/s, shared-memory Get {:.2} GiB/s",
        gib / mi,
        gib / ms
    );
    eprintln!(
        "sidecar: gRPC Get over TCP {:.2} GiB/s; Redis GET one by one {:.2} GiB/s, pipelined {:.2} GiB/s",
        gib / mg,
        gib / me,
        gib / mp
    );
    Ok(vec![
        Figure::new("sidecar.lookup_p50_us", percentile(&lat, 0.5), 1, "us"),
        Figure::new("sidecar.lookup_p99_us", percentile(&lat, 0.99), 1, "us"),
        Figure::new(
            "sidecar.lookup_inproc_p50_us",
            percentile(&inproc, 0.5),
            1,
            "us",
        ),
        Figure::new("sidecar.shm_get_gib_s", gib / ms, 2, "GiB/s"),
        Figure::new("sidecar.inproc_read_gib_s", gib / mi, 2, "GiB/s"),
        Figure::new("sidecar.shm_get_vs_inproc", mi / ms, 2, "x"),
        Figure::new("sidecar.grpc_get_gib_s", gib / mg, 2, "GiB/s"),
        Figure::new("sidecar.redis_get_gib_s", gib / redis_best, 2, "GiB/s"),
        Figure::new("sidecar.grpc_get_vs_redis", redis_best / mg, 2, "x"),
    ])
}
