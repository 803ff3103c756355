//! The real `strata-sidecar` binary over real sockets: round trips over the Unix socket and
//! TCP, inline and through shared memory; authentication and tenant isolation; malformed
//! input; a client killed mid-stream; restart with the disk tier.

use std::io::Write;
use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use strata_cache_core::{KvDtype, KvLayout, KvShape, Namespace, TpShape};
use strata_server::Client;
use strata_server::pb;
use strata_tests::sidecar::{BLOCK, PAGE, Sidecar, TempDir, block, built_binary, spec, tokens};
use tonic::Code;

const TOKEN: &str = "test-token-0123456789";

fn blocks(n: usize, seed: u8) -> Vec<Bytes> {
    (0..n).map(|i| Bytes::from(block(i, seed))).collect()
}

/// The block keys the sidecar computes for `tokens` in the test namespace of tenant
/// `salt` (what a router hashing pages itself would send).
fn keys(model: u8, salt: &[u8], tokens: &[u32]) -> Vec<[u8; 32]> {
    Namespace::new(
        [model; 32],
        KvDtype::F16,
        KvLayout::PageFirst,
        PAGE as u32,
        KvShape {
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 64,
        },
        TpShape::default(),
        salt,
    )
    .unwrap()
    .page_keys(tokens)
    .into_iter()
    .map(|k| k.0)
    .collect()
}

