"""Stacked runs (train/stacked.py) equal the same runs trained one by one.

Two policy runs that differ in learning rate, beta, loss and data (a seed's batches) take
the same steps stacked on a run axis and apart; parameters and metrics must agree within float
tolerance. The stacked sampler and ranking must draw and order what each run's own programs do.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from alignment_gap import logprobs, run_dir, sharding
from alignment_gap.batches import PreferenceBatch
from alignment_gap.checkpoint import Checkpointer
from alignment_gap.errors import ConfigError
from alignment_gap.presets import models
from alignment_gap.presets import policy as policy_presets
from alignment_gap.sampling import Sampler, SamplingConfig
from alignment_gap.sources import rank_program
from alignment_gap.study import pipeline
from alignment_gap.train import policy_stack, stacked
from alignment_gap.train.policy import make_policy_loss
from alignment_gap.train.state import (
    TrainState,
    init_train_state,
    make_optimizer,
    make_update_step,
)
from configs import study as study_configs
from tests.conftest import random_prompts
from tests.helpers import language_model, preference_model

RUNS = [stacked.RunSettings(1e-2, 0.1, "ipo"), stacked.RunSettings(3e-3, 0.5, "dpo")]
STEPS, BATCH, P, R = 4, 4, 8, 6


def optimizer_config(learning_rate=1e-3):
    return ml_collections.ConfigDict(dict(learning_rate=learning_rate, warmup_steps=1,
                                          num_steps=STEPS, end_lr_fraction=0.1,
                                          weight_decay=0.01, grad_clip=1.0))


def batches(seed, vocab):
    """One run's batches: its own data order."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        prompt, prompt_mask = random_prompts(rng, BATCH, P, vocab)
        chosen, rejected = rng.integers(2, vocab, (2, BATCH, R)).astype(np.int32)
        lengths = rng.integers(1, R + 1, (2, BATCH))
        masks = np.arange(R)[None, None, :] < lengths[..., None]
        out.append(PreferenceBatch(prompt, prompt_mask, chosen, masks[0], rejected, masks[1]))
    return out


@pytest.mark.parametrize("shared_batch", [False, True], ids=["own_batches", "shared_batch"])
def test_stacked_policy_runs_equal_separate_runs(mini_config, shared_batch):
    """On a (data 2, fsdp 2) mesh: the runs split over `data`, each run's batch and
    parameters over `fsdp` (the separate runs split their batch over both). With
    `shared_batch` (an offline sweep's one data order) the runs take one batch and the
    reference's forward pass over it is in the stacked program once, not once per run."""
    shape = (2, 2, 1)
    policy, mesh, rules = language_model(mini_config, shape)
    reference, _, _ = language_model(mini_config, shape)
    ref_graphdef, ref_params = nnx.split(reference)
    vocab = policy.cfg.vocab_size
    data = [batches(0 if shared_batch else seed, vocab) for seed in range(len(RUNS))]
    with sharding.use(mesh, rules):
        ref_sh = sharding.state_shardings(ref_params, mesh)
    rows = sharding.batch_sharding(mesh, rules, 2)
    batch_sh = PreferenceBatch(*[rows] * 6)
    extras = {"reference": ref_params}
    graphdef, start, state_sh = init_train_state(policy, make_optimizer(optimizer_config()),
                                                 mesh, rules)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)

    apart = []
    for run, run_data in zip(RUNS, data, strict=True):
        tx = make_optimizer(optimizer_config(run.learning_rate))
        loss_fn = make_policy_loss(run.loss, run.beta, 1, ref_graphdef)
        update = make_update_step(graphdef, tx, loss_fn, mesh, rules, state_sh, batch_sh,
                                  {"reference": ref_sh})
        state, metrics = copy(start), []
        for batch in run_data:
            state, m = update(state, batch, extras)
            metrics.append(jax.device_get(m))
        apart.append((state, metrics))

    update = stacked.make_stacked_policy_update(optimizer_config(), RUNS, graphdef,
                                                ref_graphdef, 1, mesh, rules, state_sh,
                                                batch_sh, ref_sh, shared_batch=shared_batch)
    states = stacked.stack([copy(start)] * len(RUNS), state_sh)
    for step in range(STEPS):
        batch = data[0][step] if shared_batch else stacked.stack([d[step] for d in data],
                                                                 batch_sh)
        states, m = update(states, batch, extras)
        m = jax.device_get(m)
        for i, (_, metrics) in enumerate(apart):
            for name, value in metrics[step].items():
                if shared_batch and name == "classifier_accuracy" and value == 0.5 and (
                        metrics[step]["kl_sequence"] == 0):
                    # Policy = reference (warm-up's first learning rate is 0): a run alone
                    # ties every margin at exactly 0 (credit 1/2); the stack's reference,
                    # computed unbatched, rounds apart by ~1e-6, so a margin's sign is noise.
                    assert np.all(np.abs(m["h"]) < 1e-4)
                    continue
                np.testing.assert_allclose(m[name][i], value, rtol=2e-4, atol=1e-5,
                                           err_msg=f"run {i} step {step + 1} {name}")
    # Adam divides by sqrt(v): an entry whose gradient is near zero can move by up to the
    # learning rate on a rounding difference, hence an absolute tolerance of 1% of it.
    leaf = jax.tree.leaves(states.params)[0]
    assert leaf.sharding.spec[0] == "data" and leaf.addressable_shards[0].data.shape[0] == 1
    moved = 0.0
    for (state, _), one in zip(apart, stacked.unstack(states), strict=True):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                     state.params, one.params)
        moved += float(squared_distance(start.params, one.params))
    assert moved > 0  # the runs trained


