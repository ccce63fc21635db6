"""Runs that differ only in seed, learning rate, beta or loss, trained as one compiled program.

Such runs share every shape, so their train states are stacked on a leading "run" axis and the
update step, the sampler and the proxy's ranking are `vmap`ped over it: one program per step
for the whole sweep instead of one per run, split over the mesh's `data` axis. What it saves is
compiles and processes (one program, not one per learning rate) and, where the runs take one
batch (`shared_batch`: an offline sweep), the frozen reference's forward pass over it, done once
for the stack; a step of n stacked runs still costs most of n steps on a 2-core CPU, where a
mini step is compute, not overhead (8 runs: about 6 steps; `bench/stacked_runs.py`). An
accelerator that one small run leaves idle is where a stack should pay; that is not measured
yet. The study trains its offline sweeps this way with `sweep.stack_runs` (`policy_stack.py`).

    runs = [RunSettings(1e-3, 0.1, "ipo"), RunSettings(5e-4, 0.5, "dpo")]
    update = make_stacked_policy_update(config, runs, graphdef, ref_graphdef, stop_ids, mesh,
                                        rules, state_shardings, batch_shardings, ref_shardings)
    states = stack([state] * len(runs), state_shardings)  # all from the same SFT policy
    states, metrics = update(states, stack(batches, batch_shardings), {"reference": ref})
    unstack(states)[1]                       # run 1 alone, as a separate run would hold it

The settings are inputs of the program, not constants in it, so one compiled step serves any
values. What the runs share (the frozen reference, the proxy) is passed once, unstacked. The
learning-rate schedule keeps the config's shape (warm-up, steps, end fraction) for every run;
runs of different lengths do not stack. Results equal separate runs' within float tolerance
(tests/test_stacked.py): a batched matmul may sum in another order, and a shared batch's
reference log-probs, computed unbatched, round apart from the policy's by ~1e-6 while the
policy is still the reference (so that step's margins are not exact ties).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alignment_gap import losses, sharding
from alignment_gap.batches import PreferenceBatch
from alignment_gap.errors import ConfigError
from alignment_gap.sampling import SampleOutput, SamplingConfig, sample
from alignment_gap.sources import rank_pairs
from alignment_gap.train.policy import make_policy_loss
from alignment_gap.train.state import make_optimizer, update_fn

RUN_AXIS = "data"  # The mesh axis the stacked runs are split over.
RUNS = "runs"  # The vmap axis's name, for reductions over the runs.


@dataclasses.dataclass(frozen=True)
class RunSettings:
    learning_rate: float
    beta: float
    loss: str = "ipo"


def settings_arrays(runs: list[RunSettings]) -> dict:
    """The settings as the program's input: one entry per run on the leading axis."""
    for run in runs:
        if run.loss not in losses.POLICY_LOSSES:
            raise ValueError(f"loss {run.loss!r} is unknown; choose one of "
                             f"{losses.POLICY_LOSSES}")
    return {"learning_rate": jnp.asarray([r.learning_rate for r in runs], jnp.float32),
            "beta": jnp.asarray([r.beta for r in runs], jnp.float32),
            "loss": jnp.asarray([losses.POLICY_LOSSES.index(r.loss) for r in runs], jnp.int32)}


def stack(trees, shardings=None):
    """Trees of equal structure -> one tree whose leaves gain a leading run axis, placed as
    the stacked programs take them when `shardings` (one run's) are given."""
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)
    return stacked if shardings is None else jax.device_put(stacked,
                                                            stacked_shardings(shardings))


def unstack(tree) -> list:
    """Inverse of `stack`."""
    n = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def _without(entry, axis):
    """A PartitionSpec entry (or a rule's mesh axes) with mesh axis `axis` taken out."""
    if entry == axis:
        return None
    if isinstance(entry, (tuple, list)):
        kept = tuple(a for a in entry if a != axis)
        return kept if len(kept) > 1 else (kept[0] if kept else None)
    return entry


def stacked_shardings(shardings):
    """One run's NamedShardings with the run axis in front, split over the `RUN_AXIS` mesh
    axis (which then shards nothing inside a run: a run's batch is split over the others)."""
    return jax.tree.map(lambda s: NamedSharding(s.mesh, P(RUN_AXIS, *(
        _without(e, RUN_AXIS) for e in s.spec))), shardings)


def run_rules(rules):
    """The logical-axis rules one run is traced under: `RUN_AXIS` left out."""
    return tuple((name, _without(axes, RUN_AXIS)) for name, axes in rules)


def check_runs(n: int, mesh):
    if n % mesh.shape[RUN_AXIS]:
        raise ConfigError(f"{n} stacked runs do not divide over the mesh's {RUN_AXIS!r} axis "
                          f"of {mesh.shape[RUN_AXIS]} devices; stack a multiple of it")


def inner_shardings(shardings):
    """One run's shardings inside the vmapped program: the run axis's mesh axis left out (also
    where a batch every run shares is placed: whole on each of the run axis's devices)."""
    return jax.tree.map(lambda s: NamedSharding(s.mesh, P(*(
        _without(e, RUN_AXIS) for e in s.spec))), shardings)


def _program(fn, mesh, rules, in_shardings, out_shardings, donate_argnums=()):
    """`fn` (already vmapped) jitted, called under the rules a run is traced with."""
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=donate_argnums)

    def call(*args):
        with sharding.use(mesh, run_rules(rules)):
            return jitted(*args)

    call.jitted = jitted
    return call


