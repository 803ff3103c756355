//! The attacks of the security review, at a low rate, each against the running sidecar;
//! their outcomes are counted apart from the legitimate clients' errors.
//!
//! - `stalled_upload`: unauthenticated HTTP/2 streams (`Put`) that declare a message just
//!   under `max_message`, send part of it and go quiet.
//! - `unread_get`: an authenticated inline `Get` of a long cached prompt whose reader keeps
//!   a small window and never reads.
//! - `idle_tcp`: TCP connections to the gRPC port that send nothing.
//! - `slow_metrics`: a half-sent HTTP request to the metrics endpoint.
//! - `huge_release`: `Release` of a million unknown lease ids.

use std::time::{Duration, Instant};

use prost::Message;
use prost::bytes::Bytes;
use strata_server::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Shared;

/// The attacks, in the order they are run.
pub const KINDS: [&str; 5] = [
    "stalled_upload",
    "unread_get",
    "idle_tcp",
    "slow_metrics",
    "huge_release",
];

/// How long an attack holds its connection before giving up.
const HOLD: Duration = Duration::from_secs(20);

/// Runs attack `kind` once; returns its outcome in a few words.
pub async fn run(shared: &Shared, kind: &str) -> String {
    let r = match kind {
        "stalled_upload" => stalled_upload(shared).await,
        "unread_get" => unread_get(shared).await,
        "idle_tcp" => idle(shared, false).await,
        "slow_metrics" => idle(shared, true).await,
        "huge_release" => huge_release(shared).await,
        _ => Ok("unknown attack".into()),
    };
    r.unwrap_or_else(|e| format!("attack failed: {}", first_words(&e.to_string())))
}

fn first_words(s: &str) -> String {
    s.chars().take(60).collect()
}

fn grpc_frame(len: u32) -> Vec<u8> {
    let mut f = vec![0u8];
    f.extend_from_slice(&len.to_be_bytes());
    f
}

async fn h2_connect(addr: &str, window: u32) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr)).await??;
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(10),
        h2::client::Builder::new()
            .initial_window_size(window)
            .handshake::<_, Bytes>(tcp),
    )
    .await??;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Two unauthenticated `Put` streams on one connection, each declaring `max_message - 64`
/// bytes and sending up to 8 MiB of them (as far as flow control lets), then silence.
async fn stalled_upload(shared: &Shared) -> anyhow::Result<String> {
    let (addrs, _) = shared.addrs();
    let client = h2_connect(&addrs.tcp, 65_535).await?;
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut c = client.clone().ready().await?;
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{}/strata.v1.Cache/Put", addrs.tcp))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
        let (resp, mut send) = c.send_request(req, false)?;
        send.send_data(Bytes::from(grpc_frame((64 << 20) - 64)), false)?;
        streams.push((resp, send));
    }
    let start = Instant::now();
    let mut sent = 0u64;
    let chunk = Bytes::from(vec![0x11u8; 64 << 10]);
    // Send while the server grants window, for at most a few seconds.
    'outer: for (_, send) in &mut streams {
        let mut mine = 0u64;
        while mine < 8 << 20 && start.elapsed() < Duration::from_secs(5) {
            send.reserve_capacity(chunk.len());
            let cap = tokio::time::timeout(
                Duration::from_millis(500),
                std::future::poll_fn(|cx| send.poll_capacity(cx)),
            )
            .await;
            match cap {
                Ok(Some(Ok(n))) if n > 0 => {
                    if send.send_data(chunk.slice(..n), false).is_err() {
                        continue 'outer;
                    }
                    mine += n as u64;
                    sent += n as u64;
                }
                Ok(Some(Ok(_))) => {}
                // Stream reset or connection gone, or no window for half a second.
                _ => continue 'outer,
            }
        }
    }
    // Then silence: does the server answer, reset, or wait?
    let mut outcomes = Vec::new();
    for (resp, _send) in streams {
        let left = HOLD.saturating_sub(start.elapsed());
        let o = match tokio::time::timeout(left, resp).await {
            Ok(Ok(r)) => {
                let grpc = r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("trailers");
                format!("answered (grpc-status {grpc})")
            }
            Ok(Err(e)) => format!(
                "reset ({})",
                e.reason().map_or("closed".into(), |r| format!("{r:?}"))
            ),
            Err(_) => "held open".into(),
        };
        outcomes.push(o);
    }
    outcomes.sort();
    outcomes.dedup();
    Ok(format!("{}; {} MiB sent", outcomes.join(", "), sent >> 20))
}

