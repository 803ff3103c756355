//! Tokenizers: `tokenizer.json` through the `tokenizers` crate, or one built from a GGUF
//! file's metadata (byte-level BPE vocabularies: GPT-2 style, SmolLM, Llama 3, Qwen2).

use std::path::Path;

use serde_json::json;
use tokenizers::Tokenizer;

use crate::EngineError;
use crate::gguf::{GgufFile, Value};

/// Loads a `tokenizer.json`.
pub fn from_file(path: &Path) -> Result<Tokenizer, EngineError> {
    Tokenizer::from_file(path).map_err(|e| EngineError::Format(format!("{}: {e}", path.display())))
}

/// The pre-tokenizer split pattern of a GGUF `tokenizer.ggml.pre` value.
fn pre_split(pre: &str) -> Result<serde_json::Value, EngineError> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        // GPT-2's own regex, after splitting every digit on its own.
        "smollm" => {
            json!({"type": "Sequence", "pretokenizers": [split(r"\p{N}"), byte_level(true)]})
        }
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3), byte_level(false)]})
        }
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2), byte_level(false)]}),
        "gpt-2" | "gpt2" | "default" => byte_level(true),
        other => {
            return Err(EngineError::Unsupported(format!(
                "GGUF pre-tokenizer {other:?} (built in: smollm, llama-bpe, qwen2, gpt-2); put the model's tokenizer.json beside it"
            )));
        }
    })
}

/// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer, EngineError> {
    let s = |k: &str| g.get(k).and_then(Value::as_str);
    let model = s("tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        return Err(EngineError::Unsupported(format!(
            "GGUF tokenizer model {model:?} (built in: gpt2 byte-level BPE); put the model's tokenizer.json beside the .gguf"
        )));
    }
    let arr = |k: &str| {
        g.get(k)
            .and_then(Value::as_array)
            .ok_or_else(|| EngineError::Format(format!("GGUF: no {k}")))
    };
    let tokens = arr("tokenizer.ggml.tokens")?;
    let merges = arr("tokenizer.ggml.merges")?;
    let types = g.get("tokenizer.ggml.token_type").and_then(Value::as_array);
    let pre = s("tokenizer.ggml.pre").unwrap_or("default");
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        let t = t
            .as_str()
            .ok_or_else(|| EngineError::Format("GGUF: a token is not a string".into()))?;
        vocab.insert(t.to_owned(), json!(id));
        // 3 = control, 4 = user-defined: matched whole, never split by BPE.
        let ty = types
            .and_then(|ts| ts.get(id))
            .and_then(Value::as_u64)
            .unwrap_or(1);
        if ty == 3 || ty == 4 {
            added.push(
                json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": ty == 3}),
            );
        }
    }
    let merges: Vec<&str> = merges.iter().filter_map(Value::as_str).collect();
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_split(pre)?,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": pre.starts_with("llama"), "vocab": vocab, "merges": merges},
    });
    spec.to_string()
        .parse::<Tokenizer>()
        .map_err(|e| EngineError::Format(format!("GGUF tokenizer: {e}")))
}

/// Encodes `text` (special tokens written in the text are matched).
pub fn encode(t: &Tokenizer, text: &str) -> Result<Vec<u32>, EngineError> {
    t.encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| EngineError::BadRequest(format!("tokenizer: {e}")))
}

/// Decodes ids to text (special tokens skipped).
pub fn decode(t: &Tokenizer, ids: &[u32]) -> Result<String, EngineError> {
    t.decode(ids, true)
        .map_err(|e| EngineError::BadRequest(format!("tokenizer: {e}")))
}
