"""The checkpointer's own guarantees on real orbax directories: a damaged step set aside as
often as it is damaged, a save orbax would skip is an error, not a silent no-op, and a step that
one of two processes cannot read is passed over by both."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from alignment_gap.checkpoint import Checkpointer
from alignment_gap.train.state import TrainState
from launch.local_multiprocess import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "checkpoint_worker.py")


def _state(step: int) -> TrainState:
    return TrainState(step=jnp.asarray(step, jnp.int32), params={"w": jnp.full((256,), step,
                                                                           jnp.float32)},
                      opt_state={"m": jnp.zeros(())})


def _damage(directory, step: int):
    for chunk in (directory / str(step) / "params").rglob("d/*"):
        chunk.write_bytes(chunk.read_bytes()[:chunk.stat().st_size // 2])


def _save(ckpt: Checkpointer, step: int):
    ckpt.save(_state(step), jax.random.key(0), {"kind": "test"})
    ckpt.wait()


def _restore(ckpt: Checkpointer) -> int:
    like = _state(0)
    state, _, _ = ckpt.restore(like, jax.tree.map(lambda x: x.sharding, like))
    return int(state.step)


def test_the_same_step_damaged_twice_is_set_aside_twice(tmp_path):
    ckpt = Checkpointer(str(tmp_path), max_to_keep=5)
    _save(ckpt, 1)
    for _ in range(2):  # damaged, resumed from 1, saved anew, damaged again
        _save(ckpt, 2)
        _damage(tmp_path, 2)
        assert _restore(ckpt) == 1
        assert ckpt.latest_step() == 1
    ckpt.close()
    assert sorted(p.name for p in tmp_path.iterdir() if "damaged" in p.name) == [
        "2.damaged", "2.damaged-2"]


def test_a_damaged_log_record_passes_the_step_over_like_any_other_item(tmp_path):
    """The loop's record (`log`) is read after the restore: damaged, it had stopped the resume
    with a JSON traceback instead of the step being set aside."""
    ckpt = Checkpointer(str(tmp_path), max_to_keep=5)
    for step in (1, 2):
        ckpt.save(_state(step), jax.random.key(0), {"kind": "test"}, log={"best": step})
        ckpt.wait()
    for item in (tmp_path / "2" / "log").iterdir():
        item.write_text(item.read_text()[:5])
    assert _restore(ckpt) == 1 and ckpt.log_record(1) == {"best": 1}
    ckpt.close()
    assert (tmp_path / "2.damaged").is_dir()


def test_a_damaged_frozen_checkpoint_is_one_line_and_no_earlier_step(tmp_path):
    """A frozen model (SFT start, proxy, judge) is the run's last step or nothing: an earlier
    one would be another model. Damaged, it is one line naming the step and the fix."""
    from alignment_gap.checkpoint import load_params, read_meta
    from alignment_gap.errors import CheckpointDamaged

    ckpt = Checkpointer(str(tmp_path), max_to_keep=5)
    for step in (1, 2):
        _save(ckpt, step)
    ckpt.close()
    _damage(tmp_path, 2)
    like = _state(0).params
    with pytest.raises(CheckpointDamaged) as error:
        load_params(str(tmp_path), like, jax.tree.map(lambda x: x.sharding, like))
    message = str(error.value)
    assert message.startswith(f"{tmp_path}/2 cannot be read (") and "\n" not in message
    assert message.endswith(f"rerun the run in {tmp_path.parent} (it resumes from its last "
                            "readable checkpoint and finishes again), or point to another run")
    for item in (tmp_path / "2" / "meta").iterdir():
        item.write_text("{")
    with pytest.raises(CheckpointDamaged, match=rf"^config.x: {tmp_path}/2 cannot be read"):
        read_meta(str(tmp_path), "config.x")


def test_a_save_orbax_would_skip_is_an_error(tmp_path):
    ckpt = Checkpointer(str(tmp_path), max_to_keep=5)
    _save(ckpt, 3)
    with pytest.raises(RuntimeError, match=r"/2: orbax skipped this save \(its latest step is 3\)"):
        _save(ckpt, 2)
    ckpt.close()


def _two_processes(tmp_path, mode: str, timeout: int = 180) -> list[dict]:
    address = f"127.0.0.1:{free_port()}"
    outs = [tmp_path / f"{mode}_{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, WORKER, address, str(i), mode,
                               str(tmp_path / "ckpt"), str(out)], cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i, out in enumerate(outs)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:  # a hang: no process outlives the test
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [log[-3000:] for log in logs]
    return [json.loads(out.read_text()) | {"log": log} for out, log in zip(outs, logs,
                                                                          strict=True)]


def test_a_step_one_process_cannot_read_is_passed_over_by_every_process(tmp_path):
    """Process 1's shards of step 2 are damaged, process 0's are whole: both resume from step 1
    (before, process 0 restored step 2 and waited for process 1 in orbax's barrier)."""
    _two_processes(tmp_path, "save")
    step_2 = tmp_path / "ckpt" / "2"
    shards = [f for item in ("params", "opt_state")
              for f in (step_2 / item / "ocdbt.process_1").rglob("d/*")]
    assert shards
    for chunk in shards:
        chunk.write_bytes(chunk.read_bytes()[:chunk.stat().st_size // 2])
    first, second = _two_processes(tmp_path, "restore")
    assert first["step"] == second["step"] == 1
    assert first["firsts"] + second["firsts"] == [1.0, 1025.0, 2049.0, 3073.0]
    assert (tmp_path / "ckpt" / "2.damaged").is_dir()
    assert "/ckpt/2 (process 1 could not read it) could not be read" in first["log"]


def test_processes_restore_process_0s_latest_step_whatever_their_own_listing(tmp_path):
    """Process 1's listing of the directory lacks step 2 (a stale network filesystem cache):
    both still resume from step 2, the latest process 0 lists, which process 1 can read."""
    _two_processes(tmp_path, "save")
    results = _two_processes(tmp_path, "stale", timeout=120)
    assert [r["step"] for r in results] == [2, 2], [r["log"][-2000:] for r in results]


def test_a_refusal_on_one_process_stops_the_process_that_could_not_read_the_meta(tmp_path):
    """Process 0 reads step 2's meta and its check refuses the checkpoint; process 1 cannot
    read that meta. Both raise the refusal (process 1 naming process 0) instead of process 1
    waiting for process 0 in the next collective."""
    _two_processes(tmp_path, "save")
    first, second = _two_processes(tmp_path, "refuse", timeout=120)
    assert first["refused"] == "a 'test' checkpoint does not fit"
    assert second["refused"].endswith("/ckpt: step 2 does not fit this run (process 0 refused "
                                      "it; its log says why)"), second
