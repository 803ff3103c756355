//! The shared-memory data plane's handshake: arbitrary bytes from a client through a Unix
//! socket pair into `shm::serve_session` over a real sidecar state (two tenants with
//! tokens). The server must answer or close, never panic, never hang (the session must end
//! within 5 s of the client closing), and must forget the session once it ends.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use strata_server::state::Shared;
use strata_server::{Sidecar, shm};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn shared() -> &'static Arc<Shared> {
    static S: OnceLock<(Sidecar, Arc<Shared>)> = OnceLock::new();
    &S.get_or_init(|| {
        let dir = strata_fuzz::scratch("/tmp", "shm");
        let cfg = strata_fuzz::sidecar::config(&dir);
        let sc = strata_fuzz::runtime()
            .block_on(Sidecar::bind(cfg))
            .expect("binding the sidecar");
        let sh = sc.shared();
        (sc, sh)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    let shared = shared().clone();
    strata_fuzz::runtime().block_on(async move {
        let (mut client, server) = tokio::net::UnixStream::pair().expect("socket pair");
        let task = tokio::spawn(shm::serve_session(shared.clone(), server));
        // The input, then half-close: a hello without a newline ends at EOF.
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let mut buf = [0u8; 4096];
            loop {
                match client.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        reply.extend_from_slice(&buf[..n]);
                        if reply.contains(&b'\n') {
                            break;
                        }
                    }
                }
            }
        })
        .await;
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("serve_session did not end within 5 s of the client closing")
            .expect("serve_session panicked");
        assert!(
            shared.sessions.is_empty(),
            "a session outlived its connection"
        );
    });
});
