"""Run directories: the records that say a run finished (and what it found) or failed.

A run directory belongs to one trainer run or one study stage. Everything that asks whether
it is done, or reads back what it produced, goes through here, so the record can change in
one place:

    DONE.json     {"step": last step, ...result}; a trainer's result: {"metrics": its last
                  metrics, "stopped_early": bool}
    FAILED.json   {"error": "<ExceptionType>: <first line of the message>", "launch": the sweep
                  launch it failed in, if named}
    PREEMPTED.json  {"step": the step saved, "signal": "SIGTERM" | "SIGINT", "unlogged": the
                  metrics of the steps since the last logged line}: stopped on a preemption
                  signal with that step checkpointed; removed when the run resumes

    outcomes/step_N.npz  one evaluation's per-prompt outcomes (a policy run's judge verdicts,
                  oracle verdicts, KLs) at step N: what intervals over prompts resample
    config.json   the config the run (or study) was started with
    checkpoints/  the trainer's orbax checkpoints (`checkpoint.Checkpointer`)
    metrics.jsonl  one JSON line per logged step and evaluation (`metrics.MetricWriter`)
    stream/       an online run's recorded batches, sealed at each checkpoint (`sources`)

A run is finished once `DONE.json` says `step >= num_steps` (a stage that is one pass counts
as one step), or that it stopped early (validation plateau). The rest of the record is the
run's result: a trainer's last metrics, an analysis stage's numbers. Records are written by
process 0 only, atomically (a temporary file, then a rename), so a crash never leaves half of
one.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re

import jax
import numpy as np

from alignment_gap.errors import ConfigError, DataError

LOCK = ".lock"
DONE = "DONE.json"
FAILED = "FAILED.json"
PREEMPTED = "PREEMPTED.json"
CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
STREAM = "stream"


def write_text(directory: str, name: str, text: str):
    """Write `directory/name` atomically (process 0 only; the others return): a temporary file,
    then a rename, so a crash leaves the old file or the new one, never half of one."""
    if jax.process_index() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}.tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
    replace_durably(tmp, os.path.join(directory, name))


def replace_durably(tmp: str, path: str):
    """Rename the written file `tmp` to `path` once its bytes are on disk, then record the
    rename on disk too: after a power cut or a kernel crash, `path` holds the old contents or
    the new, never a name pointing at blocks not yet written."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    try:  # some filesystems (FUSE mounts) refuse fsync on a directory; the rename stands
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_json(directory: str, name: str, payload: dict):
    """Write `directory/name` as JSON atomically (process 0 only)."""
    write_text(directory, name, json.dumps(payload, indent=2, sort_keys=True, default=str))


def read_json(directory: str, name: str) -> dict | None:
    """`directory/name` as written by `write_json`; None when it does not exist."""
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError:
            raise DataError(f"{path} is damaged (not JSON); delete it and rerun to redo "
                            f"{os.path.basename(os.path.abspath(directory))}") from None


def finish(directory: str, step: int = 1, **result):
    """Mark the run finished at `step` with its result (keyword fields, JSON-serialisable)."""
    write_json(directory, DONE, {"step": int(step), **result})


def result(directory: str) -> dict:
    """What a finished run recorded (`finish`'s fields, `step` included); {} if unfinished."""
    return read_json(directory, DONE) or {}


def final_metrics(directory: str) -> dict:
    """A finished trainer run's last metrics (its evaluations as `eval/...`); {} otherwise."""
    return result(directory).get("metrics", {})


def finished_step(directory: str) -> int | None:
    done = read_json(directory, DONE)
    return None if done is None else int(done["step"])


def is_finished(directory: str, num_steps: int = 1) -> bool:
    """Finished at >= num_steps steps, or stopped early (validation plateau) before that."""
    done = read_json(directory, DONE)
    if done is None:
        return False
    return int(done["step"]) >= num_steps or bool(done.get("stopped_early"))