fn host_pages(r: &pb::LookupResponse) -> u64 {
    r.tiers
        .iter()
        .find(|t| t.tier == pb::Tier::Host as i32)
        .map(|t| t.pages)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_lookup_prefetch_get_over_unix_and_tcp_inline_and_shared_memory() {
    let dir = TempDir::new("sidecar-rt");
    let sc = Sidecar::start(&dir.0, &["--tcp", "127.0.0.1:0", "--token", TOKEN]);
    let mut uds = Client::connect_unix(&sc.socket)
        .await
        .unwrap()
        .with_token(TOKEN);
    let ns = uds.open_namespace(&spec(1)).await.unwrap();
    assert_eq!(ns.block_bytes, BLOCK as u64);
    let ns = ns.namespace;
    let t = tokens(6, 1);

    // Put 4 pages inline over the Unix socket; a lookup of 6 pages finds those 4.
    let rep = uds.put(&ns, &t[..4 * PAGE], blocks(4, 1)).await.unwrap();
    assert_eq!((rep.pages, rep.stored), (4, 4));
    let look = uds.lookup(&ns, &t).await.unwrap();
    assert_eq!((look.matched_pages, look.requested_pages), (4, 6));
    assert_eq!(host_pages(&look), 4);
    // By block keys (salt of the `--token` tenant is its name, "default").
    let k = keys(1, b"default", &t);
    assert_eq!(uds.lookup_keys(&ns, &k).await.unwrap().matched_pages, 4);
    // Extending the prefix sends only the new page (cached ones go empty).
    let mut ext = vec![Bytes::new(); 4];
    ext.push(Bytes::from(block(4, 1)));
    let rep = uds.put(&ns, &t[..5 * PAGE], ext).await.unwrap();
    assert_eq!((rep.existing, rep.stored), (4, 1));

    // Get inline over the Unix socket and over TCP: the same bytes come back.
    let got = uds.get(&ns, &t).await.unwrap();
    assert_eq!(got.len(), 5);
    for (i, b) in got.iter().enumerate() {
        assert_eq!(b.as_ref(), block(i, 1).as_slice(), "unix page {i}");
    }
    let url = format!("http://{}", sc.tcp.as_ref().unwrap());
    let mut tcp = Client::connect_tcp(&url).await.unwrap().with_token(TOKEN);
    let ns_tcp = tcp.open_namespace(&spec(1)).await.unwrap().namespace;
    assert_eq!(ns_tcp, ns, "the same description is the same namespace");
    let got = tcp.get(&ns, &t).await.unwrap();
    assert_eq!(got.len(), 5);
    assert_eq!(got[4].as_ref(), block(4, 1).as_slice());
    // A streamed range: skip 2, at most 2.
    let mut s = tcp.get_stream(&ns, &t, 2, 2).await.unwrap();
    let head = s.message().await.unwrap().unwrap();
    assert_eq!(head.matched_pages, 2);
    let mut pages = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        assert_eq!(m.block.as_ref(), block(2 + m.page as usize, 1).as_slice());
        pages.push(m.page);
    }
    assert_eq!(pages, vec![0, 1]);
    // Put over TCP too, and read it back over the Unix socket.
    let t2 = tokens(3, 2);
    tcp.put(&ns, &t2, blocks(3, 2)).await.unwrap();
    assert_eq!(
        uds.get(&ns, &t2).await.unwrap()[2].as_ref(),
        block(2, 2).as_slice()
    );

    // Prefetch toward the host tier: the ticket finishes, its lease is released.
    let p = uds
        .prefetch(
            &ns,
            &t,
            pb::Tier::Host,
            pb::PrefetchPolicy::WaitComplete,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(p.matched_pages, 5);
    let st = uds
        .prefetch_status(p.ticket, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(st.done);
    assert_eq!((st.ready_pages, st.total_pages, st.lease), (5, 5, p.lease));
    assert_eq!(uds.release(&[p.lease]).await.unwrap(), 1);

    // Shared memory: slots of the pool hold the very bytes; a Put through staging slots
    // reads back inline.
    let mut shm = uds.open_shm(&sc.shm).unwrap();
    let got = uds
        .get_shm(&shm, &ns, &t, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(got.slots.len(), 5);
    for (i, s) in got.slots.iter().enumerate() {
        assert_eq!(
            shm.block(s.offset, s.len).unwrap(),
            block(i, 1).as_slice(),
            "slot {i}"
        );
    }
    let stats = uds.stats().await.unwrap();
    assert_eq!(stats.shm_sessions, 1);
    assert!(stats.client_leases >= 1);
    assert!(stats.tiers[0].pinned_bytes >= 5 * BLOCK as u64);
    assert_eq!(uds.release(&[got.lease]).await.unwrap(), 1);
    let t3 = tokens(4, 3);
    let own: Vec<Vec<u8>> = (0..4).map(|i| block(i, 3)).collect();
    let refs: Vec<&[u8]> = own.iter().map(|b| b.as_slice()).collect();
    let rep = uds.put_shm(&mut shm, &ns, &t3, &refs, PAGE).await.unwrap();
    assert_eq!(rep.stored, 4);
    let back = tcp.get(&ns, &t3).await.unwrap();
    assert_eq!(back.len(), 4);
    assert_eq!(back[3].as_ref(), own[3].as_slice());

    // Nothing is left leased or pinned once everything is released.
    drop(shm);
    wait_until(&mut uds, |s| {
        s.client_leases == 0 && s.leases == 0 && s.shm_sessions == 0
    })
    .await;

    // Metrics are served and count the calls above.
    let m = http_get(sc.metrics.as_ref().unwrap(), "/metrics");
    assert!(
        m.contains("strata_sidecar_requests_total{method=\"Put\",code=\"OK\"}"),
        "{m}"
    );
    assert!(
        m.contains("strata_cache_resident_bytes{tier=\"host\"}"),
        "{m}"
    );
}

/// Polls `Stats` until `ok` holds (10 s at most).
async fn wait_until(c: &mut Client, ok: impl Fn(&pb::StatsResponse) -> bool) -> pb::StatsResponse {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.stats().await.unwrap();
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "stats never settled: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_authenticate_and_tenants_never_see_each_other() {
    let dir = TempDir::new("sidecar-auth");
    let cfg = dir.0.join("sidecar.toml");
    std::fs::write(
        &cfg,
        r#"
        metrics_token = "metrics-token-0123456789"
        [[tenants]]
        name = "alice"
        tokens = ["alice-token-0123456789"]
        shm = true
        [[tenants]]
        name = "bob"
        tokens = ["bob-token-0123456789ab"]
        "#,
    )
    .unwrap();
    let sc = Sidecar::start(
        &dir.0,
        &["--config", cfg.to_str().unwrap(), "--tcp", "127.0.0.1:0"],
    );
    let url = format!("http://{}", sc.tcp.as_ref().unwrap());

    // Missing and wrong tokens, on both listeners.
    for mut c in [
        Client::connect_unix(&sc.socket).await.unwrap(),
        Client::connect_tcp(&url).await.unwrap(),
    ] {
        let e = c.open_namespace(&spec(1)).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::Unauthenticated), "{e}");
        assert!(e.to_string().contains("missing token"), "{e}");
        let mut wrong = c.clone().with_token("alice-token-0123456780");
        let e = wrong.stats().await.unwrap_err();
        assert_eq!(e.code(), Some(Code::Unauthenticated), "{e}");
    }
    // Health is open, so probes need no token.
    let mut a = Client::connect_tcp(&url)
        .await
        .unwrap()
        .with_token("alice-token-0123456789");
    let mut b = Client::connect_unix(&sc.socket)
        .await
        .unwrap()
        .with_token("bob-token-0123456789ab");
    let na = a.open_namespace(&spec(1)).await.unwrap().namespace;
    let nb = b.open_namespace(&spec(1)).await.unwrap().namespace;
    assert_ne!(
        na, nb,
        "the same model opened by two tenants is two namespaces"
    );
    let t = tokens(4, 7);
    a.put(&na, &t, blocks(4, 7)).await.unwrap();
    assert_eq!(a.lookup(&na, &t).await.unwrap().matched_pages, 4);

    // Bob finds and reads nothing of Alice's: not in his namespace, not by her id, not by
    // her block keys.
    assert_eq!(b.lookup(&nb, &t).await.unwrap().matched_pages, 0);
    assert!(b.get(&nb, &t).await.unwrap().is_empty());
    let e = b.lookup(&na, &t).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound), "{e}");
    let e = b.get(&na, &t).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound), "{e}");
    let ka = keys(1, b"alice", &t);
    assert_eq!(a.lookup_keys(&na, &ka).await.unwrap().matched_pages, 4);
    assert_eq!(b.lookup_keys(&nb, &ka).await.unwrap().matched_pages, 0);
    // Nor her leases.
    let p = a
        .prefetch(
            &na,
            &t,
            pb::Tier::Host,
            pb::PrefetchPolicy::BestEffort,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let e = b.release(&[p.lease]).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound), "{e}");
    assert_eq!(a.release(&[p.lease]).await.unwrap(), 1);
    // Bob may not map the shared pool; Alice may.
    let e = b.open_shm(&sc.shm).err().expect("bob must be refused");
    assert!(e.to_string().contains("may not map"), "{e}");
    assert!(a.open_shm(&sc.shm).is_ok());
    // Bob's own data is his.
    b.put(&nb, &t, blocks(4, 8)).await.unwrap();
    assert_eq!(
        b.get(&nb, &t).await.unwrap()[0].as_ref(),
        block(0, 8).as_slice()
    );
    assert_eq!(
        a.get(&na, &t).await.unwrap()[0].as_ref(),
        block(0, 7).as_slice()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_the_right_status_and_the_server_keeps_serving() {
    let dir = TempDir::new("sidecar-bad");
    let sc = Sidecar::start(
        &dir.0,
        &[
            "--tcp",
            "127.0.0.1:0",
            "--token",
            TOKEN,
            "--max-tokens-per-call",
            "256",
            "--max-message",
            "64KiB",
            "--max-inflight",
            "2",
            "--max-lease",
            "10s",
        ],
    );
    let mut c = Client::connect_unix(&sc.socket)
        .await
        .unwrap()
        .with_token(TOKEN);
    let ns = c.open_namespace(&spec(1)).await.unwrap().namespace;
    let t = tokens(2, 1);
    c.put(&ns, &t, blocks(2, 1)).await.unwrap();

    let check = |e: strata_server::client::ClientError, code: Code, says: &str| {
        assert_eq!(e.code(), Some(code), "{e}");
        assert!(e.to_string().contains(says), "{e} should say {says:?}");
    };
    // Wrong block size.
    let e = c
        .put(&ns, &tokens(1, 2), vec![Bytes::from(vec![1u8; 100])])
        .await
        .unwrap_err();
    check(e, Code::InvalidArgument, "block 0 is 100 bytes");
    // A namespace whose blocks do not fit this sidecar.
    let mut big = spec(1);
    big.num_layers = 3;
    let e = c.open_namespace(&big).await.unwrap_err();
    check(e, Code::InvalidArgument, "--block-bytes");
    // A shape whose block size overflows 64 bits.
    let mut absurd = spec(1);
    absurd.num_layers = u32::MAX;
    absurd.num_kv_heads = u32::MAX;
    absurd.head_dim = u32::MAX;
    let e = c.open_namespace(&absurd).await.unwrap_err();
    check(e, Code::InvalidArgument, "at most");
    // Too many tokens.
    let e = c.lookup(&ns, &tokens(17, 1)).await.unwrap_err();
    check(e, Code::InvalidArgument, "max_tokens_per_call");
    // Unknown namespace, malformed namespace id.
    let e = c.lookup(&"ab".repeat(32), &t).await.unwrap_err();
    check(e, Code::NotFound, "unknown namespace");
    let e = c.lookup("nonsense", &t).await.unwrap_err();
    check(e, Code::NotFound, "unknown namespace");
    // Not a whole number of pages; a key of the wrong length.
    let e = c.put(&ns, &t[..PAGE + 3], blocks(1, 1)).await.unwrap_err();
    check(e, Code::InvalidArgument, "whole number");
    let e = c
        .lookup_keys(&ns, &[[0u8; 32]])
        .await
        .map(|r| r.matched_pages)
        .unwrap();
    assert_eq!(e, 0);
    // A message over the size limit.
    let e = c.put(&ns, &tokens(5, 9), blocks(5, 9)).await.unwrap_err();
    check(e, Code::ResourceExhausted, "max_message");
    // A lease over the limit.
    let mut shm = c.open_shm(&sc.shm).unwrap();
    let e = c
        .get_shm(&shm, &ns, &t, Duration::from_secs(60))
        .await
        .unwrap_err();
    check(e, Code::InvalidArgument, "max_lease");
    // A missing block for a page that is not cached.
    let e = c
        .put(&ns, &tokens(1, 3), vec![Bytes::new()])
        .await
        .unwrap_err();
    check(e, Code::InvalidArgument, "sent empty");
    // Staging slots that do not exist.
    let e = c
        .put_shm(&mut shm, &ns, &tokens(1, 4), &[&[0u8; 10]], PAGE)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("bytes"), "{e}");
    // Calls in flight on one connection: two Watch streams hold both slots.
    let mut w1 = c.watch(&ns).await.unwrap();
    let _w2 = c.watch(&ns).await.unwrap();
    let e = c.stats().await.unwrap_err();
    check(e, Code::ResourceExhausted, "max_inflight_per_connection");
    // Another connection is not affected.
    let mut other = Client::connect_unix(&sc.socket)
        .await
        .unwrap()
        .with_token(TOKEN);
    other.stats().await.unwrap();
    // The watcher sees what the other connection stores.
    other.put(&ns, &tokens(1, 5), blocks(1, 5)).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), w1.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.kind, pb::watch_event::Kind::Stored as i32);
    assert_eq!(
        ev.key.as_ref(),
        keys(1, b"default", &tokens(1, 5))[0].as_slice()
    );

    // Random bytes on the gRPC sockets: those connections fail, the server does not.
    for _ in 0..3 {
        let mut s = std::os::unix::net::UnixStream::connect(&sc.socket).unwrap();
        let junk: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
            .collect();
        let _ = s.write_all(&junk);
        let mut s = std::net::TcpStream::connect(sc.tcp.as_ref().unwrap()).unwrap();
        let _ = s.write_all(&junk);
        let mut s = std::os::unix::net::UnixStream::connect(&sc.shm).unwrap();
        let _ = s.write_all(&junk);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Everything stored is still there and served.
    let got = other.get(&ns, &t).await.unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].as_ref(), block(1, 1).as_slice());
    let url = format!("http://{}", sc.tcp.as_ref().unwrap());
    let mut tcp = Client::connect_tcp(&url).await.unwrap().with_token(TOKEN);
    assert_eq!(tcp.lookup(&ns, &t).await.unwrap().matched_pages, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_mid_stream_has_its_leases_and_slots_released() {
    let dir = TempDir::new("sidecar-kill");
    let sc = Sidecar::start(&dir.0, &[]);
    let mut victim = std::process::Command::new(built_binary("strata-sidecar-victim"))
        .arg(&sc.socket)
        .arg(&sc.shm)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(victim.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(
        line.trim(),
        "HOLDING",
        "victim failed; sidecar log:\n{}",
        sc.log.lock().join("\n")
    );
    let mut c = Client::connect_unix(&sc.socket).await.unwrap();
    let held = c.stats().await.unwrap();
    assert_eq!(held.shm_sessions, 1, "{held:?}");
    assert_eq!(held.get_streams, 1, "{held:?}");
    assert!(held.client_leases >= 1, "{held:?}");
    assert!(held.leases >= 2, "{held:?}");
    assert!(held.tiers[0].pinned_bytes >= 8 * BLOCK as u64, "{held:?}");

    victim.kill().unwrap();
    victim.wait().unwrap();
    let after = wait_until(&mut c, |s| {
        s.shm_sessions == 0
            && s.get_streams == 0
            && s.client_leases == 0
            && s.leases == 0
            && s.tiers[0].pinned_bytes == 0
    })
    .await;
    // Its blocks are still cached: releasing a lease loses no data.
    assert!(after.pages >= 64, "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_the_disk_tier_finds_earlier_blocks() {
    let dir = TempDir::new("sidecar-disk");
    let disk = dir.0.join("g3.data");
    let args = [
        "--disk-path",
        disk.to_str().unwrap(),
        "--disk-capacity",
        "16MiB",
    ];
    let t = tokens(8, 4);
    let ns = {
        let sc = Sidecar::start(&dir.0, &args);
        let mut c = Client::connect_unix(&sc.socket).await.unwrap();
        let ns = c.open_namespace(&spec(2)).await.unwrap().namespace;
        c.put(&ns, &t, blocks(8, 4)).await.unwrap();
        let look = c.lookup(&ns, &t).await.unwrap();
        assert_eq!(
            look.tiers.iter().map(|x| x.pages).collect::<Vec<_>>(),
            vec![8, 8]
        );
        drop(c);
        let socket = sc.socket.clone();
        assert!(sc.terminate(), "SIGTERM must end the sidecar cleanly");
        assert!(!socket.exists(), "the socket file is removed on shutdown");
        ns
    };
    let sc = Sidecar::start(&dir.0, &args);
    let mut c = Client::connect_unix(&sc.socket).await.unwrap();
    assert_eq!(c.open_namespace(&spec(2)).await.unwrap().namespace, ns);
    let look = c.lookup(&ns, &t).await.unwrap();
    assert_eq!(look.matched_pages, 8);
    let disk_pages = look
        .tiers
        .iter()
        .find(|x| x.tier == pb::Tier::Disk as i32)
        .unwrap()
        .pages;
    assert_eq!(disk_pages, 8);
    let got = c.get(&ns, &t).await.unwrap();
    assert_eq!(got.len(), 8);
    for (i, b) in got.iter().enumerate() {
        assert_eq!(b.as_ref(), block(i, 4).as_slice(), "page {i} after restart");
    }
    // Through shared memory too: the disk blocks are promoted into the pool first.
    let shm = c.open_shm(&sc.shm).unwrap();
    let got = c
        .get_shm(&shm, &ns, &t, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(got.slots.len(), 8);
    assert_eq!(
        shm.block(got.slots[7].offset, got.slots[7].len).unwrap(),
        block(7, 4).as_slice()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_tcp_round_trips_and_plain_text_is_refused() {
    let dir = TempDir::new("sidecar-tls");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cp, kp) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    std::fs::write(&cp, cert.cert.pem()).unwrap();
    std::fs::write(&kp, cert.signing_key.serialize_pem()).unwrap();
    let sc = Sidecar::start(
        &dir.0,
        &[
            "--tcp",
            "127.0.0.1:0",
            "--token",
            TOKEN,
            "--tls-cert",
            cp.to_str().unwrap(),
            "--tls-key",
            kp.to_str().unwrap(),
        ],
    );
    let port = sc
        .tcp
        .as_ref()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let url = format!("https://localhost:{port}");
    let mut c = Client::connect_tls(&url, cert.cert.pem().as_bytes(), "localhost")
        .await
        .unwrap()
        .with_token(TOKEN);
    let ns = c.open_namespace(&spec(3)).await.unwrap().namespace;
    let t = tokens(2, 3);
    c.put(&ns, &t, blocks(2, 3)).await.unwrap();
    assert_eq!(
        c.get(&ns, &t).await.unwrap()[1].as_ref(),
        block(1, 3).as_slice()
    );
    // Without the token, TLS or not, nothing.
    let mut anon = Client::connect_tls(&url, cert.cert.pem().as_bytes(), "localhost")
        .await
        .unwrap();
    assert_eq!(
        anon.stats().await.unwrap_err().code(),
        Some(Code::Unauthenticated)
    );
    // A plain-text client gets no service from the TLS port.
    let plain = format!("http://127.0.0.1:{port}");
    let failed = match Client::connect_tcp(&plain).await {
        Err(_) => true,
        Ok(c) => c.with_token(TOKEN).stats().await.is_err(),
    };
    assert!(failed, "plain text must not be served on the TLS port");
}
