"""Train state and the one jitted, sharded, state-donating update step every trainer uses.

A trainer supplies `loss_fn(model, batch, extras) -> (loss, metrics)`; `make_update_step` turns
it into `step(state, batch, extras) -> (state, metrics)`, compiled once with explicit in/out
shardings taken from the parameters' logical annotations, the train state donated (updated in
place) and the extras (frozen models, keys) never donated. With `microbatches` k > 1 the
gradient is accumulated over k slices of the batch computed one after another: the same update,
with one slice's activations live at a time (to fit accelerator memory; on CPU, to fit cache).
With a loss that is a mean over rows, a small model's gradient on a one-device CPU mesh is
computed in side-by-side groups of rows (`cpu_groups`), then applied by a second program; on
several CPU devices holding the parameters whole, each device sums its slices' gradients and
one all-reduce averages the devices' (`_per_device_gradient`).
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

from alignment_gap import cpu_groups, sharding
from alignment_gap.batches import split_rows

# Metrics that are totals: summed over micro-batches, groups and devices, not averaged.
TOTALS = ("tokens", "kl_total", "response_tokens")
# Ratio metrics: name -> (numerator, denominator), both totals, divided once the whole batch's
# are summed (a mean of the slices' ratios would move with the slicing).
RATIOS = {"kl_per_token": ("kl_total", "response_tokens")}


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
                     extras_shardings=None, microbatches: int = 1, name: str = "update",
                     row_mean_loss: bool = False, settings: dict[str, float] | None = None):
    """Jit `loss_fn(model, batch, extras) -> (loss, metrics)` into a donated update step.

    `extras` carries what the loss reads but never trains or donates: frozen models' states
    (the reference policy), RNG keys. Metrics gain `loss` and `grad_norm`; all are replicated.
    `microbatches` k: loss, gradient and metrics are the mean over k equal slices of the batch
    (totals such as `tokens` the sum), so a per-example mean loss gives the full batch's
    gradient; a ratio metric (`RATIOS`: `kl_per_token`) divides the whole batch's totals. Every
    slice sees the same `extras` (a PRNG key there would repeat its draws in each slice).
    `name` names the compiled program (`sft_update`, `policy_update`, ...). `row_mean_loss`:
    the loss is a mean over the batch's rows (pairs), so equal groups of rows average to the
    batch's loss and gradient, which on a one-device CPU mesh a small model then computes in
    side-by-side groups (`_GroupedUpdate`; a token-weighted mean would not average so) and
    several CPU devices holding the parameters whole compute device by device
    (`_per_device_gradient`), without a PRNG key among the extras in either case.
    `settings` (name -> float: a learning rate, beta): inputs of the program instead of
    constants in it, so runs that differ only in them share one compiled program (a sweep's
    later points read it from the persistent compilation cache). `tx` and `loss_fn` are then
    functions of the settings (traced float32 scalars) that return the optimizer and the loss;
    `step.bind(values)` is a step of the same programs that feeds them other values.
    """

    make_tx, make_loss = (tx, loss_fn) if settings else (lambda s: tx, lambda s: loss_fn)
    replicated = NamedSharding(mesh, P())
    in_shardings = (state_shardings, batch_shardings, extras_shardings,
                    replicated if settings else None)

    per_device = row_mean_loss and sharding.whole_on_every_cpu_device(
        mesh, rules, state_shardings.params)

    def step(state, batch, extras, settings):
        if per_device and not _holds_keys(extras):
            gradient = _per_device_gradient(graphdef, make_loss, microbatches, mesh, rules)
            (loss, metrics), grads = gradient(state.params, batch, extras, settings)
            return apply_gradient(make_tx(settings), state, loss, metrics, grads)
        one = update_fn(graphdef, make_tx(settings), make_loss(settings), microbatches,
                        state_shardings.params)
        return one(state, batch, extras)

    step.__name__ = name  # the program's name in compile logs and the AOT report
    jitted = jax.jit(step, in_shardings=in_shardings,
                     out_shardings=(state_shardings, replicated), donate_argnums=0)
    grouped = _GroupedUpdate(graphdef, make_tx, make_loss, microbatches, mesh, rules, name,
                             in_shardings) if row_mean_loss else None

    def bind(values: dict[str, float] | None):
        arrays = []  # the settings as arrays, made at the first call (AOT meshes have none)

        def run(state, batch, extras=None):
            if values and not arrays:
                arrays.append(jax.device_put({k: jnp.float32(v) for k, v in values.items()},
                                             replicated))
            inputs = arrays[0] if arrays else None
            if grouped is not None and grouped.takes(state.params, batch, extras):
                return grouped(state, batch, extras, inputs)
            with sharding.use(mesh, rules):
                return jitted(state, batch, extras, inputs)

        run.jitted = jitted  # the whole batch in one program (what the AOT tool compiles)
        run.grouped = grouped
        run.settings = dict(values or {})  # the values the program's settings input takes
        run.bind = bind  # the same programs with other settings (`train/policy.py`)
        return run

    return bind(settings)


def update_fn(graphdef, tx, loss_fn, microbatches: int = 1, grad_shardings=None):
    """The pure `step(state, batch, extras) -> (state, metrics)` that `make_update_step` jits
    (and `train/stacked.py` vmaps over runs). `grad_shardings` places the accumulated gradient
    when `microbatches` > 1."""
    gradient = gradient_fn(graphdef, loss_fn, microbatches, grad_shardings)

    def step(state: TrainState, batch, extras):
        (loss, metrics), grads = gradient(state.params, batch, extras)
        return apply_gradient(tx, state, loss, metrics, grads)

    return step


def gradient_fn(graphdef, loss_fn, microbatches: int = 1, grad_shardings=None):
    """The pure `(params, batch, extras) -> ((loss, metrics), grads)`, averaged over
    `microbatches` slices of the batch computed one after another."""

    def loss_and_grads(params, batch, extras):
        def loss_of_params(params):
            return loss_fn(nnx.merge(graphdef, params), batch, extras)

        return jax.value_and_grad(loss_of_params, has_aux=True)(params)

    def gradient(params, batch, extras):
        if microbatches == 1:
            return loss_and_grads(params, batch, extras)
        return _accumulate(loss_and_grads, params, batch, extras, microbatches, grad_shardings)

    return gradient


def apply_gradient(tx, state: TrainState, loss, metrics, grads):
    """The optimizer's step: (next state, metrics with `loss` and `grad_norm`, and each of
    `RATIOS` in place of its totals)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    for name, (numerator, denominator) in RATIOS.items():
        if numerator in metrics:
            metrics[name] = metrics.pop(numerator) / jnp.maximum(metrics.pop(denominator), 1)
    return TrainState(state.step + 1, params, opt_state), metrics


