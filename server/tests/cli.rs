//! The binary's command line: help, and clear refusals of bad settings before it binds
//! anything. (The sidecar's behaviour over its sockets is tested in the `tests` crate.)

use std::process::Command;

fn sidecar() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata-sidecar"))
}

#[test]
fn help_lists_the_main_settings() {
    let out = sidecar().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--socket",
        "--tcp",
        "--token",
        "--host-capacity",
        "--disk-path",
        "--config",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}:\n{text}");
    }
}

#[test]
fn tcp_without_a_token_is_refused_with_the_reason() {
    let dir = std::env::temp_dir().join(format!("strata-cli-{}", std::process::id()));
    let out = sidecar()
        .args(["--tcp", "127.0.0.1:0", "--metrics", ""])
        .arg("--socket")
        .arg(dir.join("s.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs at least one tenant"), "{err}");
    assert!(
        !dir.join("s.sock").exists(),
        "nothing may be bound on a refused start"
    );
}

#[test]
fn a_config_file_with_a_typo_names_the_field() {
    let p = std::env::temp_dir().join(format!("strata-cli-{}.toml", std::process::id()));
    std::fs::write(&p, "host_capacty = \"1GiB\"\n").unwrap();
    let out = sidecar().arg("--config").arg(&p).output().unwrap();
    let _ = std::fs::remove_file(&p);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("host_capacty"), "{err}");
}

#[test]
fn a_socket_path_naming_a_regular_file_is_refused_and_the_file_kept() {
    let p = std::env::temp_dir().join(format!("strata-cli-file-{}", std::process::id()));
    std::fs::write(&p, "precious").unwrap();
    let out = sidecar()
        .args(["--metrics", ""])
        .arg("--socket")
        .arg(&p)
        .output()
        .unwrap();
    let kept = std::fs::read_to_string(&p).unwrap_or_default();
    let _ = std::fs::remove_file(&p);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a socket"));
    assert_eq!(kept, "precious");
}
