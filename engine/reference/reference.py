#!/usr/bin/env python3
"""Independent numpy reference implementation of a Llama-family forward pass.

It exists to produce golden test fixtures for the Rust inference engine; it is
written for readability and numerical exactness, not speed:

* weights are dequantized exactly (Q4_1 / Q8_0 blocks decoded in float64,
  BF16 / F16 safetensors widened without rounding),
* every activation is computed in float64,
* the whole sequence is recomputed for every generated token (no KV cache).

Supported model sources
  * GGUF (arch ``llama``) -- e.g. SmolLM2-135M-Instruct.Q4_1.gguf.  The GGUF
    converter permutes the rows of Q and K so RoPE rotates ADJACENT pairs
    (x[2i], x[2i+1])  (ggml "normal" rope mode).
  * Hugging Face folders (config.json + model.safetensors) for llama, qwen2
    and qwen3.  HF checkpoints use the HALF-SPLIT layout (x[i], x[i + d/2])
    ("rotate_half", ggml "neox" mode).

Regenerate all fixtures (run from the repository root):

    python3 engine/reference/reference.py \
        --model models/SmolLM2-135M-Instruct.Q4_1.gguf --out engine/tests/fixtures
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import struct
import sys
import time
from dataclasses import dataclass, field

import numpy as np

# --------------------------------------------------------------------------
# Model description
# --------------------------------------------------------------------------

ROPE_ADJACENT = "adjacent"  # pairs (x[2i], x[2i+1])      -- GGUF llama files
ROPE_HALF = "half"  # pairs (x[i], x[i + d/2])         -- HF checkpoints


@dataclass
class Config:
    n_layer: int
    d_model: int
    d_ff: int
    n_head: int
    n_kv_head: int
    head_dim: int
    vocab_size: int
    rope_base: float
    rms_eps: float
    rope_layout: str  # ROPE_ADJACENT or ROPE_HALF
    qkv_bias: bool = False  # Qwen2: q/k/v projections have biases
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE


@dataclass
class Layer:
    attn_norm: np.ndarray  # [d_model]
    wq: np.ndarray  # [n_head*head_dim, d_model]   (HF layout: [out, in])
    wk: np.ndarray  # [n_kv_head*head_dim, d_model]
    wv: np.ndarray  # [n_kv_head*head_dim, d_model]
    wo: np.ndarray  # [d_model, n_head*head_dim]
    ffn_norm: np.ndarray  # [d_model]
    w_gate: np.ndarray  # [d_ff, d_model]
    w_up: np.ndarray  # [d_ff, d_model]
    w_down: np.ndarray  # [d_model, d_ff]
    bq: np.ndarray | None = None
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    q_norm: np.ndarray | None = None  # [head_dim]
    k_norm: np.ndarray | None = None  # [head_dim]


@dataclass
class Model:
    cfg: Config
    tok_embd: np.ndarray  # [vocab, d_model]
    layers: list[Layer]
    out_norm: np.ndarray  # [d_model]
    output: np.ndarray  # [vocab, d_model]  (== tok_embd when tied)
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------
# Forward pass (float64)
# --------------------------------------------------------------------------


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * w, over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, positions: np.ndarray, base: float, layout: str) -> np.ndarray:
    """Rotary position embedding.

    x: [T, H, D].  Pair i (0 <= i < D/2) is rotated by angle p * theta_i with
    theta_i = base^(-2i/D).  `layout` selects which two elements form pair i:
      adjacent: (x[2i], x[2i+1])       half: (x[i], x[i + D/2])
    """
    d = x.shape[-1]
    theta = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # [D/2]
    ang = positions.astype(np.float64)[:, None] * theta[None, :]  # [T, D/2]
    cos = np.cos(ang)[:, None, :]
    sin = np.sin(ang)[:, None, :]
    out = np.empty_like(x)
    if layout == ROPE_ADJACENT:
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
    elif layout == ROPE_HALF:
        h = d // 2
        x0, x1 = x[..., :h], x[..., h:]
        out[..., :h] = x0 * cos - x1 * sin
        out[..., h:] = x0 * sin + x1 * cos
    else:
        raise ValueError(f"unknown rope layout {layout!r}")
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def attention(cfg: Config, L: Layer, x: np.ndarray, positions: np.ndarray, rope_layout: str) -> np.ndarray:
    """Causal grouped-query self-attention over the whole sequence x [T, d_model]."""
    T = x.shape[0]
    D = cfg.head_dim
    q = x @ L.wq.T
    k = x @ L.wk.T
    v = x @ L.wv.T
    if cfg.qkv_bias:
        q, k, v = q + L.bq, k + L.bk, v + L.bv
    q = q.reshape(T, cfg.n_head, D)
    k = k.reshape(T, cfg.n_kv_head, D)
    v = v.reshape(T, cfg.n_kv_head, D)
    if cfg.qk_norm:  # Qwen3: RMSNorm over head_dim, per head, before RoPE
        q = rms_norm(q, L.q_norm, cfg.rms_eps)
        k = rms_norm(k, L.k_norm, cfg.rms_eps)
    q = rope(q, positions, cfg.rope_base, rope_layout)
    k = rope(k, positions, cfg.rope_base, rope_layout)

    group = cfg.n_head // cfg.n_kv_head  # q heads per kv head
    causal = np.tril(np.ones((T, T), dtype=bool))
    out = np.empty((T, cfg.n_head, D))
    for h in range(cfg.n_head):
        kv = h // group
        scores = (q[:, h, :] @ k[:, kv, :].T) / math.sqrt(D)  # [T, T]
        scores = np.where(causal, scores, -np.inf)
        out[:, h, :] = softmax(scores, axis=-1) @ v[:, kv, :]
    return out.reshape(T, cfg.n_head * D) @ L.wo.T


def mlp(L: Layer, x: np.ndarray) -> np.ndarray:
    return (silu(x @ L.w_gate.T) * (x @ L.w_up.T)) @ L.w_down.T


def forward(model: Model, tokens, rope_layout: str | None = None, last_only: bool = False) -> np.ndarray:
    """Logits [T, vocab] (or [1, vocab] if last_only) for the token sequence, positions 0..T-1."""
    cfg = model.cfg
    layout = rope_layout or cfg.rope_layout
    tokens = np.asarray(tokens, dtype=np.int64)
    positions = np.arange(len(tokens))
    x = model.tok_embd[tokens]  # [T, d_model]
    for L in model.layers:
        x = x + attention(cfg, L, rms_norm(x, L.attn_norm, cfg.rms_eps), positions, layout)
        x = x + mlp(L, rms_norm(x, L.ffn_norm, cfg.rms_eps))
    if last_only:
        x = x[-1:]
    return rms_norm(x, model.out_norm, cfg.rms_eps) @ model.output.T


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def perplexity(logits: np.ndarray, tokens) -> float:
    """exp(mean NLL of tokens[1:] given all previous tokens), natural log."""
    lp = log_softmax(logits[:-1])
    nll = -lp[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]
    return float(np.exp(np.mean(nll)))


def greedy(model: Model, prompt, n: int):
    """n greedy steps (argmax, ties -> lowest id, never stops at EOS).

    Returns (generated ids, top1-top2 logit margin at each step)."""
    toks = list(prompt)
    gen, margins = [], []
    for _ in range(n):
        logits = forward(model, toks, last_only=True)[0]
        order = np.argsort(-logits, kind="stable")
        gen.append(int(order[0]))
        margins.append(float(logits[order[0]] - logits[order[1]]))
        toks.append(int(order[0]))
    return gen, margins


# --------------------------------------------------------------------------
# GGUF loading (exact dequantization in float64)
# --------------------------------------------------------------------------

QK = 32  # elements per block for Q4_1 and Q8_0


def dequant_q4_1(raw: np.ndarray) -> np.ndarray:
    """Q4_1 block = f16 d, f16 m, 16 bytes of nibbles; x[j] = d*lo(q[j]) + m, x[j+16] = d*hi(q[j]) + m."""
    b = raw.reshape(-1, 20)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float64)
    m = b[:, 2:4].copy().view(np.float16).astype(np.float64)
    qs = b[:, 4:20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float64)  # [nb, 32]
    return d * q + m


def dequant_q8_0(raw: np.ndarray) -> np.ndarray:
    """Q8_0 block = f16 d, 32 x int8; x[j] = d*q[j]."""
    b = raw.reshape(-1, 34)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float64)
    q = b[:, 2:34].copy().view(np.int8).astype(np.float64)
    return d * q


def gguf_tensor(t) -> np.ndarray:
    """Dequantize a GGUF tensor to float64 with numpy shape = reversed(ne) (i.e. HF [out, in])."""
    from gguf import GGMLQuantizationType as Q

    shape = tuple(int(s) for s in reversed(t.shape))
    raw = np.asarray(t.data)
    if t.tensor_type == Q.F32:
        return raw.astype(np.float64).reshape(shape)
    if t.tensor_type == Q.F16:
        return raw.view(np.float16).astype(np.float64).reshape(shape)
    raw = raw.view(np.uint8).reshape(-1)
    if t.tensor_type == Q.Q4_1:
        return dequant_q4_1(raw).reshape(shape)
    if t.tensor_type == Q.Q8_0:
        return dequant_q8_0(raw).reshape(shape)
    raise NotImplementedError(f"tensor {t.name}: type {t.tensor_type.name}")


def gguf_field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def load_gguf(path: str) -> tuple[Model, object]:
    from gguf import GGUFReader

    r = GGUFReader(path)
    arch = gguf_field(r, "general.architecture")
    if arch != "llama":
        raise NotImplementedError(f"arch {arch!r}")
    g = lambda k: gguf_field(r, f"{arch}.{k}")  # noqa: E731
    n_head = int(g("attention.head_count"))
    d_model = int(g("embedding_length"))
    head_dim = d_model // n_head
    assert int(g("rope.dimension_count") or head_dim) == head_dim, "partial rotary not supported"
    tensors = {t.name: t for t in r.tensors}
    W = lambda name: gguf_tensor(tensors[name])  # noqa: E731
    tok_embd = W("token_embd.weight")
    cfg = Config(
        n_layer=int(g("block_count")),
        d_model=d_model,
        d_ff=int(g("feed_forward_length")),
        n_head=n_head,
        n_kv_head=int(g("attention.head_count_kv") or n_head),
        head_dim=head_dim,
        vocab_size=tok_embd.shape[0],
        rope_base=float(g("rope.freq_base") or 10000.0),
        # stored as f32 in the file; use the f32 value exactly as written
        rms_eps=float(g("attention.layer_norm_rms_epsilon")),
        rope_layout=ROPE_ADJACENT,  # GGUF llama Q/K rows are pre-permuted
    )
    layers = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        layers.append(
            Layer(
                attn_norm=W(p + "attn_norm.weight"),
                wq=W(p + "attn_q.weight"),
                wk=W(p + "attn_k.weight"),
                wv=W(p + "attn_v.weight"),
                wo=W(p + "attn_output.weight"),
                ffn_norm=W(p + "ffn_norm.weight"),
                w_gate=W(p + "ffn_gate.weight"),
                w_up=W(p + "ffn_up.weight"),
                w_down=W(p + "ffn_down.weight"),
            )
        )
    output = W("output.weight") if "output.weight" in tensors else tok_embd  # tied
    return Model(cfg, tok_embd, layers, W("output_norm.weight"), output), r


# --------------------------------------------------------------------------
# Tokenizer from GGUF metadata, chat template
# --------------------------------------------------------------------------


def tokenizer_from_gguf(reader):
    """Byte-level BPE equivalent to llama.cpp's `gpt2` tokenizer with pre=`smollm`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    assert gguf_field(reader, "tokenizer.ggml.model") == "gpt2"
    pre = gguf_field(reader, "tokenizer.ggml.pre")
    if pre != "smollm":
        raise NotImplementedError(f"pre-tokenizer {pre!r}")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    types = gguf_field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate token strings"
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    # smollm: every numeric char is its own piece, then the GPT-2 byte-level regex split.
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    # control tokens (token_type == 3) are matched verbatim in the input text
    specials = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3]
    tk.add_special_tokens(specials)
    for a in specials:
        assert tk.token_to_id(a.content) == vocab[a.content]
    return tk


