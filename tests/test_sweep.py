"""A study's runs fanned out over independent hosts sharing one workdir (`config.sweep`).

Real processes run the stage scheduler on a small stage graph whose stages only record when
and where they ran: every stage runs exactly once, on its owner, after its inputs; a failure on
one host stops the others with the failing stage named instead of a hang.
"""

import json
import os
import re
import select
import subprocess
import sys
import threading
import time

import ml_collections
import pytest

from launch.local_multiprocess import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r'''
import os, sys, time
import ml_collections
from alignment_gap import run_dir
from alignment_gap.study.scheduler import Stage, failure_records, run_stages, wait_for

workdir, shard, shards, fail = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
time.sleep(float(sys.argv[5]) if shard == 1 else 0)  # shard 1 starting late
# Failure records already there when a shard starts are an earlier attempt's (it waits for
# their retry): a failing stage below waits until every shard has looked, so a shard slow to
# start (a loaded machine) does not take this attempt's failure for an earlier one.
earlier = failure_records(workdir)
open(os.path.join(workdir, f"looked-{shard}"), "w").close()

def job(name):
    def run(cfg, out):
        start = time.time()
        if name == fail:
            while not all(os.path.exists(os.path.join(workdir, f"looked-{k}"))
                          for k in range(shards)):
                time.sleep(0.05)
            raise RuntimeError(f"{name} broke")
        time.sleep(0.2)
        run_dir.finish(out, shard=shard, start=start, end=time.time())
    return run

def stage(name, upstream=(), run=False):
    return Stage(name, ml_collections.ConfigDict({"name": name}), job(name), tuple(upstream),
                 {"method": "m"} if run else {})

base = stage("base")
runs = [stage(f"run{i}", [base], run=True) for i in range(4)]
analysis = stage("analysis", [runs[1], runs[2]])
late = stage("late_base")  # a shared stage listed after work that other hosts wait for
late_runs = [stage(f"late_run{i}", [late], run=True) for i in range(2)]
stages = [base, *runs, analysis, late, *late_runs]
run_stages(stages, workdir, shard, shards, poll_s=0.05, timeout_s=60, earlier=earlier)
if shard == 0:
    wait_for(stages, workdir, 0.05, 60, "the report")
print("exit", shard)
'''


def _sweep(workdir, shards, fail="", shard1_late_s=0.0):
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(workdir), str(k), str(shards),
                               fail, str(shard1_late_s)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(shards)]
    return [(p.wait(timeout=120), *p.communicate()) for p in procs]


def _done(workdir):
    out = {}
    for path in (workdir / "stages").glob("*/DONE.json"):
        out[path.parent.name.rsplit("-", 1)[0]] = json.loads(path.read_text())
    return out


UPSTREAM = {"run0": ["base"], "run1": ["base"], "run2": ["base"], "run3": ["base"],
            "analysis": ["run1", "run2"], "late_run0": ["late_base"],
            "late_run1": ["late_base"]}


def test_every_stage_runs_once_on_its_owner_after_its_inputs(tmp_path):
    results = _sweep(tmp_path, 2)
    for rc, _, err in results:
        assert rc == 0, err[-2000:]
    printed = [line.split()[2] for _, out, _ in results for line in out.splitlines()
               if line.startswith("== stage")]
    assert sorted(printed) == sorted(["base", "analysis", "late_base", *UPSTREAM.keys() -
                                      {"analysis"}])  # each exactly once
    done = _done(tmp_path)
    # Runs go round-robin over the hosts; shared stages run on shard 0.
    assert {name: d["shard"] for name, d in done.items()} == {
        "base": 0, "analysis": 0, "late_base": 0, "run0": 0, "run1": 1, "run2": 0, "run3": 1,
        "late_run0": 0, "late_run1": 1}
    for name, inputs in UPSTREAM.items():
        assert all(done[name]["start"] >= done[u]["end"] for u in inputs), name


