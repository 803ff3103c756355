#!/usr/bin/env python3
"""Writes the structured seed corpora of fuzz/corpus/ (run from fuzz/: `python3 make_seeds.py`): a tiny Llama model as
GGUF and as a Hugging Face folder (F32, hidden 2, one layer, vocab 4), valid sidecar
configurations and shared-memory hellos. Small on purpose: libFuzzer mutates from these."""
import json, os, struct

A = "aaaaaaaaaaaaaaaaaaaaaaaa"
B = "bbbbbbbbbbbbbbbbbbbbbbbb"


def w(target, name, data):
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def s(x):
    x = x.encode()
    return struct.pack("<Q", len(x)) + x


def f32(n, start=0.0):
    return b"".join(struct.pack("<f", start + 0.01 * i) for i in range(n))


# name (HF), name (GGUF), shape outermost first
TENSORS = [
    ("model.embed_tokens.weight", "token_embd.weight", [4, 2]),
    ("model.norm.weight", "output_norm.weight", [2]),
    ("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight", [2]),
    ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", [2, 2]),
    ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight", [2, 2]),
    ("model.layers.0.self_attn.v_proj.weight", "blk.0.attn_v.weight", [2, 2]),
    ("model.layers.0.self_attn.o_proj.weight", "blk.0.attn_output.weight", [2, 2]),
    ("model.layers.0.post_attention_layernorm.weight", "blk.0.ffn_norm.weight", [2]),
    ("model.layers.0.mlp.gate_proj.weight", "blk.0.ffn_gate.weight", [2, 2]),
    ("model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight", [2, 2]),
    ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight", [2, 2]),
]


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def gguf(with_tokenizer):
    kv = [
        ("general.architecture", 8, s("llama")),
        ("llama.block_count", 4, struct.pack("<I", 1)),
        ("llama.embedding_length", 4, struct.pack("<I", 2)),
        ("llama.feed_forward_length", 4, struct.pack("<I", 2)),
        ("llama.attention.head_count", 4, struct.pack("<I", 1)),
        ("llama.context_length", 4, struct.pack("<I", 64)),
    ]
    if with_tokenizer:
        toks = ["a", "b", "ab", "<s>"]
        kv += [
            ("tokenizer.ggml.model", 8, s("gpt2")),
            ("tokenizer.ggml.pre", 8, s("llama-bpe")),
            ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, len(toks)) + b"".join(s(t) for t in toks)),
            ("tokenizer.ggml.merges", 9, struct.pack("<IQ", 8, 1) + s("a b")),
            ("tokenizer.ggml.token_type", 9, struct.pack("<IQ", 5, 4) + struct.pack("<4i", 1, 1, 1, 3)),
        ]
    b = b"GGUF" + struct.pack("<IQQ", 3, len(TENSORS), len(kv))
    for k, ty, v in kv:
        b += s(k) + struct.pack("<I", ty) + v
    off = 0
    data = b""
    for _, name, shape in TENSORS:
        dims = list(reversed(shape))
        b += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        b += struct.pack("<IQ", 0, off)
        t = f32(numel(shape), off / 100)
        t += b"\0" * (-len(t) % 32)
        data += t
        off += len(t)
    b += b"\0" * (-len(b) % 32)
    return b + data


w("gguf", "tiny_llama.gguf", gguf(True))
w("gguf", "tiny_llama_no_tokenizer.gguf", gguf(False))
w("gguf", "header_only.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 0))

cfg = {
    "model_type": "llama", "hidden_size": 2, "intermediate_size": 2, "num_hidden_layers": 1,
    "num_attention_heads": 1, "num_key_value_heads": 1, "vocab_size": 4,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}
header = {}
data = b""
for name, _, shape in TENSORS:
    t = f32(numel(shape), len(data) / 100)
    header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(t)]}
    data += t
header["__metadata__"] = {"format": "pt"}
h = json.dumps(header, separators=(",", ":")).encode()
st = struct.pack("<Q", len(h)) + h + data
for flags, name in [(0, "tiny_llama"), (1, "tiny_llama_indexed")]:
    c = json.dumps(cfg).encode()
    w("safetensors", name, bytes([flags]) + struct.pack("<H", len(c)) + c + st)
cfg3 = dict(cfg, model_type="qwen3", head_dim=2, rope_scaling={"rope_type": "llama3", "factor": 8.0})
c = json.dumps(cfg3).encode()
w("safetensors", "qwen3_config", bytes([0]) + struct.pack("<H", len(c)) + c + st)

w("shm_handshake", "anonymous", "STRATA-SHM 1 -\n")
w("shm_handshake", "tenant_a", f"STRATA-SHM 1 {A}\n")
w("shm_handshake", "tenant_b", f"STRATA-SHM 1 {B}\n")
w("shm_handshake", "bad_version", "STRATA-SHM 2 -\n")

w("sidecar_config", "minimal.toml", 'host_capacity = "64MiB"\nmetrics = ""\n')
w("sidecar_config", "full.toml", f'''socket = "/tmp/s.sock"
shm = true
tcp = "127.0.0.1:0"
metrics = "127.0.0.1:9464"
page_size = 16
block_bytes = 1024
host_capacity = "1GiB"
disk_path = "/tmp/g3.dat"
disk_capacity = "16 GB"
write_policy = "selective:2"
max_message = "64MiB"
max_tokens_per_call = 4096
max_inflight_per_connection = 8
max_lease = "30s"
shm_staging_slots = 64
shutdown_grace = "1s 500ms"

[[tenants]]
name = "a"
tokens = ["{A}"]
salt = "salt-a"
shm = true
max_namespaces = 4

[[tenants]]
name = "b"
tokens = ["{B}"]
token_files = ["/run/secrets/b"]
''')
w("sidecar_config", "sizes.toml", 'host_capacity = "1.5 GiB"\ndisk_capacity = 1099511627776\nmax_message = "1KB"\nwrite_policy = "write-back"\n')
