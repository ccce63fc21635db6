"""Train state and the one jitted, sharded, state-donating update step every trainer uses.

A trainer supplies `loss_fn(model, batch, extras) -> (loss, metrics)`; `make_update_step` turns
it into `step(state, batch, extras) -> (state, metrics)`, compiled once with explicit in/out
shardings taken from the parameters' logical annotations, the train state donated (updated in
place) and the extras (frozen models, keys) never donated. With `microbatches` k > 1 the
gradient is accumulated over k slices of the batch computed one after another: the same update,
with one slice's activations live at a time (to fit accelerator memory; on CPU, to fit cache).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alignment_gap import sharding
from alignment_gap.batches import split_rows

TOTALS = ("tokens",)  # Metrics that are totals: summed over micro-batches, not averaged.


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of the trainable model's Params.
    opt_state: Any  # optax state; mirrors params (and their sharding annotations).


def train_state_program(params, tx: optax.GradientTransformation, mesh, rules):
    """(jitted `params -> TrainState`, the state's shardings). `params` may be abstract. The
    parameters are donated: the train state takes over their buffers instead of copying them,
    so a model's arrays are not held twice."""
    with sharding.use(mesh, rules):
        opt_state = jax.eval_shape(tx.init, params)
        shardings = TrainState(NamedSharding(mesh, P()),
                               sharding.state_shardings(params, mesh),
                               sharding.state_shardings(opt_state, mesh))

    def init_train_state(params):
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    init = jax.jit(init_train_state, in_shardings=(shardings.params,), out_shardings=shardings,
                   donate_argnums=0)
    return init, shardings


def init_train_state(model, tx: optax.GradientTransformation, mesh, rules):
    """(graphdef, state, state shardings) for a model already created on `mesh`. The model's
    parameter arrays become the state's (donated): use `state.params` from here on."""
    graphdef, params = nnx.split(model)
    init, shardings = train_state_program(params, tx, mesh, rules)
    with sharding.use(mesh, rules):
        return graphdef, init(params), shardings


def make_update_step(graphdef, tx, loss_fn, mesh, rules, state_shardings, batch_shardings,
                     extras_shardings=None, microbatches: int = 1, name: str = "update"):
    """Jit `loss_fn(model, batch, extras) -> (loss, metrics)` into a donated update step.

    `extras` carries what the loss reads but never trains or donates: frozen models' states
    (the reference policy), RNG keys. Metrics gain `loss` and `grad_norm`; all are replicated.
    `microbatches` k: loss, gradient and metrics are the mean over k equal slices of the batch
    (totals such as `tokens` the sum), so a per-example mean loss gives the full batch's
    gradient; a ratio metric (`kl_per_token`) becomes the mean of the slices' ratios. Every
    slice sees the same `extras` (a PRNG key there would repeat its draws in each slice).
    `name` names the compiled program (`sft_update`, `policy_update`, ...).
    """

    step = update_fn(graphdef, tx, loss_fn, microbatches, state_shardings.params)
    step.__name__ = name  # the program's name in compile logs and the AOT report
    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(step, in_shardings=(state_shardings, batch_shardings, extras_shardings),
                     out_shardings=(state_shardings, replicated), donate_argnums=0)

    def run(state, batch, extras=None):
        with sharding.use(mesh, rules):
            return jitted(state, batch, extras)

    run.jitted = jitted
    return run


def update_fn(graphdef, tx, loss_fn, microbatches: int = 1, grad_shardings=None):
    """The pure `step(state, batch, extras) -> (state, metrics)` that `make_update_step` jits
    (and `train/stacked.py` vmaps over runs). `grad_shardings` places the accumulated gradient
    when `microbatches` > 1."""

    def loss_and_grads(params, batch, extras):
        def loss_of_params(params):
            return loss_fn(nnx.merge(graphdef, params), batch, extras)

        return jax.value_and_grad(loss_of_params, has_aux=True)(params)

    def step(state: TrainState, batch, extras):
        if microbatches == 1:
            (loss, metrics), grads = loss_and_grads(state.params, batch, extras)
        else:
            (loss, metrics), grads = _accumulate(loss_and_grads, state.params, batch, extras,
                                                 microbatches, grad_shardings)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        return TrainState(state.step + 1, params, opt_state), metrics

    return step


def _accumulate(loss_and_grads, params, batch, extras, k: int, grad_shardings):
    """((loss, metrics), grads) averaged over k slices of `batch`, one slice at a time."""

    slices = split_rows(batch, k)
    first = jax.tree.map(lambda x: x[0], slices)
    shapes = jax.eval_shape(loss_and_grads, params, first, extras)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    zeros = (zeros[0], jax.lax.with_sharding_constraint(zeros[1], grad_shardings))

    def add_slice(total, one_slice):
        return jax.tree.map(jnp.add, total, loss_and_grads(params, one_slice, extras)), None

    # A scan (not a Python loop) keeps the slices sequential: XLA may not interleave them.
    ((loss, metrics), grads), _ = jax.lax.scan(add_slice, zeros, slices)
    metrics = {name: value if name in TOTALS else value / k for name, value in metrics.items()}
    return (loss / k, metrics), jax.tree.map(lambda g: g / k, grads)


def make_optimizer(c, learning_rate=None) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine decay to `end_lr_fraction`, global-norm clipping.

    Reads `learning_rate`, `warmup_steps`, `num_steps`, `weight_decay`, `grad_clip`,
    `end_lr_fraction` from the trainer config. A `learning_rate` given here replaces the
    config's and may be traced (stacked runs, `train/stacked.py`): the schedule is then the
    config's shape with peak 1, scaled by it.
    """
    end = c.get("end_lr_fraction", 0.0)
    if learning_rate is None:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, c.learning_rate, c.warmup_steps, c.num_steps, end_value=c.learning_rate * end)
    else:
        unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, c.warmup_steps, c.num_steps,
                                                  end_value=end)
        schedule = lambda count: learning_rate * unit(count)
    parts = [optax.clip_by_global_norm(c.grad_clip)] if c.get("grad_clip", 0.0) else []
    parts.append(optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=c.get("weight_decay", 0.0)))
    return optax.chain(*parts)
