"""Offline policy runs that differ only in learning rate, beta or loss, trained as one stack.

An offline sweep is many runs of one shape: the same SFT start, data order (seed), length and
checkpoint schedule. `run(configs, workdirs)` trains them stacked on a run axis with one
compiled update step (`stacked.py`), reading each batch once and computing the reference's
log-probs of it once for the stack, and leaves every run's directory as `policy.run` leaves it
- config, metrics log, per-step evaluation outcomes, checkpoints (parameters, optimizer state,
data iterator, RNG) and the finished record - so the study's tables, its test stage and a
resume read them unchanged. Each run is evaluated with one shared
evaluator (its programs compiled once); the starting point, the same SFT policy for every run,
is evaluated once. Results equal separate runs' within float tolerance (tests/test_study.py).

    python -m alignment_gap.main --config configs/study.py:mini --workdir W \\
        --config.sweep.stack_runs=8       # the study's scheduler groups its offline runs

Resuming: runs at most one save apart (a kill between two runs' saves) resume together from
the earlier step, the later checkpoint dropped; runs further apart stack by step
(`resume_groups`). A run that diverges stops the stack, naming that run. On a 2-core CPU a
stack trains a sweep faster than its runs one after another (bench/stacked_stages.py), but not
n times: a step of 8 stacked runs costs about 6 steps of one there (bench/stacked_runs.py).
"""

from __future__ import annotations

import json
import logging
import os

import jax
from flax import nnx
from jax.experimental import multihost_utils

from alignment_gap import preemption, resume_guard, run_dir, sharding
from alignment_gap.batches import PreferenceBatch
from alignment_gap.checkpoint import Checkpointer
from alignment_gap.errors import CheckpointDamaged, ConfigError
from alignment_gap.preemption import Preempted
from alignment_gap.train import common, policy, stacked
from alignment_gap.train.loop import RunLog, save_steps
from alignment_gap.train.state import init_train_state, make_optimizer

STACKED_FIELDS = ("learning_rate", "beta", "loss")  # what may differ between stacked runs
PROGRESS_KEYS = ("loss", "kl_sequence", "classifier_accuracy")


def stack_key(config) -> str:
    """Runs whose keys are equal can be trained as one stack; "" for a run that cannot (an
    online run samples from its own policy; a stop rule ends runs at different steps)."""
    if config.get("source") != "offline":
        return ""
    if config.eval.get("stop_after_falls", 0) or config.eval.get("kl_cap", 0.0):
        return ""
    shared = {k: v for k, v in config.to_dict().items() if k not in STACKED_FIELDS}
    return json.dumps(shared, sort_keys=True, default=str)


def run(configs: list, workdirs: list[str]):
    """Train the unfinished runs among `configs` (each into its workdir) stacked; runs that
    resume from different steps (`resume_groups`) stack by step, and runs left over from a
    multiple of the mesh's run axis are trained one by one."""
    todo = [(c, w) for c, w in zip(configs, workdirs, strict=True)
            if not common.finished(c, w)]
    if not todo:
        return
    keys = {stack_key(c) for c, _ in todo}
    if "" in keys or len(keys) > 1:
        raise ConfigError(f"runs {[w for _, w in todo]} do not stack: stacked runs are offline "
                          f"runs without stop rules that differ only in {STACKED_FIELDS}")
    mesh_runs = sharding.make_mesh(todo[0][0].mesh).shape[stacked.RUN_AXIS]
    for start, group in resume_groups(todo):
        cut = len(group) - len(group) % mesh_runs
        alone = group[cut if cut >= 2 else 0:]
        if cut >= 2:
            try:
                _run_stack([c for c, _ in group[:cut]], [w for _, w in group[:cut]], start)
            except CheckpointDamaged as e:  # raised before any step: nothing was changed
                logging.warning("%s; these runs resume one by one (each sets its damaged "
                                "checkpoint aside)", e)
                alone = group
        for config, workdir in alone:
            policy.run(config, workdir)


def resume_groups(runs: list[tuple]) -> list[tuple[int, list]]:
    """[(step, runs that resume from it)]. Runs at most one save apart (a kill between two
    runs' saves) all resume from the earliest step, the later checkpoints dropped; runs further
    apart (one added to the sweep, another `stack_runs`) lose nothing: each step's runs stack
    on their own."""
    saved = []
    for config, workdir in runs:
        ckpt = Checkpointer(common.checkpoint_dir(workdir), config.max_to_keep)
        saved.append(set(ckpt.manager.all_steps()))
        ckpt.close()
    latest = [max(steps, default=0) for steps in saved]
    start = min(latest)
    next_save = min((k for k in save_steps(runs[0][0]) if k > start), default=start)
    if all(step <= next_save and (start in steps or not start)
           for step, steps in zip(latest, saved, strict=True)):
        return [(start, runs)]
    by_step: dict[int, list] = {}
    for run, step in zip(runs, latest, strict=True):
        by_step.setdefault(step, []).append(run)
    return sorted(by_step.items())


