//! The `strata-engine` binary as a user runs it.

mod common;

use std::process::Command;

use common::{fixtures, model_path, reference};

fn engine_cmd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_strata-engine"));
    c.env("STRATA_MODELS_DIR", model_path().parent().unwrap());
    c
}

#[test]
fn generate_streams_the_greedy_continuation_and_reports_speed() {
    let r = reference();
    let case = &r["greedy"][0];
    let out = engine_cmd()
        .args([
            "generate",
            "--prompt",
            case["prompt"].as_str().unwrap(),
            "--max-tokens",
            "24",
            "--temperature",
            "0",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Without --model it used the default model from STRATA_MODELS_DIR.
    assert!(
        stderr.contains("SmolLM2-135M-Instruct.Q4_1.gguf"),
        "{stderr}"
    );
    assert_eq!(
        stdout.trim_end(),
        case["generated_text"].as_str().unwrap().trim_end()
    );
    assert!(
        stderr.contains("prefill") && stderr.contains("decode") && stderr.contains("tokens/s"),
        "{stderr}"
    );
}

#[test]
fn chat_generation_stops_at_the_end_of_the_turn() {
    const ARGS: [&str; 10] = [
        "generate",
        "--chat",
        "--prompt",
        "Say hello.",
        "--max-tokens",
        "200",
        "--temperature",
        "0.7",
        "--seed",
        "3",
    ];
    let out = engine_cmd().args(ARGS).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.trim().is_empty());
    assert!(
        !stdout.contains("<|im_end|>"),
        "special tokens are not printed: {stdout}"
    );
    // Same seed, same text.
    let again = engine_cmd().args(ARGS).output().unwrap();
    assert_eq!(stdout, String::from_utf8_lossy(&again.stdout));
}

#[test]
fn perplexity_prints_the_reference_figure() {
    let out = engine_cmd()
        .args(["perplexity", "--model"])
        .arg(model_path())
        .arg("--file")
        .arg(fixtures().join("passage.txt"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ppl: f64 = stdout.split_whitespace().nth(1).unwrap().parse().unwrap();
    let want = reference()["passage"]["perplexity"].as_f64().unwrap();
    assert!((ppl / want - 1.0).abs() < 0.02, "{stdout}");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("strata-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let garbage = dir.join("garbage.gguf");
    std::fs::write(&garbage, b"GGUF\x03\x00\x00\x00 not really a model").unwrap();
    let truncated = dir.join("truncated.gguf");
    let model = std::fs::read(model_path()).unwrap();
    std::fs::write(&truncated, &model[..model.len() / 3]).unwrap();
    let cases: Vec<(Vec<std::ffi::OsString>, &str)> = vec![
        (
            vec![
                "generate".into(),
                "--model".into(),
                dir.join("missing.gguf").into(),
                "--prompt".into(),
                "x".into(),
            ],
            "missing.gguf",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                garbage.clone().into(),
                "--prompt".into(),
                "x".into(),
            ],
            "bad model file",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                truncated.clone().into(),
                "--prompt".into(),
                "x".into(),
            ],
            "outside the file",
        ),
        (
            vec![
                "generate".into(),
                "--prompt".into(),
                "x".into(),
                "--temperature=-1".into(),
            ],
            "temperature",
        ),
        (
            vec!["generate".into(), "--prompt".into(), "".into()],
            "empty",
        ),
        (
            vec![
                "perplexity".into(),
                "--file".into(),
                dir.join("nope.txt").into(),
            ],
            "nope.txt",
        ),
        (
            vec![
                "generate".into(),
                "--prompt".into(),
                "x".into(),
                "--page-size".into(),
                "7".into(),
            ],
            "page-size",
        ),
        (
            vec![
                "generate".into(),
                "--prompt".into(),
                "x".into(),
                "--page-size".into(),
                "0".into(),
            ],
            "page-size",
        ),
    ];
    for (args, want) in cases {
        let out = engine_cmd().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(want),
            "{args:?}: expected {want:?} in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