def _mean_of_parts(parts, k: int):
    """((loss, metrics), grads) of the whole batch from its k equal parts': means, and the
    sums of `TOTALS`."""
    (loss, metrics), grads = jax.tree.map(lambda *x: sum(x[1:], x[0]), *parts)
    metrics = {name: value if name in TOTALS else value / k for name, value in metrics.items()}
    return (loss / k, metrics), jax.tree.map(lambda g: g / k, grads)


class _GroupedUpdate:
    """The update of a small model on a one-device CPU mesh: the gradient of `cpu_groups`'
    side-by-side groups of rows, each group's from its own thread (in `microbatches` slices),
    then one program averages them (as `microbatches` would: totals are summed and each ratio
    metric divided once, the whole batch's) and applies the optimizer. Not where the extras
    hold a PRNG key, which every group would draw the same bits from. `make_tx` and
    `make_loss` map the settings input (or None) to the optimizer and the loss."""

    def __init__(self, graphdef, make_tx, make_loss, microbatches: int, mesh, rules,
                 name: str, in_shardings: tuple):
        self.microbatches, self.mesh, self.rules, self.groups = microbatches, mesh, rules, None
        state_shardings, batch_shardings, extras_shardings, settings_shardings = in_shardings
        replicated = NamedSharding(mesh, P())

        def group(params, batch, extras, settings, first):
            rows = jax.tree.map(lambda x: cpu_groups.group_rows(x, first, self.groups), batch)
            gradient = gradient_fn(graphdef, make_loss(settings), microbatches,
                                   state_shardings.params)
            return gradient(params, rows, extras)

        def apply(state, parts, settings):
            (loss, metrics), grads = _mean_of_parts(parts, len(parts))
            return apply_gradient(make_tx(settings), state, loss, metrics, grads)

        group.__name__, apply.__name__ = f"{name}_group", f"{name}_apply"
        # Explicit input shardings: a batch that arrives replicated (merged from the sampler's
        # groups) and one placed by rows (a dataset's) take the same program.
        self.group = jax.jit(group, in_shardings=(state_shardings.params, batch_shardings,
                                                  extras_shardings, settings_shardings,
                                                  replicated))
        self.apply = jax.jit(apply, out_shardings=(state_shardings, replicated),
                             donate_argnums=0)

    def takes(self, params, batch, extras) -> bool:
        if self.groups is None:  # fixed by the model's size, known at the first call
            self.groups = cpu_groups.default_groups(self.mesh, params)
        rows = jax.tree.leaves(batch)[0].shape[0]
        return (self.groups > 1 and rows % (self.groups * self.microbatches) == 0
                and not _holds_keys(extras))

    def __call__(self, state, batch, extras, settings=None):
        rows = jax.tree.leaves(batch)[0].shape[0]
        parts = cpu_groups.run_groups(self.group, (state.params, batch, extras, settings),
                                      self.groups, rows, rows, self.mesh, self.rules)
        with sharding.use(self.mesh, self.rules):
            return self.apply(state, parts, settings)


