"""Roofline on this machine: each part of a policy step against the measured matmul peak.

    python bench/roofline.py [--sizes mini,60m,250m] [--scaling_size 60m]

Matmul peak first (float32 `x @ x`), then at each size, with the same prompt and response
lengths: the policy update step (IPO on pairs; policy forward + backward + AdamW and the frozen
reference's forward), the KV-cache sampler, and preference scoring (both orders) - tokens/s,
achieved GFLOP/s and the fraction of peak. Then how the update step's time grows with sequence
length and with batch at one size. One process, one sitting: compare the ratios.

FLOPs, per token (Kaplan et al. 2020, the causal half not discounted; N = the blocks' matmul
parameters, L layers, W width, T context): a forward 2N + 4 L W T, training 3x that; plus
2 W V (x3 when trained) at each position whose next-token logits are computed - the response
positions in an update, the last prompt position and each decoded token in the sampler, none in
the preference model (a scalar head). T for a decoded token is its average context. The last
block runs its query, attention output and MLP only at the positions whose output is read
(`read_at`: those logit positions, or the preference model's two scored positions per pair);
elsewhere it computes keys and values alone, and the count follows.
Tokens are those a pass reads, a pair's prompt once: the update reads `[prompt | chosen |
rejected]` (P + 2R per pair), scoring `[prompt | y1 y2 | y2 y1]` (P + 4R); T for each is the
length of its own order's sequence (P + R, P + 2R).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from foundation import matmul_peak, timed

from alignment_gap import allocator, sharding
from alignment_gap.batches import PreferenceBatch
from alignment_gap.models import LanguageModel, PreferenceModel, TransformerConfig
from alignment_gap.models.heads import both_order_margin
from alignment_gap.presets import meshes, models
from alignment_gap.sampling import Sampler, SamplingConfig
from alignment_gap.train.policy import make_policy_loss
from alignment_gap.train.state import init_train_state, make_update_step

PROMPT, RESPONSE = 64, 32
PAIRS = {"mini": 32, "60m": 8, "250m": 4, "770m": 2}  # pairs per update step on this CPU
SAMPLE_PROMPTS = {"mini": 64, "60m": 16, "250m": 8, "770m": 4}


def layer_flops(cfg: TransformerConfig, context: float, passes: int, read: float = 1.0) -> float:
    """Per token through the blocks: passes x 2 x matmul params + attention (passes: 1 forward,
    3 forward + backward), `read` of the tokens through the whole last block and the rest
    through its key and value projections only; the vocabulary projection is counted apart,
    where it is computed."""
    kv = 2 * cfg.width * cfg.num_kv_heads * cfg.head_dim
    full = (2 * cfg.width * cfg.num_heads * cfg.head_dim + kv + 3 * cfg.width * cfg.mlp_dim
            + 2 * cfg.width * context)  # + attention: q.k and p.v, 2 W T multiply-adds
    last = read * full + (1 - read) * kv
    return passes * 2 * ((cfg.num_layers - 1) * full + last)


def head_flops(cfg: TransformerConfig, passes: int) -> float:
    """Per position whose next-token logits are computed."""
    return passes * 2 * cfg.width * cfg.vocab_size


def _cfg(size, max_len):
    return TransformerConfig.from_config(models.get_config(size), max_len=max_len)


def _random_pairs(cfg, pairs, prompt, response, mesh, rules) -> PreferenceBatch:
    rng = np.random.default_rng(0)
    tok = lambda n: rng.integers(2, cfg.vocab_size, (pairs, n)).astype(np.int32)
    ones = lambda n: np.ones((pairs, n), bool)
    return sharding.global_batch(PreferenceBatch(tok(prompt), ones(prompt), tok(response),
                                                 ones(response), tok(response), ones(response)),
                                 mesh, rules)


def bench_update(size, pairs, prompt, response, mesh, rules, peak) -> dict:
    cfg = _cfg(size, prompt + response)
    make = lambda: sharding.create_sharded(LanguageModel, cfg, 0, mesh, rules)
    policy, reference = make(), make()
    ref_graphdef, ref_params = nnx.split(reference)
    with sharding.use(mesh, rules):
        ref_sh = sharding.state_shardings(ref_params, mesh)
    tx = optax.adamw(1e-5)
    graphdef, state, state_sh = init_train_state(policy, tx, mesh, rules)
    batch = _random_pairs(cfg, pairs, prompt, response, mesh, rules)
    step = make_update_step(graphdef, tx, make_policy_loss("ipo", 0.1, -1, ref_graphdef), mesh,
                            rules, state_sh, jax.tree.map(lambda x: x.sharding, batch),
                            {"reference": ref_sh})
    holder = {"state": state}

    def one():
        holder["state"], metrics = step(holder["state"], batch, {"reference": ref_params})
        return metrics["loss"]

    seconds = timed(one, 3 if size != "mini" else 10)
    length = prompt + response
    tokens = pairs * (prompt + 2 * response)  # the prompt once, then chosen and rejected
    # Policy forward + backward, reference forward; logits only at the response positions.
    read = 2 * response / (prompt + 2 * response)  # the positions whose logits are read
    flops = (tokens * (layer_flops(cfg, length, 3, read) + layer_flops(cfg, length, 1, read))
             + 2 * pairs * response * (head_flops(cfg, 3) + head_flops(cfg, 1)))
    return _row("update (policy fwd+bwd+AdamW, reference fwd)", size, f"{pairs} pairs x "
                f"{length}", seconds, tokens, flops, peak)


def bench_sampler(size, prompts, prompt, response, mesh, rules, peak) -> dict:
    cfg = _cfg(size, prompt + response)
    lm = sharding.create_sharded(LanguageModel, cfg, 0, mesh, rules)
    rng = np.random.default_rng(0)
    x = rng.integers(2, cfg.vocab_size, (prompts, prompt)).astype(np.int32)
    sampler = Sampler(lm, mesh, rules, SamplingConfig(max_new_tokens=response, eos_id=-1))
    state, key = nnx.state(lm), jax.random.key(0)
    seconds = timed(lambda: sampler(state, x, np.ones_like(x, bool), key).tokens, 3)
    flops = prompts * (prompt * layer_flops(cfg, prompt / 2, 1, 1 / prompt)  # prefill
                       + head_flops(cfg, 1)
                       + response * (layer_flops(cfg, prompt + response / 2, 1)
                                     + head_flops(cfg, 1)))
    return _row("sampler (prefill + KV-cache decode)", size, f"{prompts} x {prompt} + "
                f"{response} new", seconds, prompts * response, flops, peak)


def bench_scoring(size, pairs, prompt, response, mesh, rules, peak) -> dict:
    cfg = _cfg(size, prompt + 2 * response)
    pm = sharding.create_sharded(PreferenceModel, cfg, 0, mesh, rules)
    graphdef, state = nnx.split(pm)
    b = _random_pairs(cfg, pairs, prompt, response, mesh, rules)
    score = jax.jit(lambda s, b: both_order_margin(nnx.merge(graphdef, s), b.prompt,
                                                   b.prompt_mask, b.chosen, b.chosen_mask,
                                                   b.rejected, b.rejected_mask))
    with sharding.use(mesh, rules):
        seconds = timed(lambda: score(state, b), 3 if size != "mini" else 10)
    length = prompt + 2 * response
    tokens = pairs * (prompt + 4 * response)  # the prompt once, then each order's responses
    read = 2 / (prompt + 4 * response)  # each order's scored position
    return _row("preference scoring (both orders)", size, f"{pairs} pairs x {length}", seconds,
                tokens, tokens * layer_flops(cfg, length, 1, read), peak)  # no vocabulary head


def _row(what, size, shape, seconds, tokens, flops, peak) -> dict:
    return {"what": what, "size": size, "shape": shape, "s": seconds,
            "tokens_per_s": tokens / seconds, "gflops": flops / seconds / 1e9,
            "fraction_of_peak": flops / seconds / peak}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="mini,60m,250m")
    parser.add_argument("--scaling_size", default="60m")
    parser.add_argument("--lengths", default="64,128,256,512")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--out", default="bench/out/roofline.json")
    args = parser.parse_args()
    mesh_cfg = meshes.get_config("cpu")
    mesh, rules = sharding.make_mesh(mesh_cfg, jax.devices()[:1]), mesh_cfg.rules
    peak = matmul_peak(dtype=jnp.float32)
    rows = []
    for size in args.sizes.split(","):
        rows.append(bench_update(size, PAIRS[size], PROMPT, RESPONSE, mesh, rules, peak))
        rows.append(bench_sampler(size, SAMPLE_PROMPTS[size], PROMPT, RESPONSE, mesh, rules,
                                  peak))
        rows.append(bench_scoring(size, PAIRS[size], PROMPT, RESPONSE, mesh, rules, peak))
        print(rows[-3:], flush=True)
    s = args.scaling_size
    scaling = []
    for length in map(int, args.lengths.split(",")):  # prompt:response 2:1, fixed pairs
        scaling.append(bench_update(s, 2, 2 * length // 3, length - 2 * length // 3, mesh,
                                    rules, peak))
    for pairs in map(int, args.batches.split(",")):
        scaling.append(bench_update(s, pairs, PROMPT, RESPONSE, mesh, rules, peak))

    device = jax.devices()[0]
    print(f"\n{device.platform} ({device.device_kind}), {os.cpu_count()} cores, jax "
          f"{jax.__version__}; float32 matmul peak measured first: {peak / 1e9:.0f} GFLOP/s\n")
    header = "| {} | size | shape | s/call | tokens/s | GFLOP/s | of peak |"
    print(header.format("part"))
    print("| --- " * 7 + "|")
    for r in rows:
        print(f"| {r['what']} | {r['size']} | {r['shape']} | {r['s']:.4f} | "
              f"{r['tokens_per_s']:,.0f} | {r['gflops']:.1f} | {r['fraction_of_peak']:.1%} |")
    print(f"\nUpdate step at {s}: time vs sequence length (2 pairs) and vs batch "
          f"({PROMPT} + {RESPONSE} tokens)\n")
    print("| shape | s/step | tokens/s | GFLOP/s | of peak | s per pair-token |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in scaling:
        pairs, length = r["shape"].split(" pairs x ")
        per = r["s"] / (int(pairs) * int(length))
        print(f"| {r['shape']} | {r['s']:.3f} | {r['tokens_per_s']:,.0f} | {r['gflops']:.1f} | "
              f"{r['fraction_of_peak']:.1%} | {per * 1e3:.2f} ms |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": platform.node(), "platform": device.platform,
                   "cpu_count": os.cpu_count(), "jax": jax.__version__,
                   "date": time.strftime("%Y-%m-%d %H:%M"), "matmul_peak_gflops": peak / 1e9,
                   "parts": rows, "scaling": scaling}, f, indent=2)


if __name__ == "__main__":
    allocator.reexec()  # timings with the malloc our entry points run with
    main()
