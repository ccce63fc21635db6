"""Policy optimisation (IPO, DPO, SLiC, Best-of-2) fed online or offline through one update step.

The policy starts from the SFT checkpoint, which is also the frozen reference. `config.source`
picks where batches come from - `online` (sample from the current policy, rank with the frozen
proxy preference model) or `offline` (a preference dataset, or a replay of a recorded online
stream) - and nothing else changes: the same jitted update step, compiled once, takes either.

    python -m alignment_gap.main --config configs/policy.py:online_mini --workdir DIR
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from alignment_gap import logprobs, losses, program_cache, resume_guard, run_dir, sharding
from alignment_gap.batches import PreferenceBatch
from alignment_gap.checkpoint import Checkpointer
from alignment_gap.data import datasets, pipelines
from alignment_gap.evaluation import Evaluator
from alignment_gap.models.heads import same_responses
from alignment_gap.sampling import SamplingConfig, stop_ids_beyond_eos
from alignment_gap.sources import (
    OfflineSource,
    OnlineSource,
    StreamRecorder,
    dataset_iterator,
    replay_iterator,
)
from alignment_gap.train import common, stopping
from alignment_gap.train.loop import Loop
from alignment_gap.train.state import (
    init_train_state,
    make_optimizer,
    make_update_step,
    schedule_fields,
)


def _pair_logits(model, batch: PreferenceBatch):
    """Response logits of chosen ([0]) and rejected ([1]), the prompt computed once."""
    logits = logprobs.pair_response_logits(model, batch.prompt, batch.prompt_mask, batch.chosen,
                                           batch.chosen_mask, batch.rejected, batch.rejected_mask)
    responses = jnp.stack([batch.chosen, batch.rejected])
    masks = jnp.stack([batch.chosen_mask, batch.rejected_mask])
    return logits, responses, masks


def make_policy_loss(name: str, beta: float, stop_ids, reference_graphdef):
    """`loss_fn(policy, batch, extras)` for `make_update_step`; extras hold the reference.
    `stop_ids`: the id or ids that end a response (the tokenizer's `stop_ids`: EOS and, for a
    chat model, its end of turn), for the `eos_rate` metric."""
    stop_ids = (stop_ids,) if isinstance(stop_ids, int) else tuple(stop_ids)

    def loss_fn(policy, batch: PreferenceBatch, extras):
        reference = nnx.merge(reference_graphdef, extras["reference"])
        logits, responses, masks = _pair_logits(policy, batch)
        ref_logits = jax.lax.stop_gradient(_pair_logits(reference, batch)[0])
        per_token = jnp.where(masks, logprobs.token_logprobs(logits, responses), 0.0)
        ref_per_token = jnp.where(masks, logprobs.token_logprobs(ref_logits, responses), 0.0)
        (policy_w, policy_l), (ref_w, ref_l) = per_token.sum(-1), ref_per_token.sum(-1)
        loss = jnp.mean(losses.policy_loss(name, beta, policy_w, policy_l, ref_w, ref_l))
        h = losses.margin(policy_w, policy_l, ref_w, ref_l)
        kl = logprobs.per_token_kl(logits, ref_logits, masks)
        lengths = masks.sum(-1)
        last = jnp.take_along_axis(responses, jnp.maximum(lengths - 1, 0)[..., None], -1)[..., 0]
        return loss, {
            "h": jnp.mean(h),
            "chosen_logratio": jnp.mean(policy_w - ref_w),
            "rejected_logratio": jnp.mean(policy_l - ref_l),
            "classifier_accuracy": jnp.mean(losses.tie_half(h)),
            # Exact KL(policy || reference) on this batch's responses: the dataset's offline,
            # samples at the sampling settings online; not eval/kl (temperature-1 samples of
            # the policy, the study's KL axis). kl_per_token: divided once the whole batch is
            # summed (`state.RATIOS`).
            "kl_total": kl.sum(), "response_tokens": masks.sum().astype(jnp.float32),
            "kl_sequence": jnp.mean(kl.sum(-1)),
            "response_length": jnp.mean(lengths),
            # Compared id by id: jnp.isin flattens `last`, gathering the batch's rows.
            "eos_rate": jnp.mean((lengths > 0) & (last[..., None] == jnp.asarray(stop_ids))
                                 .any(-1)),
            # Pairs of two equal responses (online: the policy drew the same twice): their
            # margin h is 0, so IPO / DPO / SLiC take no gradient from them.
            "identical_pairs": jnp.mean(same_responses(batch.chosen, batch.chosen_mask,
                                                       batch.rejected, batch.rejected_mask)),
            "tokens": (2 * batch.prompt_mask.sum() + masks.sum()).astype(jnp.float32),
        }

    return loss_fn


def make_policy_update(config, graphdef, ref_graphdef, stop_ids, mesh, rules,
                       state_shardings, batch_shardings, ref_shardings):
    """The policy's update step, `update(state, batch, {"reference": params})`. Its learning
    rate and beta are inputs of the program, not constants: a study's runs that differ only
    in them (a sweep, online beside offline) compile it once, and in one process trace it
    once (`program_cache`)."""
    update = _policy_update(graphdef, ref_graphdef, stop_ids, schedule_fields(config),
                            config.loss, config.microbatches, mesh,
                            program_cache.rules_key(rules), program_cache.shardings_key(
                                (state_shardings, batch_shardings, ref_shardings)))
    return update.bind({"learning_rate": config.learning_rate, "beta": config.beta})


@program_cache.cached
def _policy_update(graphdef, ref_graphdef, stop_ids, schedule: tuple, loss: str,
                   microbatches: int, mesh, rules, shardings_key):
    optimizer = ConfigDict(dict(schedule))
    state_shardings, batch_shardings, ref_shardings = program_cache.shardings_of(shardings_key)
    return make_update_step(
        graphdef, lambda s: make_optimizer(optimizer, learning_rate=s["learning_rate"]),
        lambda s: make_policy_loss(loss, s["beta"], stop_ids, ref_graphdef), mesh, rules,
        state_shardings, batch_shardings, {"reference": ref_shardings},
        microbatches=microbatches, name="policy_update", row_mean_loss=True,
        settings={"learning_rate": 0.0, "beta": 1.0})  # placeholders: `bind` gives the values


def sampling_config(config, tokenizer) -> SamplingConfig:
    s = config.sampling
    return SamplingConfig(max_new_tokens=config.data.response_len, temperature=s.temperature,
                          top_k=s.top_k, top_p=s.top_p, eos_id=tokenizer.eos_id,
                          pad_id=tokenizer.pad_id, stop_ids=stop_ids_beyond_eos(tokenizer))


def run(config, workdir: str):
    if common.finished(config, workdir):
        return
    rt = common.runtime(config, workdir)
    check_inputs(config, rt, [workdir])  # every frozen input, before anything is compiled
    policy, reference = starting_models(config, rt)
    ref_graphdef, ref_params = nnx.split(reference)
    with sharding.use(rt.mesh, rt.rules):
        ref_shardings = sharding.state_shardings(ref_params, rt.mesh)
    tx = make_optimizer(config)
    graphdef, state, shardings = init_train_state(policy, tx, rt.mesh, rt.rules)
    update = make_policy_update(config, graphdef, ref_graphdef, rt.tokenizer.stop_ids, rt.mesh,
                                rt.rules, shardings, rt.batch_shardings(PreferenceBatch),
                                ref_shardings)

    ckpt = Checkpointer(common.checkpoint_dir(workdir), config.max_to_keep)
    source, data_iterator, recorder = make_source(config, rt, policy, workdir)
    rng = jax.random.key(config.seed)
    if ckpt.latest_step() is not None:
        state, rng, _ = ckpt.restore(state, shardings, data_iterator, check=lambda saved: (
            common.check_resume(saved, "lm", config.model, rt, workdir)))
    if isinstance(source, OnlineSource):
        source.step = int(jax.device_get(state.step))  # stream records carry the loop's step
    if recorder is not None:
        recorder.resume_from(int(jax.device_get(state.step)))

    def step(state, batch, key):
        state, metrics = update(state, batch, {"reference": ref_params})
        return state, {**metrics, **source.stats}

    evaluate = None
    if config.eval.golden_checkpoint:
        evaluator = make_evaluator(config, rt, policy, ref_params)
        win_rates = stopping.logged(workdir, "eval/win_rate", int(jax.device_get(state.step)))

        def evaluate(s):
            scores, outcomes = evaluator.evaluate(s.params)
            run_dir.write_outcomes(workdir, int(jax.device_get(s.step)), outcomes)
            win_rates.append(scores["win_rate"])
            margin = config.eval.get("stop_margin", 0.0)  # in a config only where set
            if stopping.turned(win_rates, config.eval.stop_after_falls, margin):
                return scores, (f"the golden win rate has been below its best "
                                f"{max(win_rates):.3f}{f' by over {margin:g}' if margin else ''} "
                                f"at {config.eval.stop_after_falls} evaluations")
            if stopping.over_cap(scores["kl"], config.eval.kl_cap):
                return scores, f"KL {scores['kl']:.2f} is past the cap {config.eval.kl_cap:g}"
            return scores, ""

    loop = Loop(config, workdir, update=step,
                next_batch=lambda s, key: source.next_batch(s.params, key),
                checkpointer=ckpt, meta=common.meta("lm", config.model, rt),
                data_iterator=data_iterator,
                on_checkpoint=recorder.seal if recorder is not None else None,
                evaluate=evaluate,
                evaluate_at_start=True,
                progress_keys=("loss", "kl_sequence", "classifier_accuracy"))
    state, _ = loop.run(state, rng)
    ckpt.close()
    return state


def check_inputs(config, rt, workdirs: list[str]):
    """Fail before any compile if a frozen input (SFT start, proxy, golden judge, opponent)
    cannot provide the configured model, or (a resume) is another run than the one each of
    `workdirs` started from."""
    frozen = {}
    if not _pretrained_start(config):
        frozen["sft_checkpoint"] = ("lm", config.sft_checkpoint, config.model)
    if config.source == "online":
        frozen["proxy_checkpoint"] = ("preference", config.proxy_checkpoint, config.proxy_model)
    if config.eval.golden_checkpoint:
        frozen["eval.golden_checkpoint"] = ("preference", config.eval.golden_checkpoint,
                                            config.eval.golden_model)
    if config.eval.opponent_checkpoint:
        frozen["eval.opponent_checkpoint"] = ("lm", config.eval.opponent_checkpoint,
                                              config.eval.get("opponent_model") or config.model)
    identities = {field: common.check_frozen(kind, path, model, rt, f"config.{field}")
                  for field, (kind, path, model) in frozen.items()}
    if config.replay.stream:  # the online run that recorded it (its workdir)
        recorder = common.run_identity(os.path.dirname(os.path.abspath(config.replay.stream)))
        if recorder is not None:
            identities["replay.stream"] = recorder
    for workdir in workdirs:
        resume_guard.check_inputs(workdir, identities)


def starting_models(config, rt):
    """(policy, reference): the SFT checkpoint twice, or with no SFT run the pretrained model."""
    if _pretrained_start(config):
        return tuple(common.initial_model("lm", config, rt, config.seed) for _ in range(2))
    return tuple(common.load_frozen("lm", config.sft_checkpoint, config.model, rt)
                 for _ in range(2))


def _pretrained_start(config) -> bool:
    return not config.sft_checkpoint and bool(common.pretrained_checkpoint(config))


# What a tandem replay must share with the online run it replays to retrace it.
RETRACE_FIELDS = ("learning_rate", "beta", "loss", "num_steps", "warmup_steps",
                  "end_lr_fraction", "weight_decay", "grad_clip")


def retrace_differences(config, recorder_config) -> list[str]:
    """`field ours (the online run's X)` for each `RETRACE_FIELDS` field a replay sets apart."""
    return [f"{name} {config.get(name)} (the online run's {recorder_config.get(name)})"
            for name in RETRACE_FIELDS if config.get(name) != recorder_config.get(name)]


def _say_if_not_a_retrace(config):
    """A tandem replay under other settings than its online run's is the same pairs under
    another update, which may be the point (`coverage` replays at offline's learning rate)."""
    recorder = run_dir.read_json(os.path.dirname(os.path.abspath(config.replay.stream)),
                                 run_dir.CONFIG)
    differ = retrace_differences(config, recorder) if recorder else []
    if differ and jax.process_index() == 0:
        print(f"tandem replay of {config.replay.stream} with {', '.join(differ)}: the online "
              "run's pairs under another update, not a retrace of it", flush=True)


def make_source(config, rt, policy, workdir):
    """(source, checkpointable iterator, stream recorder or None)."""
    if config.source == "offline":
        if config.replay.stream:
            if config.replay.order == "tandem":
                _say_if_not_a_retrace(config)
            iterator = replay_iterator(config.replay.stream, rt.shape, config.replay.order,
                                       config.replay.window, config.seed, config.num_steps)
        else:
            comparisons = datasets.comparisons(config.data)
            iterator = dataset_iterator(comparisons["train"], rt.tokenizer, rt.shape,
                                        config.seed, config.data.num_threads)
        return OfflineSource(iterator, rt.global_batch), iterator, None
    proxy = common.load_frozen("preference", config.proxy_checkpoint, config.proxy_model, rt)
    prompts = datasets.prompts(config.data)["train"]
    iterator = iter(pipelines.prompt_pipeline(prompts, rt.tokenizer, rt.shape, seed=config.seed,
                                              num_threads=config.data.num_threads))
    recorder = (StreamRecorder(os.path.join(workdir, run_dir.STREAM))
                if config.record_stream else None)
    source = OnlineSource(iterator, rt.global_batch, policy, proxy, rt.mesh, rt.rules,
                          sampling_config(config, rt.tokenizer), recorder,
                          microbatches=config.microbatches)
    return source, iterator, recorder


def make_evaluator(config, rt, policy, sft_params) -> Evaluator:
    """Win rate vs the opponent (golden judge), KL to SFT, classifier accuracy, drift, on the
    test split's first `eval.prompts` prompts (from `eval.first_prompt`, where a config sets
    it: the study's test stage reads the ones after those every run's evaluations read)."""
    e, d = config.eval, config.data
    golden = common.load_frozen("preference", e.golden_checkpoint, e.golden_model, rt)
    opponent, opponent_lm = sft_params, None
    if e.opponent_checkpoint and e.get("opponent_model"):  # another architecture
        opponent_lm = common.load_frozen("lm", e.opponent_checkpoint, e.opponent_model, rt)
        opponent = None
    elif e.opponent_checkpoint:
        opponent = nnx.state(common.load_frozen("lm", e.opponent_checkpoint, config.model, rt))

    def fixed(rows: int) -> pipelines.BatchShape:
        return pipelines.BatchShape(rows, d.prompt_len, d.response_len,
                                    sharding.process_rows(rt.mesh, rt.rules, rows))

    prompt_source = datasets.prompts(d)["test"]
    first = e.get("first_prompt", 0)
    count = min(e.prompts, len(prompt_source) - first)
    prompt_source = pipelines.Window(prompt_source, first, count)
    prompts = next(iter(pipelines.prompt_pipeline(prompt_source, rt.tokenizer, fixed(count),
                                                  seed=0, shuffle=False, num_epochs=1)))
    texts = [pipelines.as_text(prompt_source[i]["prompt"]) for i in range(count)]
    pairs = None
    if e.pairs:
        pair_source = datasets.comparisons(d)["validation"]
        n = min(e.pairs, len(pair_source))
        pairs = rt.global_batch(next(iter(pipelines.preference_pipeline(
            pair_source, rt.tokenizer, fixed(n), seed=0, shuffle=False, num_epochs=1))))
    world = datasets.world_config(d) if d.kind == "synthetic" else None
    return Evaluator(lm=policy, sft_params=sft_params, golden=golden, opponent_params=opponent,
                     prompts=rt.global_batch(prompts), pairs=pairs, mesh=rt.mesh, rules=rt.rules,
                     sampling=sampling_config(config, rt.tokenizer), kl_prompts=e.kl_prompts,
                     tokenizer=rt.tokenizer, prompt_texts=texts, world=world, seed=config.seed,
                     opponent_lm=opponent_lm, first_prompt=first)
