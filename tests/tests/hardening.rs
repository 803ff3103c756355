//! The findings of the outside security review (issue 15), each reproduced against the
//! real `strata-sidecar` binary over real sockets: the attack, then what must hold (memory
//! bounded, the attacker refused with a named status, a legitimate client on the Unix
//! socket served throughout).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use strata_server::{Client, pb};
use strata_tests::sidecar::{BLOCK, PAGE, Sidecar, TempDir, block, spec, tokens};
use tonic::Code;

const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789ab";
const ADMIN: &str = "admin-token-0123456789";
const METRICS: &str = "metrics-token-0123456789";

/// A config with tenants alice (shared memory allowed) and bob, plus `extra` TOML lines
/// at the top level and `alice_quota` lines in alice's `[tenants.quota]`.
fn config(dir: &TempDir, extra: &str, alice_quota: &str) -> String {
    let p = dir.0.join("sidecar.toml");
    std::fs::write(
        &p,
        format!(
            r#"
metrics_token = "{METRICS}"
admin_tokens = ["{ADMIN}"]
{extra}
[[tenants]]
name = "alice"
tokens = ["{ALICE}"]
shm = true
[tenants.quota]
{alice_quota}
[[tenants]]
name = "bob"
tokens = ["{BOB}"]
"#
        ),
    )
    .unwrap();
    p.to_str().unwrap().to_string()
}

fn blocks(n: usize, seed: u8) -> Vec<Bytes> {
    (0..n).map(|i| Bytes::from(block(i, seed))).collect()
}

/// A legitimate client on the Unix socket: stores and reads back a prompt, within a few
/// seconds, or panics.
async fn legit_round_trip(sc: &Sidecar, seed: u32) {
    let work = async {
        let mut c = client(sc, BOB).await;
        let ns = c.open_namespace(&spec(9)).await.unwrap().namespace;
        let t = tokens(2, seed);
        c.put(&ns, &t, blocks(2, seed as u8)).await.unwrap();
        let got = c.get(&ns, &t).await.unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(&got[1][..], &block(1, seed as u8)[..]);
    };
    tokio::time::timeout(Duration::from_secs(20), work)
        .await
        .expect("a legitimate client on the Unix socket was not served within 20 s");
}

/// A client of `token`'s tenant on the sidecar's Unix socket.
async fn client(sc: &Sidecar, token: &str) -> Client {
    Client::connect_unix(&sc.socket)
        .await
        .unwrap()
        .with_token(token)
}

/// A raw HTTP/2 connection to the TCP listener.
async fn h2_conn(addr: &str, window: u32) -> h2::client::SendRequest<prost::bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake(tcp)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

fn grpc_request(addr: &str, method: &str, token: Option<&str>) -> http::Request<()> {
    let mut b = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/strata.v1.Cache/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(()).unwrap()
}

/// The grpc-status of a response: in its headers (trailers-only) or its trailers.
async fn grpc_status(resp: h2::client::ResponseFuture) -> Option<String> {
    let resp = resp.await.ok()?;
    if let Some(s) = resp.headers().get("grpc-status") {
        return Some(s.to_str().ok()?.to_string());
    }
    let mut body = resp.into_body();
    while let Some(d) = body.data().await {
        let d = d.ok()?;
        let _ = body.flow_control().release_capacity(d.len());
    }
    let t = body.trailers().await.ok()??;
    Some(t.get("grpc-status")?.to_str().ok()?.to_string())
}

