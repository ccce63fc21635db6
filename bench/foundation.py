"""Foundation benchmark: update-step throughput vs the machine's matmul peak; sampler speed.

    python bench/foundation.py [--sizes mini,60m] [--out bench/out/foundation.json]
    # one GPU (H100 class), bf16, under 5 minutes:
    python bench/foundation.py --sizes 250m,770m --sampler_sizes 250m,770m --dtype bfloat16

All figures come from one process in one sitting, so the ratios (fraction of peak, cache
speed-up) are the numbers to compare across machines. Prints a table and writes JSON.

FLOPs per trained token: 6 x (non-embedding parameters, LM head included) + the attention
score and value products, 12 x layers x width x context (Kaplan et al. 2020 accounting, with
the causal half not discounted).
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

from alignment_gap import allocator, logprobs, losses, sharding
from alignment_gap.models import LanguageModel, TransformerConfig
from alignment_gap.presets import meshes, models
from alignment_gap.sampling import Sampler, SamplingConfig
from alignment_gap.train.state import init_train_state, make_update_step

# size: (batch, sequence length) for the update step.
TRAIN_SHAPES = {"mini": (32, 128), "peer": (32, 48), "60m": (8, 256), "250m": (4, 256),
                "770m": (8, 512)}
GPU_TRAIN_SHAPES = {"250m": (32, 512), "770m": (16, 512)}  # when an accelerator is present


def cpu_model() -> str:
    """The CPU's model name (every timing names it: these machines differ)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def timed(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up (compile) call."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(n: int = 2048, dtype=jnp.float32) -> float:
    if jax.default_backend() != "cpu":
        n = 8192  # big enough to saturate an accelerator
    a = jnp.ones((n, n), dtype)
    dot = jax.jit(lambda x: x @ x)
    return 2 * n**3 / timed(lambda: dot(a), 10)


def train_flops_per_token(cfg: TransformerConfig, context: int) -> float:
    per_layer = (2 * cfg.width * cfg.num_heads * cfg.head_dim  # q, o
                 + 2 * cfg.width * cfg.num_kv_heads * cfg.head_dim  # k, v
                 + 3 * cfg.width * cfg.mlp_dim)
    matmul_params = cfg.num_layers * per_layer + cfg.width * cfg.vocab_size  # + LM head
    return 6 * matmul_params + 12 * cfg.num_layers * cfg.width * context


DTYPE = "float32"


def _lm(size: str, mesh, rules, **overrides):
    cfg = TransformerConfig.from_config(models.get_config(size), dtype=DTYPE, **overrides)
    return cfg, sharding.create_sharded(LanguageModel, cfg, 0, mesh, rules)


def bench_update(size: str, mesh, rules, peak: float) -> dict:
    shapes = TRAIN_SHAPES if jax.default_backend() == "cpu" else {**TRAIN_SHAPES,
                                                                  **GPU_TRAIN_SHAPES}
    batch, length = shapes[size]
    cfg, lm = _lm(size, mesh, rules, max_len=max(length, 64))
    tx = optax.adamw(1e-4)
    graphdef, state, state_sh = init_train_state(lm, tx, mesh, rules)

    def loss_fn(model, b, extras):
        per_token, mask = logprobs.next_token_logprobs(model, b["tokens"], b["mask"])
        return losses.next_token_loss(per_token, mask), {}

    rng = np.random.default_rng(0)
    data = {"tokens": rng.integers(2, cfg.vocab_size, (batch, length)).astype(np.int32),
            "mask": np.ones((batch, length), bool)}
    data = sharding.global_batch(data, mesh, rules)
    step = make_update_step(graphdef, tx, loss_fn, mesh, rules, state_sh,
                            jax.tree.map(lambda x: x.sharding, data))
    holder = {"state": state}

    def one():
        holder["state"], metrics = step(holder["state"], data)
        return metrics["loss"]

    seconds = timed(one, 3 if size in ("60m", "250m") else 10)
    tokens_per_s = batch * length / seconds
    flops = tokens_per_s * train_flops_per_token(cfg, length)
    return {"what": "update (fwd+bwd+adamw)", "size": size, "batch": batch, "length": length,
            "step_s": seconds, "tokens_per_s": tokens_per_s, "gflops": flops / 1e9,
            "fraction_of_peak": flops / peak}


def bench_sampler(size: str, mesh, rules, batch=32, prompt_len=32, new_tokens=64) -> dict:
    cfg, lm = _lm(size, mesh, rules, max_len=prompt_len + new_tokens)
    rng = np.random.default_rng(0)
    prompt = rng.integers(2, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    prompt_mask = np.ones_like(prompt, bool)
    scfg = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, eos_id=-1)
    state, key = nnx.state(lm), jax.random.key(0)
    result = {"what": "sampler", "size": size, "batch": batch, "prompt": prompt_len,
              "new_tokens": new_tokens}
    for name, use_cache in (("cache", True), ("no_cache", False)):
        sampler = Sampler(lm, mesh, rules, scfg, use_cache=use_cache)
        seconds = timed(lambda s=sampler: s(state, prompt, prompt_mask, key).tokens, 3)
        result[f"{name}_tokens_per_s"] = batch * new_tokens / seconds
    result["cache_speedup"] = result["cache_tokens_per_s"] / result["no_cache_tokens_per_s"]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="mini,60m")
    parser.add_argument("--sampler_sizes", default="mini,peer")
    parser.add_argument("--out", default="bench/out/foundation.json")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    global DTYPE
    DTYPE = args.dtype

    mesh_cfg = meshes.get_config("cpu")
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
    rules = mesh_cfg.rules
    peak = matmul_peak(dtype=jnp.dtype(args.dtype))
    rows = [bench_update(s, mesh, rules, peak) for s in args.sizes.split(",") if s]
    samplers = [bench_sampler(s, mesh, rules) for s in args.sampler_sizes.split(",") if s]

    device = jax.devices()[0]
    print(f"\n{device.platform} ({device.device_kind}), {os.cpu_count()} cores, "
          f"jax {jax.__version__}; {args.dtype} matmul peak measured: {peak / 1e9:.0f} GFLOP/s "
          "(MFU below is against this measured peak)\n")
    print("| update step | batch x len | s/step | tokens/s | GFLOP/s | of peak |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['size']} | {r['batch']} x {r['length']} | {r['step_s']:.3f} | "
              f"{r['tokens_per_s']:,.0f} | {r['gflops']:.1f} | {r['fraction_of_peak']:.0%} |")
    print("\n| sampler | batch, prompt + new | tokens/s, KV cache | tokens/s, recompute | "
          "speed-up |")
    print("| --- | --- | --- | --- | --- |")
    for r in samplers:
        print(f"| {r['size']} | {r['batch']}, {r['prompt']} + {r['new_tokens']} | "
              f"{r['cache_tokens_per_s']:,.0f} | {r['no_cache_tokens_per_s']:,.0f} | "
              f"{r['cache_speedup']:.1f}x |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": platform.node(), "platform": device.platform,
                   "device_kind": device.device_kind, "cpu_count": os.cpu_count(),
                   "jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
                   "matmul_peak_gflops": peak / 1e9, "update": rows, "sampler": samplers},
                  f, indent=2)


if __name__ == "__main__":
    allocator.reexec()  # timings with the malloc our entry points run with
    main()