/// An inline `Get` of a long prompt (the attacker's own, stored first) read by nobody.
async fn unread_get(shared: &Shared) -> anyhow::Result<String> {
    let (addrs, _) = shared.addrs();
    let tenant = shared.tenants[0].clone();
    let (mut c, ns, _) = super::workload::connect(shared, &tenant, true)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // 64 pages of the attacker's own: far more than one window.
    let mut tokens = Vec::new();
    for p in 0..64u64 {
        let t = super::data::prompt_tokens(shared.seed ^ 0xA77A, p);
        tokens.extend_from_slice(&t[..super::data::PAGE]);
    }
    let blocks = super::data::page_keys(tenant.index, &tokens)
        .iter()
        .map(|k| Bytes::from(super::data::block_bytes(k)))
        .collect();
    c.put(&ns, &tokens, blocks)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let client = h2_connect(&addrs.tcp, 65_535).await?;
    let mut c2 = client.ready().await?;
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/strata.v1.Cache/Get", addrs.tcp))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {}", tenant.token))
        .body(())?;
    let (resp, mut send) = c2.send_request(req, false)?;
    let msg = pb::GetRequest {
        namespace: ns,
        tokens: vec![],
        tokens_le: tokens
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .collect::<Vec<u8>>()
            .into(),
        skip_pages: 0,
        max_pages: 0,
        shm_session: String::new(),
        lease_ms: 0,
    }
    .encode_to_vec();
    let mut body = grpc_frame(msg.len() as u32);
    body.extend_from_slice(&msg);
    send.send_data(Bytes::from(body), true)?;
    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), resp).await;
    let mut body = match r {
        Ok(Ok(r)) => r.into_body(),
        Ok(Err(e)) => return Ok(format!("refused ({e})")),
        Err(_) => return Ok("no answer".into()),
    };
    // Never read; after HOLD, see whether the server ended the stream meanwhile.
    tokio::time::sleep(HOLD.saturating_sub(start.elapsed())).await;
    let outcome = loop {
        match tokio::time::timeout(Duration::from_millis(200), body.data()).await {
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => break format!("reset by server ({e})"),
            Ok(None) => break "ended by server".to_string(),
            Err(_) => break "still open after hold".to_string(),
        }
    };
    Ok(first_words(&outcome))
}

/// A TCP connection to the gRPC port (or a half-sent request to the metrics endpoint)
/// that then says nothing.
async fn idle(shared: &Shared, metrics: bool) -> anyhow::Result<String> {
    let (addrs, _) = shared.addrs();
    let addr = if metrics { &addrs.metrics } else { &addrs.tcp };
    if addr.is_empty() {
        return Ok("no endpoint".into());
    }
    let mut s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr)).await??;
    if metrics {
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nUser-Agent: slow")
            .await?;
    }
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    let outcome = loop {
        let left = HOLD.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) => break format!("closed by server after {}s", start.elapsed().as_secs()),
            Ok(Ok(_)) => continue,
            Ok(Err(_)) => break format!("reset by server after {}s", start.elapsed().as_secs()),
            Err(_) => break "still open after hold".into(),
        }
    };
    Ok(outcome)
}

/// `Release` of a million unknown lease ids with a valid token.
async fn huge_release(shared: &Shared) -> anyhow::Result<String> {
    let tenant = shared.tenants[0].clone();
    let (mut c, _, _) = super::workload::connect(shared, &tenant, false)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let ids: Vec<u64> = (0..1_000_000u64)
        .map(|i| (1 << 62) | i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 2)
        .collect();
    let r = tokio::time::timeout(Duration::from_secs(60), c.release(&ids)).await;
    Ok(match r {
        Ok(Ok(n)) => format!("released {n}"),
        Ok(Err(e)) => {
            let len = match &e {
                strata_server::client::ClientError::Status(s) => s.message().len(),
                _ => 0,
            };
            let size = match len {
                0..=1024 => "short message",
                1025..=65_536 => "message up to 64 KiB",
                _ => "message over 64 KiB",
            };
            format!("{} ({size})", super::workload::error_kind(&e))
        }
        Err(_) => "no answer in 60s".into(),
    })
}