def _holds_keys(extras) -> bool:
    """Whether the extras hold a PRNG key, which groups of rows or devices would draw alike."""
    return any(jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
               for x in jax.tree.leaves(extras))


def _per_device_gradient(graphdef, make_loss, microbatches: int, mesh, rules):
    """`(params, batch, extras, settings) -> ((loss, metrics), grads)` of a row-mean loss on
    several CPU devices holding the parameters whole: each device computes its rows' gradient
    (in `microbatches` slices, summed locally) and one all-reduce averages the devices' (as
    `microbatches` would: totals are summed and each ratio metric divided once). The
    partitioned program all-reduces every slice's gradient, each a rendezvous of the devices'
    threads."""
    axes, devices = sharding.batch_axes(rules), sharding.batch_shards(mesh, rules)

    def gradient(params, batch, extras, settings):
        parts = gradient_fn(graphdef, make_loss(settings), microbatches)(params, batch, extras)
        return _mean_of_parts([jax.lax.psum(parts, axes)], devices)

    return sharding.per_device(gradient, mesh, (P(), sharding.rows_spec(rules), P(), P()), P())


def _accumulate(loss_and_grads, params, batch, extras, k: int, grad_shardings):
    """((loss, metrics), grads) averaged over k slices of `batch`, one slice at a time."""

    slices = split_rows(batch, k)
    first = jax.tree.map(lambda x: x[0], slices)
    shapes = jax.eval_shape(loss_and_grads, params, first, extras)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    if grad_shardings is not None:
        zeros = (zeros[0], jax.lax.with_sharding_constraint(zeros[1], grad_shardings))

    def add_slice(total, one_slice):
        return jax.tree.map(jnp.add, total, loss_and_grads(params, one_slice, extras)), None

    # A scan (not a Python loop) keeps the slices sequential: XLA may not interleave them.
    total, _ = jax.lax.scan(add_slice, zeros, slices)
    return _mean_of_parts([total], k)


def schedule_fields(c) -> tuple:
    """What `make_optimizer` reads from a trainer config besides the peak learning rate, as a
    hashable key (runs equal in it share an optimizer that takes the learning rate as input)."""
    return tuple((k, c.get(k, 0.0)) for k in ("warmup_steps", "num_steps", "end_lr_fraction",
                                                "grad_clip", "weight_decay"))


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
    # AdamW as `optax.adamw` composes it, the decay restricted to `decayed` parameters by a
    # stateless step: the optimizer state keeps adamw's tree, so checkpoints of runs saved
    # before the restriction still restore (optax's own mask adds a MaskedState).
    parts.append(optax.chain(optax.scale_by_adam(b1=0.9, b2=0.95),
                             decay_weights(c.get("weight_decay", 0.0)),
                             optax.scale_by_learning_rate(schedule)))
    return optax.chain(*parts)


def decay_weights(rate: float) -> optax.GradientTransformation:
    """Adds `rate * p` to the update of each `decayed` parameter p (AdamW's decoupled decay)."""
    def update(updates, state, params):
        if rate:
            updates = jax.tree.map(lambda u, p, on: u + rate * p if on else u, updates, params,
                                   decayed(params))
        return updates, state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def decayed(params):
    """Which parameters weight decay shrinks: weight matrices and embeddings, not norm scales
    or biases (as is usual: decaying a norm's scale pulls the layer towards zero output)."""
    def is_weight(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        name = next(n for n in reversed(names) if n != "value")
        return not (name == "scale" or name.endswith("bias"))
    return jax.tree_util.tree_map_with_path(is_weight, params)
