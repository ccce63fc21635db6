"""orbax checkpoints: train state + data iterator + RNG + metadata; read-only model loads.

A checkpoint directory holds one orbax step directory per save, each with the items
`params`, `opt_state`, `loop` (`step`, RNG key data), `data` (the grain iterator's state) and
`meta` (JSON: model config, tokenizer fingerprint, kind) and `log` (JSON: the training loop's own
state at that step - its last metrics, whether a stop rule fired, the steps it has not logged
yet - so a run killed after a save resumes its log and its decision as they were). orbax writes
each step to a temporary directory and renames it when complete, so a crash never corrupts the
last good checkpoint.

Frozen models (the reference policy, the preference models) are loaded read-only from another
run's checkpoints: only `params` and `meta` are read, straight into the target shardings, and
every incompatibility is reported before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from alignment_gap.errors import CheckpointDamaged, IncompatibleCheckpoint
from alignment_gap.models.transformer import TransformerConfig
from alignment_gap.sharding import abstract_like


class Checkpointer:
    """`max_to_keep`: the scheduled checkpoints kept (`prune`); a preemption's unscheduled one
    never pushes a scheduled one out (the study's analyses read every scheduled step)."""

    def __init__(self, directory: str, max_to_keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.max_to_keep = max_to_keep
        self.manager = ocp.CheckpointManager(  # no retention of orbax's own: see `prune`
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state, rng, meta: dict, data_iterator=None, log: dict | None = None):
        """`state`: a train state (`step`, `params`, `opt_state`); `log`: the loop's record
        (`train/loop.py`); returns the step saved."""
        step = int(jax.device_get(state.step))
        items = {"params": ocp.args.StandardSave(state.params),
                 "opt_state": ocp.args.StandardSave(state.opt_state),
                 # Host numpy, not a device array: the key lives on one local device, which
                 # orbax cannot save from several processes.
                 "loop": ocp.args.StandardSave({"step": np.asarray(jax.device_get(state.step)),
                                                "rng": np.asarray(jax.random.key_data(rng))}),
                 "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            # Our pipelines' state counts global batches, the same on every process, so one
            # JSON copy restores under any process layout (grain's own handler writes one file
            # per process and cannot restore into a different process count).
            items["data"] = ocp.args.JsonSave(data_iterator.get_state())
        if log is not None:
            items["log"] = ocp.args.JsonSave(log)
        if not self.manager.save(step, args=ocp.args.Composite(**items)):
            # orbax skips a step at or before its latest one: the state would not be saved
            raise RuntimeError(f"{self.path(step)}: orbax skipped this save (its latest step is "
                               f"{self.latest_step()}); a resume must drop the steps after "
                               "the one it restores")
        return step

    def log_record(self, step: int) -> dict | None:
        """The loop's record saved with checkpoint `step`; None for a checkpoint saved before
        checkpoints held one."""
        if not os.path.isdir(os.path.join(self.path(step), "log")):
            return None
        return self.manager.restore(step, args=ocp.args.Composite(
            log=ocp.args.JsonRestore()))["log"]

    def restore(self, state, shardings, data_iterator=None, step: int | None = None,
                check=None):
        """(state, rng, meta) at `step` (default latest): `state` (abstract or not) and its
        `shardings` give the structure; the iterator is restored in place. `check(meta)` runs
        before any tensor is read and raises when the checkpoint does not fit this run (a
        changed model or tokenizer): that error stops the restore as it is.

        A latest checkpoint that cannot be read (truncated or corrupted files) is set aside as
        `<step>.damaged` and the previous one is restored, with a warning naming both. When
        none can be restored, nothing is renamed and the error names the directory: a run
        never starts from scratch on its own. With several processes, each reads its own
        shards and a step any of them cannot read is passed over by all: every process resumes
        from the same step."""
        steps = [step] if step is not None else _agreed_steps(
            sorted(self.manager.all_steps(), reverse=True))
        reader = self._reader()
        try:
            return self._restore_first_readable(reader, steps, state, shardings, data_iterator,
                                                check)
        finally:
            reader.close()

    def _restore_first_readable(self, reader, steps, state, shardings, data_iterator, check):
        damaged = []
        for candidate in steps:
            meta, restored, error = None, None, None
            try:
                meta = _restore_meta(reader, candidate)
            except Exception as e:  # noqa: BLE001 - any unreadable file: try the previous one
                error = e
            self._check_everywhere(check, meta if error is None else None, candidate)
            if error is None:
                try:
                    restored = self._read(reader, candidate, state, shardings,
                                          data_iterator is not None,
                                          os.path.isdir(os.path.join(self.path(candidate), "log")))
                except Exception as e:  # noqa: BLE001
                    error = e
            failed = _processes_failing(error is not None)
            if failed:
                why = _first_line(error) if error is not None else \
                    f"process {', '.join(map(str, failed))} could not read it"
                damaged.append((candidate, why))
                continue
            new_state, rng = self._resume(restored, state, shardings, data_iterator)
            if damaged:
                self._set_aside(damaged, candidate)
            return new_state, rng, meta
        raise CheckpointDamaged(
            f"{self.directory}: no checkpoint can be restored into this run (step "
            f"{damaged[0][0]}: {damaged[0][1]}); if the config changed, set it back, else move "
            "the directory away to train from scratch")

    def _check_everywhere(self, check, meta, step: int):
        """`check(meta)` on each process that read `meta` (None: it could not), then one
        collective, so a refusal stops every process: a process that could not read the meta
        raises too, rather than wait for the others in the next collective."""
        refusal = None
        if check is not None and meta is not None:
            try:
                check(meta)
            except Exception as e:  # noqa: BLE001 - re-raised below, once every process knows
                refusal = e
        refusing = _processes_failing(refusal is not None)
        if refusal is not None:
            raise refusal
        if refusing:
            raise IncompatibleCheckpoint(
                f"{self.directory}: step {step} does not fit this run (process "
                f"{', '.join(map(str, refusing))} refused it; its log says why)")

    def _reader(self):
        """A manager that reads this process's shards with no barrier among processes: orbax
        waits at one after every restore, where a process whose read failed never arrives."""
        me = jax.process_index()
        return ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            create=False, multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me})))

    @staticmethod
    def _read(reader, step: int, state, shardings, with_data: bool, with_log: bool) -> dict:
        items = {"params": ocp.args.StandardRestore(abstract_like(state.params,
                                                                  shardings.params)),
                 "opt_state": ocp.args.StandardRestore(abstract_like(state.opt_state,
                                                                     shardings.opt_state)),
                 "loop": ocp.args.StandardRestore({"step": np.zeros((), np.int32),
                                                   "rng": np.asarray(jax.random.key_data(
                                                       jax.random.key(0)))})}
        if with_data:
            items["data"] = ocp.args.JsonRestore()
        if with_log:  # read again by the loop (`log_record`): damaged, the step is passed over
            items["log"] = ocp.args.JsonRestore()
        return reader.restore(step, args=ocp.args.Composite(**items))

    @staticmethod
    def _resume(restored, state, shardings, data_iterator) -> tuple:
        """(state, rng) of a step every process has read; the data iterator is set in place."""
        if data_iterator is not None:
            data_iterator.set_state(restored["data"])
        loop = restored["loop"]
        step_array = jax.device_put(np.asarray(loop["step"], np.int32), shardings.step)
        new_state = dataclasses.replace(state, step=step_array, params=restored["params"],
                                        opt_state=restored["opt_state"])
        rng = jax.random.wrap_key_data(np.asarray(loop["rng"]))
        return new_state, rng

    def _set_aside(self, damaged: list, restored_step: int):
        """Rename damaged steps out of orbax's sight (a later save of the same step would clash),
        keeping their files; warn once naming them and the step restored instead."""
        if jax.process_index() == 0:
            for bad, _ in damaged:
                os.replace(self.path(bad), _free_name(self.path(bad) + ".damaged"))
        if jax.process_count() > 1:  # the others wait for the renames
            multihost_utils.sync_global_devices("set aside damaged checkpoints")
        self.manager.reload()
        if jax.process_index() == 0:  # the console shows warnings (console.py)
            names = ", ".join(f"{self.path(bad)} ({why})" for bad, why in damaged)
            logging.warning("checkpoint %s could not be read; kept as .damaged, resumed from %s",
                            names, self.path(restored_step))

    def prune(self, scheduled):
        """Once a save is complete: keep the latest checkpoint and the newest `max_to_keep` of
        the `scheduled` steps; delete the rest (a preemption's step once a later one exists)."""
        steps = sorted(self.manager.all_steps())
        kept = {*[s for s in steps if s in scheduled][-self.max_to_keep:], *steps[-1:]}
        for step in steps:
            if step not in kept:
                self.manager.delete(step)

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _free_name(path: str) -> str:
    """`path`, or `path-2`, `path-3`... where an earlier one exists (the same step damaged
    again after a rerun saved it anew)."""
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip()
    if not text:
        return type(error).__name__
    text = text.splitlines()[0].split(" See full TensorStore details")[0]  # drops a repr
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _agreed_steps(steps: list[int]) -> list[int]:
    """Process 0's list of `steps` on every process. Each lists the shared directory itself, and
    a stale listing on one host (a network filesystem's cached directory) must not set the
    processes on different steps: a step a process cannot read is passed over by all."""
    if jax.process_count() == 1:
        return steps
    count = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
    mine = np.asarray(steps if jax.process_index() == 0 else [0] * count, np.int32)
    return [int(s) for s in np.asarray(multihost_utils.broadcast_one_to_all(mine))]


