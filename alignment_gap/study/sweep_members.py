"""The live jobs of a study's workdir must agree on its config and how its runs are shared out.

A sweep's shards share one workdir and each works out on its own which runs are its
(`scheduler.owner`: from `sweep.shards`, `sweep.stack_runs` and the plan the rest of the config
makes). Two jobs given different values would both train some runs into the same directories
and leave others to no one, so each study job holds `<workdir>/sweep/shard-<k>.json` while it
runs: a kernel `flock` over a record of its config (the lock goes with the process, so a killed
job leaves a stale file, never a stale claim). A job stops at once, with one line naming the
field, when its shard is held by a live job or a live job of another shard was given another
value (`PER_HOST` fields may differ); files of jobs that ended are ignored, so a workdir
resumes with another config once no job runs in it. Taking a file, writing it and
reading the others happen under `sweep/.mutex`, so jobs started together see each other whole.

The lock is the filesystem's: it spans hosts on local disks and NFS, not on gcsfuse (there
each host sees only its own jobs, and the check covers those).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os

import jax

from alignment_gap.errors import ConfigError

DIRECTORY = "sweep"
FIRST = ("sweep.shards", "sweep.stack_runs")  # compared first: the usual mistake
PER_HOST = ("sweep.shard", "sweep.poll_s", "sweep.wait_timeout_s", "sweep.launch",
            "distributed")


def settings(config) -> dict:
    """The config's fields as {"a.b": JSON value}, the fields a host may set apart left out."""
    def flat(tree, prefix):
        for key, value in tree.items():
            name = f"{prefix}{key}"
            if name in PER_HOST:
                continue
            if isinstance(value, dict):
                yield from flat(value, name + ".")
            else:
                yield name, value

    fields = dict(flat(json.loads(json.dumps(config.to_dict(), default=str)), ""))
    return {name: fields[name] for name in (*FIRST, *sorted(set(fields) - set(FIRST)))
            if name in fields}


@contextlib.contextmanager
def member(workdir: str, config):
    """Hold this job's shard of `workdir` (process 0 only) for the `with` block; raise
    ConfigError if another live job holds the same shard or was given another `settings`."""
    if jax.process_index() != 0:
        yield
        return
    shard, mine = int(config["sweep"].get("shard", 0)), settings(config)
    directory = os.path.join(workdir, DIRECTORY)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"shard-{shard}.json"), "a+") as own:
        with open(os.path.join(directory, ".mutex"), "a") as mutex:
            fcntl.flock(mutex, fcntl.LOCK_EX)  # held for an instant by each starting job
            try:
                _join(own, directory, shard, mine, workdir)
            finally:
                fcntl.flock(mutex, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(own, fcntl.LOCK_UN)


def _join(own, directory: str, shard: int, mine: dict, workdir: str):
    if not _try_lock(own, fcntl.LOCK_EX):
        own.seek(0)
        holder = _parse(own.read())
        _check_same(holder, shard, mine)
        raise ConfigError(f"config.sweep.shard: shard {shard} of {workdir} is already running "
                          f"({_describe(holder)}); start each shard once, or wait for it to end")
    own.seek(0)
    own.truncate()
    own.write(json.dumps({"shard": shard, "pid": os.getpid(), "host": os.uname().nodename,
                          "config": mine}))
    own.flush()
    os.fsync(own.fileno())  # seen whole by a job on another host (NFS)
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), "shard-*.json"))):
        if os.path.samefile(path, own.name):
            continue
        _check_same(_live_record(path), shard, mine)


def _try_lock(f, kind) -> bool:
    try:
        fcntl.flock(f, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _live_record(path: str) -> dict:
    """The record of the job holding `path`; {} when none does (it ended) or it is gone."""
    try:
        with open(path) as f:
            if _try_lock(f, fcntl.LOCK_SH):  # nobody holds it
                fcntl.flock(f, fcntl.LOCK_UN)
                return {}
            return _parse(f.read())
    except FileNotFoundError:
        return {}


def _check_same(other: dict, shard: int, mine: dict):
    theirs = other.get("config", {})
    for field in (*mine, *(f for f in theirs if f not in mine)) if theirs else ():
        if mine.get(field, _UNSET) != theirs.get(field, _UNSET):
            raise ConfigError(
                f"config.{field}: {_show(mine.get(field, _UNSET))} here (shard {shard}), but a "
                f"job of shard {other.get('shard')} ({_describe(other)}) runs this workdir with "
                f"{_show(theirs.get(field, _UNSET))}; give every shard the same config and "
                "overrides but --config.sweep.shard (shards and stack_runs decide which shard "
                "trains which run), or wait for that job to end")


_UNSET = object()


def _show(value) -> str:
    return "no such field" if value is _UNSET else json.dumps(value)


def _parse(text: str) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def _describe(record: dict) -> str:
    if "pid" in record and "host" in record:
        return f"pid {record['pid']} on {record['host']}"
    return "another process"
