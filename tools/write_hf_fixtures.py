"""Write tiny random Hugging Face checkpoints and PyTorch reference outputs.

Developer tool, NOT run in CI and not a dependency of `alignment_gap`: it needs
PyTorch + transformers, which the package never imports. Run it with the peer
venv made by `shared/peerbench/setup.sh` (torch 2.13 CPU, transformers 5.24.0):

    /tmp/peerbench/trl-venv/bin/python tools/write_hf_fixtures.py

For each family (gemma3, qwen2, qwen3, llama3) it builds a tiny model with
transformers' own classes, fills every parameter with seeded random values
(norm weights too, so that a `w` vs `1 + w` mistake shows), and writes under
`tests/fixtures/hf/<family>/`:

* `config.json`, `generation_config.json`, `model.safetensors` (float32) via
  `save_pretrained(..., safe_serialization=True)`; tied models store no lm_head;
* `reference.npz`: `input_ids` int32 [2, 12]; `logits` float32 [2, 12, 128]
  (full forward, attention mask all ones); `greedy` int32 [2, 8], the new tokens
  of `generate(do_sample=False, max_new_tokens=8)` with the KV cache and with
  EOS stopping disabled (cross-checked against an uncached argmax loop).

Attention is "eager", so masks are applied exactly. Sliding-window rule of
transformers 5.24 (`masking_utils.sliding_window_overlay`: `kv_idx > q_idx -
sliding_window`, ANDed with causal `kv_idx <= q_idx`): query i sees key j iff
0 <= i - j < sliding_window, i.e. the token itself plus the previous
sliding_window - 1 tokens (window 4 -> keys i-3 .. i). The sliding KV cache
keeps the last sliding_window - 1 keys, which is the same rule.
"""

import copy
import json
import pathlib

import numpy as np
import torch
import transformers as tf

ROOT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hf"
VOCAB, BATCH, SEQ, NEW = 128, 2, 12, 8
WEIGHT_STD = 0.2  # see randomise(): 0.02 leaves attention almost uniform
COMMON = dict(vocab_size=VOCAB, hidden_size=32, max_position_embeddings=64, rms_norm_eps=1e-6)


def configs():
    """Family name -> (model class, config). Every field that matters is explicit."""
    gemma3 = tf.Gemma3TextConfig(
        **COMMON,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        intermediate_size=24,  # 64 would make the file ~240 KB; 24 keeps it non-square and < 150 KB
        sliding_window=4,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    )
    qwen2 = tf.Qwen2Config(
        **COMMON,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    qwen3 = tf.Qwen3Config(
        **COMMON,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=64,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    llama3 = tf.LlamaConfig(
        **COMMON,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
    return {
        "gemma3": (tf.Gemma3ForCausalLM, gemma3),
        "qwen2": (tf.Qwen2ForCausalLM, qwen2),
        "qwen3": (tf.Qwen3ForCausalLM, qwen3),
        "llama3": (tf.LlamaForCausalLM, llama3),
    }


def randomise(model, seed, gemma_norms):
    """Normal(0, WEIGHT_STD) for matrices and biases; random norm weights.

    Gemma norms scale by (1 + w), so w ~ U(-0.5, 0.5); the others scale by w, so
    w ~ U(0.5, 1.5) gives the same effective range. Tied weights are filled once.
    """
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5) if gemma_norms else p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, WEIGHT_STD)


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def greedy(model, ids):
    """generate() with the KV cache, checked against an uncached argmax loop."""
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)  # generate() fills None fields from it,
    model.generation_config.eos_token_id = None  # so EOS stopping is disabled here
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=NEW,
            pad_token_id=0,
        )
    model.generation_config = saved
    new = out[:, SEQ:]
    seq, margin = ids, float("inf")
    for _ in range(NEW):
        last = logits_of(model, seq)[:, -1]
        top2 = last.topk(2, dim=-1).values
        margin = min(margin, (top2[:, 0] - top2[:, 1]).min().item())
        seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    assert new.shape == (BATCH, NEW) and torch.equal(new, seq[:, SEQ:]), (new, seq[:, SEQ:])
    return new, margin


def sensitivity(family, model, ids, ref):
    """Max |logit change| from the mistakes these fixtures must catch."""
    out = {}
    if family == "gemma3":
        for window in (5, 3, SEQ + NEW):
            model.config.sliding_window = window
            out[f"sliding_window={window}"] = (logits_of(model, ids) - ref).abs().max().item()
        model.config.sliding_window = 4
    if family == "llama3":
        plain = copy.deepcopy(model.config)
        plain.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
        other = tf.LlamaForCausalLM(plain).eval()
        other.load_state_dict(model.state_dict())
        out["default_rope"] = (logits_of(other, ids) - ref).abs().max().item()
        out["inv_freq_llama3"] = model.model.rotary_emb.inv_freq.tolist()
        out["inv_freq_default"] = other.model.rotary_emb.inv_freq.tolist()
    return out


def main():
    for seed, (family, (cls, config)) in enumerate(configs().items()):
        config._attn_implementation = "eager"
        model = cls(config).eval()
        randomise(model, 1000 + seed, gemma_norms=family == "gemma3")
        rng = np.random.default_rng(2000 + seed)
        ids = torch.from_numpy(rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int64))
        logits = logits_of(model, ids)
        new, margin = greedy(model, ids)
        out = ROOT / family
        model.save_pretrained(out, safe_serialization=True)
        np.savez(
            out / "reference.npz",
            input_ids=ids.numpy().astype(np.int32),
            logits=logits.numpy().astype(np.float32),
            greedy=new.numpy().astype(np.int32),
        )
        print(
            f"== {family}: logits std {logits.std().item():.3f}, greedy {new.tolist()}, "
            f"smallest top-1/top-2 gap {margin:.4f}"
        )
        print("   sensitivity", json.dumps(sensitivity(family, model, ids, logits)))
        for f in sorted(out.iterdir()):
            print(f"   {f.relative_to(ROOT.parents[2])}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