def test_a_failed_stage_stops_the_hosts_waiting_for_it(tmp_path):
    (rc0, out0, err0), (rc1, _, err1) = _sweep(tmp_path, 2, fail="run1")
    assert rc1 != 0 and "run1 broke" in err1
    assert rc0 != 0 and "stage run1 failed" in err0 and "run1 broke" in err0
    assert "exit 0" not in out0
    assert json.loads(next(tmp_path.glob("stages/run1-*/FAILED.json")).read_text())["error"] \
        == "RuntimeError: run1 broke"
    # Both shards again, run1's owner starting late: the other waits for the retry instead of
    # stopping on the earlier attempt's record.
    retried = _sweep(tmp_path, 2, shard1_late_s=2.0)
    for rc, _, err in retried:
        assert rc == 0, err[-2000:]
    assert not list(tmp_path.glob("stages/*/FAILED.json"))
    assert set(_done(tmp_path)) == {"base", "late_base", *UPSTREAM}
    # The waiting shard says whose retry it waits for (once), and how long it would wait.
    said = [line for line in retried[0][1].splitlines() if line.startswith("waiting for")]
    assert said == ["waiting for stage run1, failed before this job started (RuntimeError: "
                    "run1 broke): shard 1 retries it when it starts; if that shard stopped in "
                    "this attempt already, stop this job (it would wait "
                    "config.sweep.wait_timeout_s=60 s; naming the launch, config.sweep.launch, "
                    "tells them apart)"]


@pytest.mark.parametrize("shard", [-1, 2])
def test_shard_out_of_range_is_a_one_line_error(shard):
    from alignment_gap.config_checks import validate
    from alignment_gap.errors import ConfigError
    from configs import study

    c = study.get_config("smoke")
    c.sweep.shards, c.sweep.shard = 2, shard
    with pytest.raises(ConfigError, match=r"config.sweep.shard: .* not in \[0, sweep.shards=2\)"):
        validate(c, 1)