def flops(jitted, *args) -> float:
    return jitted.lower(*args).compile().cost_analysis()["flops"]


def test_a_shared_batch_runs_the_reference_forward_once_for_the_stack(mini_config):
    """On one device, the stacked program over one shared batch does one reference forward's
    work less than the same two runs given a copy of the batch each (XLA's FLOP count)."""
    policy, mesh, rules = language_model(mini_config)
    reference, _, _ = language_model(mini_config)
    ref_graphdef, ref_params = nnx.split(reference)
    with sharding.use(mesh, rules):
        ref_sh = sharding.state_shardings(ref_params, mesh)
    batch_sh = PreferenceBatch(*[sharding.batch_sharding(mesh, rules, 2)] * 6)
    graphdef, start, state_sh = init_train_state(policy, make_optimizer(optimizer_config()),
                                                 mesh, rules)
    states = stacked.stack([start] * len(RUNS), state_sh)
    batch = batches(0, policy.cfg.vocab_size)[0]
    extras = {"reference": ref_params}
    counts = {}
    for shared, batch_in in ((True, batch), (False, stacked.stack([batch] * len(RUNS)))):
        update = stacked.make_stacked_policy_update(optimizer_config(), RUNS, graphdef,
                                                    ref_graphdef, 1, mesh, rules, state_sh,
                                                    batch_sh, ref_sh, shared_batch=shared)
        with sharding.use(mesh, stacked.run_rules(rules)):
            counts[shared] = flops(update.jitted, states, batch_in, extras, update.settings)
    def reference_forward(params, b):
        return logprobs.pair_response_logits(nnx.merge(ref_graphdef, params), b.prompt,
                                             b.prompt_mask, b.chosen, b.chosen_mask, b.rejected,
                                             b.rejected_mask)

    with sharding.use(mesh, rules):
        forward = flops(jax.jit(reference_forward), ref_params, batch)
    saved = counts[False] - counts[True]
    assert 0.8 * forward < saved < 1.2 * forward, (counts, forward)


def squared_distance(a, b):
    return sum(jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                     strict=True))


