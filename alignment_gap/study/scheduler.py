"""Stages and how they run: cached, in dependency order, on one host or fanned out over several.

A `Stage` is one unit of the study (a trainer run, the relabelling pass, an analysis) under
`<workdir>/stages/<name>-<key>`, where `key` hashes the stage's own config and the keys of the
stages it reads. A stage whose run directory is finished (`run_dir.is_finished`) is skipped,
so an interrupted study resumes where it stopped; changing a stage's config changes its key and
re-runs it and everything downstream. The processes of one multi-process job decide what is
finished on process 0's view of the disk (`_agreed_finished`), so they run the same stages.

With one shard, `run_stages` runs every unfinished stage in order. A sweep fans the runs out
over hosts sharing the workdir: shard k runs its share (`owner`) and waits for the upstream
stages other shards run; a stage that raises leaves a failure record (`run_dir.fail`) that
stops every shard waiting on it. A record already there when a shard starts is an earlier
attempt's (`failure_records`): its owner retries that stage, so the shard waits for it, unless
the record names this launch (`sweep.launch`: the shard started after the failure).
Each shard keeps `{stage: seconds}` in its timings file.
With `stack_runs` > 1, runs that share a `stack` (an offline sweep's runs of one seed and
length) are trained together as one stacked program (`units`; `train/policy_stack.py`), and a
stack always goes to one shard.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from alignment_gap import preemption, run_dir
from alignment_gap.errors import StageFailed
from alignment_gap.preemption import Preempted
from alignment_gap.presets import common as common_presets
from alignment_gap.presets import meshes


@dataclasses.dataclass
class Stage:
    name: str
    config: ml_collections.ConfigDict
    run: callable  # (config, run directory) -> None; finishes the directory (run_dir.finish)
    upstream: tuple = ()  # Stages whose outputs this one reads.
    meta: dict = dataclasses.field(default_factory=dict)  # method, seed, lr, ... for results
    # Stages with the same non-empty `stack` can be trained as one stacked program
    # (`run_stages(stack_runs=...)`); their configs differ only in what a stack varies.
    stack: str = ""
    # () -> whether what the stage wrote outside its directory (datasets under data.dir) is
    # still there: a stage whose outputs were deleted is not finished, and runs again.
    outputs_present: callable = None

    @property
    def key(self) -> str:
        """Hashes the config and the inputs' keys. A path into an input's run directory counts
        as that input, not as where the workdir lies: a workdir moved or named another way
        (relative, absolute, `./`) keeps its finished stages. Settings that change how the
        work runs but not what it computes (`_unhashed_defaults`) are not hashed: each process
        of one job is given its own process_id, and a study moved onto more processes is the
        same study."""
        keys = [u.key for u in self.upstream]
        config = _without_unhashed(self.config.to_dict())
        return _hash(_relocatable(config, self.upstream, keys), keys)

    @property
    def full_key(self) -> str:
        """The key as studies before 2026-12-07 wrote it (every setting hashed): a study run
        with other than the default `_unhashed_defaults` settings still finds its stages."""
        keys = [u.full_key for u in self.upstream]
        return _hash(_relocatable(self.config.to_dict(), self.upstream, keys), keys)

    @property
    def legacy_key(self) -> str:
        """The key as studies before 2026-12-04 wrote it (workdir paths hashed with the
        config), so that their stage directories are still found (`directory`)."""
        return _hash(self.config.to_dict(), [u.legacy_key for u in self.upstream])

    def legacy_key_as_if(self, workdir: str, previous: str) -> str:
        """`legacy_key` as an older study computed it in this workdir when it was named
        `previous` (before it was moved or renamed)."""
        return _hash(_renamed(self.config.to_dict(), workdir, previous),
                     [u.legacy_key_as_if(workdir, previous) for u in self.upstream])

    def directory(self, workdir: str) -> str:
        """`<workdir>/stages/<name>-<key>`, or the legacy-keyed directory an older study left
        (under this workdir name or, moved since, under a name its stages' configs record)."""
        path = os.path.join(workdir, "stages", f"{self.name}-{self.key}")
        if os.path.isdir(path):
            return path
        keys = [self.full_key, self.legacy_key] + [
            self.legacy_key_as_if(workdir, previous) for previous in previous_names(workdir)]
        for key in keys:
            legacy = os.path.join(workdir, "stages", f"{self.name}-{key}")
            if os.path.isdir(legacy):
                return legacy
        return path

    def directory_key(self, workdir: str) -> str:
        """The key in the name of `directory(workdir)` (what outputs outside it are named by)."""
        return os.path.basename(self.directory(workdir))[len(self.name) + 1:]


def _unhashed_defaults() -> dict:
    """Section -> the settings of it a key leaves out, at their defaults: how processes find
    each other, and grain's reader threads (its output order does not depend on them)."""
    return {"distributed": meshes.distributed_config().to_dict(),
            "data": {"num_threads": common_presets.data_config().num_threads}}


def _without_unhashed(config: dict) -> dict:
    """`config` with the `_unhashed_defaults` settings it has at their defaults."""
    config = dict(config)
    for section, defaults in _unhashed_defaults().items():
        if isinstance(config.get(section), dict):
            config[section] = {**config[section],
                               **{k: v for k, v in defaults.items() if k in config[section]}}
    return config


def _hash(config: dict, upstream_keys: list[str]) -> str:
    payload = json.dumps({"config": config, "upstream": upstream_keys}, sort_keys=True,
                         default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:10]


def _relocatable(config, upstream: tuple[Stage, ...], keys: list[str]):
    """`config` with each path into an upstream stage's directory written as `<stage KEY>/rest`,
    independent of the workdir's location. Paths come from `directory`, so one into
    `stages/<name>-<any key>` is the directory in use of the upstream stage of that name."""
    names = {u.name: key for u, key in zip(upstream, keys, strict=True)}

    def rewrite(value):
        match = _STAGE_PATH.fullmatch(value) if isinstance(value, str) else None
        if match and match["name"] in names:
            return f"<stage {names[match['name']]}>{match['rest']}"
        return value

    return _strings(config, rewrite)


# A path into a stage directory: <workdir>/stages/<name>-<10-hex key>[/rest].
_SEP = re.escape(os.sep)
_STAGE_PATH = re.compile(rf"(?:(?P<workdir>.*?){_SEP})?stages{_SEP}(?P<name>[^{_SEP}]+)-"
                         rf"[0-9a-f]{{10}}(?P<rest>(?:{_SEP}.*)?)")


def _strings(value, rewrite):
    """`value` (JSON-like) with every string passed through `rewrite`; tuples become lists."""
    if isinstance(value, dict):
        return {k: _strings(v, rewrite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strings(v, rewrite) for v in value]
    return rewrite(value) if isinstance(value, str) else value


def _renamed(config, workdir: str, previous: str):
    """`config` with its paths into `<workdir>/stages` written under `previous` instead."""
    here, there = os.path.join(workdir, "stages", ""), os.path.join(previous, "stages", "")
    return _strings(config, lambda v: there + v[len(here):] if v.startswith(here) else v)


def previous_names(workdir: str) -> list[str]:
    """Other names this workdir's stages were run under (an older study's keys hashed them):
    the workdirs that paths in its stages' recorded configs point into."""
    stages = os.path.join(workdir, "stages")
    try:
        stamp = os.stat(stages).st_mtime_ns  # a new stage directory changes it
    except FileNotFoundError:
        return []
    return _previous_names(workdir, stamp)


@functools.lru_cache(maxsize=8)
def _previous_names(workdir: str, stamp: int) -> list[str]:
    found = set()

    def note(value):
        match = _STAGE_PATH.fullmatch(value)
        if match and match["workdir"] and match["workdir"] != workdir:
            found.add(match["workdir"])
        return value

    for path in glob.glob(os.path.join(glob.escape(workdir), "stages", "*", run_dir.CONFIG)):
        try:
            with open(path) as f:
                _strings(json.load(f), note)
        except (OSError, ValueError):
            continue  # a directory being written, or not a run's: it names nothing
    return sorted(found)



def units(stages: list[Stage], stack_runs: int = 1) -> list[list[Stage]]:
    """The policy runs in plan order as the units a host trains: a run alone, or up to
    `stack_runs` runs with the same `stack`, in order, as one stacked program."""
    out, open_units = [], {}
    for stage in (s for s in stages if "method" in s.meta):
        unit = open_units.get(stage.stack) if stage.stack and stack_runs > 1 else None
        if unit is None or len(unit) == stack_runs:
            unit = open_units[stage.stack] = []
            out.append(unit)
        unit.append(stage)
    return out


def owner(stages: list[Stage], shards: int, stack_runs: int = 1) -> dict[str, int]:
    """Which sweep shard runs each stage: policy runs round-robin (a stack's runs together),
    everything else shard 0."""
    out = {s.name: 0 for s in stages}
    for i, unit in enumerate(units(stages, stack_runs)):
        out.update({s.name: i % shards for s in unit})
    return out


def finished(stage: Stage, workdir: str) -> bool:
    return _finished(stage, stage.directory(workdir))


def _finished(stage: Stage, directory: str) -> bool:
    return (run_dir.is_finished(directory, stage.config.get("num_steps", 1))
            and (stage.outputs_present is None or stage.outputs_present()))


def _agreed_finished(stages: list[Stage], where) -> set[str]:
    """The names of `stages` that are finished, as process 0 sees them. Several processes of
    one job act on one view: each reads the shared disk at its own moment (a network
    filesystem's cache can lag), and a process that skipped a stage the others run would leave
    their collectives waiting. The broadcast also waits for process 0, which writes the
    finished records, to reach this point."""
    flags = np.array([_finished(s, where(s)) for s in stages], bool)
    if jax.process_count() > 1 and len(flags):
        flags = np.asarray(multihost_utils.broadcast_one_to_all(flags)).astype(bool)
    return {s.name for s, done in zip(stages, flags, strict=True) if done}


def _directories(workdir: str):
    """stage -> its directory, resolved once: the polling loops below ask again and again, and
    a key hashes the configs of every stage upstream."""
    seen = {}

    def where(stage: Stage) -> str:
        if stage.name not in seen:
            seen[stage.name] = stage.directory(workdir)
        return seen[stage.name]

    return where


def failure_records(workdir: str, launch: str = "") -> dict[str, tuple]:
    """{stage directory: identity of its failure record} for the records under `workdir` now:
    taken when a job starts, these are an earlier attempt's, except those of the sweep launch
    `launch` if one is named (another shard of this launch failed before this one started)."""
    found = {}
    for path in glob.glob(os.path.join(os.path.abspath(workdir), "stages", "*", run_dir.FAILED)):
        identity = _identity(path)
        if identity is None:
            continue
        if launch and (run_dir.read_json(os.path.dirname(path), run_dir.FAILED) or {}).get(
                "launch") == launch:
            continue
        found[os.path.dirname(path)] = identity
    return found


def _identity(path: str) -> tuple | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _check_not_failed(stage: Stage, directory: str, earlier: dict) -> str | None:
    """Raise on a failure record written since this job started (`earlier`: the ones before);
    return the error of one from before (its retry is awaited), else None."""
    why = run_dir.failure(directory)
    path = run_dir.failed_path(directory)
    if why is not None and _identity(path) != earlier.get(os.path.abspath(directory)):
        raise StageFailed(f"stage {stage.name} failed (see {path}): {why}")
    return why


def _say_retry_awaited(name: str, why: str, owners: dict, timeout_s: float, launch: str):
    """A shard waiting on a stage whose failure record predates this job waits for its owner
    to retry it. With no launch named, a shard that already stopped in this attempt, before
    this job started, left a record that looks the same, so the line says how long it waits."""
    if jax.process_index() != 0:
        return
    line = (f"waiting for stage {name}, failed before this job started ({why}): shard "
            f"{owners[name]} retries it when it starts")
    if launch:
        line += f" (the failure is another launch's than this one, {launch})"
    else:
        line += (f"; if that shard stopped in this attempt already, stop this job (it would "
                 f"wait config.sweep.wait_timeout_s={timeout_s:g} s; naming the launch, "
                 "config.sweep.launch, tells them apart)")
    print(line, flush=True)


def wait_for(stages: list[Stage], workdir: str, poll_s: float, timeout_s: float, why: str,
             earlier: dict | None = None):
    """Block until every stage is finished; a failed one raises, so does the timeout.
    `earlier`: `failure_records` as the job started (default: now)."""
    earlier = failure_records(workdir) if earlier is None else earlier
    deadline = time.monotonic() + timeout_s
    where = _directories(workdir)
    while True:
        done = _agreed_finished(stages, where)
        pending = [s for s in stages if s.name not in done]
        for stage in pending:
            _check_not_failed(stage, where(stage), earlier)
        if not pending:
            return
        _stop_if_requested(f"while waiting for stage {pending[0].name} ({why})")
        if time.monotonic() > deadline:
            raise StageFailed(f"config.sweep.wait_timeout_s: {timeout_s:g} s passed waiting for "
                              f"stage {pending[0].name} ({why}); is its shard running?")
        time.sleep(poll_s)


SECONDS = "seconds.json"  # in a stage's directory: how long its run took


def timings_name(shard: int, shards: int) -> str:
    return "timings.json" if shards == 1 else f"timings-shard{shard}-of-{shards}.json"


def run_stages(stages: list[Stage], workdir: str, shard: int = 0, shards: int = 1,
               poll_s: float = 5.0, timeout_s: float = 86_400.0, stack_runs: int = 1,
               run_stacked=None, earlier: dict | None = None, launch: str = "") -> dict:
    """Run this shard's unfinished stages, each once its upstream stages are finished; returns
    {stage name: seconds} for this shard's runs (kept in `timings_name(shard, shards)`).

    `stack_runs` > 1: runs of one `stack` go up to that many at a time to
    `run_stacked(configs, directories)` (`train/policy_stack.run`); each is timed at its share
    of the stack's seconds. `earlier`: `failure_records` as the job started (default: now);
    a shard waits for the stages those name (their owners retry them) instead of stopping.
    `launch`: the sweep launch (`config.sweep.launch`) this shard's failure records name."""
    earlier = failure_records(workdir, launch) if earlier is None else earlier
    if stack_runs > 1 and run_stacked is None:
        raise ValueError("run_stages: stack_runs > 1 needs run_stacked (policy_stack.run)")
    name = timings_name(shard, shards)
    timings = run_dir.read_json(workdir, name) or {}
    owners = owner(stages, shards, stack_runs)
    unit_of = {s.name: unit for unit in units(stages, stack_runs) for s in unit}
    mine = [s for s in stages if owners[s.name] == shard]
    waiting_since = None  # the timeout counts waiting for inputs, not this shard's own work
    told = set()  # stages whose awaited retry has been announced
    where = _directories(workdir)
    watched = list({u.name: u for s in mine for u in (s, *s.upstream)}.values())
    while True:
        done = _agreed_finished(watched, where)
        pending = [s for s in mine if s.name not in done]
        if not pending:
            return timings
        # The first stage whose inputs are ready (scanning in order keeps one host sequential
        # and never deadlocks: the stage graph is acyclic).
        ready = next((s for s in pending if all(u.name in done for u in s.upstream)), None)
        if ready is None:
            for stage in pending:
                for upstream in stage.upstream:
                    why = _check_not_failed(upstream, where(upstream), earlier)
                    if why is not None and upstream.name not in told:
                        told.add(upstream.name)
                        _say_retry_awaited(upstream.name, why, owners, timeout_s, launch)
            _stop_if_requested(f"while stage {pending[0].name} waited for its inputs")
            waiting_since = waiting_since or time.monotonic()
            if time.monotonic() - waiting_since > timeout_s:
                raise StageFailed(f"config.sweep.wait_timeout_s: {timeout_s:g} s passed with "
                                  f"stage {pending[0].name} still waiting for its inputs")
            time.sleep(poll_s)
            continue
        waiting_since = None
        _stop_if_requested(f"before stage {ready.name}")  # a signal during the last stage
        waiting = {s.name for s in pending}
        group = [s for s in unit_of.get(ready.name, [ready]) if s.name in waiting]
        k = len(mine) - len(pending) + 1
        try:
            if len(group) > 1:
                _run_stack(group, [where(s) for s in group], timings,
                           f"{k}-{k + len(group) - 1} of {len(mine)}", run_stacked, launch)
            else:
                _run_one(ready, where(ready), timings, f"{k} of {len(mine)}", launch)
        except Preempted:
            raise
        except BaseException as e:
            # Shards waiting on this one's other stages stop at once instead of timing out.
            _mark_not_run([s for s in pending if s not in group], where, shard, group[0], e,
                          launch)
            raise
        run_dir.write_json(workdir, name, timings)
        done = _agreed_finished(group, where)
        for stage in group:
            if stage.name not in done:
                raise StageFailed(f"stage {stage.name} returned without finishing "
                                  f"({where(stage)} has no {run_dir.DONE})")


def _stop_if_requested(when: str):
    if preemption.stop_requested():
        raise Preempted(f"stopped {when}; run the same command again to go on")


def _mark_not_run(stages: list[Stage], where, shard: int, failed: Stage, error: BaseException,
                  launch: str):
    """A failure record in each of `stages` (a stopped shard's own, never to run in this
    attempt): the shards waiting for them stop naming the cause. Its retry clears them."""
    cause = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
    for stage in stages:
        run_dir.fail(where(stage), StageFailed(
            f"not run: shard {shard} stopped at stage {failed.name} ({cause})"), launch)


def _run_one(stage: Stage, out: str, timings: dict, place: str, launch: str = ""):
    """Run `stage` into `out`; `place` ("3 of 19": of this host's stages) goes on its line."""
    if jax.process_index() == 0:
        print(f"== stage {stage.name} -> {out}  ({place})", flush=True)
    run_dir.clear_failure(out)  # a retry
    start = time.perf_counter()
    try:
        stage.run(stage.config, out)
    except Preempted:  # saved, not failed
        raise
    except BaseException as e:
        run_dir.fail(out, e, launch)
        raise
    timings[stage.name] = time.perf_counter() - start
    run_dir.write_json(out, SECONDS, {"seconds": timings[stage.name]})


def _run_stack(group: list[Stage], outs: list[str], timings: dict, place: str, run_stacked,
               launch: str = ""):
    """`group` (runs of one stack, upstream finished) as one stacked program."""
    if jax.process_index() == 0:
        for i, (stage, out) in enumerate(zip(group, outs, strict=True)):
            print(f"== stage {stage.name} -> {out}  ({place}; stacked, {i + 1} of "
                  f"{len(group)})", flush=True)
    for out in outs:
        run_dir.clear_failure(out)
    start = time.perf_counter()
    try:
        run_stacked([s.config for s in group], outs)
    except Preempted:
        raise
    except BaseException as e:
        for stage, out in zip(group, outs, strict=True):
            if not _finished(stage, out):  # a run the stack finished before it failed is done
                run_dir.fail(out, e, launch)
        raise
    seconds = (time.perf_counter() - start) / len(group)
    timings.update({s.name: seconds for s in group})
    for out in outs:
        run_dir.write_json(out, SECONDS, {"seconds": seconds, "stacked_runs": len(group)})


def merged_timings(workdir: str) -> dict:
    """Every shard's stage timings (a sweep writes one file per shard)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(workdir, "timings*.json"))):
        out.update(run_dir.read_json(workdir, os.path.basename(path)))
    return out


def stage_seconds(stages: list[Stage], workdir: str) -> dict:
    """{stage name: seconds its run took} of the finished `stages`, from each stage's own
    record in its directory (the timings files are by name, so a stage rerun under another
    config on another shard would read the older run's time); a stage run before those
    records were kept: the timings files'."""
    files, where, out = merged_timings(workdir), _directories(workdir), {}
    for stage in stages:
        record = run_dir.read_json(where(stage), SECONDS)
        if record is not None:
            out[stage.name] = record["seconds"]
        elif stage.name in files:
            out[stage.name] = files[stage.name]
    return out
