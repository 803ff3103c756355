//! Test helper: a sidecar client that takes leases (a shared-memory `Get` and an inline
//! `Get` stream it stops reading), says `HOLDING`, and waits to be killed. The sidecar must
//! release everything it held.
//!
//! Usage: `strata-sidecar-victim <socket> <shm-socket>`; it stores and reads its own blocks.

use std::time::Duration;

use strata_server::Client;
use strata_tests::sidecar::{PAGE, block, spec, tokens};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 3,
        "usage: strata-sidecar-victim <socket> <shm-socket>"
    );
    let mut c = Client::connect_unix(&args[1]).await?;
    let ns = c.open_namespace(&spec(9)).await?.namespace;
    let t = tokens(64, 99);
    let blocks: Vec<_> = (0..64).map(|i| block(i, 9).into()).collect();
    c.put(&ns, &t, blocks).await?;
    let shm = c.open_shm(&args[2])?;
    let got = c
        .get_shm(&shm, &ns, &t[..8 * PAGE], Duration::from_secs(30))
        .await?;
    anyhow::ensure!(
        got.slots.len() == 8,
        "expected 8 slots, got {}",
        got.slots.len()
    );
    // An inline stream read only as far as its first block.
    let mut s = c.get_stream(&ns, &t, 0, 0).await?;
    let _header = s.message().await?;
    let _first = s.message().await?;
    println!("HOLDING");
    tokio::time::sleep(Duration::from_secs(600)).await;
    drop((shm, s));
    Ok(())
}