def test_stacked_sampler_and_ranking_equal_each_runs_own(mini_config):
    runs = [language_model(mini_config, seed=seed)[0] for seed in range(2)]
    proxy, mesh, rules = preference_model(mini_config, seed=7)
    cfg = SamplingConfig(max_new_tokens=R, temperature=1.0, eos_id=1, pad_id=0)
    rng = np.random.default_rng(0)
    prompts = [random_prompts(rng, BATCH, P, runs[0].cfg.vocab_size) for _ in runs]
    keys = [jax.random.key(i) for i in range(len(runs))]
    params = [nnx.state(lm) for lm in runs]
    graphdef = nnx.graphdef(runs[0])
    with sharding.use(mesh, rules):
        state_sh = sharding.state_shardings(params[0], mesh)

    sampler = Sampler(runs[0], mesh, rules, cfg, samples_per_prompt=2)
    rank = rank_program(proxy, mesh, rules)
    proxy_state = nnx.state(proxy)
    apart = []
    for state, (prompt, mask), key in zip(params, prompts, keys, strict=True):
        out = sampler(state, prompt, mask, key)
        apart.append((out, rank(proxy_state, prompt, mask, out.tokens, out.mask)))

    sample = stacked.stacked_sampler(graphdef, mesh, rules, state_sh, cfg, samples_per_prompt=2)
    stacked_prompts = stacked.stack([jnp.asarray(p) for p, _ in prompts])
    stacked_masks = stacked.stack([jnp.asarray(m) for _, m in prompts])
    out = sample(stacked.stack(params), stacked_prompts, stacked_masks, jnp.stack(keys))
    ranked = stacked.stacked_rank(proxy, mesh, rules)(proxy_state, stacked_prompts,
                                                        stacked_masks, out.tokens, out.mask)
    for i, (one_out, one_batch) in enumerate(apart):
        np.testing.assert_array_equal(out.tokens[i], one_out.tokens)
        np.testing.assert_array_equal(out.mask[i], one_out.mask)
        np.testing.assert_allclose(out.logprobs[i], one_out.logprobs, rtol=1e-5, atol=1e-5)
        for got, want in zip(jax.tree.leaves(stacked.unstack(ranked)[i]),
                             jax.tree.leaves(one_batch), strict=True):
            np.testing.assert_array_equal(got, want)
    assert not np.array_equal(out.tokens[0], out.tokens[1])  # the runs drew their own


def test_a_stacked_run_that_is_done_stays_done_while_another_decodes(mini_config):
    """Greedy decoding of one repeated prompt: with EOS set to run 0's first token, all of run
    0's rows end at the first step while run 1 decodes on (the loop is shared); each run still
    gets exactly what its own sampler gives it."""
    runs = [language_model(mini_config, seed=seed)[0] for seed in range(2)]
    _, mesh, rules = language_model(mini_config)
    rng = np.random.default_rng(1)
    prompt, mask = random_prompts(rng, 1, P, runs[0].cfg.vocab_size)
    other, other_mask = random_prompts(rng, BATCH, P, runs[1].cfg.vocab_size)
    prompts = [np.repeat(prompt, BATCH, axis=0), other]
    masks = [np.repeat(mask, BATCH, axis=0), other_mask]
    params = [nnx.state(lm) for lm in runs]
    greedy = SamplingConfig(max_new_tokens=R, temperature=0.0, eos_id=-1, pad_id=0)
    first = Sampler(runs[0], mesh, rules, greedy)(params[0], prompts[0], masks[0],
                                                   jax.random.key(0)).tokens[0, 0]
    cfg = SamplingConfig(max_new_tokens=R, temperature=0.0, eos_id=int(first), pad_id=0)
    sampler = Sampler(runs[0], mesh, rules, cfg, samples_per_prompt=2)
    apart = [sampler(state, p, m, jax.random.key(0)) for state, p, m in
             zip(params, prompts, masks, strict=True)]
    assert (apart[0].mask.sum(axis=1) == 1).all()  # run 0: EOS first, for every row
    assert apart[1].mask.sum() > 2 * BATCH  # run 1 decodes past the first step
    with sharding.use(mesh, rules):
        state_sh = sharding.state_shardings(params[0], mesh)
    sample = stacked.stacked_sampler(nnx.graphdef(runs[0]), mesh, rules, state_sh, cfg,
                                     samples_per_prompt=2)
    out = sample(stacked.stack(params), stacked.stack([jnp.asarray(p) for p in prompts]),
                 stacked.stack([jnp.asarray(m) for m in masks]),
                 jnp.stack([jax.random.key(0)] * 2))
    for i, one in enumerate(apart):
        np.testing.assert_array_equal(out.tokens[i], one.tokens)
        np.testing.assert_array_equal(out.mask[i], one.mask)
        np.testing.assert_allclose(out.logprobs[i], one.logprobs, rtol=1e-5, atol=1e-5)


