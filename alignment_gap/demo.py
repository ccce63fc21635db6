"""The foundation demo (configs/demo.py): learn to sort a prompt, then sample with the KV cache.

A short, real run of every foundation piece on any mesh: the policy is created sharded,
trained with the jitted update step on a process-sharded batch, sampled with the KV-cache
sampler, and compared with its initial self by the exact per-token KL.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from alignment_gap import logprobs, losses, preemption, resume_guard, run_dir, sharding
from alignment_gap.evaluation import kl_sampler
from alignment_gap.models import LanguageModel, TransformerConfig
from alignment_gap.sampling import Sampler, SamplingConfig
from alignment_gap.train.state import init_train_state, make_update_step


def sorting_batch(rng: np.random.Generator, rows: int, config):
    """Left-padded prompts of 4..prompt_len symbols; responses = sorted prompt + EOS."""
    p, r, eos, pad = config.prompt_len, config.response_len, config.sampling.eos_id, 0
    prompt = np.full((rows, p), pad, np.int32)
    response = np.full((rows, r), pad, np.int32)
    for i in range(rows):
        n = rng.integers(min(4, p), p + 1)
        symbols = rng.integers(2, 2 + config.alphabet, n)
        prompt[i, p - n:] = symbols
        response[i, :n] = np.sort(symbols)
        response[i, n] = eos
    return {"prompt": prompt, "prompt_mask": prompt != pad,
            "response": response, "response_mask": response != pad}


def sft_loss(model, batch, extras):
    per_token, _ = logprobs.sequence_logprobs(model, batch["prompt"], batch["prompt_mask"],
                                              batch["response"], batch["response_mask"])
    return losses.next_token_loss(per_token, batch["response_mask"]), {}


def run(config, workdir: str) -> dict:
    started = run_dir.read_json(workdir, run_dir.CONFIG)
    changed = resume_guard.changes(started, config.to_dict()) if started else []
    if changed:  # no checkpoint to resume: the demo runs again under the new config
        if jax.process_index() == 0:
            print(f"{workdir} holds a demo run of another config ("
                  f"{'; '.join(f'{f} {old!r} -> {new!r}' for f, old, new in changed)}): "
                  "running it again", flush=True)
            if os.path.exists(done := os.path.join(workdir, run_dir.DONE)):
                os.remove(done)  # the old run's result, until this one's
    elif run_dir.already_finished(workdir, config.num_steps):
        return run_dir.result(workdir)
    run_dir.write_json(workdir, run_dir.CONFIG, config.to_dict())

    mesh = sharding.make_mesh(config.mesh)
    rules = config.mesh.rules
    model_cfg = TransformerConfig.from_config(config.model)
    policy = sharding.create_sharded(LanguageModel, model_cfg, config.seed, mesh, rules)
    # Same seed: the starting policy (the same program, compiled once).
    initial = sharding.create_sharded(LanguageModel, model_cfg, config.seed, mesh, rules)

    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate,
                                                  config.warmup_steps, config.num_steps)
    tx = optax.adamw(schedule, weight_decay=0.0)
    graphdef, state, state_sh = init_train_state(policy, tx, mesh, rules)
    rows = sharding.batch_sharding(mesh, rules, 2)
    batch_sh = {"prompt": rows, "prompt_mask": rows, "response": rows, "response_mask": rows}
    update = make_update_step(graphdef, tx, sft_loss, mesh, rules, state_sh, batch_sh)

    local_rows = sharding.process_rows(mesh, rules, config.batch_size).count
    rng = np.random.default_rng([config.seed, jax.process_index()])
    is_chief = jax.process_index() == 0
    start, metrics = time.perf_counter(), None
    for step in range(1, config.num_steps + 1):
        batch = sharding.global_batch(sorting_batch(rng, local_rows, config), mesh, rules)
        state, new_metrics = update(state, batch)
        if metrics is not None and (step - 1) % config.log_every == 0 and is_chief:
            rate = (step - 1) / (time.perf_counter() - start)
            print(f"step {step - 1:5d}  loss {float(metrics['loss']):.4f}  "
                  f"grad_norm {float(metrics['grad_norm']):.3f}  {rate:.1f} steps/s  "
                  f"eta {(config.num_steps - step + 1) / rate:.0f}s", flush=True)
        metrics = new_metrics  # Read one step late: the next step is already dispatched.
        if preemption.reached():  # Ctrl-C / SIGTERM: nothing to save, the demo keeps none
            raise preemption.Preempted(f"stopped after step {step} of {config.num_steps}; the "
                                       "demo keeps no checkpoint: the same command runs it "
                                       "again from its first step")
    final_loss = float(metrics["loss"])
    train_s = time.perf_counter() - start

    policy = nnx.merge(graphdef, state.params)
    sampling = SamplingConfig.from_config(config.sampling)
    sampler = Sampler(policy, mesh, rules, sampling)
    eval_rows = sharding.process_rows(mesh, rules, config.eval_prompts)
    eval_batch = sorting_batch(np.random.default_rng([config.seed, 10_000 + jax.process_index()]),
                               eval_rows.count, config)
    prompts = sharding.global_batch({k: eval_batch[k] for k in ("prompt", "prompt_mask")},
                                    mesh, rules)
    key = jax.random.key(config.seed)
    jax.block_until_ready(sampler(state.params, prompts["prompt"], prompts["prompt_mask"], key))
    t0 = time.perf_counter()
    sample = jax.block_until_ready(
        sampler(state.params, prompts["prompt"], prompts["prompt_mask"], key))
    sample_s = time.perf_counter() - t0
    own = sample  # the KL's samples: the policy's own distribution (`evaluation.kl_sampler`)
    if (own_sampler := kl_sampler(policy, mesh, rules, sampling)) is not None:
        own = own_sampler(state.params, prompts["prompt"], prompts["prompt_mask"], key)

    expected = sharding.global_batch({"r": eval_batch["response"]}, mesh, rules)["r"]
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    @functools.partial(jax.jit, out_shardings=replicated)
    def evaluate(policy, initial, prompt, prompt_mask, sample, own, expected):
        kl = logprobs.sequence_kl(policy, initial, prompt, prompt_mask, own.tokens, own.mask)
        exact = jnp.all(jnp.where(sample.mask, sample.tokens, 0) == expected, axis=1)
        return {"kl": jnp.mean(kl), "exact": jnp.mean(exact), "tokens": jnp.sum(sample.mask)}

    with sharding.use(mesh, rules):
        stats = evaluate(policy, initial, prompts["prompt"], prompts["prompt_mask"], sample, own,
                         expected)
    sampled_tokens = multihost_utils.process_allgather(sample.tokens, tiled=True)

    summary = {
        "steps": config.num_steps,
        "final_loss": final_loss,
        "train_steps_per_s": config.num_steps / train_s,
        "exact_sort_rate": float(stats["exact"]),
        "kl_to_initial_nats": float(stats["kl"]),
        "sampled_tokens_per_s": float(stats["tokens"]) / sample_s,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "mesh": dict(mesh.shape),
    }
    run_dir.finish(workdir, config.num_steps, **summary)  # the summary is the run's result
    if is_chief:
        for k, v in summary.items():
            print(f"{k:>22}: {v:.4g}" if isinstance(v, float) else f"{k:>22}: {v}")
        _show_examples(eval_batch, eval_rows.select(sampled_tokens)[:3])
    logging.info("demo finished: %s", summary)
    return summary


def _show_examples(batch, sampled):
    for prompt, mask, tokens in zip(batch["prompt"], batch["prompt_mask"], sampled, strict=False):
        print(f"  prompt {prompt[mask].tolist()} -> sampled {tokens.tolist()}")