def test_bucket_workdir_is_refused_with_the_mount_named(tmp_path):
    out = subprocess.run([sys.executable, "-m", "alignment_gap.main", "--config",
                          os.path.join(ROOT, "configs", "study.py:smoke"),
                          "--workdir", "gs://bucket/study"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: --workdir: gs://bucket/study")
    assert "launch/tpu_vm.sh --bucket" in out.stderr



HOLDER = r'''
import sys, time
import ml_collections
from alignment_gap.study import sweep_members

workdir, shard, shards, stack_runs = sys.argv[1], *map(int, sys.argv[2:5])
sweep = {"shard": shard, "shards": shards, "stack_runs": stack_runs}
with sweep_members.member(workdir, ml_collections.ConfigDict({"sweep": sweep,
                                                                "seeds": [0, 1]})):
    print("held", flush=True)
    time.sleep(600)  # until the test kills it
'''


def test_live_shards_given_other_settings_or_the_same_shard_stop_at_once(tmp_path):
    """A job holds its shard of the workdir while it runs: a second job of that shard, or one
    given another config (`shards` and `stack_runs` decide who trains which run, the rest the
    plan) stops with one line naming the field; once the holder is killed, its file no longer
    counts."""
    from alignment_gap.errors import ConfigError
    from alignment_gap.study import sweep_members

    def join(seeds=(0, 1), **sweep):
        config = ml_collections.ConfigDict({"sweep": sweep, "seeds": list(seeds)})
        with sweep_members.member(str(tmp_path), config):
            pass

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "1", "2", "8"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert select.select([holder.stdout], [], [], 120)[0], "the holder did not start"
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"^config.sweep.stack_runs: 1 here \(shard 0\), "
                           rf"but a job of shard 1 \(pid {holder.pid} on .*\) runs this workdir "
                           r"with 8; give every shard the same"):
            join(shard=0, shards=2, stack_runs=1)
        with pytest.raises(ConfigError, match=r"^config.sweep.shards: 1 here"):
            join(shard=0, shards=1, stack_runs=8)
        with pytest.raises(ConfigError, match=rf"^config.sweep.shard: shard 1 of "
                           rf"{re.escape(str(tmp_path))} is already running \(pid {holder.pid} "):
            join(shard=1, shards=2, stack_runs=8)
        with pytest.raises(ConfigError, match=r"^config.seeds: \[0\] here \(shard 0\), but a job "
                           r"of shard 1 .* with \[0, 1\]; give every shard the same config"):
            join(seeds=[0], shard=0, shards=2, stack_runs=8)
        join(shard=0, shards=2, stack_runs=8)  # the same config: a fellow shard
        # Through the entry point: one line, status 2, before anything is written.
        out = subprocess.run([sys.executable, "-m", "alignment_gap.main", "--config",
                              os.path.join(ROOT, "configs", "study.py:smoke"), "--workdir",
                              str(tmp_path), "--config.sweep.shards=2"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr[-2000:]
        assert out.stderr.strip().splitlines()[-1].startswith(
            "error: config.sweep.stack_runs: 1 here (shard 0), but a job of shard 1")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    finally:
        holder.kill()
        holder.wait(timeout=60)
    join(shard=0, shards=1, stack_runs=2)  # the killed job's claim went with it
    assert (tmp_path / "sweep" / "shard-1.json").exists()


def test_shards_started_together_with_the_same_settings_all_join(tmp_path):
    """Jobs launched at once (`launch/local_multiprocess.py --sweep`) take their files under one
    mutex: none is refused, and each sees the others whole."""
    holders = [subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), str(k), "3", "2"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for k in range(3)]
    try:
        for holder in holders:
            assert select.select([holder.stdout], [], [], 120)[0], holder.stderr.read()[-2000:]
            assert holder.stdout.readline().strip() == "held", holder.stderr.read()[-2000:]
        records = [json.loads((tmp_path / "sweep" / f"shard-{k}.json").read_text())
                   for k in range(3)]
        assert [(r["shard"], r["pid"], r["config"]) for r in records] == [
            (k, h.pid, {"sweep.shards": 3, "sweep.stack_runs": 2, "seeds": [0, 1]})
            for k, h in enumerate(holders)]
    finally:
        for holder in holders:
            holder.kill()
            holder.wait(timeout=60)


def test_a_stopped_shard_marks_its_other_stages_so_hosts_waiting_on_them_stop(tmp_path):
    """Shard 0 fails at run0 before its late_base, which shard 1's late_run1 needs: shard 1
    stops naming the cause (it waited out the whole timeout, saying it was still waiting)."""
    (rc0, _, err0), (rc1, _, err1) = _sweep(tmp_path, 2, fail="run0")
    assert rc0 != 0 and "run0 broke" in err0
    assert rc1 != 0 and "stage late_base failed" in err1
    assert "not run: shard 0 stopped at stage run0 (RuntimeError: run0 broke)" in err1
    for rc, _, err in _sweep(tmp_path, 2):  # the retry clears the records
        assert rc == 0, err[-2000:]
    assert not list(tmp_path.glob("stages/*/FAILED.json"))


def _stage(name, upstream=(), seconds=0.0):
    from alignment_gap import run_dir
    from alignment_gap.study.scheduler import Stage

    def run(cfg, out):
        time.sleep(seconds)
        run_dir.finish(out)
    return Stage(name, ml_collections.ConfigDict({"name": name}), run, tuple(upstream),
                 {"method": "m"})


def test_the_wait_timeout_counts_waiting_not_the_shards_own_work(tmp_path):
    """Shard 1 trains for 3 s, then waits 1 s for shard 0's stage: within a 2 s timeout."""
    from alignment_gap import run_dir
    from alignment_gap.study.scheduler import run_stages

    theirs = _stage("theirs")  # shard 0's (runs go round-robin), finished by a timer here
    mine, later = _stage("mine", seconds=3.0), _stage("later", [theirs])  # shard 1's
    timer = threading.Timer(4.0, lambda: run_dir.finish(theirs.directory(str(tmp_path))))
    timer.start()
    try:
        run_stages([theirs, mine, _stage("other"), later], str(tmp_path), shard=1, shards=2,
                   poll_s=0.05, timeout_s=2.0)
    finally:
        timer.cancel()
    assert run_dir.is_finished(later.directory(str(tmp_path)), 1)


def test_a_stage_failed_in_this_launch_before_the_shard_started_stops_it_at_once(
        tmp_path, capsys):
    """A failure record naming this shard's launch (`sweep.launch`) is this attempt's, though
    it was there when the shard started: it stops, naming the stage. Another launch's is an
    earlier attempt's: the shard waits for its owner's retry."""
    from alignment_gap import run_dir
    from alignment_gap.errors import StageFailed
    from alignment_gap.study.scheduler import run_stages

    theirs = _stage("theirs")  # shard 0's
    later = _stage("later", [theirs])  # shard 1's
    directory = theirs.directory(str(tmp_path))
    run_dir.fail(directory, RuntimeError("theirs broke"), launch="tpu-b")
    start = time.monotonic()
    with pytest.raises(StageFailed, match=r"stage theirs failed \(see .*\): RuntimeError: "
                                          "theirs broke"):
        run_stages([theirs, later], str(tmp_path), shard=1, shards=2, poll_s=0.05,
                   timeout_s=30, launch="tpu-b")
    assert time.monotonic() - start < 10  # not the wait timeout
    retry = lambda: (run_dir.clear_failure(directory), run_dir.finish(directory))
    timer = threading.Timer(1.0, retry)
    timer.start()
    try:
        run_stages([theirs, later], str(tmp_path), shard=1, shards=2, poll_s=0.05,
                   timeout_s=30, launch="tpu-c")
    finally:
        timer.cancel()
    assert run_dir.is_finished(later.directory(str(tmp_path)), 1)
    assert ("waiting for stage theirs, failed before this job started (RuntimeError: theirs "
            "broke): shard 0 retries it when it starts (the failure is another launch's than "
            "this one, tpu-c)") in capsys.readouterr().out


def test_the_launch_id_moves_no_stage_directory(tmp_path):
    """A relaunch names a new `sweep.launch`; every stage must stay where it was (resumed)."""
    from alignment_gap.study import pipeline
    from configs import study

    named = study.get_config("smoke_hypotheses")
    named.sweep.launch = "tpu-20261207T170000-1"
    where = lambda c: [s.directory(str(tmp_path)) for s in pipeline.build_plan(
        c, str(tmp_path)).stages]
    assert where(named) == where(study.get_config("smoke_hypotheses"))


def test_a_signal_while_a_shard_waits_stops_it_for_a_requeue(tmp_path, monkeypatch):
    from alignment_gap import preemption
    from alignment_gap.study.scheduler import run_stages, wait_for

    theirs = _stage("theirs")
    later = _stage("later", [theirs])
    monkeypatch.setattr(preemption._state, "requested", "SIGTERM")
    with pytest.raises(preemption.Preempted, match="while stage later waited for its inputs"):
        run_stages([theirs, later], str(tmp_path), shard=1, shards=2, poll_s=0.05,
                   timeout_s=60)
    with pytest.raises(preemption.Preempted, match="while waiting for stage theirs"):
        wait_for([theirs], str(tmp_path), 0.05, 60, "the report")


def test_the_processes_of_one_job_run_its_stages_on_process_0s_view(tmp_path):
    """Two processes of one job (`jax.distributed`): process 0 writes each stage's finished
    record a moment after the other returns, and process 1 never sees them. Each runs every
    stage once, in order, and neither stops (before, process 1 found a stage it had just run
    unfinished: "returned without finishing")."""
    address = f"127.0.0.1:{free_port()}"
    worker = os.path.join(ROOT, "tests", "scheduler_worker.py")
    outs = [tmp_path / f"out_{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, worker, address, str(i), str(tmp_path / "w"),
                               str(out)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, out in enumerate(outs)]
    try:
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:  # a hang: no process outlives the test
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [log[-2000:] for log in logs]
    assert [json.loads(out.read_text())["ran"] for out in outs] == [["a", "b", "c"]] * 2


def test_the_report_reads_each_stages_own_run_time(tmp_path):
    """A stage rerun under another config on a sweep's shard: the report's time is that run's,
    not the older single-host run's that timings.json still holds under the same name."""
    from alignment_gap import run_dir
    from alignment_gap.study import scheduler

    def stage(seconds):
        def run(config, out):
            time.sleep(seconds)
            run_dir.finish(out)
        return scheduler.Stage("a", ml_collections.ConfigDict({"seconds": seconds}), run)

    scheduler.run_stages([stage(0.0)], str(tmp_path))
    rerun = stage(0.3)
    scheduler.run_stages([rerun], str(tmp_path), shard=0, shards=2)
    assert scheduler.merged_timings(str(tmp_path))["a"] < 0.3  # the older run's, by name
    assert scheduler.stage_seconds([rerun], str(tmp_path))["a"] >= 0.3
