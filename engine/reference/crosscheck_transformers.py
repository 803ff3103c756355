#!/usr/bin/env python3
"""Optional cross-check of reference.py against Hugging Face transformers (PyTorch, float64).

Not needed to regenerate fixtures; needs `torch` and `transformers` in addition to
requirements.txt.  Run from the repository root after reference.py:

    python3 engine/reference/crosscheck_transformers.py \
        --model models/SmolLM2-135M-Instruct.Q4_1.gguf --fixtures engine/tests/fixtures

1. Loads each tiny_* folder with AutoModelForCausalLM (dtype float64, so BF16/F16
   weights are widened exactly) and compares its logits with tiny_reference.json.
2. Converts the GGUF SmolLM2 weights (dequantized by reference.py) into a HF
   LlamaForCausalLM, undoing the converter's Q/K row permutation (adjacent-pair ->
   half-split RoPE layout), and compares logits / perplexity on the passage with
   smollm2_reference.json and smollm2_full_logits.f32.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402


def check_tiny(fixtures):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    doc = json.load(open(os.path.join(fixtures, "tiny_reference.json")))
    for name, case in doc.items():
        folder = os.path.join(fixtures, name)
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, attn_implementation="eager").eval()
        tk = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"))
        assert tk.encode(case["text"]) == case["tokens"]
        with torch.no_grad():
            logits = m(torch.tensor([case["tokens"]])).logits[0].numpy()
        diff = np.max(np.abs(logits - np.array(case["logits"])))
        print(f"{name}: {type(m).__name__} max |transformers - fixture| = {diff:.2e}")
        assert diff < 2e-6, diff


def unpermute(w, n_head):
    """Inverse of llama.cpp convert_hf_to_gguf's permute(): adjacent-pair rows -> half-split rows."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def check_smollm(model_path, fixtures):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, _ = ref.load_gguf(model_path)
    c = model.cfg
    hc = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        rms_norm_eps=c.rms_eps, rope_theta=c.rope_base, max_position_embeddings=8192,
        tie_word_embeddings=True, attn_implementation="eager",
    )
    hc.rope_parameters = {"rope_type": "default", "rope_theta": c.rope_base}
    hf = LlamaForCausalLM(hc).to(torch.float64).eval()
    sd = {"model.embed_tokens.weight": model.tok_embd, "model.norm.weight": model.out_norm,
          "lm_head.weight": model.output}
    for i, L in enumerate(model.layers):
        p = f"model.layers.{i}."
        sd.update({
            p + "input_layernorm.weight": L.attn_norm,
            p + "self_attn.q_proj.weight": unpermute(L.wq, c.n_head),
            p + "self_attn.k_proj.weight": unpermute(L.wk, c.n_kv_head),
            p + "self_attn.v_proj.weight": L.wv,
            p + "self_attn.o_proj.weight": L.wo,
            p + "post_attention_layernorm.weight": L.ffn_norm,
            p + "mlp.gate_proj.weight": L.w_gate,
            p + "mlp.up_proj.weight": L.w_up,
            p + "mlp.down_proj.weight": L.w_down,
        })
    missing, unexpected = hf.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
                                             strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)

    doc = json.load(open(os.path.join(fixtures, "smollm2_reference.json")))
    toks = doc["passage"]["tokens"]
    with torch.no_grad():
        logits = hf(torch.tensor([toks])).logits[0].numpy()
    ppl = ref.perplexity(logits, toks)
    print(f"SmolLM2 via transformers: passage ppl {ppl:.6f} (fixture {doc['passage']['perplexity']:.6f})")
    full = np.fromfile(os.path.join(fixtures, doc["full_logits_file"]), "<f4").reshape(-1, c.vocab_size)
    d = np.max(np.abs(logits[doc["full_logits_positions"]] - full))
    print(f"  max |transformers - full_logits fixture (f32)| = {d:.2e}")
    worst = 0.0
    for p, e in enumerate(doc["passage"]["positions"]):
        ids = [i for i, _ in e["top"]]
        assert list(np.argsort(-logits[p], kind="stable")[: len(ids)]) == ids, p
        worst = max(worst, max(abs(logits[p, i] - v) for i, v in e["top"]))
    print(f"  top-10 ids identical at all {len(toks)} positions; max logit diff {worst:.2e}")
    for g in doc["greedy"]:
        seq = list(g["tokens"])
        for want in g["generated"]:
            with torch.no_grad():
                nxt = int(torch.argmax(hf(torch.tensor([seq])).logits[0, -1]))
            assert nxt == want, (g["name"], nxt, want)
            seq.append(nxt)
        print(f"  greedy {g['name']}: identical")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--fixtures", default="engine/tests/fixtures")
    a = ap.parse_args()
    check_tiny(a.fixtures)
    check_smollm(a.model, a.fixtures)


if __name__ == "__main__":
    main()
