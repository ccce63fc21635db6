"""The checkpointer's own guarantees on real orbax directories: a damaged step set aside as
often as it is damaged, and a save orbax would skip is an error, not a silent no-op."""

import jax
import jax.numpy as jnp
import pytest

from alignment_gap.checkpoint import Checkpointer
from alignment_gap.train.state import TrainState


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


def test_a_save_orbax_would_skip_is_an_error(tmp_path):
    ckpt = Checkpointer(str(tmp_path), max_to_keep=5)
    _save(ckpt, 3)
    with pytest.raises(RuntimeError, match=r"/2: orbax skipped this save \(its latest step is 3\)"):
        _save(ckpt, 2)
    ckpt.close()
