"""Pairwise preference-model trainer: the golden and the proxy model are this, configured twice.

Likelihood (Tang et al. 2024, App. A): `E[1/2 log r(x, yw, yl) + 1/2 log(1 - r(x, yl, yw))]`,
estimated without bias by showing each pair in a random order (a fair coin per example) with
target 1 when the winner comes first. Validation accuracy uses the both-order sign rule; training
stops when it has not improved for `patience` evaluations (the paper stops near the plateau).

    python -m alignment_gap.main --config configs/preference_model.py:golden_mini --workdir DIR
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignment_gap import losses, sharding
from alignment_gap.batches import PreferenceBatch
from alignment_gap.checkpoint import Checkpointer
from alignment_gap.data import datasets, pipelines
from alignment_gap.models.heads import both_order_margin
from alignment_gap.train import common, stopping
from alignment_gap.train.loop import Loop
from alignment_gap.train.state import init_train_state, make_optimizer, make_update_step


def random_order_loss(model, batch: PreferenceBatch, extras):
    """Binary cross-entropy of r(x, first, second) with the order drawn per example."""
    winner_first = jax.random.bernoulli(extras["key"], 0.5, (batch.prompt.shape[0],))
    pick = lambda a, b: jnp.where(winner_first[:, None], a, b)
    first, first_mask = pick(batch.chosen, batch.rejected), pick(batch.chosen_mask,
                                                                 batch.rejected_mask)
    second, second_mask = pick(batch.rejected, batch.chosen), pick(batch.rejected_mask,
                                                                   batch.chosen_mask)
    logits = model(batch.prompt, batch.prompt_mask, first, first_mask, second, second_mask)
    loss = jnp.mean(losses.preference_model_loss(logits, winner_first))
    accuracy = jnp.mean((logits > 0) == winner_first)
    return loss, {"accuracy": accuracy}


def sign_rule_accuracy(model, batch: PreferenceBatch):
    """Fraction of pairs where the both-order sign rule prefers the labelled winner, a tie
    (e.g. two identical responses) counting 1/2 as in the win rates."""
    margin = both_order_margin(model, batch.prompt, batch.prompt_mask, batch.chosen,
                               batch.chosen_mask, batch.rejected, batch.rejected_mask)
    return jnp.mean(losses.tie_half(margin))


def accuracy_program(graphdef, mesh):
    """Jitted `(params, batch) -> sign-rule accuracy` (replicated)."""
    def preference_accuracy(params, batch: PreferenceBatch):
        return sign_rule_accuracy(nnx.merge(graphdef, params), batch)

    return jax.jit(preference_accuracy, out_shardings=sharding.replicated(mesh))


def init_from_lm(pm, lm_run_dir: str, config, rt) -> None:
    """Copy a language model's backbone (e.g. the SFT policy) into the preference model."""
    common.check_frozen("lm", lm_run_dir, config.model, rt, "config.init_from")
    lm = common.load_frozen("lm", lm_run_dir, config.model, rt)
    nnx.update(pm.backbone, nnx.state(lm.backbone))  # segment embeddings and head stay fresh


def run(config, workdir: str):
    if common.finished(config, workdir):
        return
    rt = common.runtime(config, workdir)
    sources = datasets.comparisons(config.data)
    common.check_split_sizes(config.data, sources, config.batch_size, "comparisons")

    def pipeline(split, seed, **kw):
        return pipelines.preference_pipeline(sources[split], rt.tokenizer, rt.shape, seed=seed,
                                             num_threads=config.data.num_threads, **kw)

    model = common.initial_model("preference", config, rt, config.seed)
    if config.init_from:
        init_from_lm(model, config.init_from, config, rt)
    tx = make_optimizer(config)
    graphdef, state, shardings = init_train_state(model, tx, rt.mesh, rt.rules)
    update = make_update_step(graphdef, tx, random_order_loss, rt.mesh, rt.rules, shardings,
                              rt.batch_shardings(PreferenceBatch), {"key": rt.replicated()},
                              name="preference_update")
    train_iter = iter(pipeline("train", config.seed))
    ckpt = Checkpointer(common.checkpoint_dir(workdir), config.max_to_keep)
    rng = jax.random.key(config.seed)
    history: list[float] = []  # validation accuracy at each evaluation, for the plateau rule
    if ckpt.latest_step() is not None:
        state, rng, _ = ckpt.restore(state, shardings, train_iter, check=lambda saved: (
            common.check_resume(saved, "preference", config.model, rt, workdir)))
        history = stopping.logged(workdir, "eval/accuracy", int(jax.device_get(state.step)))

    accuracy = accuracy_program(graphdef, rt.mesh)

    def evaluate(state):
        batches = pipeline("validation", 0, shuffle=False, num_epochs=1)
        batches = common.validation_batches(batches, config.eval_batches, rt.global_batch,
                                            "comparisons")
        with sharding.use(rt.mesh, rt.rules):
            values = [float(accuracy(state.params, b)) for b in batches]
        score = float(np.mean(values))
        history.append(score)
        plateau = stopping.plateaued(history, config.patience, config.min_improvement)
        return {"accuracy": score}, "validation plateau" if plateau else False

    loop = Loop(config, workdir,
                update=lambda s, b, key: update(s, b, {"key": key}),
                next_batch=lambda s, key: rt.global_batch(next(train_iter)),
                checkpointer=ckpt, meta=common.meta("preference", config.model, rt),
                data_iterator=train_iter, evaluate=evaluate,
                progress_keys=("loss", "accuracy"))
    state, _ = loop.run(state, rng)
    ckpt.close()
    return state
