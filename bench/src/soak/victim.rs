//! A client process that is killed with SIGKILL while it holds leases: it stores a few
//! prompts, takes a shared-memory Get lease, a Prefetch lease and an inline Get stream it
//! stops reading, prints `HOLDING <lease ids>`, then reads and checks blocks until it is
//! killed (or gives up after two minutes). A wrong byte is reported as `WRONG <bytes>`.

use std::io::Write;
use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use serde::{Deserialize, Serialize};
use strata_server::Client;
use strata_server::pb;

use super::data::{self, PAGE};

/// What the victim is told (one JSON argument).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct VictimArgs {
    /// gRPC Unix socket.
    pub socket: String,
    /// Shared-memory socket.
    pub shm: String,
    /// TCP address, used when `tcp` is set.
    pub tcp_addr: String,
    /// Connect over TCP instead of the Unix socket.
    pub tcp: bool,
    /// Tenant token.
    pub token: String,
    /// Tenant index (the block bytes depend on it).
    pub tenant: u32,
    /// Prompt seed of the run.
    pub seed: u64,
    /// First prompt id the victim uses.
    pub first_prompt: u64,
}

/// Runs the victim (the `soak-client` entry point). `args` is the one JSON argument.
pub fn main(args: &[String]) -> anyhow::Result<()> {
    let [json] = args else {
        anyhow::bail!("usage: soak-client '<json arguments>'");
    };
    let a: VictimArgs = serde_json::from_str(json)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(a))
}

async fn run(a: VictimArgs) -> anyhow::Result<()> {
    let c = if a.tcp {
        Client::connect_tcp(&format!("http://{}", a.tcp_addr)).await?
    } else {
        Client::connect_unix(&a.socket).await?
    };
    let mut c = c.with_token(a.token.clone());
    let ns = c.open_namespace(&data::spec()).await?.namespace;
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| data::prompt_tokens(a.seed, a.first_prompt + i))
        .collect();
    for t in &prompts {
        let blocks = data::page_keys(a.tenant, t)
            .iter()
            .map(|k| Bytes::from(data::block_bytes(k)))
            .collect();
        c.put(&ns, t, blocks).await?;
    }
    let mut leases = Vec::new();
    let shm = c.open_shm(&a.shm)?;
    let got = c
        .get_shm(&shm, &ns, &prompts[0], Duration::from_secs(30))
        .await?;
    leases.push(got.lease);
    let p = c
        .prefetch(
            &ns,
            &prompts[1],
            pb::Tier::Host,
            pb::PrefetchPolicy::WaitComplete,
            Duration::from_secs(30),
        )
        .await?;
    leases.push(p.lease);
    // An inline stream read only as far as its first block, left open.
    let mut held = c.get_stream(&ns, &prompts[2], 0, 0).await?;
    let _ = held.message().await?;
    let _ = held.message().await?;
    let ids: Vec<String> = leases
        .iter()
        .filter(|&&l| l != 0)
        .map(u64::to_string)
        .collect();
    println!("HOLDING {}", ids.join(","));
    std::io::stdout().flush()?;
    let end = Instant::now() + Duration::from_secs(120);
    let mut i = 0usize;
    while Instant::now() < end {
        let t = &prompts[3 + i % 3];
        i += 1;
        let Ok(blocks) = c.get(&ns, t).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let keys = data::page_keys(a.tenant, t);
        let wrong: u64 = blocks
            .iter()
            .zip(&keys)
            .map(|(b, k)| data::wrong_bytes(b, &data::block_bytes(k)))
            .sum();
        if wrong > 0 {
            println!("WRONG {wrong}");
            std::io::stdout().flush()?;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop((shm, held));
    let _ = PAGE;
    Ok(())
}