/// Finding 1: streams without a token that declare a large message, send all but its
/// last byte and go quiet are refused on their headers; nothing of their bodies is held.
/// With a token, the bytes being received are bounded per connection and in total, and a
/// stalled body times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_not_buffered_before_authentication_and_are_bounded_after() {
    let dir = TempDir::new("hard-f1");
    let cfg = config(
        &dir,
        r#"max_message = "8MiB"
max_receiving_per_connection = "16MiB"
max_receiving = "24MiB"
stall_timeout = "2s""#,
        "",
    );
    let mut sc = Sidecar::start(&dir.0, &["--config", &cfg, "--tcp", "127.0.0.1:0"]);
    let addr = sc.tcp.clone().unwrap();
    let base = sc.rss();
    let chunk = Bytes::from(vec![7u8; 1 << 20]);
    let declared = (8u32 << 20) - 64;
    let mut header = vec![0u8];
    header.extend_from_slice(&declared.to_be_bytes());

    // 48 unauthenticated streams over 4 connections, each sending 7 MiB of an 8 MiB message.
    let mut refused = 0;
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut send = h2_conn(&addr, 1 << 20).await;
        for _ in 0..12 {
            send = send.ready().await.unwrap();
            let (resp, mut body) = send
                .send_request(grpc_request(&addr, "Put", None), false)
                .unwrap();
            let _ = body.send_data(Bytes::from(header.clone()), false);
            for _ in 0..7 {
                body.reserve_capacity(chunk.len());
                let _ = body.send_data(chunk.clone(), false);
            }
            streams.push(body);
            if let Ok(Some(s)) =
                tokio::time::timeout(Duration::from_secs(5), grpc_status(resp)).await
            {
                assert_eq!(
                    s, "16",
                    "an unauthenticated stream must get UNAUTHENTICATED"
                );
                refused += 1;
            }
        }
    }
    assert_eq!(
        refused, 48,
        "every unauthenticated stream is refused on its headers"
    );
    // A connection that keeps sending requests without a token is closed.
    let mut send = h2_conn(&addr, 1 << 20).await;
    let mut closed = false;
    for _ in 0..40 {
        let Ok(ready) = send.ready().await else {
            closed = true;
            break;
        };
        send = ready;
        let Ok((resp, _body)) = send.send_request(grpc_request(&addr, "Stats", None), true) else {
            closed = true;
            break;
        };
        if tokio::time::timeout(Duration::from_secs(5), grpc_status(resp))
            .await
            .ok()
            .flatten()
            .is_none()
        {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "40 refused requests and the connection is still open"
    );
    legit_round_trip(&sc, 1).await;
    let grown = sc.rss().saturating_sub(base);
    assert!(
        grown < 64 << 20,
        "48 unauthenticated 8 MiB streams grew the sidecar by {} MiB",
        grown >> 20
    );
    drop(streams);

    // With a token: 16 streams of 7 MiB each on 2 connections; the budgets (16 MiB per
    // connection, 24 MiB in all) refuse what is over them, the rest stall and time out.
    let mut codes = Vec::new();
    let mut streams = Vec::new();
    let mut pending = Vec::new();
    for _ in 0..2 {
        let mut send = h2_conn(&addr, 1 << 20).await;
        for _ in 0..8 {
            send = send.ready().await.unwrap();
            let (resp, mut body) = send
                .send_request(grpc_request(&addr, "Put", Some(ALICE)), false)
                .unwrap();
            let _ = body.send_data(Bytes::from(header.clone()), false);
            for _ in 0..7 {
                body.reserve_capacity(chunk.len());
                let _ = body.send_data(chunk.clone(), false);
            }
            streams.push(body);
            pending.push(tokio::spawn(grpc_status(resp)));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peak = sc.rss().saturating_sub(base);
    for p in pending {
        codes.push(
            tokio::time::timeout(Duration::from_secs(20), p)
                .await
                .expect("every stalled stream ends within its stall timeout")
                .unwrap(),
        );
    }
    assert!(sc.alive(), "the sidecar died");
    // RESOURCE_EXHAUSTED (8) for budget refusals, DEADLINE_EXCEEDED (4) for stalls.
    assert!(
        codes
            .iter()
            .all(|c| matches!(c.as_deref(), Some("8") | Some("4") | None)),
        "{codes:?}"
    );
    assert!(codes.iter().any(|c| c.as_deref() == Some("8")), "{codes:?}");
    assert!(codes.iter().any(|c| c.as_deref() == Some("4")), "{codes:?}");
    assert!(
        peak < (24 * 3) << 20,
        "112 MiB of stalled authenticated bodies grew the sidecar by {} MiB (budget 24 MiB)",
        peak >> 20
    );
    legit_round_trip(&sc, 2).await;
}

/// Finding 2: inline Get streams whose client never reads are capped per tenant and in
/// total; the producer stops after the stall timeout (a client that reads again then gets
/// DEADLINE_EXCEEDED, never a silently short stream); a client that still reads nothing a
/// stall timeout later has its connection closed, which gives back what the streams held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_streams_that_are_never_read_are_capped_and_time_out() {
    let dir = TempDir::new("hard-f2");
    let cfg = config(&dir, r#"stall_timeout = "3s""#, "get_streams = 4");
    let sc = Sidecar::start(&dir.0, &["--config", &cfg, "--tcp", "127.0.0.1:0"]);
    let addr = sc.tcp.clone().unwrap();
    let mut c = client(&sc, ALICE).await;
    let ns = c.open_namespace(&spec(1)).await.unwrap().namespace;
    let t = tokens(64, 1);
    c.put(&ns, &t, blocks(64, 1)).await.unwrap();
    let msg = grpc_frame(&pb::GetRequest {
        namespace: ns.clone(),
        tokens: t.clone(),
        ..Default::default()
    });
    // Receive windows of 1 KiB that are never released: the client reads nothing. Three
    // streams on one connection, one on another (which will read again later).
    let open = |send: h2::client::SendRequest<Bytes>| {
        let (addr, msg) = (addr.clone(), msg.clone());
        async move {
            let mut send = send.ready().await.unwrap();
            let (resp, mut body) = send
                .send_request(grpc_request(&addr, "Get", Some(ALICE)), false)
                .unwrap();
            body.send_data(msg, true).unwrap();
            (send, resp)
        }
    };
    let mut held = Vec::new();
    let mut send = h2_conn(&addr, 1024).await;
    for _ in 0..3 {
        let (s, r) = open(send).await;
        send = s;
        held.push(r);
    }
    let (reader_conn, reader) = open(h2_conn(&addr, 1024).await).await;
    let started = Instant::now();
    let mut admin = client(&sc, ADMIN).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while admin.stats().await.unwrap().get_streams < 4 {
        assert!(Instant::now() < deadline, "the 4 streams never opened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A fifth stream is over the tenant's quota.
    let mut a2 = client(&sc, ALICE).await;
    let e = a2.get(&ns, &t).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
    assert!(e.to_string().contains("quota.get_streams"), "{e}");
    // Another tenant is not affected.
    legit_round_trip(&sc, 3).await;
    // Between the stall timeout (3 s) and twice it, the client that reads again gets the
    // blocks already queued, then DEADLINE_EXCEEDED.
    tokio::time::sleep(Duration::from_millis(4500).saturating_sub(started.elapsed())).await;
    let resp = reader.await.unwrap();
    let mut body = resp.into_body();
    let mut got = 0;
    while let Some(d) = body.data().await {
        let d = d.unwrap();
        got += d.len();
        let _ = body.flow_control().release_capacity(d.len());
    }
    let trailers = body.trailers().await.unwrap().unwrap();
    assert_eq!(
        trailers.get("grpc-status").unwrap(),
        "4",
        "{trailers:?} after {got} bytes"
    );
    assert!(got < 64 * BLOCK, "the whole prompt was sent: {got} bytes");
    drop(reader_conn);
    // The client that still reads nothing has its connection closed by the sidecar,
    // which gives back everything its streams held.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = admin.stats().await.unwrap();
        if s.get_streams == 0 && s.client_leases == 0 && s.leases == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "Get streams still held: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        send.ready().await.is_err(),
        "the stalled client's connection is still open"
    );
    let mine = a2.stats().await.unwrap();
    assert_eq!((mine.get_streams, mine.tiers[0].pinned_bytes), (0, 0));
    assert_eq!(a2.get(&ns, &t).await.unwrap().len(), 64);
    drop(held);
}

/// One gRPC message frame: the 5-byte prefix and `m` encoded.
fn grpc_frame<M: prost::Message>(m: &M) -> Bytes {
    raw_frame(&m.encode_to_vec())
}

fn raw_frame(m: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(m.len() + 5);
    b.push(0);
    b.extend_from_slice(&(m.len() as u32).to_be_bytes());
    b.extend_from_slice(m);
    Bytes::from(b)
}

/// Sends one already-framed unary request over HTTP/2 on the Unix socket and returns
/// its grpc-status and grpc-message.
async fn raw_unary(sc: &Sidecar, method: &str, token: &str, frame: Bytes) -> (String, String) {
    let s = tokio::net::UnixStream::connect(&sc.socket).await.unwrap();
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .handshake(s)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await.unwrap();
    let (resp, mut body) = send
        .send_request(grpc_request("localhost", method, Some(token)), false)
        .unwrap();
    let mut rest = frame;
    while !rest.is_empty() {
        let n = rest.len().min(1 << 20);
        body.reserve_capacity(n);
        let chunk = rest.split_to(n);
        if body.send_data(chunk, rest.is_empty()).is_err() {
            break;
        }
    }
    let resp = tokio::time::timeout(Duration::from_secs(30), resp)
        .await
        .expect("no answer within 30 s")
        .unwrap();
    let h = |m: &http::HeaderMap, k: &str| {
        m.get(k)
            .map(|v| v.to_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    if resp.headers().contains_key("grpc-status") {
        return (
            h(resp.headers(), "grpc-status"),
            h(resp.headers(), "grpc-message"),
        );
    }
    let mut b = resp.into_body();
    while let Some(d) = b.data().await {
        let d = d.unwrap();
        let _ = b.flow_control().release_capacity(d.len());
    }
    let t = b.trailers().await.unwrap().unwrap_or_default();
    (h(&t, "grpc-status"), h(&t, "grpc-message"))
}

/// Finding 3: idle TCP connections and half-sent metrics requests are capped and timed
/// out; the Unix socket stays reachable throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_capped_and_closed() {
    let dir = TempDir::new("hard-f3");
    let cfg = config(
        &dir,
        r#"max_tcp_connections = 8
max_metrics_connections = 4
first_request_timeout = "1s""#,
        "",
    );
    let sc = Sidecar::start(&dir.0, &["--config", &cfg, "--tcp", "127.0.0.1:0"]);
    let addr = sc.tcp.clone().unwrap();
    let metrics = sc.metrics.clone().unwrap();
    // 40 idle TCP connections and 20 half-sent metrics requests.
    let idle: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    let half: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(&metrics).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s
        })
        .collect();
    legit_round_trip(&sc, 4).await;
    // Everything is closed by the sidecar: over the cap at once, the rest by timeouts
    // (1 s without a first request; 5 s for metrics headers).
    let closed_within = |mut s: TcpStream, limit: Duration| {
        s.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue, // the server's HTTP/2 settings or an HTTP error page
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    };
    let start = Instant::now();
    let handles: Vec<_> = idle
        .into_iter()
        .map(|s| std::thread::spawn(move || closed_within(s, Duration::from_secs(10))))
        .chain(
            half.into_iter()
                .map(|s| std::thread::spawn(move || closed_within(s, Duration::from_secs(15)))),
        )
        .collect();
    for h in handles {
        assert!(h.join().unwrap(), "a connection was left open");
    }
    assert!(start.elapsed() < Duration::from_secs(16));
    let body = http_get(&metrics, Some(METRICS));
    assert!(body.contains("strata_sidecar_refused_connections_total{listener=\"tcp\"}"));
    assert!(body.contains("strata_sidecar_connection_timeouts_total{listener=\"tcp\"}"));
    legit_round_trip(&sc, 5).await;
}

/// Finding 3, at a 1,024 descriptor limit: 1,500 TCP connections from a peer without a
/// token leave the Unix socket and the shared-memory socket reachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_connection_flood_leaves_the_local_sockets_reachable() {
    let dir = TempDir::new("hard-f3-nofile");
    let cfg = config(&dir, "", "");
    let mut sc = Sidecar::start_limited(
        &dir.0,
        &["--config", &cfg, "--tcp", "127.0.0.1:0"],
        Some(1024),
    );
    let addr = sc.tcp.clone().unwrap();
    raise_own_nofile(4096);
    let flood: Vec<TcpStream> = (0..1500)
        .filter_map(|_| TcpStream::connect(&addr).ok())
        .collect();
    assert!(
        flood.len() > 1024,
        "the flood itself failed: {}",
        flood.len()
    );
    legit_round_trip(&sc, 7).await;
    let c = client(&sc, ALICE).await;
    let shm = c
        .open_shm(&sc.shm)
        .expect("a shared-memory session during the flood");
    drop(shm);
    assert!(sc.alive());
    let log = sc.log.lock().join("\n");
    assert!(!log.contains("Too many open files"), "{log}");
    drop(flood);
}

/// Raises this test process's soft open-file limit to at least `n` (within the hard
/// limit), for tests that open many sockets.
fn raise_own_nofile(n: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid resource and a pointer to a live rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        if r.rlim_cur < n {
            r.rlim_cur = n.min(r.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn http_get(addr: &str, token: Option<&str>) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Finding 4: requests that decode to far more than their size (empty elements, packed
/// zeros, hidden behind a trailing group) are refused before decoding; a declared length
/// over the method's limit is refused from its prefix; control calls have a small size
/// limit; an error that lists what the caller sent is short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoding_inflation_and_huge_error_messages_are_refused() {
    let dir = TempDir::new("hard-f4");
    let cfg = config(&dir, "", "");
    let sc = Sidecar::start(&dir.0, &["--config", &cfg]);
    let base = sc.rss();
    let mut c = client(&sc, ALICE).await;
    let ns = c.open_namespace(&spec(1)).await.unwrap().namespace;
    let ns_field = {
        let mut f = vec![0x0a, ns.len() as u8];
        f.extend_from_slice(ns.as_bytes());
        f
    };
    // 60 MiB of empty `blocks` elements (field 3): 31 million elements.
    let mut m = ns_field.clone();
    m.extend(std::iter::repeat_n([0x1au8, 0x00], 30 << 20).flatten());
    let (code, msg) = raw_unary(&sc, "Put", ALICE, raw_frame(&m)).await;
    assert_eq!(code, "8", "{msg}");
    assert!(
        msg.contains("repeated%20elements") || msg.contains("repeated elements"),
        "{msg}"
    );
    // The same followed by an unknown group (which prost would skip): not a plain message.
    m.extend_from_slice(&[0xbb, 0x3e, 0xbc, 0x3e]); // field 999 start group, end group
    let (code, msg) = raw_unary(&sc, "Put", ALICE, raw_frame(&m)).await;
    assert_eq!(code, "3", "{msg}");
    // 60 MiB of packed zero tokens (field 2) in a Put.
    let mut m = ns_field.clone();
    let n = 60u32 << 20;
    m.push(0x12);
    let mut v = n;
    while v >= 0x80 {
        m.push((v as u8) | 0x80);
        v >>= 7;
    }
    m.push(v as u8);
    m.resize(m.len() + n as usize, 0);
    let (code, msg) = raw_unary(&sc, "Put", ALICE, raw_frame(&m)).await;
    assert_eq!(code, "8", "{msg}");
    drop(m);
    // A Lookup declaring 60 MiB is refused from its prefix, without sending the rest.
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&(60u32 << 20).to_be_bytes());
    let started = Instant::now();
    let (code, msg) = raw_unary(&sc, "Lookup", ALICE, Bytes::from(prefix)).await;
    assert_eq!(code, "8", "{msg}");
    assert!(msg.contains("Lookup"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // A Lookup (no blocks) of 4 MiB is over the control limit.
    let look = pb::LookupRequest {
        namespace: ns.clone(),
        tokens_le: Bytes::from(vec![1u8; 4 << 20]),
        ..Default::default()
    };
    let r = c.request(look).unwrap();
    let e = c.raw().lookup(r).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("Lookup request message"),
        "{}",
        e.message()
    );
    // Release of 100,000 unknown lease ids: NOT_FOUND with a short message.
    let ids: Vec<u64> = (1..=100_000).map(|i| i * 7919).collect();
    let e = c.release(&ids).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound), "{e}");
    assert!(e.to_string().len() < 1024, "{} bytes", e.to_string().len());
    assert!(e.to_string().contains("and 99992 more"), "{e}");
    let grown = sc.rss().saturating_sub(base);
    assert!(grown < 400 << 20, "grew by {} MiB", grown >> 20);
    legit_round_trip(&sc, 6).await;
}

/// The standard services: health checks need no token anywhere; reflection needs one on
/// TCP (it is open on the owner-only Unix socket); their messages are small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_over_tcp_needs_a_token_and_health_stays_open() {
    let dir = TempDir::new("hard-std");
    let cfg = config(&dir, "", "");
    let sc = Sidecar::start(&dir.0, &["--config", &cfg, "--tcp", "127.0.0.1:0"]);
    let addr = sc.tcp.clone().unwrap();
    let refl = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
    let health = "/grpc.health.v1.Health/Check";
    let call = |path: &str, token: Option<&str>, frame: Bytes| {
        let (addr, path, token) = (addr.clone(), path.to_string(), token.map(str::to_string));
        async move {
            let mut send = h2_conn(&addr, 1 << 20).await.ready().await.unwrap();
            let mut b = http::Request::builder()
                .method("POST")
                .uri(format!("http://{addr}{path}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers");
            if let Some(t) = token {
                b = b.header("authorization", format!("Bearer {t}"));
            }
            let (resp, mut body) = send.send_request(b.body(()).unwrap(), false).unwrap();
            let _ = body.send_data(frame, true);
            tokio::time::timeout(Duration::from_secs(10), grpc_status(resp))
                .await
                .expect("no answer")
        }
    };
    let list = raw_frame(&[0x3a, 0x00]); // list_services = ""
    assert_eq!(call(refl, None, list.clone()).await.as_deref(), Some("16"));
    assert_eq!(call(refl, Some(ALICE), list).await.as_deref(), Some("0"));
    assert_eq!(
        call(health, None, raw_frame(&[])).await.as_deref(),
        Some("0")
    );
    // A health check declaring 4 MiB is refused from its prefix.
    let mut big = vec![0u8];
    big.extend_from_slice(&(4u32 << 20).to_be_bytes());
    assert_eq!(
        call(health, None, Bytes::from(big)).await.as_deref(),
        Some("8")
    );
}

/// Finding 5: per-tenant quotas. A tenant at its leased-bytes quota is refused naming
/// it; at its host-bytes quota its own blocks leave, never another tenant's; others keep
/// working; usage returns to zero when its leases end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_held_to_their_quotas() {
    let dir = TempDir::new("hard-f5");
    let quota = format!("leased_bytes = {}\nhost_bytes = {}", 8 * BLOCK, 16 * BLOCK);
    let cfg = config(&dir, "", &quota);
    let sc = Sidecar::start(&dir.0, &["--config", &cfg]);
    let mut alice = client(&sc, ALICE).await;
    let mut bob = client(&sc, BOB).await;
    let ans = alice.open_namespace(&spec(1)).await.unwrap().namespace;
    let bns = bob.open_namespace(&spec(1)).await.unwrap().namespace;
    let bt = tokens(100, 50);
    bob.put(&bns, &bt, blocks(100, 50)).await.unwrap();

    // Alice stores 4 prompts of 8 pages: she keeps at most 16 pages; Bob keeps all 100.
    for s in 0..4u32 {
        let t = tokens(8, s);
        let rep = alice.put(&ans, &t, blocks(8, s as u8)).await.unwrap();
        assert_eq!(rep.stored, 8);
    }
    let mine = alice.stats().await.unwrap();
    assert_eq!(mine.scope, "tenant:alice");
    assert!(
        mine.tiers[0].resident_bytes <= 16 * BLOCK as u64,
        "alice holds {} blocks over her quota of 16",
        mine.tiers[0].resident_bytes / BLOCK as u64
    );
    assert_eq!(bob.lookup(&bns, &bt).await.unwrap().matched_pages, 100);
    // The newest prompt is whole.
    assert_eq!(
        alice
            .lookup(&ans, &tokens(8, 3))
            .await
            .unwrap()
            .matched_pages,
        8
    );

    // Leases: 8 pages fit her quota, 8 more do not.
    let p = alice
        .prefetch(
            &ans,
            &tokens(8, 3),
            pb::Tier::Host,
            pb::PrefetchPolicy::WaitComplete,
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(p.matched_pages, 8);
    let e = alice
        .prefetch(
            &ans,
            &tokens(8, 2),
            pb::Tier::Host,
            pb::PrefetchPolicy::WaitComplete,
            Duration::from_secs(20),
        )
        .await;
    match e {
        Err(e) => {
            assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
            assert!(e.to_string().contains("quota.leased_bytes"), "{e}");
        }
        // Her older prompt may have been evicted already: then nothing is leased.
        Ok(r) => assert_eq!(r.matched_pages, 0, "a lease over quota was granted"),
    }
    // Bob is unaffected.
    bob.put(&bns, &tokens(4, 77), blocks(4, 77)).await.unwrap();
    assert_eq!(bob.get(&bns, &bt).await.unwrap().len(), 100);
    assert_eq!(
        alice.stats().await.unwrap().tiers[0].pinned_bytes,
        8 * BLOCK as u64
    );
    // Usage returns to zero when her connection (which holds the prefetch lease) closes.
    drop(alice);
    let mut admin = client(&sc, ADMIN).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = admin.stats().await.unwrap();
        if s.client_leases == 0 && s.leases == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "leases left: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut alice = client(&sc, ALICE).await;
    let s = alice.stats().await.unwrap();
    assert_eq!((s.leases, s.tiers[0].pinned_bytes), (0, 0), "{s:?}");
    let body = http_get(sc.metrics.as_ref().unwrap(), Some(METRICS));
    assert!(
        body.contains("strata_tenant_leased_bytes{tenant=\"alice\"} 0"),
        "{body}"
    );
}

/// Finding 6: a Put naming staging slots of pages already cached does not make the
/// sidecar read (fault in) those slots; sessions are capped per tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_slots_of_cached_pages_are_not_read_and_sessions_are_capped() {
    let dir = TempDir::new("hard-f6");
    let cfg = config(&dir, "shm_staging_slots = 2048", "");
    let sc = Sidecar::start(&dir.0, &["--config", &cfg, "--host-capacity", "64MiB"]);
    let mut c = client(&sc, ALICE).await;
    let ns = c.open_namespace(&spec(1)).await.unwrap().namespace;
    let pages = 2048;
    let t = tokens(pages, 1);
    for part in 0..2 {
        let half = pages / 2;
        let mut bs: Vec<Bytes> = vec![Bytes::new(); half * part];
        bs.extend((half * part..half * (part + 1)).map(|i| Bytes::from(block(i, 1))));
        c.put(&ns, &t[..half * (part + 1) * PAGE], bs)
            .await
            .unwrap();
    }
    let base = sc.rss();
    let mut sessions = Vec::new();
    for _ in 0..4 {
        let shm = c.open_shm(&sc.shm).unwrap();
        let put = pb::PutRequest {
            namespace: ns.clone(),
            tokens: t.clone(),
            staging_slots: (0..pages as u32).collect(),
            shm_session: shm.session().to_string(),
            ..Default::default()
        };
        let r = c.request(put).unwrap();
        let rep = c.raw().put(r).await.unwrap().into_inner();
        assert_eq!(rep.existing, pages as u64);
        sessions.push(shm);
    }
    let grown = sc.rss().saturating_sub(base);
    assert!(
        grown < 32 << 20,
        "Puts of cached pages through 4 sessions of 32 MiB staging grew the sidecar by {} MiB",
        grown >> 20
    );
    legit_round_trip(&sc, 8).await;
    // The tenant's fifth session is refused, naming the quota.
    let e = c
        .open_shm(&sc.shm)
        .err()
        .expect("a fifth session was opened");
    assert!(e.to_string().contains("quota.shm_sessions"), "{e}");
    drop(sessions);
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.open_shm(&sc.shm).is_err() {
        assert!(Instant::now() < deadline, "sessions were not given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Finding 7: concurrent opens cannot pass `max_namespaces` together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_namespaces_holds_under_concurrent_opens() {
    let dir = TempDir::new("hard-f7");
    let p = dir.0.join("sidecar.toml");
    std::fs::write(
        &p,
        format!("[[tenants]]\nname = \"alice\"\ntokens = [\"{ALICE}\"]\nmax_namespaces = 4\n"),
    )
    .unwrap();
    // The sidecar waits 20 ms between counting a tenant's namespaces and registering a new
    // one (a test hook), so all 16 opens of a round overlap in that window.
    let sc = Sidecar::start_with(
        &dir.0,
        &["--config", p.to_str().unwrap()],
        None,
        &[("STRATA_TEST_NAMESPACE_DELAY_MS", "20")],
    );
    for round in 0..5u8 {
        let mut tasks = Vec::new();
        for m in 0..16u8 {
            let path = sc.socket.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = Client::connect_unix(&path).await.unwrap().with_token(ALICE);
                c.open_namespace(&spec(m.wrapping_add(round.wrapping_mul(16))))
                    .await
                    .is_ok()
            }));
        }
        let mut ok = 0;
        for t in tasks {
            ok += usize::from(t.await.unwrap());
        }
        let expect = if round == 0 { 4 } else { 0 };
        assert_eq!(ok, expect, "round {round}: {ok} namespaces opened");
    }
}

