"""The training loop's schedule (`train/loop.py`) with a counting update, real orbax checkpoints
and a real run directory: where it evaluates and checkpoints, and that the extra steps change no
update."""

import json

import jax
import jax.numpy as jnp
import ml_collections

from alignment_gap.checkpoint import Checkpointer
from alignment_gap.train.loop import Loop
from alignment_gap.train.state import TrainState


def _run(workdir, **schedule):
    config = ml_collections.ConfigDict(dict(num_steps=12, log_every=3, **schedule))
    evaluated = []

    def update(state, batch, key):  # params: the sum of the batches; key: read, so it matters
        state = TrainState(step=state.step + 1, params={"w": state.params["w"] + batch},
                           opt_state={"m": state.opt_state["m"] + jax.random.uniform(key)})
        return state, {"loss": batch}

    def evaluate(state):
        evaluated.append(int(state.step))
        return {"win_rate": float(state.params["w"])}, ""

    state = TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(())},
                       opt_state={"m": jnp.zeros(())})
    ckpt = Checkpointer(str(workdir / "checkpoints"), max_to_keep=20)
    loop = Loop(config, str(workdir), update=update,
                next_batch=lambda state, key: jnp.float32(state.step + 1), checkpointer=ckpt,
                meta={}, evaluate=evaluate, evaluate_at_start=True)
    state, _ = loop.run(state, jax.random.key(0))
    eval_rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().split("\n")
                 if "eval/win_rate" in line]
    return state, evaluated, sorted(ckpt.manager.all_steps()), eval_rows


def test_checkpoint_steps_add_evaluations_and_change_no_update(tmp_path):
    plain, plain_evals, plain_ckpts, _ = _run(tmp_path / "plain", checkpoint_every=5)
    assert plain_evals == [0, 5, 10, 12] and plain_ckpts == [5, 10, 12]

    early, evals, ckpts, rows = _run(tmp_path / "early", checkpoint_every=5,
                                     checkpoint_steps=[2, 3, 10])
    assert evals == [0, 2, 3, 5, 10, 12] and ckpts == [2, 3, 5, 10, 12]
    assert [r["step"] for r in rows] == evals
    assert [r["eval/win_rate"] for r in rows] == [sum(range(1, s + 1)) for s in evals]
    assert (float(early.params["w"]), float(early.opt_state["m"])) == (
        float(plain.params["w"]), float(plain.opt_state["m"]))
