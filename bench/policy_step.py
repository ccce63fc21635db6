"""Where an online and an offline policy step spend their time, and the sampler alone.

    python bench/policy_step.py --shape mini     # the CPU study's shape
    python bench/policy_step.py --shape peer     # ../shared/peerbench's shape, to set beside
                                                 # TRL and Tunix run in the same sitting
    python bench/policy_step.py --shape peer --devices 2 --microbatches 2
                                                 # one XLA CPU device per core, data parallel

Online step = sample two responses per prompt with the KV-cache sampler + rank them with the
proxy preference model (both orders) + the update step (whose forward includes the frozen
reference's log-probs). Offline step = the next dataset-shaped batch + the same update step.
Parts are also timed alone (reference log-probs as their own jitted call), and the golden and
proxy models' training step on the offline step's pairs. Step times are the
mean of steps 4..23 (3 warm-up steps dropped), as peerbench measures. Random-init models, EOS
disabled so every response has its full length (as the peers generate). Tokens/s count the
tokens of the `[prompt | response]` sequences a step handles (the prompt once per response, as
the peers count them), whatever the code does to read each prompt only once.
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

from alignment_gap import allocator, logprobs, sharding
from alignment_gap.batches import PreferenceBatch, PromptBatch
from alignment_gap.models import LanguageModel, PreferenceModel, TransformerConfig
from alignment_gap.presets import meshes, models
from alignment_gap.sampling import Sampler, SamplingConfig
from alignment_gap.sources import OnlineSource
from alignment_gap.train.policy import make_policy_loss
from alignment_gap.train.preference import random_order_loss
from alignment_gap.train.state import init_train_state, make_update_step

# shape: (model size, prompts per step, prompt length, response length, sampler prompts)
SHAPES = {"mini": ("mini", 32, 64, 24, 64), "peer": ("peer", 32, 32, 16, 64)}
WARMUP, STEPS = 3, 20


def mean_time(fn, warmup=WARMUP, steps=STEPS) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(fn())
    return (time.perf_counter() - t0) / steps


def random_models(size: str, max_len: int, devices: int, dtype: str = "float32"):
    """(mesh, rules, model config, policy, reference, proxy): random-init models of `size` on
    a data-parallel mesh of `devices` CPU devices; policy and reference are equal. `dtype` is
    the compute dtype (parameters stay float32)."""
    mesh_cfg = meshes.get_config("cpu")
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:devices])
    rules = mesh_cfg.rules
    cfg = TransformerConfig.from_config(models.get_config(size), max_len=max_len, dtype=dtype)
    make = lambda cls, seed: sharding.create_sharded(cls, cfg, seed, mesh, rules)
    return (mesh, rules, cfg, make(LanguageModel, 0), make(LanguageModel, 0),
            make(PreferenceModel, 1))


class _Prompts:
    """An endless iterator of one fixed prompt batch (input cost is the data bench's topic)."""

    def __init__(self, prompt, mask):
        self.batch = PromptBatch(prompt, mask)

    def __next__(self):
        return self.batch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="mini", choices=sorted(SHAPES))
    parser.add_argument("--microbatches", type=int, default=1,
                        help="the policy config's `microbatches` (update step, proxy scoring)")
    parser.add_argument("--devices", type=int, default=1,
                        help="CPU devices (one per core is the point): a data-parallel mesh")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype (parameters and optimizer state stay float32)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    size, batch, p, r, sampler_prompts = SHAPES[args.shape]
    if args.devices < 1 or batch % (args.devices * args.microbatches) or sampler_prompts % (
            args.devices):
        parser.error(f"--devices {args.devices} x --microbatches {args.microbatches} must divide "
                     f"the {batch} prompts (and --devices the sampler's {sampler_prompts})")
    jax.config.update("jax_num_cpu_devices", args.devices)

    mesh, rules, cfg, policy, reference, proxy = random_models(size, p + 2 * r, args.devices,
                                                                 args.dtype)
    ref_graphdef, ref_params = nnx.split(reference)
    tx = optax.adamw(1e-5)
    graphdef, state, state_sh = init_train_state(policy, tx, mesh, rules)
    rows = sharding.batch_sharding(mesh, rules, 2)
    with sharding.use(mesh, rules):
        ref_sh = sharding.state_shardings(ref_params, mesh)
    loss_fn = make_policy_loss("ipo", 0.1, -1, ref_graphdef)
    update = make_update_step(graphdef, tx, loss_fn, mesh, rules, state_sh,
                              PreferenceBatch(*[rows] * 6), {"reference": ref_sh},
                              microbatches=args.microbatches, row_mean_loss=True)

    rng = np.random.default_rng(0)
    prompt = rng.integers(3, cfg.vocab_size, (batch, p)).astype(np.int32)
    prompt_mask = np.ones_like(prompt, bool)
    sampling = SamplingConfig(max_new_tokens=r, temperature=1.0, eos_id=-1)
    to_global = lambda b: sharding.global_batch(b, mesh, rules)
    online = OnlineSource(_Prompts(prompt, prompt_mask), to_global, policy, proxy, mesh, rules,
                          sampling, microbatches=args.microbatches)
    responses = rng.integers(3, cfg.vocab_size, (2, batch, r)).astype(np.int32)
    full = np.ones((batch, r), bool)
    offline_batch = PreferenceBatch(prompt, prompt_mask, responses[0], full, responses[1], full)
    holder = {"state": state, "key": jax.random.key(0)}

    def online_step():
        holder["key"], key = jax.random.split(holder["key"])
        b = online.next_batch(holder["state"].params, key)
        holder["state"], m = update(holder["state"], b, {"reference": ref_params})
        return m["loss"]

    def offline_step():
        holder["state"], m = update(holder["state"], to_global(offline_batch),
                                    {"reference": ref_params})
        return m["loss"]

    # Parts alone.
    sample_times, score_times = [], []

    def sample_and_score():
        holder["key"], key = jax.random.split(holder["key"])
        online.next_batch(holder["state"].params, key)
        sample_times.append(online.stats["sample_s"])
        score_times.append(online.stats["score_s"])

    ref_logits = jax.jit(lambda params, b: logprobs.pair_response_logits(
        nnx.merge(ref_graphdef, params), b.prompt, b.prompt_mask, b.chosen, b.chosen_mask,
        b.rejected, b.rejected_mask))
    update_only = lambda: update(holder["state"], to_global(offline_batch),
                                 {"reference": ref_params})
    t_online = mean_time(online_step)
    t_offline = mean_time(offline_step)
    mean_time(sample_and_score)
    with sharding.use(mesh, rules):
        t_ref = mean_time(lambda: ref_logits(ref_params, offline_batch))

    def update_keep():
        holder["state"], m = update_only()
        return m["loss"]
    t_update = mean_time(update_keep)
    t_sample = float(np.mean(sample_times[WARMUP:]))
    t_score = float(np.mean(score_times[WARMUP:]))

    # The golden and proxy models' training step (`train/preference.py`) on the same pairs.
    pm_graphdef, pm_state, pm_sh = init_train_state(nnx.clone(proxy), tx, mesh, rules)
    pm_update = make_update_step(pm_graphdef, tx, random_order_loss, mesh, rules, pm_sh,
                                 PreferenceBatch(*[rows] * 6), name="preference_update")
    pm_holder = {"state": pm_state}

    def preference_step():
        pm_holder["state"], m = pm_update(pm_holder["state"], to_global(offline_batch),
                                          {"key": jax.random.key(2)})
        return m["loss"]
    t_preference = mean_time(preference_step)

    sampler = Sampler(policy, mesh, rules, sampling)
    sp = rng.integers(3, cfg.vocab_size, (sampler_prompts, p)).astype(np.int32)
    t_sampler = mean_time(lambda: sampler(holder["state"].params, sp, np.ones_like(sp, bool),
                                          jax.random.key(1)).tokens, warmup=3, steps=10)

    seq_tokens = 2 * batch * (p + r)  # tokens through the policy per step (both responses)
    results = {
        "shape": args.shape, "model": size, "microbatches": args.microbatches,
        "devices": args.devices, "params": int(sum(
            x.size for x in jax.tree.leaves(nnx.state(policy, nnx.Param)))),
        "prompts": batch, "prompt_len": p, "response_len": r,
        "online_step_s": t_online, "offline_step_s": t_offline,
        "online_over_offline": t_online / t_offline,
        "sample_s": t_sample, "score_s": t_score, "reference_logprobs_s": t_ref,
        "update_s": t_update, "preference_update_s": t_preference,
        "preference_update_tokens_per_s": batch * (p + 2 * r) / t_preference,
        "sample_tokens_per_s": 2 * batch * r / t_sample,
        "score_tokens_per_s": 2 * batch * (p + 2 * r) / t_score,
        "reference_tokens_per_s": seq_tokens / t_ref,
        "update_tokens_per_s": seq_tokens / t_update,
        "online_tokens_per_s": seq_tokens / t_online,
        "offline_tokens_per_s": seq_tokens / t_offline,
        "sampler_call_s": t_sampler, "sampler_prompts": sampler_prompts,
        "sampler_tokens_per_s": sampler_prompts * r / t_sampler,
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpu_count": os.cpu_count(),
        "jax": jax.__version__, "malloc": "tbb" if allocator.active() else "system",
    }
    print(f"\nshape {args.shape}: {size} ({results['params']:,} params), microbatches "
          f"{args.microbatches}, {args.devices} CPU device(s), {batch} prompts, "
          f"prompt {p} + response {r}, mean of {STEPS} steps after {WARMUP}, malloc "
          f"{results['malloc']}\n")
    print("| part | s | tokens/s |")
    print("| --- | --- | --- |")
    for name, key, tok in (("online step", "online_step_s", "online_tokens_per_s"),
                           ("  sampling (2 x batch)", "sample_s", "sample_tokens_per_s"),
                           ("  proxy scoring (2 orders)", "score_s", "score_tokens_per_s"),
                           ("  update (incl. reference fwd)", "update_s", "update_tokens_per_s"),
                           ("  (reference log-probs alone)", "reference_logprobs_s",
                            "reference_tokens_per_s"),
                           ("offline step", "offline_step_s", "offline_tokens_per_s"),
                           ("preference-model update (golden / proxy training)",
                            "preference_update_s", "preference_update_tokens_per_s"),
                           (f"sampler call ({sampler_prompts} prompts)", "sampler_call_s",
                            "sampler_tokens_per_s")):
        print(f"| {name} | {results[key]:.4f} | {results[tok]:,.0f} |")
    print(f"\nonline / offline step time: {results['online_over_offline']:.2f}x")
    out = args.out or (f"bench/out/policy_step_{args.shape}_k{args.microbatches}"
                       f"_d{args.devices}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    allocator.reexec()  # timings with the malloc our entry points run with
    main()
