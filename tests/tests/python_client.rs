//! A non-Rust client: Python `grpcio` from PyPI, with no generated code and no `.proto`,
//! lists the services through server reflection and calls OpenNamespace, Put, Lookup,
//! Get and Stats on the real sidecar binary (`tests/python/reflection_client.py`).
//! `scripts/python-env.sh` installs the pinned Python packages into `.cache/pyenv`.

use std::path::PathBuf;
use std::process::Command;

use strata_tests::sidecar::{Sidecar, TempDir};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn python_grpcio_lists_services_by_reflection_and_calls_lookup_and_get() {
    let setup = Command::new("bash")
        .arg(repo().join("scripts/python-env.sh"))
        .output()
        .expect("running scripts/python-env.sh");
    assert!(
        setup.status.success(),
        "scripts/python-env.sh failed (the Python client needs it):\n{}{}",
        String::from_utf8_lossy(&setup.stdout),
        String::from_utf8_lossy(&setup.stderr)
    );
    let dir = TempDir::new("sidecar-py");
    let token = "python-token-0123456789";
    let sc = Sidecar::start(&dir.0, &["--token", token]);
    let out = Command::new(repo().join(".cache/pyenv/bin/python"))
        .arg(repo().join("tests/python/reflection_client.py"))
        .arg("--socket")
        .arg(&sc.socket)
        .args(["--token", token])
        .output()
        .expect("running the Python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "Python client failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    let services: Vec<&str> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    for s in ["strata.v1.Cache", "grpc.health.v1.Health"] {
        assert!(services.contains(&s), "{services:?} lacks {s}");
    }
    assert!(
        services.iter().any(|s| s.contains("ServerReflection")),
        "{services:?}"
    );
    assert_eq!(v["health"], "SERVING");
    assert_eq!(v["lookup"]["matched_pages"], 2);
    assert_eq!(v["lookup"]["requested_pages"], 3);
    assert_eq!(v["get_blocks"], 2);
    assert_eq!(v["get_ok"], true);
    // Without the token the same script is refused.
    let out = Command::new(repo().join(".cache/pyenv/bin/python"))
        .arg(repo().join("tests/python/reflection_client.py"))
        .arg("--socket")
        .arg(&sc.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("UNAUTHENTICATED"));
}
