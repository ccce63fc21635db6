"""The training loop's schedule (`train/loop.py`) with a counting update, real orbax checkpoints
and a real run directory: where it evaluates and checkpoints, that the extra steps change no
update, and that a run killed at any point resumes to the same log and finished record."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from alignment_gap import run_dir
from alignment_gap.checkpoint import Checkpointer
from alignment_gap.train import loop as loop_module
from alignment_gap.train.loop import Loop
from alignment_gap.train.state import TrainState


class Killed(BaseException):
    """Stands in for a SIGKILL: nothing after it runs, nothing catches it."""


def _run(workdir, kill_in_step=None, stop_at=None, keep=20, preempt_at=None, **schedule):
    """Train to `num_steps` (12) or to `stop_at`, where the evaluation says stop; resume from
    the latest checkpoint in `workdir` if there is one. `kill_in_step`: die as that step's
    batch is asked for; `preempt_at`: a SIGTERM arrives in that step; `keep`: max_to_keep."""
    config = ml_collections.ConfigDict({"num_steps": 12, "log_every": 3, **schedule})
    evaluated, signalled = [], [False]

    def update(state, batch, key):  # params: the sum of the batches; key: read, so it matters
        state = TrainState(step=state.step + 1, params={"w": state.params["w"] + batch},
                           opt_state={"m": state.opt_state["m"] + jax.random.uniform(key)})
        return state, {"loss": batch}

    def next_batch(state, key):
        if int(state.step) + 1 == kill_in_step:
            raise Killed
        signalled[0] = int(state.step) + 1 == preempt_at
        return jnp.float32(state.step + 1)

    def evaluate(state):
        evaluated.append(int(state.step))
        stop = "the rule fired" if int(state.step) == stop_at else ""
        return {"win_rate": float(state.params["w"])}, stop

    state = TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(())},
                       opt_state={"m": jnp.zeros(())})
    ckpt = Checkpointer(str(workdir / "checkpoints"), max_to_keep=keep)
    rng = jax.random.key(0)
    if ckpt.latest_step() is not None:
        state, rng, _ = ckpt.restore(state, jax.tree.map(lambda x: x.sharding, state))
    loop = Loop(config, str(workdir), update=update, next_batch=next_batch, checkpointer=ckpt,
                meta={}, evaluate=evaluate, evaluate_at_start=True)
    reached = loop_module.preemption.reached
    loop_module.preemption.reached = lambda: signalled[0]
    try:
        state, _ = loop.run(state, rng)
    finally:
        loop_module.preemption.reached = reached
        ckpt.close()
    eval_rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().split("\n")
                 if "eval/win_rate" in line]
    return state, evaluated, sorted(ckpt.manager.all_steps()), eval_rows


def _log(workdir) -> list[dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rows]  # wall clock


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


@pytest.mark.parametrize("stop_at", [None, 6])
def test_a_run_killed_after_its_last_save_finishes_as_it_would_have(tmp_path, monkeypatch,
                                                                    stop_at):
    """Killed between the save of its last step (the end, or where its stop rule fired) and
    its finished record: the rerun finishes with that step's metrics and decision, training no
    further step."""
    _run(tmp_path / "straight", stop_at=stop_at, checkpoint_every=3)
    with monkeypatch.context() as patch:
        def killed(*args, **kwargs):
            raise Killed
        patch.setattr(loop_module.run_dir, "finish", killed)
        with pytest.raises(Killed):
            _run(tmp_path / "killed", stop_at=stop_at, checkpoint_every=3)
    assert run_dir.read_json(str(tmp_path / "killed"), run_dir.DONE) is None
    _, evaluated, ckpts, _ = _run(tmp_path / "killed", stop_at=stop_at, checkpoint_every=3)
    assert evaluated == [] and ckpts == [3, 6, 9, 12][:2 if stop_at else 4]
    done = [run_dir.read_json(str(tmp_path / name), run_dir.DONE)
            for name in ("straight", "killed")]
    assert done[1] == done[0]
    assert done[0]["stopped_early"] == bool(stop_at) and "eval/win_rate" in done[0]["metrics"]


def test_a_run_stopped_between_log_lines_logs_its_last_steps(tmp_path, monkeypatch):
    """The stop rule fires at step 8, two steps after the last line (every 3): those steps are
    averaged into a line at 8, also when the run is killed before its finished record."""
    _run(tmp_path / "straight", stop_at=8, checkpoint_every=4)
    losses = [(r["step"], r["loss"]) for r in _log(tmp_path / "straight") if "loss" in r]
    assert losses == [(3, 2.0), (6, 5.0), (8, 7.5)]
    with monkeypatch.context() as patch:
        def killed(*args, **kwargs):
            raise Killed
        patch.setattr(loop_module.run_dir, "finish", killed)
        with pytest.raises(Killed):
            _run(tmp_path / "killed", stop_at=8, checkpoint_every=4)
    _run(tmp_path / "killed", stop_at=8, checkpoint_every=4)
    assert _log(tmp_path / "killed") == _log(tmp_path / "straight")


def test_a_run_killed_between_log_lines_resumes_the_same_averages(tmp_path):
    """Checkpoints (every 3 steps) fall between log lines (every 2): the steps a checkpoint
    left unlogged are averaged into the resumed run's next line."""
    _run(tmp_path / "straight", checkpoint_every=3, log_every=2)
    with pytest.raises(Killed):
        _run(tmp_path / "killed", kill_in_step=5, checkpoint_every=3, log_every=2)
    _run(tmp_path / "killed", checkpoint_every=3, log_every=2)
    assert _log(tmp_path / "killed") == _log(tmp_path / "straight")


def _tensorboard_events(workdir) -> list:
    """Every event of the run's TensorBoard files, file by file in the order written."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted((workdir / "tensorboard" / "train").iterdir(),
                       key=lambda p: p.stat().st_mtime_ns):
        data = path.read_bytes()
        while data:  # TFRecord: length, its CRC, the record, its CRC
            (length,) = struct.unpack("<Q", data[:8])
            events.append(Event.FromString(data[12:12 + length]))
            data = data[16 + length:]
    return events


def test_a_resumed_run_tells_tensorboard_to_hide_the_steps_it_logs_again(tmp_path):
    with pytest.raises(Killed):
        _run(tmp_path, kill_in_step=8, checkpoint_every=3)
    _run(tmp_path, checkpoint_every=3)
    starts = [e.step for e in _tensorboard_events(tmp_path) if e.HasField("session_log")]
    assert starts == [0, 7]  # the fresh start, then the resume from the step-6 checkpoint


def test_a_preemptions_checkpoint_pushes_no_scheduled_one_out(tmp_path):
    """Every scheduled checkpoint kept (max_to_keep = their number, as a study's policy runs
    keep them): a SIGTERM's unscheduled save at step 7 displaces none of them and goes once
    the next scheduled save is complete."""
    from alignment_gap.preemption import Preempted

    with pytest.raises(Preempted):
        _run(tmp_path, keep=4, preempt_at=7, checkpoint_every=3)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 6, 7]
    _, _, ckpts, _ = _run(tmp_path, keep=4, checkpoint_every=3)
    assert ckpts == [3, 6, 9, 12]
