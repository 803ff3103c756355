//! Tiny random-weights models in Hugging Face layout (Llama F32 untied, Qwen2 BF16 with QKV
//! bias, Qwen3 F16 with Q/K norm) load from safetensors and match the reference's logits.

mod common;

use common::fixtures;
use strata_engine::{Engine, KvDtype, KvPool, Logits, Sequence};

#[test]
fn tiny_safetensors_models_match_the_reference() {
    let text = std::fs::read_to_string(fixtures().join("tiny_reference.json")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    for name in ["tiny_llama", "tiny_qwen2", "tiny_qwen3"] {
        let e = Engine::load(&fixtures().join(name)).unwrap_or_else(|err| panic!("{name}: {err}"));
        let tokens = common::ids(&r[name]["tokens"]);
        let want: Vec<Vec<f32>> = r[name]["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect();
        let vocab = e.model.config.vocab;
        let pool = KvPool::new(&e.model.config, KvDtype::F32, 16, 8).unwrap();
        let mut seq = Sequence::new();
        let got = e
            .model
            .forward(&pool, &mut seq, &tokens, Logits::All)
            .unwrap();
        let mut max = 0f32;
        for (p, row) in want.iter().enumerate() {
            for (a, b) in got[p * vocab..(p + 1) * vocab].iter().zip(row) {
                max = max.max((a - b).abs());
            }
        }
        println!(
            "{name} ({}): max |Δlogit| {max:e} over {} positions",
            e.model.config.arch,
            want.len()
        );
        assert!(max < 1e-3, "{name}: max logit difference {max}");
        // Its tokenizer.json loads and round-trips.
        assert_eq!(
            e.decode(&e.encode_prompt("The quick", false).unwrap())
                .unwrap(),
            "The quick"
        );
    }
}

#[test]
fn a_broken_model_folder_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("strata-bad-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures().join("tiny_llama");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    // Truncated weights.
    let w = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    let err = Engine::load(&dir)
        .err()
        .expect("truncated weights must not load")
        .to_string();
    assert!(
        err.contains("outside the file") || err.contains("does not match"),
        "{err}"
    );
    // Unknown architecture.
    std::fs::write(dir.join("config.json"), r#"{"model_type": "gpt_neox"}"#).unwrap();
    let err = Engine::load(&dir).err().unwrap().to_string();
    assert!(err.contains("gpt_neox"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn configurations_the_engine_cannot_honour_are_refused() {
    let src = fixtures().join("tiny_llama");
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "yarn",
            Box::new(|c| {
                c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0})
            }),
            "yarn",
        ),
        (
            "huge",
            Box::new(|c| c["num_hidden_layers"] = serde_json::json!(1u64 << 40)),
            "inconsistent configuration",
        ),
        (
            "heads",
            Box::new(|c| c["num_key_value_heads"] = serde_json::json!(3)),
            "inconsistent configuration",
        ),
    ];
    for (name, edit, want) in cases {
        let dir = std::env::temp_dir().join(format!("strata-cfg-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["model.safetensors", "tokenizer.json"] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap())
                .unwrap();
        edit(&mut cfg);
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        let err = Engine::load(&dir)
            .err()
            .unwrap_or_else(|| panic!("{name}: loaded"))
            .to_string();
        assert!(err.contains(want), "{name}: {err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn the_namespace_follows_weights_and_configuration() {
    let a = Engine::load(&fixtures().join("tiny_llama")).unwrap();
    let again = Engine::load(&fixtures().join("tiny_llama")).unwrap();
    assert_eq!(
        a.model.fingerprint(),
        again.model.fingerprint(),
        "same files, same namespace"
    );
    let b = Engine::load(&fixtures().join("tiny_qwen2")).unwrap();
    assert_ne!(a.model.fingerprint(), b.model.fingerprint());
    // Same weights, another RoPE base: different K bytes, so a different namespace.
    let dir = std::env::temp_dir().join(format!("strata-theta-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures().join("tiny_llama");
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["rope_theta"] = serde_json::json!(500000.0);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let c = Engine::load(&dir).unwrap();
    assert_ne!(a.model.fingerprint(), c.model.fingerprint());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_namespace_follows_the_kv_dtype() {
    let e = Engine::load(&fixtures().join("tiny_llama")).unwrap();
    let f16 = e.model.namespace(KvDtype::F16, 16, b"t").unwrap();
    let f32 = e.model.namespace(KvDtype::F32, 16, b"t").unwrap();
    assert_eq!(f16.dtype(), strata_cache_core::KvDtype::F16);
    assert_eq!(f32.dtype(), strata_cache_core::KvDtype::F32);
    // Every block key differs: the same prefix in f16 and f32 never shares a block.
    let tokens: Vec<u32> = (0..64).collect();
    let (a, b) = (f16.page_keys(&tokens), f32.page_keys(&tokens));
    assert_eq!(a.len(), 4);
    assert!(a.iter().all(|k| !b.contains(k)), "f16 and f32 keys overlap");
    assert_ne!(f16.root_key(), f32.root_key());
    // A page is a block of that namespace: f16 pages are half the bytes.
    for (dtype, ns) in [(KvDtype::F16, &f16), (KvDtype::F32, &f32)] {
        let pool = KvPool::new(&e.model.config, dtype, 16, 1).unwrap();
        assert_eq!(pool.block_bytes(), ns.block_bytes(), "{dtype}");
    }
    assert_eq!(2 * f16.block_bytes(), f32.block_bytes());
}
