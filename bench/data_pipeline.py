"""Input pipeline: records/s of the grain pipeline, and whether the update step ever waits on it.

    python bench/data_pipeline.py [--data_dir /tmp/ag_bench_data]

1. Records/s of the tokenising preference pipeline alone at the mini study's shape (32 pairs,
   prompt 64 + responses 24), for 1, 2 and 4 reader threads.
2. The offline policy update step fed by that pipeline: time blocked in `next()` per step
   against the step itself. With prefetching, input should be ready before the step asks.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
import optax
from flax import nnx

from alignment_gap import allocator, sharding
from alignment_gap.batches import PreferenceBatch
from alignment_gap.data import builders, pipelines, tokenizer
from alignment_gap.data import world as world_lib
from alignment_gap.models import LanguageModel, TransformerConfig
from alignment_gap.presets import meshes, models
from alignment_gap.train.policy import make_policy_loss
from alignment_gap.train.state import init_train_state, make_update_step

SHAPE = pipelines.BatchShape(global_batch_size=32, prompt_len=64, response_len=24)


def records_per_second(source, tok, threads: int, batches: int = 100) -> float:
    it = iter(pipelines.preference_pipeline(source, tok, SHAPE, seed=0, num_threads=threads))
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * SHAPE.global_batch_size / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="/tmp/ag_bench_data")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="bench/out/data_pipeline.json")
    args = parser.parse_args()

    world = world_lib.WorldConfig(seed=0)
    source = builders.prepare(builders.synthetic_builder("comparisons", args.data_dir, world,
                                                         train=20_000))["train"]
    tok = tokenizer.synthetic_tokenizer(args.data_dir, world, vocab_size=512)
    rates = {t: records_per_second(source, tok, t) for t in (1, 2, 4)}

    mesh_cfg = meshes.get_config("cpu")
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
    rules = mesh_cfg.rules
    cfg = TransformerConfig.from_config(models.get_config("mini"), max_len=128)
    policy = sharding.create_sharded(LanguageModel, cfg, 0, mesh, rules)
    ref_graphdef, ref_params = nnx.split(sharding.create_sharded(LanguageModel, cfg, 0, mesh,
                                                                 rules))
    tx = optax.adamw(1e-5)
    graphdef, state, state_sh = init_train_state(policy, tx, mesh, rules)
    rows = sharding.batch_sharding(mesh, rules, 2)
    with sharding.use(mesh, rules):
        ref_sh = sharding.state_shardings(ref_params, mesh)
    update = make_update_step(graphdef, tx, make_policy_loss("ipo", 0.1, 1, ref_graphdef), mesh,
                              rules, state_sh, PreferenceBatch(*[rows] * 6),
                              {"reference": ref_sh})
    it = iter(pipelines.preference_pipeline(source, tok, SHAPE, seed=0, num_threads=2))
    waits, steps = [], []
    for i in range(args.steps + 5):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        state, metrics = update(state, sharding.global_batch(batch, mesh, rules),
                                {"reference": ref_params})
        jax.block_until_ready(metrics["loss"])
        t2 = time.perf_counter()
        if i >= 5:  # after compilation and the first fills
            waits.append(t1 - t0)
            steps.append(t2 - t1)
    result = {"records_per_s_by_threads": rates,
              "step_s_mean": float(np.mean(steps)), "wait_s_mean": float(np.mean(waits)),
              "wait_s_p95": float(np.percentile(waits, 95)),
              "wait_fraction": float(np.sum(waits) / (np.sum(waits) + np.sum(steps))),
              "records_needed_per_s": SHAPE.global_batch_size / float(np.mean(steps)),
              "date": time.strftime("%Y-%m-%d %H:%M"), "cpu_count": os.cpu_count()}
    print("\n| reader threads | records/s (pipeline alone) |")
    print("| --- | --- |")
    for t, rate in rates.items():
        print(f"| {t} | {rate:,.0f} |")
    print(f"\noffline update step (mini, 32 pairs): {result['step_s_mean'] * 1e3:.1f} ms/step, "
          f"needs {result['records_needed_per_s']:,.0f} records/s")
    print(f"time blocked in next(): mean {result['wait_s_mean'] * 1e3:.2f} ms, "
          f"p95 {result['wait_s_p95'] * 1e3:.2f} ms, {result['wait_fraction']:.1%} of the loop")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    allocator.reexec()  # timings with the malloc our entry points run with
    main()