def _vmap(fn, in_axes=0):
    return jax.vmap(fn, in_axes=in_axes, axis_name=RUNS, spmd_axis_name=RUN_AXIS)


def make_stacked_update_step(graphdef, make_tx, make_loss, mesh, rules, state_shardings,
                             batch_shardings, extras_shardings=None, microbatches: int = 1,
                             name: str = "stacked_update", shared_batch: bool = False):
    """`step(states, batches, extras, settings) -> (states, metrics)` over stacked runs.

    `make_tx(settings)` and `make_loss(settings)` build one run's optimizer and loss from its
    row of `settings` (traced scalars); `extras` are shared by every run. Shardings are one
    run's (as `make_update_step` takes them). Metrics come back with the run axis in front.
    The states are donated, as in `make_update_step`. With `shared_batch` every run takes the
    same batch (one run's, no run axis): what the loss computes from the batch and `extras`
    alone, such as a frozen reference's log-probs, is then computed once for the stack, since
    `vmap` batches only what depends on a run's own state.
    """

    def one_run(state, batch, settings, extras):
        step = update_fn(graphdef, make_tx(settings), make_loss(settings), microbatches,
                         inner_shardings(state_shardings.params))
        return step(state, batch, extras)

    batch_axis = None if shared_batch else 0

    def step(states, batches, extras, settings):
        return _vmap(one_run, in_axes=(0, batch_axis, 0, None))(states, batches, settings,
                                                                extras)

    step.__name__ = name
    states = stacked_shardings(state_shardings)
    runs = stacked_shardings(NamedSharding(mesh, P()))
    batches = (inner_shardings if shared_batch else stacked_shardings)(batch_shardings)
    return _program(step, mesh, rules, (states, batches, extras_shardings, runs),
                    (states, runs), donate_argnums=0)


def make_stacked_policy_update(config, runs: list[RunSettings], graphdef, ref_graphdef,
                               stop_ids, mesh, rules, state_shardings, batch_shardings,
                               ref_shardings, microbatches: int = 1, shared_batch: bool = False):
    """The policy trainer's update step over stacked runs, each with its own learning rate,
    beta and loss; `update(states, batches, {"reference": params})`. With `shared_batch`
    (an offline sweep: one data order) `batches` is the one batch every run takes, and the
    reference's log-probs of it are computed once, not once per run."""
    check_runs(len(runs), mesh)
    settings = settings_arrays(runs)
    step = make_stacked_update_step(
        graphdef, lambda s: make_optimizer(config, learning_rate=s["learning_rate"]),
        lambda s: make_policy_loss(s["loss"], s["beta"], stop_ids, ref_graphdef),
        mesh, rules, state_shardings, batch_shardings, {"reference": ref_shardings},
        microbatches, name="stacked_policy_update", shared_batch=shared_batch)

    def update(states, batches, extras):
        return step(states, batches, extras, settings)

    update.jitted, update.settings = step.jitted, settings  # to lower it (tests/test_stacked.py)
    return update


def stacked_sampler(graphdef, mesh, rules, params_shardings, cfg: SamplingConfig,
                    samples_per_prompt: int = 1, name: str = "stacked_sample"):
    """`sample(params, prompts, prompt_masks, keys)` for stacked runs: each run samples from
    its own parameters, prompts and key (`Sampler` for one run). The decode loop runs until
    every run's rows are done."""
    rows = stacked_shardings(sharding.batch_sharding(mesh, rules, 2))

    def run(params, prompts, prompt_masks, keys):
        return _vmap(lambda *a: sample(nnx.merge(graphdef, a[0]), *a[1:], cfg,
                                       samples_per_prompt=samples_per_prompt, run_axis=RUNS))(
            params, prompts, prompt_masks, keys)

    run.__name__ = name
    return _program(run, mesh, rules, (stacked_shardings(params_shardings), rows, rows,
                                       stacked_shardings(NamedSharding(mesh, P()))),
                    SampleOutput(rows, rows, rows))


def stacked_rank(proxy, mesh, rules, microbatches: int = 1, name: str = "stacked_rank"):
    """`rank(proxy_state, prompts, prompt_masks, tokens, masks) -> PreferenceBatch` for stacked
    runs' samples (what `sources.rank_pairs` gives each run), the one frozen proxy shared by
    all."""
    proxy_graphdef, proxy_state = nnx.split(proxy)
    rows = stacked_shardings(sharding.batch_sharding(mesh, rules, 2))
    with sharding.use(mesh, rules):
        proxy_shardings = sharding.state_shardings(proxy_state, mesh)

    def run(proxy_state, prompts, prompt_masks, tokens, masks):
        # One proxy for every run, and rows do not interact: the runs' pairs are one batch,
        # scored in slices of one run's slice size (`microbatches` per run). At the mini
        # shape 4 runs ranked in about 6x one run's time as a vmap over the runs (all rows at
        # once), 4.1-4.3x in slices (bench/RESULTS.md).
        runs, b = prompts.shape[:2]
        merged = lambda x: x.reshape(runs * x.shape[1], *x.shape[2:])  # samples stay by prompt
        batch = rank_pairs(nnx.merge(proxy_graphdef, proxy_state), merged(prompts),
                           merged(prompt_masks), merged(tokens), merged(masks),
                           microbatches * runs)
        return jax.tree.map(lambda x: x.reshape(runs, b, *x.shape[1:]), batch)

    run.__name__ = name
    return _program(run, mesh, rules, (proxy_shardings,) + (rows,) * 4,
                    PreferenceBatch(*[rows] * 6))