def _processes_failing(failed_here: bool) -> list[int]:
    """The processes for which `failed_here` is true (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return [0] if failed_here else []
    flags = np.asarray(multihost_utils.process_allgather(np.asarray(failed_here)))
    return [int(i) for i in np.flatnonzero(flags)]


def _restore_meta(manager, step: int) -> dict:
    """Only the `meta` item (JSON) of checkpoint `step`: no tensor is read."""
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def read_meta(directory: str, what: str) -> tuple[int, dict]:
    """(step, meta) of the latest checkpoint in `directory`; clear errors when there is none."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise IncompatibleCheckpoint(f"{what}: checkpoint directory {directory} does not exist; "
                                     "train that model first or fix the path")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
    step = manager.latest_step()
    if step is None:
        raise IncompatibleCheckpoint(f"{what}: {directory} holds no finished checkpoint; "
                                     "train that model first or fix the path")
    try:
        meta = _restore_meta(manager, step)
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise _frozen_damaged(directory, step, e, what) from None
    finally:
        manager.close()
    return step, meta


def _frozen_damaged(directory: str, step: int, error: Exception, what: str = "") -> Exception:
    """A frozen model's checkpoint that cannot be read: not set aside for an earlier step (that
    would be another model), named with the fix."""
    run = os.path.dirname(directory)
    return CheckpointDamaged(f"{what + ': ' if what else ''}{directory}/{step} cannot be read "
                             f"({_first_line(error)}); rerun the run in {run} (it resumes from "
                             "its last readable checkpoint and finishes again), or point to "
                             "another run")


