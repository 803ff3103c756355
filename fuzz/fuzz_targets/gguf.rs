//! The engine's GGUF reader on arbitrary bytes: `GgufFile::open` must return an error or a
//! file whose every tensor lies inside the map, and loading a model (and its tokenizer)
//! from it must return an error or a model, never panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use strata_engine::gguf::GgufFile;
use strata_engine::{Model, tokenizer};

fuzz_target!(|data: &[u8]| {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    let path = DIR
        .get_or_init(|| strata_fuzz::scratch("/dev/shm", "gguf"))
        .join("m.gguf");
    std::fs::write(&path, data).expect("writing the input");
    let Ok(g) = GgufFile::open(&path) else {
        return;
    };
    for t in g.tensors.values() {
        assert!(t.offset + t.len <= g.map().len(), "tensor outside the map");
        assert_eq!(g.bytes(t).len(), t.len);
    }
    if let Ok(tok) = tokenizer::from_gguf(&g) {
        if let Ok(ids) = tokenizer::encode(&tok, "Hello, world! 123") {
            let _ = tokenizer::decode(&tok, &ids);
        }
    }
    let _ = Model::load_gguf(&g, &path);
});
