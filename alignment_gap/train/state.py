"""Train state and the one jitted, sharded, state-donating update step every trainer uses.

A trainer supplies `loss_fn(model, batch) -> (loss, metrics)`; `make_update_step` turns it into
`step(state, batch) -> (state, metrics)` compiled once with explicit in/out shardings taken from
the parameters' logical annotations, the train state donated (updated in place).
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of the trainable model's Params.
    opt_state: Any  # optax state; mirrors params (and their sharding annotations).


def init_train_state(model, tx: optax.GradientTransformation, mesh, rules):
    """(graphdef, state, state shardings) for a model already created on `mesh`."""
    graphdef, params = nnx.split(model)
    with sharding.use(mesh, rules):
        abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params,
                              jax.eval_shape(tx.init, params))
        shardings = TrainState(NamedSharding(mesh, P()),
                               sharding.state_shardings(params, mesh),
                               sharding.state_shardings(abstract.opt_state, mesh))
        state = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)),
                        out_shardings=shardings)(params)
    return graphdef, state, shardings


def make_update_step(graphdef, tx, loss_fn, mesh, rules, state_shardings, batch_shardings):
    """Jit `loss_fn` into a donated update step; metrics gain `loss` and `grad_norm`."""

    def step(state: TrainState, batch):
        def loss_of_params(params):
            return loss_fn(nnx.merge(graphdef, params), batch)

        (loss, metrics), grads = jax.value_and_grad(loss_of_params, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        return TrainState(state.step + 1, params, opt_state), metrics

    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, replicated), donate_argnums=0)

    def run(state, batch):
        with sharding.use(mesh, rules):
            return jitted(state, batch)

    run.jitted = jitted
    return run
