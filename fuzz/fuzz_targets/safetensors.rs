//! The engine's safetensors reader and `config.json` parsing on arbitrary bytes: the input
//! is split into a `config.json`, a `model.safetensors` and (optionally) an index; loading
//! the tensors and the whole Hugging Face folder must return an error or a model, never
//! panic, and every tensor returned must lie inside its file.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use strata_engine::{Model, safetensors};

fuzz_target!(|data: &[u8]| {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| strata_fuzz::scratch("/dev/shm", "safetensors"));
    // Layout: [flags u8][config len u16 LE][config][safetensors...]; flag bit 0 adds an
    // index naming the tensors file (and, with bit 1, a file outside the folder).
    if data.len() < 3 {
        return;
    }
    let flags = data[0];
    let clen = usize::from(u16::from_le_bytes([data[1], data[2]])).min(data.len() - 3);
    let (config, st) = data[3..].split_at(clen);
    std::fs::write(dir.join("config.json"), config).expect("writing config.json");
    std::fs::write(dir.join("model.safetensors"), st).expect("writing model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if flags & 1 == 1 {
        let target = if flags & 2 == 2 {
            "../model.safetensors"
        } else {
            "model.safetensors"
        };
        let text = format!(r#"{{"weight_map":{{"a":"{target}","b":"model.safetensors"}}}}"#);
        std::fs::write(&index, text).expect("writing the index");
    } else {
        let _ = std::fs::remove_file(&index);
    }
    if let Ok(ts) = safetensors::load_file(&dir.join("model.safetensors")) {
        for t in ts.values() {
            assert!(t.offset + t.len <= t.map.len(), "tensor outside the map");
            assert_eq!(t.bytes().len(), t.len);
        }
    }
    let _ = Model::load_hf(dir);
});