/// Finding 8: a tenant's Stats show only its own usage; global figures need an admin
/// token; `/metrics` needs the metrics token when tenants share the sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_only_their_own_figures() {
    let dir = TempDir::new("hard-f8");
    let cfg = config(&dir, "", "");
    let sc = Sidecar::start(&dir.0, &["--config", &cfg]);
    let mut alice = client(&sc, ALICE).await;
    let mut bob = client(&sc, BOB).await;
    let ans = alice.open_namespace(&spec(1)).await.unwrap().namespace;
    let bns = bob.open_namespace(&spec(1)).await.unwrap().namespace;
    alice.put(&ans, &tokens(2, 1), blocks(2, 1)).await.unwrap();
    bob.put(&bns, &tokens(5, 2), blocks(5, 2)).await.unwrap();
    bob.lookup(&bns, &tokens(5, 2)).await.unwrap();
    let a = alice.stats().await.unwrap();
    assert_eq!(
        (a.scope.as_str(), a.pages, a.lookups),
        ("tenant:alice", 2, 0)
    );
    assert_eq!(a.tiers[0].resident_bytes, 2 * BLOCK as u64);
    let b = bob.stats().await.unwrap();
    assert_eq!((b.pages, b.lookups), (5, 1));
    let mut admin = client(&sc, ADMIN).await;
    let g = admin.stats().await.unwrap();
    assert_eq!((g.scope.as_str(), g.pages), ("global", 7));
    // An admin token is good for Stats only.
    let e = admin.open_namespace(&spec(1)).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::Unauthenticated));
    // Metrics: 401 without the token, the per-tenant figures with it.
    let m = sc.metrics.clone().unwrap();
    assert!(http_get(&m, None).starts_with("HTTP/1.1 401"));
    assert!(http_get(&m, Some(ALICE)).starts_with("HTTP/1.1 401"));
    let body = http_get(&m, Some(METRICS));
    assert!(body.starts_with("HTTP/1.1 200"));
    assert!(
        body.contains(&format!(
            "strata_tenant_host_bytes{{tenant=\"bob\"}} {}",
            5 * BLOCK
        )),
        "{body}"
    );
}