def test_an_unknown_loss_and_runs_that_do_not_divide_the_mesh_are_named():
    with pytest.raises(ValueError, match="'ipo2' is unknown"):
        stacked.settings_arrays([stacked.RunSettings(1e-3, 0.1, "ipo2")])
    _, mesh, _ = language_model(models.get_config("nano"), (2, 1, 1))
    with pytest.raises(ConfigError, match="3 stacked runs do not divide over the mesh's 'data'"):
        stacked.check_runs(3, mesh)


def test_only_offline_runs_that_differ_in_learning_rate_beta_or_loss_stack(tmp_path):
    """`policy_stack.stack_key`: the study's offline runs of one seed and length share a key;
    another seed, an online run or a stop rule does not; `run` refuses a mixed group."""
    study = study_configs.get_config("smoke")
    study.offline_learning_rates, study.offline_betas = [5e-4, 1e-3], [0.1, 0.5]
    study.seeds = [0, 1]
    plan = pipeline.build_plan(study, str(tmp_path))
    offline = [s for s in plan.stages if s.meta.get("method") == "offline"]
    keys = {}
    for stage in offline:
        assert stage.stack == policy_stack.stack_key(stage.config) != ""
        keys.setdefault(stage.meta["seed"], set()).add(stage.stack)
    assert [len(k) for k in keys.values()] == [1, 1] and keys[0] != keys[1]
    online = next(s for s in plan.stages if s.meta.get("method") == "online")
    assert online.stack == ""
    stopping = offline[0].config.copy_and_resolve_references()
    stopping.eval.kl_cap = 5.0
    assert policy_stack.stack_key(stopping) == ""
    with pytest.raises(ConfigError, match="do not stack: stacked runs are offline runs"):
        policy_stack.run([offline[0].config, online.config],
                         [str(tmp_path / "a"), str(tmp_path / "b")])


def test_runs_one_save_apart_resume_together_and_runs_further_apart_stack_by_step(tmp_path):
    """`policy_stack.resume_groups` on real checkpoint directories: a kill between two runs'
    saves (one run a save ahead) -> all from the earlier step; a run added fresh to a sweep
    whose runs are two saves in -> nothing rolled back, each step's runs on their own."""
    config = ml_collections.ConfigDict(dict(checkpoint_every=5, num_steps=20, max_to_keep=10))

    def run(name, steps):
        ckpt = Checkpointer(str(tmp_path / name / "checkpoints"), config.max_to_keep)
        for step in steps:
            state = TrainState(jnp.asarray(step), {"w": jnp.ones(2)}, {"m": jnp.zeros(2)})
            ckpt.save(state, jax.random.key(0), {"kind": "lm"})
        ckpt.close()
        return config, str(tmp_path / name)

    a, b, fresh = run("a", [5, 10]), run("b", [5]), run("fresh", [])
    assert policy_stack.resume_groups([a, b]) == [(5, [a, b])]
    assert policy_stack.resume_groups([b, fresh]) == [(0, [b, fresh])]  # one save apart too
    assert policy_stack.resume_groups([a, b, fresh]) == [(0, [fresh]), (5, [b]), (10, [a])]


def test_a_stack_resuming_refuses_a_changed_run_before_rewriting_any_config(tmp_path):
    """Every run of a stack is held to the config it started with (the second one's changed
    beta was let through and its config.json overwritten)."""
    workdirs = [str(tmp_path / f"run{i}") for i in range(2)]
    for workdir in workdirs:
        os.makedirs(os.path.join(workdir, run_dir.CHECKPOINTS, "3"))
        started = policy_presets.get_config("offline_tiny")
        run_dir.write_json(workdir, run_dir.CONFIG, started.to_dict())
    now = [policy_presets.get_config("offline_tiny") for _ in workdirs]
    now[1].beta = 0.5
    with pytest.raises(ConfigError, match=r"run1: this run resumes .* beta 0.1 -> 0.5"):
        policy_stack._run_stack(now, workdirs, start=3)
    assert all(run_dir.read_json(w, run_dir.CONFIG)["beta"] == 0.1 for w in workdirs)
