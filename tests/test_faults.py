"""Runs stopped or damaged mid-way, in real processes with real signals and files.

Preemption: a signal mid-run saves that step, records it, exits 75, and a rerun goes on as if
the run had never stopped. A damaged latest checkpoint: the previous one is restored, with a
warning naming both, and the run ends as an undamaged one would."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from alignment_gap.metrics import read_jsonl
from launch.local_multiprocess import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUEUE = 75


def _args(workdir, data, *flags):
    return [sys.executable, "-m", "alignment_gap.main", "--config",
            os.path.join(ROOT, "configs", "sft.py:tiny"), "--workdir", str(workdir),
            f"--config.data.dir={data}", "--config.num_steps=40", "--config.checkpoint_every=20",
            "--config.log_every=1", *flags]


def _signal_after_step(procs, signum, step=2, to=(0,), timeout=180):
    """Wait for process 0's progress line of `step`, then signal the processes `to`."""
    deadline = time.monotonic() + timeout
    for line in procs[0].stdout:
        match = re.match(r"step (\d+)/", line)
        if match and int(match.group(1)) >= step:
            break
        assert time.monotonic() < deadline, "training did not start"
    for i in to:
        procs[i].send_signal(signum)
    return [p.communicate(timeout=timeout) for p in procs]


def _train_rows(workdir):
    return [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]


def _main(run, data, *flags, expect=0, timeout=300):
    """The tiny SFT run through the entry point, to its end; asserts its exit status."""
    done = subprocess.run(_args(run, data, *flags), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == expect, done.stderr[-3000:]
    return done


def _assert_losses_as_straight(root, run):
    """Each of the 40 steps logged once, with the uninterrupted run's loss."""
    a, b = _train_rows(root / "straight"), _train_rows(run)
    assert [r["step"] for r in b] == list(range(1, 41))
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6), x["step"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("preemption")
    _main(root / "straight", root / "data")
    return root


def test_sigint_saves_the_step_and_the_rerun_goes_on_as_if_never_stopped(straight):
    root = straight
    run = root / "interrupted"
    proc = subprocess.Popen(_args(run, root / "data"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ((_, err),) = _signal_after_step([proc], signal.SIGINT)
    assert proc.returncode == REQUEUE, err[-3000:]
    record = json.loads((run / "PREEMPTED.json").read_text())
    saved = record["step"]
    assert record["signal"] == "SIGINT" and 2 <= saved < 20  # not the scheduled checkpoint
    assert (run / "checkpoints" / str(saved)).is_dir() and not (run / "DONE.json").exists()
    assert err.strip().splitlines()[-1].startswith(f"preempted: SIGINT at step {saved} of 40")

    _main(run, root / "data")
    assert not (run / "PREEMPTED.json").exists()
    _assert_losses_as_straight(root, run)
    evals = lambda d: [r for r in read_jsonl(os.path.join(d, "metrics.jsonl")) if "loss" not in r]
    assert evals(run) == evals(root / "straight")  # validation at steps 20 and 40, once each


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_saved_step(straight, tmp_path):
    root = straight
    address = f"127.0.0.1:{free_port()}"
    run = tmp_path / "two"
    flags = ["--config.num_steps=200", "--config.checkpoint_every=100",
             f"--config.distributed.coordinator_address={address}",
             "--config.distributed.num_processes=2", "--config.distributed.local_cpu_devices=1"]
    saved_dir = tmp_path / "saved"  # where launch/slurm.sbatch asks each process to say it saved
    env = {**os.environ, "ALIGNMENT_GAP_SAVED_DIR": str(saved_dir)}
    procs = [subprocess.Popen(_args(run, root / "data", *flags,
                                    f"--config.distributed.process_id={i}"),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
             for i in range(2)]
    outs = _signal_after_step(procs, signal.SIGTERM, to=(1,))
    assert [p.returncode for p in procs] == [REQUEUE, REQUEUE], [e[-2000:] for _, e in outs]
    assert sorted(os.listdir(saved_dir)) == ["process_0", "process_1"]
    steps = {int(re.search(r"at step (\d+) of", err).group(1)) for _, err in outs}
    saved = json.loads((run / "PREEMPTED.json").read_text())["step"]
    assert steps == {saved} and saved < 100
    assert sorted(os.listdir(run / "checkpoints")) == [str(saved)]


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(straight, tmp_path):
    root = straight
    run = tmp_path / "damaged"
    shutil.copytree(root / "straight", run)
    (run / "DONE.json").unlink()
    for chunk in (run / "checkpoints" / "40" / "params").rglob("d/*"):  # half of every chunk
        chunk.write_bytes(chunk.read_bytes()[:chunk.stat().st_size // 2])
    done = _main(run, root / "data")
    (warning,) = [line for line in done.stderr.splitlines() if "could not be read" in line]
    assert warning.startswith(f"warning: checkpoint {run / 'checkpoints' / '40'} (")
    assert warning.endswith(f"kept as .damaged, resumed from {run / 'checkpoints' / '20'}")
    assert (run / "checkpoints" / "40.damaged").is_dir()  # kept, out of orbax's way
    _assert_losses_as_straight(root, run)


def test_a_second_job_on_the_same_workdir_stops_at_once_and_a_killed_one_leaves_no_lock(
        straight, tmp_path):
    root = straight
    run = tmp_path / "busy"
    first = subprocess.Popen(_args(run, root / "data", "--config.num_steps=2000"), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in first.stdout:  # training has started
        if re.match(r"step \d+/", line):
            break
    second = _main(run, root / "data", expect=2, timeout=120)
    assert second.stderr.strip().splitlines()[-1] == (
        f"error: --workdir: {run} is in use by pid {first.pid} on {os.uname().nodename}; wait "
        "for it to end or pass another --workdir (hosts sharing a study's runs: "
        "--config.sweep.shards)")
    first.kill()  # SIGKILL: no handler runs, the kernel drops the lock with the process
    first.communicate(timeout=60)
    again = subprocess.run(_args(run, root / "data", "--config.num_steps=2"), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert "in use by" not in again.stderr, again.stderr[-3000:]


@pytest.fixture
def small_disk(tmp_path):
    """A 3.5 MB tmpfs: room for one checkpoint of the tiny SFT run, not two (needs root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3500k", "tmpfs",
                                            str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_stops_with_one_line_and_the_last_checkpoint_resumes(straight, small_disk):
    root = straight
    run = small_disk / "run"
    full = _main(run, root / "data", expect=1)
    assert full.stderr.strip().splitlines()[-1] == (
        f"error: no space left on the device of {run}; free space or move --workdir, then run "
        "the same command: the last good checkpoint of every run is intact and the run resumes "
        "from it")
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    _main(run, root / "data")
    _assert_losses_as_straight(root, run)  # resumed from step 20's checkpoint


def test_ctrl_c_stops_the_demo_naming_the_step(tmp_path):
    """The demo keeps no checkpoint; its loop never asked, so a first SIGINT was caught and
    ignored and the run went on to its end."""
    proc = subprocess.Popen([sys.executable, "-m", "alignment_gap.main", "--config",
                             os.path.join(ROOT, "configs", "demo.py:mini"), "--workdir",
                             str(tmp_path), "--config.num_steps=100000", "--config.log_every=1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:  # a demo that goes on does not outlive the test
        proc.kill()
    assert proc.returncode == REQUEUE, err[-3000:]
    assert re.fullmatch(r"preempted: stopped after step \d+ of 100000; the demo keeps no "
                        r"checkpoint: the same command runs it again from its first step",
                        err.strip().splitlines()[-1]), err[-3000:]
    assert not (tmp_path / "DONE.json").exists()
