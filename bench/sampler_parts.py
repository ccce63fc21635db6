"""The KV-cache sampler's prefill and decode loop apart, at the study's and the peers' shapes.

    python bench/sampler_parts.py                     # mini and peer shapes, one device
    python bench/sampler_parts.py --shapes peer --rounds 8

A call that draws one token is the prefill plus one draw (before 2026-12-07 it also ran one
decode step, whose logits nothing read); a full call adds the decode loop, so a decode step
costs (full - prefill) / (new tokens - 1). Both programs are timed in rounds
that alternate between them (this machine's speed drifts within minutes), 5 calls a round after
2 warm-up calls; the table gives each one's median round and its range. Random-init policy, EOS
off so every row decodes every step (as `bench/policy_step.py`'s sampler call).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx
from foundation import cpu_model
from policy_step import SHAPES, mean_time, random_models

from alignment_gap import allocator
from alignment_gap.sampling import Sampler, SamplingConfig

CALLS, WARMUP = 5, 2


def shape_row(shape: str, rounds: int) -> str:
    """One table row: the prefill call and the full call of `shape`, timed in alternation."""
    size, _, p, r, prompts = SHAPES[shape]
    mesh, rules, cfg, policy, _, _ = random_models(size, p + r, 1)
    state = nnx.state(policy)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, cfg.vocab_size, (prompts, p)).astype(np.int32)
    mask = np.ones_like(prompt, bool)
    samplers = {n: Sampler(policy, mesh, rules, SamplingConfig(max_new_tokens=n, eos_id=-1),
                           name=f"sample_{n}") for n in (1, r)}
    times = {n: [] for n in samplers}
    for _ in range(rounds):
        for n, sampler in samplers.items():
            times[n].append(mean_time(
                lambda s=sampler: s(state, prompt, mask, jax.random.key(1)).tokens,
                warmup=WARMUP, steps=CALLS))
    prefill, full = (float(np.median(times[n])) for n in (1, r))
    span = {n: f"{np.median(t) * 1e3:.1f} ({min(t) * 1e3:.1f}-{max(t) * 1e3:.1f})"
            for n, t in times.items()}
    return (f"| {shape} | {prompts} x {p} | {r} | {span[1]} | {span[r]} | "
            f"{(full - prefill) / (r - 1) * 1e3:.2f} | {prefill / full:.0%} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="mini,peer")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    print(f"{cpu_model()}, one device, jax {jax.__version__}, {time.strftime('%Y-%m-%d %H:%M')}"
          f"; median of {args.rounds} rounds of {CALLS} calls (range)\n")
    print("| shape | prompts x prompt tokens | new tokens | prefill call, ms | full call, ms "
          "| decode step, ms | prefill share |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape in args.shapes.split(","):
        print(shape_row(shape, args.rounds))


if __name__ == "__main__":
    allocator.reexec()  # timings with the malloc our entry points run with
    main()