def render_chat(template: str, user_text: str, bos: str = "", eos: str = "") -> str:
    """Render a chat template the way HF transformers does (sandboxed jinja2, trim/lstrip blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=[{"role": "user", "content": user_text}],
        add_generation_prompt=True,
        bos_token=bos,
        eos_token=eos,
    )


# --------------------------------------------------------------------------
# safetensors (hand-written reader/writer; supports F32, F16, BF16)
# --------------------------------------------------------------------------


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 -> bfloat16 (round to nearest, ties to even); returns uint16 bit patterns."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return (u >> 16).astype(np.uint16)


def bf16_bits_to_f64(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def write_safetensors(path: str, tensors: dict, dtype: str) -> None:
    """tensors: name -> float32 array; stored as `dtype` (F32 | F16 | BF16), little-endian."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        a = tensors[name]
        if dtype == "F32":
            data = a.astype("<f4").tobytes()
        elif dtype == "F16":
            data = a.astype("<f2").tobytes()
        elif dtype == "BF16":
            data = f32_to_bf16_bits(a).astype("<u2").tobytes()
        else:
            raise ValueError(dtype)
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # pad header so the data section is 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def read_safetensors(path: str) -> dict:
    """name -> float64 array (exact widening of the stored values)."""
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8 : 8 + n])
    data = buf[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = data[a:b]
        dt = info["dtype"]
        if dt == "F32":
            arr = np.frombuffer(raw, "<f4").astype(np.float64)
        elif dt == "F16":
            arr = np.frombuffer(raw, "<f2").astype(np.float64)
        elif dt == "BF16":
            arr = bf16_bits_to_f64(np.frombuffer(raw, "<u2"))
        else:
            raise NotImplementedError(dt)
        out[name] = arr.reshape(info["shape"])
    return out


def load_hf(folder: str) -> Model:
    """Load a Hugging Face llama / qwen2 / qwen3 checkpoint folder (single model.safetensors)."""
    with open(os.path.join(folder, "config.json")) as f:
        hc = json.load(f)
    mt = hc["model_type"]
    if mt not in ("llama", "qwen2", "qwen3"):
        raise NotImplementedError(mt)
    n_head = hc["num_attention_heads"]
    cfg = Config(
        n_layer=hc["num_hidden_layers"],
        d_model=hc["hidden_size"],
        d_ff=hc["intermediate_size"],
        n_head=n_head,
        n_kv_head=hc.get("num_key_value_heads", n_head),
        head_dim=hc.get("head_dim") or hc["hidden_size"] // n_head,
        vocab_size=hc["vocab_size"],
        rope_base=float(hc.get("rope_theta", 10000.0)),
        rms_eps=float(hc["rms_norm_eps"]),
        rope_layout=ROPE_HALF,  # HF convention (rotate_half)
        qkv_bias=(mt == "qwen2") or bool(hc.get("attention_bias", False)),
        qk_norm=(mt == "qwen3"),
    )
    T = read_safetensors(os.path.join(folder, "model.safetensors"))
    layers = []
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        layers.append(
            Layer(
                attn_norm=T[p + "input_layernorm.weight"],
                wq=T[a + "q_proj.weight"],
                wk=T[a + "k_proj.weight"],
                wv=T[a + "v_proj.weight"],
                wo=T[a + "o_proj.weight"],
                ffn_norm=T[p + "post_attention_layernorm.weight"],
                w_gate=T[p + "mlp.gate_proj.weight"],
                w_up=T[p + "mlp.up_proj.weight"],
                w_down=T[p + "mlp.down_proj.weight"],
                bq=T.get(a + "q_proj.bias"),
                bk=T.get(a + "k_proj.bias"),
                bv=T.get(a + "v_proj.bias"),
                q_norm=T.get(a + "q_norm.weight"),
                k_norm=T.get(a + "k_norm.weight"),
            )
        )
    emb = T["model.embed_tokens.weight"]
    output = emb if hc.get("tie_word_embeddings", False) else T["lm_head.weight"]
    return Model(cfg, emb, layers, T["model.norm.weight"], output)


# --------------------------------------------------------------------------
# Tiny random-weight HF models
# --------------------------------------------------------------------------

# name -> (architecture, model_type, storage dtype, tied, explicit head_dim, numpy seed)
TINY_MODELS = {
    "tiny_llama": ("LlamaForCausalLM", "llama", "F32", False, None, 1001),
    "tiny_qwen2": ("Qwen2ForCausalLM", "qwen2", "BF16", True, None, 1002),
    "tiny_qwen3": ("Qwen3ForCausalLM", "qwen3", "F16", True, 32, 1003),
}
TINY = dict(hidden=64, inter=160, layers=2, heads=4, kv_heads=2, vocab=256, rope_theta=10000.0, eps=1e-6)
# 20 tokens; with the byte-level tiny tokenizer these are simply the UTF-8 bytes.
TINY_TEXT = "The quick brown fox "
TORCH_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable unicode char mapping (used by ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_tokenizer():
    """Byte-level BPE with exactly the 256 byte tokens (id = byte value) and no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    b2u = bytes_to_unicode()
    tk = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    return tk


def make_tiny_model(folder: str, name: str) -> None:
    arch, mt, dtype, tied, head_dim, seed = TINY_MODELS[name]
    c = TINY
    hd = head_dim or c["hidden"] // c["heads"]
    rng = np.random.default_rng(seed)
    nrm = lambda *shape: rng.normal(0.0, 0.1, size=shape).astype(np.float32)  # noqa: E731
    one = lambda n: (1.0 + rng.normal(0.0, 0.1, size=n)).astype(np.float32)  # noqa: E731
    H, I, E = c["hidden"], c["inter"], c["vocab"]
    t = {"model.embed_tokens.weight": nrm(E, H)}
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        t[p + "input_layernorm.weight"] = one(H)
        t[a + "q_proj.weight"] = nrm(c["heads"] * hd, H)
        t[a + "k_proj.weight"] = nrm(c["kv_heads"] * hd, H)
        t[a + "v_proj.weight"] = nrm(c["kv_heads"] * hd, H)
        t[a + "o_proj.weight"] = nrm(H, c["heads"] * hd)
        if mt == "qwen2":
            t[a + "q_proj.bias"] = nrm(c["heads"] * hd)
            t[a + "k_proj.bias"] = nrm(c["kv_heads"] * hd)
            t[a + "v_proj.bias"] = nrm(c["kv_heads"] * hd)
        if mt == "qwen3":
            t[a + "q_norm.weight"] = one(hd)
            t[a + "k_norm.weight"] = one(hd)
        t[p + "post_attention_layernorm.weight"] = one(H)
        t[p + "mlp.gate_proj.weight"] = nrm(I, H)
        t[p + "mlp.up_proj.weight"] = nrm(I, H)
        t[p + "mlp.down_proj.weight"] = nrm(H, I)
    t["model.norm.weight"] = one(H)
    if not tied:
        t["lm_head.weight"] = nrm(E, H)

    config = {
        "architectures": [arch],
        "model_type": mt,
        "hidden_size": H,
        "intermediate_size": I,
        "num_hidden_layers": c["layers"],
        "num_attention_heads": c["heads"],
        "num_key_value_heads": c["kv_heads"],
        "hidden_act": "silu",
        "rms_norm_eps": c["eps"],
        "rope_theta": c["rope_theta"],
        "vocab_size": E,
        "tie_word_embeddings": tied,
        "max_position_embeddings": 512,
        "torch_dtype": TORCH_DTYPE[dtype],
        "attention_bias": mt == "qwen2",
        "bos_token_id": None,
        "eos_token_id": None,
    }
    if head_dim is not None:
        config["head_dim"] = head_dim
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    write_safetensors(os.path.join(folder, "model.safetensors"), t, dtype)
    tiny_tokenizer().save(os.path.join(folder, "tokenizer.json"))


# --------------------------------------------------------------------------
# Fixture writing
# --------------------------------------------------------------------------

MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
N_GREEDY = 24
TOP_K = 10
GREEDY_CASES = [
    ("capital_of_france", "The capital of France is", False),
    ("photosynthesis", "Photosynthesis is the process by which plants", False),
    ("chat_boiling_point", "What is the boiling point of water?", True),
]


def r5(x) -> float:
    return round(float(x), 5)


def dump_json(obj, indent: int = 0) -> str:
    """JSON with dicts indented but lists of numbers (or lists of lists of numbers) on one line."""

    def flat(v):
        return not isinstance(v, (dict, list)) or (isinstance(v, list) and all(flat(e) for e in v))

    pad = " " * (indent + 2)
    if isinstance(obj, dict):
        items = [f"{pad}{json.dumps(k)}: {dump_json(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(obj, list) and not flat(obj):
        return "[\n" + ",\n".join(pad + dump_json(v, indent + 2) for v in obj) + "\n" + " " * indent + "]"
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def log(*a):
    print(*a, flush=True)


def check_dequant_against_gguf(reader, model: Model) -> None:
    """Cross-check the hand-written dequantizers with gguf.quants.dequantize."""
    from gguf.quants import dequantize

    tensors = {t.name: t for t in reader.tensors}
    for name, mine in [("token_embd.weight", model.tok_embd), ("blk.0.attn_q.weight", model.layers[0].wq),
                       ("blk.29.ffn_down.weight", model.layers[29].w_down)]:
        t = tensors[name]
        ref = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64).reshape(mine.shape)
        log(f"  dequant check {name} ({t.tensor_type.name}): max |mine - gguf.quants| = {np.max(np.abs(mine - ref)):.3e}")


def write_gguf_fixtures(model_path: str, out: str) -> None:
    sha = sha256_file(model_path)
    if sha != MODEL_SHA256:
        sys.exit(f"model sha256 mismatch: {sha} != {MODEL_SHA256}")
    t0 = time.time()
    model, reader = load_gguf(model_path)
    log(f"loaded {model_path} in {time.time() - t0:.1f}s: {model.cfg}")
    check_dequant_against_gguf(reader, model)
    tk = tokenizer_from_gguf(reader)

    # --- tokenizer sanity
    im = tk.encode("<|im_start|>", add_special_tokens=False).ids
    log(f"  '<|im_start|>' -> {im}")
    assert im == [1], im
    with open(os.path.join(out, "passage.txt"), encoding="utf-8") as f:
        passage = f.read()
    ptoks = tk.encode(passage, add_special_tokens=False).ids
    assert tk.decode(ptoks, skip_special_tokens=False) == passage, "tokenizer does not round-trip the passage"
    log(f"  passage: {len(passage)} chars -> {len(ptoks)} tokens, round-trip OK")

    # --- passage logits / perplexity
    t0 = time.time()
    logits = forward(model, ptoks)
    ppl = perplexity(logits, ptoks)
    log(f"  passage perplexity (adjacent-pair rope, correct for GGUF): {ppl:.4f}   [{time.time() - t0:.1f}s]")
    wrong = perplexity(forward(model, ptoks, rope_layout=ROPE_HALF), ptoks)
    log(f"  passage perplexity (half-split rope, WRONG for GGUF):      {wrong:.4f}")
    assert ppl < wrong

    positions = []
    for p in range(len(ptoks)):
        top = np.argsort(-logits[p], kind="stable")[:TOP_K]
        positions.append({"top": [[int(i), r5(logits[p, i])] for i in top]})
    full_pos = [0, len(ptoks) // 2, len(ptoks) - 1]
    logits[full_pos].astype("<f4").tofile(os.path.join(out, "smollm2_full_logits.f32"))

    # --- greedy generations
    template = gguf_field(reader, "tokenizer.chat_template")
    greedy_out = []
    for name, prompt, chat in GREEDY_CASES:
        text = render_chat(template, prompt) if chat else prompt
        toks = tk.encode(text, add_special_tokens=False).ids
        gen, margins = greedy(model, toks, N_GREEDY)
        dec = tk.decode(gen, skip_special_tokens=False)
        log(f"  greedy[{name}] prompt={text!r}\n    -> {dec!r}\n    min margin {min(margins):.4f}")
        greedy_out.append({
            "name": name,
            "prompt": prompt,
            "chat": chat,
            "rendered_prompt": text,
            "tokens": toks,
            "generated": gen,
            "generated_text": dec,
            "margins": [r5(m) for m in margins],
        })

    doc = {
        "model_sha256": MODEL_SHA256,
        "model_file": os.path.basename(model_path),
        "generator": "engine/reference/reference.py (numpy float64, exact dequantization)",
        "passage": {
            "file": "passage.txt",
            "n_tokens": len(ptoks),
            "tokens": ptoks,
            "perplexity": ppl,
            "perplexity_half_split_rope": wrong,
            "positions": positions,
        },
        "full_logits_positions": full_pos,
        "full_logits_file": "smollm2_full_logits.f32",
        "full_logits_layout": f"float32 little-endian, {len(full_pos)} rows x {model.cfg.vocab_size}, row i = positions[i]",
        "greedy": greedy_out,
    }
    with open(os.path.join(out, "smollm2_reference.json"), "w") as f:
        f.write(dump_json(doc) + "\n")


def write_tiny_fixtures(out: str) -> None:
    tk = tiny_tokenizer()
    toks = tk.encode(TINY_TEXT).ids
    assert toks == list(TINY_TEXT.encode()) and len(toks) == 20, toks
    assert tk.decode(toks) == TINY_TEXT
    doc = {}
    for name, (_, mt, dtype, *_rest) in TINY_MODELS.items():
        folder = os.path.join(out, name)
        make_tiny_model(folder, name)
        model = load_hf(folder)  # reference logits come from the weights AS STORED
        logits = forward(model, toks)
        log(f"  {name} ({mt}, {dtype}): logits std {logits.std():.3f}, argmax {np.argmax(logits, -1).tolist()}")
        doc[name] = {
            "text": TINY_TEXT,
            "tokens": toks,
            "logits": [[round(float(v), 6) for v in row] for row in logits],
        }
    with open(os.path.join(out, "tiny_reference.json"), "w") as f:
        f.write(dump_json(doc) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", default="engine/tests/fixtures")
    ap.add_argument("--skip-gguf", action="store_true", help="only write the tiny HF models")
    ap.add_argument("--skip-tiny", action="store_true", help="only write the SmolLM2 fixtures")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not args.skip_tiny:
        log("tiny models:")
        write_tiny_fixtures(args.out)
    if not args.skip_gguf:
        log("SmolLM2 (GGUF):")
        write_gguf_fixtures(args.model, args.out)


if __name__ == "__main__":
    main()