def already_finished(directory: str, num_steps: int) -> bool:
    """True (and says so) when `directory` holds a finished run."""
    if is_finished(directory, num_steps):
        if jax.process_index() == 0:
            print(f"{directory} already holds a finished run ({finished_step(directory)} steps, "
                  f"{DONE}); nothing to do.", flush=True)
        return True
    return False


OUTCOMES = "outcomes"


def write_outcomes(directory: str, step: int, arrays: dict):
    """Record one evaluation's per-prompt arrays at `step` (process 0, atomically; a resumed
    run that evaluates the same step again writes the same file)."""
    if jax.process_index() != 0:
        return
    folder = os.path.join(directory, OUTCOMES)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".step_{int(step)}.npz.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(tmp, os.path.join(folder, f"step_{int(step)}.npz"))


def read_outcomes(directory: str) -> dict[int, dict]:
    """{step: {name: per-prompt array}} of every evaluation `write_outcomes` recorded."""
    out = {}
    for path in glob.glob(os.path.join(directory, OUTCOMES, "step_*.npz")):
        step = int(re.fullmatch(r"step_(\d+)\.npz", os.path.basename(path)).group(1))
        try:
            with np.load(path) as record:
                out[step] = {k: record[k] for k in record.files}
        except (OSError, ValueError) as e:
            raise DataError(f"{path} is damaged ({e}); delete {os.path.join(directory, OUTCOMES)} "
                            "and the run's DONE.json, and rerun it") from None
    return dict(sorted(out.items()))


def has_checkpoints(directory: str) -> bool:
    """Whether the run in `directory` has saved a step (`checkpoints/<step>`)."""
    saved = glob.glob(os.path.join(glob.escape(directory), CHECKPOINTS, "[0-9]*"))
    return any(os.path.basename(p).isdigit() for p in saved)


def fail(directory: str, error: BaseException, launch: str = ""):
    """Record that the run raised `error` (its type and the first line of its message), in the
    sweep launch `launch` if one is named (`config.sweep.launch`)."""
    record = {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
    write_json(directory, FAILED, record | ({"launch": launch} if launch else {}))


def failure(directory: str) -> str | None:
    """The recorded error of a failed run; None when it has not failed."""
    failed = read_json(directory, FAILED)
    return None if failed is None else failed.get("error", "")


def failed_path(directory: str) -> str:
    return os.path.join(directory, FAILED)


def clear_failure(directory: str):
    """Forget an earlier failure before a retry (process 0 only)."""
    if jax.process_index() == 0 and os.path.exists(failed_path(directory)):
        os.remove(failed_path(directory))


def preempted(directory: str, step: int, signal: str, unlogged: list[dict] = ()):
    """Record that the run stopped on `signal` with `step` checkpointed (to resume from), and
    the per-step metrics not yet averaged into a logged line (the resumed run averages them in,
    so its log reads as an uninterrupted run's)."""
    write_json(directory, PREEMPTED, {"step": int(step), "signal": signal,
                                      "unlogged": list(unlogged)})


def unlogged_at(directory: str, step: int) -> list[dict]:
    """The unlogged metrics a preemption at `step` recorded ([] for any other start)."""
    record = read_json(directory, PREEMPTED)
    return record.get("unlogged", []) if record and record.get("step") == step else []


def clear_preempted(directory: str):
    """The run resumes: forget the preemption (process 0 only)."""
    path = os.path.join(directory, PREEMPTED)
    if jax.process_index() == 0 and os.path.exists(path):
        os.remove(path)


@contextlib.contextmanager
def lock(directory: str):
    """Hold `directory` for this job (process 0): a second job started on the same workdir stops
    at once with one line, instead of both writing the same files. The lock is the kernel's
    (`flock`): it goes with the process, so a killed job leaves none behind."""
    if jax.process_index() != 0:
        yield
        return
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, LOCK), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ConfigError(f"--workdir: {directory} is in use by {holder}; wait for it to end "
                              "or pass another --workdir (hosts sharing a study's runs: "
                              "--config.sweep.shards)") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