def _run_stack(configs: list, workdirs: list[str], start: int):
    c, n = configs[0], len(configs)
    for config, workdir in zip(configs, workdirs, strict=True):  # before any is rewritten
        resume_guard.check(workdir, config)
    rt = common.runtime(c, workdirs[0])
    for config, workdir in zip(configs[1:], workdirs[1:], strict=True):
        run_dir.write_json(workdir, run_dir.CONFIG, config.to_dict())
    policy.check_inputs(c, rt, workdirs)
    sft, reference = policy.starting_models(c, rt)
    ref_graphdef, ref_params = nnx.split(reference)
    with sharding.use(rt.mesh, rt.rules):
        ref_shardings = sharding.state_shardings(ref_params, rt.mesh)
    graphdef, start_state, shardings = init_train_state(sft, make_optimizer(c), rt.mesh, rt.rules)
    batch_shardings = rt.batch_shardings(PreferenceBatch)
    settings = [stacked.RunSettings(x.learning_rate, x.beta, x.loss) for x in configs]
    update = stacked.make_stacked_policy_update(
        c, settings, graphdef, ref_graphdef, rt.tokenizer.stop_ids, rt.mesh, rt.rules, shardings,
        batch_shardings, ref_shardings, c.microbatches, shared_batch=True)
    shared_batch_shardings = stacked.inner_shardings(batch_shardings)  # whole on each run

    ckpts = [Checkpointer(common.checkpoint_dir(w), x.max_to_keep)
             for x, w in zip(configs, workdirs, strict=True)]
    logs = []
    try:
        source, data_iterator, _ = policy.make_source(c, rt, sft, workdirs[0])
        rng, states = jax.random.key(c.seed), [start_state] * n
        if start:
            states, rng = _restore(ckpts, start, start_state, shardings, data_iterator,
                                   lambda saved, w: common.check_resume(saved, "lm", c.model,
                                                                        rt, w))
        else:  # a run may be one save ahead of one that saved nothing (a kill between saves)
            _drop_after(ckpts, 0)
        states = stacked.stack(states, shardings)
        sft_params = start_state.params if start == 0 else None  # for the step-0 evaluation
        del start_state
        meta = common.meta("lm", c.model, rt)
        labels = [f"[lr {x.learning_rate:g} beta {x.beta:g} {x.loss}]" for x in configs]
        evaluator = (policy.make_evaluator(c, rt, sft, ref_params) if c.eval.golden_checkpoint
                     else None)
        # After the evaluator's setup: the first logged window's steps/s is the steps' own
        # (the stack's rate, shown in every run's log).
        logs = [RunLog(x, w, ck, start)
                for x, w, ck in zip(configs, workdirs, ckpts, strict=True)]

        def one(i):
            """Run i's train state as a separate run holds it."""
            return jax.device_put(jax.tree.map(lambda x: x[i], states), shardings)

        if evaluator is not None and start == 0:  # every run starts as the SFT policy,
            scores, outcomes = evaluator.evaluate(sft_params)  # scored once
            for workdir, log in zip(workdirs, logs, strict=True):
                run_dir.write_outcomes(workdir, 0, outcomes)
                log.writer.write(0, scores, prefix="eval/")
        last = [log.saved.get("metrics", {}) for log in logs]
        pending, saves = None, save_steps(c)
        for step in range(start + 1, c.num_steps + 1):
            rng, key = jax.random.split(rng)
            batch = source.next_batch(None, key)
            states, step_metrics = update(states, jax.device_put(batch, shared_batch_shardings),
                                          {"reference": ref_params})
            if pending is not None:
                last = _record(logs, labels, *pending)
            pending = (step, step_metrics)
            preempted = preemption.reached() and step < c.num_steps
            scheduled = step in saves
            if not (scheduled or preempted):
                continue
            last, pending = _record(logs, labels, *pending), None
            for i in range(n):  # one run's state apart at a time
                state = one(i)
                if evaluator is not None and scheduled:
                    scores, outcomes = evaluator.evaluate(state.params)
                    run_dir.write_outcomes(workdirs[i], step, outcomes)
                    logs[i].writer.write(step, scores, prefix="eval/")
                    last[i].update({f"eval/{k}": v for k, v in scores.items()})
                ckpts[i].save(state, rng, meta, data_iterator,
                              log=logs[i].saved_record(last[i], ""))
            for ck, log in zip(ckpts, logs, strict=True):
                ck.wait()
                ck.prune(saves)
                log.last_good = step
            if preempted:
                signal = preemption.requested() or "SIGTERM (to one of the processes)"
                for workdir, log in zip(workdirs, logs, strict=True):
                    run_dir.preempted(workdir, step, signal, log.window.added)
                raise Preempted(f"{signal} at step {step} of {c.num_steps}: saved the {n} "
                                f"stacked runs' checkpoints (e.g. {ckpts[0].path(step)}); run "
                                "the same command again to resume")
        for workdir, metrics in zip(workdirs, last, strict=True):
            run_dir.finish(workdir, c.num_steps, metrics=metrics, stopped_early=False)
    finally:
        for log in logs:
            log.close()
        for ck in ckpts:
            ck.close()


def _restore(ckpts, start, like, shardings, data_iterator, check) -> tuple[list, object]:
    """(each run's train state at `start`, the RNG); the data iterator is restored in place.
    Only once every run is restored are the steps past `start` dropped: an unreadable
    checkpoint (`CheckpointDamaged`) leaves every directory as it was."""
    states, rng = [], None
    for i, ck in enumerate(ckpts):
        state, run_rng, _ = ck.restore(like, shardings, data_iterator if i == 0 else None,
                                       step=start, check=lambda saved, ck=ck: check(
                                           saved, os.path.dirname(ck.directory)))
        states.append(state)
        rng = run_rng if rng is None else rng
    _drop_after(ckpts, start)
    return states, rng


def _drop_after(ckpts, start: int):
    """Delete the checkpoints past `start` (the stack trains those steps again)."""
    for ck in ckpts:
        for step in ck.manager.all_steps():
            if step > start:
                ck.manager.delete(step)


def _record(logs, labels, step, step_metrics) -> list[dict]:
    """Split one stacked step's metrics (a run axis in front, split over processes) into each
    run's log."""
    host = multihost_utils.process_allgather(step_metrics, tiled=True)
    return [log.record(step, {k: v[i] for k, v in host.items()}, PROGRESS_KEYS, label)
            for i, (log, label) in enumerate(zip(logs, labels, strict=True))]