/// Finding 9: two tenants with the same effective salt are refused at start-up.
#[test]
fn tenants_with_equal_salts_are_refused() {
    let dir = TempDir::new("hard-f9");
    // Starts the sidecar on `config`; it must refuse to start, bind nothing, and say why.
    let refused = |config: String| -> String {
        let p = dir.0.join("sidecar.toml");
        std::fs::write(&p, config).unwrap();
        let out = std::process::Command::new(strata_tests::sidecar::built_binary(
            "strata-sidecar-under-test",
        ))
        .args(["--config", p.to_str().unwrap(), "--socket"])
        .arg(dir.0.join("s.sock"))
        .output()
        .unwrap();
        assert!(!out.status.success());
        assert!(!dir.0.join("s.sock").exists(), "nothing may be bound");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused(format!(
        "metrics = \"\"\n[[tenants]]\nname = \"alice\"\ntokens = [\"{ALICE}\"]\nsalt = \"shared\"\n\
         [[tenants]]\nname = \"bob\"\ntokens = [\"{BOB}\"]\nsalt = \"shared\"\n\
         [[tenants]]\nname = \"carol\"\ntokens = [\"carol-token-0123456789\"]\nsalt = \"bob\"\n"
    ));
    assert!(
        err.contains("tenants alice and bob have the same cache salt"),
        "{err}"
    );
    // A salt equal to another tenant's default salt (its name) is refused as well.
    let err = refused(format!(
        "metrics = \"\"\n[[tenants]]\nname = \"bob\"\ntokens = [\"{BOB}\"]\n\
         [[tenants]]\nname = \"carol\"\ntokens = [\"carol-token-0123456789\"]\nsalt = \"bob\"\n"
    ));
    assert!(err.contains("tenants bob and carol have the same"), "{err}");
}
