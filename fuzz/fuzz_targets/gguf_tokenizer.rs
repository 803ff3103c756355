//! The tokenizer the engine builds from GGUF `tokenizer.ggml.*` metadata: arbitrary
//! vocabularies, merges, token types and pre-tokenizer names go through a real GGUF file;
//! building the tokenizer, encoding text and decoding ids (arbitrary ones and the encoded
//! ones) must return errors or values, never panic.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use strata_engine::gguf::GgufFile;
use strata_engine::tokenizer;
use strata_fuzz::{GgufValue, gguf_bytes};

#[derive(Arbitrary, Debug)]
struct Input {
    /// 0: "gpt2", 1: missing, else arbitrary.
    model: u8,
    model_other: String,
    /// Index into the built-in names, or an arbitrary one.
    pre: u8,
    pre_other: String,
    tokens: Vec<String>,
    /// Make the vocabulary cover every byte-level symbol (a usable tokenizer).
    byte_vocab: bool,
    merges: Vec<String>,
    /// Merges made of pairs of vocabulary entries.
    merge_pairs: Vec<(u8, u8)>,
    token_types: Option<Vec<i32>>,
    text: String,
    ids: Vec<u32>,
}

const PRES: [&str; 9] = [
    "smollm",
    "llama-bpe",
    "llama3",
    "llama-v3",
    "smaug-bpe",
    "qwen2",
    "gpt-2",
    "gpt2",
    "default",
];

/// GPT-2's byte-to-unicode table: the symbols of a byte-level BPE vocabulary.
fn byte_symbols() -> Vec<String> {
    let mut out = Vec::with_capacity(256);
    let mut n = 0u32;
    for b in 0u32..256 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        out.push(char::from_u32(c).unwrap_or('?').to_string());
    }
    out
}

fuzz_target!(|inp: Input| {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    let path = DIR
        .get_or_init(|| strata_fuzz::scratch("/dev/shm", "gguf-tokenizer"))
        .join("t.gguf");
    let mut tokens = if inp.byte_vocab {
        byte_symbols()
    } else {
        Vec::new()
    };
    tokens.extend(inp.tokens.into_iter().take(512));
    let mut merges: Vec<String> = inp.merges.into_iter().take(256).collect();
    if !tokens.is_empty() {
        for (a, b) in inp.merge_pairs.iter().take(256) {
            let a = &tokens[usize::from(*a) % tokens.len()];
            let b = &tokens[usize::from(*b) % tokens.len()];
            merges.push(format!("{a} {b}"));
        }
    }
    let mut kv = vec![
        (
            "tokenizer.ggml.tokens".to_owned(),
            GgufValue::StrArray(tokens),
        ),
        (
            "tokenizer.ggml.merges".to_owned(),
            GgufValue::StrArray(merges),
        ),
    ];
    match inp.model {
        0 => kv.push(("tokenizer.ggml.model".into(), GgufValue::Str("gpt2".into()))),
        1 => {}
        _ => kv.push((
            "tokenizer.ggml.model".into(),
            GgufValue::Str(inp.model_other),
        )),
    }
    let pre = match PRES.get(usize::from(inp.pre)) {
        Some(p) => Some(p.to_string()),
        None if inp.pre == 255 => None,
        None => Some(inp.pre_other),
    };
    if let Some(p) = pre {
        kv.push(("tokenizer.ggml.pre".into(), GgufValue::Str(p)));
    }
    if let Some(t) = inp.token_types {
        kv.push(("tokenizer.ggml.token_type".into(), GgufValue::I32Array(t)));
    }
    std::fs::write(&path, gguf_bytes(&kv)).expect("writing the input");
    let g = GgufFile::open(&path).expect("a GGUF file this target wrote must parse");
    let Ok(tok) = tokenizer::from_gguf(&g) else {
        return;
    };
    let text: String = inp.text.chars().take(1024).collect();
    if let Ok(ids) = tokenizer::encode(&tok, &text) {
        let _ = tokenizer::decode(&tok, &ids);
    }
    let ids: Vec<u32> = inp.ids.into_iter().take(1024).collect();
    let _ = tokenizer::decode(&tok, &ids);
});
