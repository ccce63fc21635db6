"""A sweep's runs stacked in one compiled program (`train/stacked.py`) against one run alone.

    python bench/stacked_runs.py                       # 8 offline runs, 4 online runs, mini
    python bench/stacked_runs.py --offline 4,8,16 --online 2,4 --devices 2
    python bench/stacked_runs.py --microbatches 4 --stack_microbatches 4,16,32 --online ""
    python bench/stacked_runs.py --microbatches 4 --offline 8 --offline_shared 8 --online ""

Offline step = the update step on a dataset-shaped batch (each run its own batch); "offline,
one batch" = the same with every run taking the same batch (an offline sweep: one data order),
the reference's log-probs computed once for the stack (`shared_batch`); online step =
sample two responses per prompt + rank them with the proxy + update, each run sampling from its
own policy. The stacked runs differ in learning rate and beta (the offline sweep's axes). Step
times are the mean of 20 steps after 3 warm-up steps, all in one process and one sitting: read
the ratio "n stacked / one alone" (issue 17's targets: 8 offline runs in at most 3x one run's
time, 4 online runs in at most 2.5x). "first step" is the time to the first result: tracing
and compiling once per program (n separate runs with different learning rates compile n
times, a stack once; the online row's update program is the offline row's, already compiled).
Random-init models, EOS disabled so every response has its full length; `--shape smoke` is
the smoke study's batch of 8 pairs. `--microbatches` is the update's number of sequential slices
for the run alone (the mini study uses 4); the stacks run at each of `--stack_microbatches`
(default: the same), since a slice of n stacked runs holds n runs' activations.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from foundation import cpu_model
from policy_step import SHAPES as STEP_SHAPES
from policy_step import mean_time, random_models

from alignment_gap import allocator, sharding
from alignment_gap.batches import PreferenceBatch
from alignment_gap.sampling import Sampler, SamplingConfig
from alignment_gap.sources import Ranker
from alignment_gap.train import stacked
from alignment_gap.train.policy import make_policy_loss
from alignment_gap.train.state import init_train_state, make_optimizer, make_update_step

# The smoke study's batch of 8 pairs at the mini shape: a step small enough to be overhead.
SHAPES = {**STEP_SHAPES, "smoke": ("mini", 8, 64, 24, 16)}
TARGETS = {("offline", 8): 3.0, ("offline, one batch", 8): 3.0, ("online", 4): 2.5}


def first_call(fn) -> float:
    """Seconds to the first result: tracing and compiling the step's programs, one step."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def sweep(n: int) -> list[stacked.RunSettings]:
    """n points of a learning rate x beta grid (the offline sweep's axes)."""
    grid = itertools.product([2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2], [0.1, 0.5, 1.0])
    return [stacked.RunSettings(lr, beta) for lr, beta in itertools.islice(grid, n)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="mini", choices=sorted(SHAPES))
    parser.add_argument("--offline", default="8", help="stack sizes of offline runs")
    parser.add_argument("--offline_shared", default="8",
                        help="stack sizes of offline runs that share each batch")
    parser.add_argument("--online", default="4", help="stack sizes of online runs")
    parser.add_argument("--devices", type=int, default=1, help="CPU devices (data parallel)")
    parser.add_argument("--microbatches", type=int, default=1, help="one run's update slices")
    parser.add_argument("--stack_microbatches", default="",
                        help="the stacks' update slices, a list (default: --microbatches)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", args.devices)
    size, batch, p, r, _ = SHAPES[args.shape]
    mesh, rules, cfg, policy, reference, proxy = random_models(size, p + 2 * r, args.devices)
    ref_graphdef, ref_params = nnx.split(reference)
    extras = {"reference": ref_params}
    opt = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=10, num_steps=300,
                                         end_lr_fraction=0.1, weight_decay=0.0, grad_clip=1.0))
    graphdef, start, state_sh = init_train_state(policy, make_optimizer(opt), mesh, rules)
    rows = sharding.batch_sharding(mesh, rules, 2)
    batch_sh = PreferenceBatch(*[rows] * 6)
    with sharding.use(mesh, rules):
        ref_sh = sharding.state_shardings(ref_params, mesh)
    rng = np.random.default_rng(0)
    sampling = SamplingConfig(max_new_tokens=r, temperature=1.0, eos_id=-1)
    proxy_state = nnx.state(proxy)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    full = np.ones((batch, r), bool)

    def offline_batch():
        prompt = rng.integers(3, cfg.vocab_size, (batch, p)).astype(np.int32)
        chosen, rejected = rng.integers(3, cfg.vocab_size, (2, batch, r)).astype(np.int32)
        return PreferenceBatch(prompt, np.ones_like(prompt, bool), chosen, full, rejected, full)

    def to_device(tree, shardings):
        return jax.device_put(tree, shardings)

    # One run alone: the trainer's own programs (its row-mean update, which a one-device CPU
    # mesh runs as side-by-side groups, and its ranker).
    update = make_update_step(graphdef, make_optimizer(opt),
                              make_policy_loss("ipo", 0.1, -1, ref_graphdef), mesh, rules,
                              state_sh, batch_sh, {"reference": ref_sh}, args.microbatches,
                              row_mean_loss=True)
    sampler = Sampler(policy, mesh, rules, sampling, samples_per_prompt=2)
    rank = Ranker(proxy, mesh, rules)
    one = offline_batch()
    holder = {"state": copy(start), "key": jax.random.key(0)}

    def offline_one():
        holder["state"], m = update(holder["state"], to_device(one, batch_sh), extras)
        return m["loss"]

    def online_one():
        holder["key"], key = jax.random.split(holder["key"])
        out = sampler(holder["state"].params, one.prompt, one.prompt_mask, key)
        b = rank(proxy_state, one.prompt, one.prompt_mask, out.tokens, out.mask)
        holder["state"], m = update(holder["state"], b, extras)
        return m["loss"]

    rows_out = []
    alone, first = {}, {}
    for kind, fn in (("offline", offline_one), ("online", online_one)):
        first[kind], alone[kind] = first_call(fn), mean_time(fn)
        rows_out.append({"kind": kind, "runs": 1, "microbatches": args.microbatches,
                         "first_s": first[kind],
                         "step_s": alone[kind], "over_one": 1.0})

    sample = stacked.stacked_sampler(graphdef, mesh, rules, state_sh.params, sampling,
                                      samples_per_prompt=2)
    stacked_rank = stacked.stacked_rank(proxy, mesh, rules)

    def time_stack(kind: str, n: int, microbatches: int) -> float:
        shared = kind == "offline, one batch"
        update_n = stacked.make_stacked_policy_update(opt, sweep(n), graphdef, ref_graphdef, -1,
                                                      mesh, rules, state_sh, batch_sh, ref_sh,
                                                      microbatches, shared_batch=shared)
        if shared:
            batches = to_device(one, stacked.inner_shardings(batch_sh))
        else:
            batches = stacked.stack([offline_batch() for _ in range(n)], batch_sh)
        held = {"states": stacked.stack([copy(start)] * n, state_sh),
                "keys": jax.random.split(jax.random.key(1), n)}

        def offline_n():
            held["states"], m = update_n(held["states"], batches, extras)
            return m["loss"]

        def online_n():
            keys = jax.vmap(jax.random.split)(held["keys"])
            held["keys"] = keys[:, 0]
            out = sample(held["states"].params, batches.prompt, batches.prompt_mask, keys[:, 1])
            b = stacked_rank(proxy_state, batches.prompt, batches.prompt_mask, out.tokens,
                             out.mask)
            held["states"], m = update_n(held["states"], b, extras)
            return m["loss"]

        fn = online_n if kind == "online" else offline_n
        return first_call(fn), mean_time(fn)

    slices = [int(m) for m in args.stack_microbatches.split(",") if m] or [args.microbatches]
    for kind, sizes in (("offline", args.offline), ("offline, one batch", args.offline_shared),
                        ("online", args.online)):
        for n, m in itertools.product((int(s) for s in sizes.split(",") if s), slices):
            compiled, t = time_stack(kind, n, m)
            one_run = alone["online" if kind == "online" else "offline"]
            rows_out.append({"kind": kind, "runs": n, "microbatches": m, "first_s": compiled,
                             "step_s": t, "over_one": t / one_run})

    machine = cpu_model()
    print(f"\n{args.shape} ({size}), {batch} prompts, prompt {p} + response {r}, "
          f"{args.devices} CPU device(s), {machine}, jax {jax.__version__}\n")
    print("| step | runs | update slices | first step (compile) s | s / step | x one run | "
          "per run | target |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows_out:
        target = TARGETS.get((row["kind"], row["runs"]))
        verdict = "" if target is None else (
            f"<= {target}x: {'met' if row['over_one'] <= target else 'missed'}")
        print(f"| {row['kind']} | {row['runs']} | {row['microbatches']} | {row['first_s']:.1f} | "
              f"{row['step_s']:.4f} | "
              f"{row['over_one']:.2f}x | {row['over_one'] / row['runs']:.2f}x | {verdict} |")
    out = args.out or f"bench/out/stacked_runs_{args.shape}_d{args.devices}.json"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"rows": rows_out, "cpu": machine, "devices": args.devices,
                   "shape": args.shape, "date": time.strftime("%Y-%m-%d %H:%M"),
                   "jax": jax.__version__}, f, indent=2)


if __name__ == "__main__":
    allocator.reexec()  # timings with the malloc our entry points run with
    main()
