"""SFT trainer: next-token loss on responses (the paper trains on winners and losers alike).

    python -m alignment_gap.main --config configs/sft.py:mini --workdir workdir/sft
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from alignment_gap import logprobs, losses, sharding
from alignment_gap.batches import SFTBatch
from alignment_gap.checkpoint import Checkpointer
from alignment_gap.data import datasets, pipelines
from alignment_gap.train import common
from alignment_gap.train.loop import Loop
from alignment_gap.train.state import init_train_state, make_optimizer, make_update_step


def sft_loss(model, batch: SFTBatch, extras=None):
    per_token, _ = logprobs.sequence_logprobs(model, batch.prompt, batch.prompt_mask,
                                              batch.response, batch.response_mask)
    loss = losses.next_token_loss(per_token, batch.response_mask)
    return loss, {"tokens": jnp.sum(batch.response_mask).astype(jnp.float32)}


def eval_loss_program(graphdef, mesh):
    """Jitted `(params, batch) -> (summed negative log-likelihood, response tokens)`
    (replicated): the validation loss is their ratio over the whole split (`validation_loss`),
    every token weighing alike whichever batch holds it."""
    def sft_eval_loss(params, batch: SFTBatch):
        mean, metrics = sft_loss(nnx.merge(graphdef, params), batch)
        tokens = metrics["tokens"]
        return mean * jnp.maximum(tokens, 1.0), tokens  # next_token_loss's own denominator

    return jax.jit(sft_eval_loss, out_shardings=sharding.replicated(mesh))


def validation_loss(parts) -> float:
    """Mean negative log-likelihood per response token of `(summed NLL, tokens)` batches."""
    nll, tokens = (sum(float(x) for x in column) for column in zip(*parts, strict=True))
    return nll / max(tokens, 1.0)


def responses_field(d) -> tuple[str, ...]:
    if d.kind == "synthetic" and d.sft_source == "demonstrations":
        return ("response",)
    return ("chosen", "rejected")


def run(config, workdir: str):
    if common.finished(config, workdir):
        return
    rt = common.runtime(config, workdir)
    sources = datasets.demonstrations(config.data)
    fields = responses_field(config.data)
    common.check_split_sizes(config.data, sources, config.batch_size, "SFT",
                             per_record=len(fields))

    def pipeline(split, seed, **kw):
        return pipelines.sft_pipeline(sources[split], rt.tokenizer, rt.shape, seed=seed,
                                      responses=fields, num_threads=config.data.num_threads, **kw)

    model = common.initial_model("lm", config, rt, config.seed)
    tx = make_optimizer(config)
    graphdef, state, shardings = init_train_state(model, tx, rt.mesh, rt.rules)
    update = make_update_step(graphdef, tx, sft_loss, rt.mesh, rt.rules, shardings,
                              rt.batch_shardings(SFTBatch), name="sft_update")
    train_iter = iter(pipeline("train", config.seed))
    ckpt = Checkpointer(common.checkpoint_dir(workdir), config.max_to_keep)
    rng = jax.random.key(config.seed)
    if ckpt.latest_step() is not None:
        state, rng, _ = ckpt.restore(state, shardings, train_iter, check=lambda saved: (
            common.check_resume(saved, "lm", config.model, rt, workdir)))

    eval_loss = eval_loss_program(graphdef, rt.mesh)

    def evaluate(state):
        batches = pipeline("validation", 0, shuffle=False, num_epochs=1)
        batches = common.validation_batches(batches, config.eval_batches, rt.global_batch, "SFT")
        with sharding.use(rt.mesh, rt.rules):
            parts = [eval_loss(state.params, b) for b in batches]
        return {"loss": validation_loss(parts)}, False

    loop = Loop(config, workdir,
                update=lambda s, b, key: update(s, b),
                next_batch=lambda s, key: rt.global_batch(next(train_iter)),
                checkpointer=ckpt, meta=common.meta("lm", config.model, rt),
                data_iterator=train_iter, evaluate=evaluate)
    state, _ = loop.run(state, rng)
    ckpt.close()
    return state
