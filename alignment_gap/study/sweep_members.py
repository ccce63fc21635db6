"""The live hosts of a study's workdir must agree on how its runs are shared out.

A sweep's shards share one workdir and each works out on its own which runs are its
(`scheduler.owner`, from `sweep.shards` and `sweep.stack_runs`). Two hosts started with different
values would both train some runs into the same directories and leave others to no one, so
each study job holds `<workdir>/sweep/shard-<k>.json` while it runs: a kernel `flock` (it goes
with the process, so a killed job leaves a stale file, never a stale claim) over a record of its
settings. A job stops at once, with one line, when its shard number is held by a live job or a
live job of another shard was given other settings. Files of jobs that ended are ignored, so a
workdir can be resumed with other settings once no job runs in it.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import time

import jax

from alignment_gap.errors import ConfigError

DIRECTORY = "sweep"
SETTINGS = ("shards", "stack_runs")  # what decides which job trains which run


def _settings(sweep) -> dict:
    return {"shards": int(sweep.get("shards", 1)), "stack_runs": int(sweep.get("stack_runs", 1))}


def _live_record(path: str, tries: int = 20) -> dict | None:
    """The record of the job holding `path`, or None when no job holds it."""
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:  # nobody holds it: a job that ended
            fcntl.flock(f, fcntl.LOCK_UN)
            return None
        for _ in range(tries):  # a job that has just taken its file writes it next
            f.seek(0)
            record = _parse(f.read())
            if record:
                return record
            time.sleep(0.05)
    return {}


@contextlib.contextmanager
def member(workdir: str, sweep):
    """Hold this job's shard of `workdir` (process 0 only) for the `with` block; raise
    ConfigError if another live job holds the same shard or was given other `SETTINGS`."""
    if jax.process_index() != 0:
        yield
        return
    shard, mine = int(sweep.get("shard", 0)), _settings(sweep)
    directory = os.path.join(workdir, DIRECTORY)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"shard-{shard}.json")
    with open(path, "a+") as f:
        if not _take(f):
            f.seek(0)
            text = f.read()
            _check_same(_parse(text), shard, mine)
            raise ConfigError(f"config.sweep.shard: shard {shard} of {workdir} is already "
                              f"running ({_describe(text)}); start each shard once, or wait "
                              "for it to end") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({**mine, "shard": shard, "pid": os.getpid(),
                            "host": os.uname().nodename}))
        f.flush()
        try:
            _check_others(directory, path, shard, mine)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _take(f, tries: int = 20) -> bool:
    for _ in range(tries):  # another job's check holds a shared lock for an instant
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.05)
    return False


def _check_others(directory: str, own: str, shard: int, mine: dict):
    for path in sorted(glob.glob(os.path.join(directory, "shard-*.json"))):
        if path == own:
            continue
        other = _live_record(path)
        if other:  # else ended, or a record still unreadable: nothing to compare
            _check_same(other, shard, mine)


def _check_same(other: dict, shard: int, mine: dict):
    for field in SETTINGS:
        if field in other and other[field] != mine[field]:
            raise ConfigError(
                f"config.sweep.{field}: {mine[field]} here (shard {shard}), but a job of shard "
                f"{other.get('shard')} ({_describe(json.dumps(other))}) runs this workdir with "
                f"{other[field]}; give every shard the same --config.sweep.shards and "
                "--config.sweep.stack_runs (they decide which shard trains which run)")


def _parse(text: str) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def _describe(text: str) -> str:
    record = _parse(text)
    if "pid" in record and "host" in record:
        return f"pid {record['pid']} on {record['host']}"
    return "another process"