# Model fields that do not change the parameters or what they compute.
NOT_ARCHITECTURE = ("name", "max_len", "dtype", "remat")


def _architecture(model: dict) -> dict:
    """The fields that define a model's parameters and function, defaults filled in (older
    checkpoints lack the newer fields: they were trained with the defaults)."""
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    cfg = TransformerConfig(**{k: v for k, v in model.items() if k in fields})
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_ARCHITECTURE}


def check_compatible(meta: dict, *, what: str, directory: str, kind: str, model: dict,
                     tokenizer_fingerprint: str):
    if meta.get("kind") != kind:
        raise IncompatibleCheckpoint(f"{what}: {directory} holds a {meta.get('kind')!r} model, "
                                     f"not a {kind!r} one; point to a {kind} checkpoint")
    saved, configured = (_architecture(m) for m in (meta.get("model", {}), model))
    diffs = [f"{k}={saved[k]!r} (configured {v!r})" for k, v in sorted(configured.items())
             if saved[k] != v]
    if diffs:
        raise IncompatibleCheckpoint(f"{what}: {directory} was trained with {', '.join(diffs)}; "
                                     "set the model config to match the checkpoint")
    if meta.get("tokenizer") != tokenizer_fingerprint:
        raise IncompatibleCheckpoint(
            f"{what}: {directory} was trained with tokenizer {meta.get('tokenizer')}, but the "
            f"configured one is {tokenizer_fingerprint}; use the tokenizer it was trained with")


def load_params(directory: str, params_like, shardings, step: int | None = None):
    """Read only the parameters of a checkpoint, into `shardings` (read-only model loads);
    `params_like` may be abstract (shapes and dtypes only)."""
    manager = ocp.CheckpointManager(os.path.abspath(directory),
                                    options=ocp.CheckpointManagerOptions(create=False,
                                                                         read_only=True))
    step = manager.latest_step() if step is None else step
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_like(params_like, shardings))))
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise _frozen_damaged(os.path.abspath(directory), step, e) from None
    finally:
        manager.close()
    return restored["params"]
