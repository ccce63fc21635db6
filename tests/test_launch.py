"""`launch/tpu_vm.sh` as run against a pod slice, with `gcloud`, `curl` and the workers' Python
stood in for by small scripts on PATH: `gcloud ... ssh --worker=all` runs the remote command in
a bash per worker (each its own HOME), `curl` answers the TPU metadata server's questions as a
slice of WORKERS hosts does (a comma-separated list with no newline at its end), and the
workers' `python3` runs `-c` checks for real, installs nothing, and records what
`alignment_gap.main` was given.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GCLOUD = r'''#!/usr/bin/env bash
# Stands in for `gcloud compute tpus tpu-vm {scp,ssh}` on a slice of $WORKERS workers.
what=$4; shift 4
if [ "$what" = scp ]; then
  for ((i = 0; i < WORKERS; i++)); do mkdir -p "$SLICE/w$i"; cp "$1" "$SLICE/w$i/"; done
  exit 0
fi
while [ "$1" != --command ]; do shift; done
worst=0
for ((i = 0; i < WORKERS; i++)); do
  HOME="$SLICE/w$i" WORKER=$i bash -c "$2" > "$SLICE/w$i.out" 2>&1 || rc=$?
  [ "${rc:-0}" -gt "$worst" ] && worst=$rc; rc=0
  cat "$SLICE/w$i.out"
done
exit $worst
'''

CURL = r'''#!/usr/bin/env bash
# The metadata server of worker $WORKER in a slice of $WORKERS.
url=${!#}
case "$url" in
  */agent-worker-number) printf '%s' "$WORKER" ;;
  */worker-network-endpoints)
    for ((i = 0; i < WORKERS; i++)); do printf '%sw%d:%d:10.0.0.%d' "${i:+,}" $i $i $i; done \
      | sed 's/^,//' ;;
  *) exit 22 ;;
esac
'''

PYTHON = r'''#!/usr/bin/env bash
# A worker's python3: -c runs for real; pip installs nothing; main records its argv.
if [ "$1" = --version ]; then "$REAL_PYTHON" --version; exit; fi
if [ "$1" = -c ]; then exec "$REAL_PYTHON" "$@"; fi
if [ "$2" = pip ]; then exit 0; fi
shift 2
printf '%s\n' "$@" > "$HOME/main_args"
echo "main on worker $WORKER"
exit "${MAIN_EXIT:-0}"
'''

OLD_PYTHON = r'''#!/usr/bin/env bash
[ "$1" = --version ] && { echo "Python 3.10.12"; exit 0; }
exit 1
'''


def _stubs(tmp_path, workers: int, python: str = PYTHON) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("gcloud", GCLOUD), ("curl", CURL), ("python3", python)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "slice").mkdir()
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "WORKERS": str(workers),
            "SLICE": str(tmp_path / "slice"), "REAL_PYTHON": sys.executable}


def _launch(root, env, *flags, main_args=("--workdir", "/mnt/gcs/b/study")):
    return subprocess.run(["bash", os.path.join(root, "launch", "tpu_vm.sh"), "--tpu", "t",
                           "--zone", "z", *flags, "--", *main_args], env=env,
                          capture_output=True, text=True, timeout=120)


def _main_args(tmp_path, worker: int) -> list[str]:
    return (tmp_path / "slice" / f"w{worker}" / "main_args").read_text().splitlines()


def test_sweep_gives_each_worker_its_number_and_the_worker_count(tmp_path):
    env = _stubs(tmp_path, workers=4)
    seeds = "--config.seeds=(0, 1)"  # a space and parentheses: one argument on the worker too
    out = _launch(ROOT, env, "--sweep", main_args=("--workdir", "/mnt/gcs/b/s", seeds))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    launches = set()
    for worker in range(4):
        args = _main_args(tmp_path, worker)
        assert args[:-1] == ["--workdir", "/mnt/gcs/b/s", seeds, f"--config.sweep.shard={worker}",
                             "--config.sweep.shards=4"], args
        assert re.fullmatch(r"--config\.sweep\.launch=tpu-\d{8}T\d{6}-\d+", args[-1]), args
        launches.add(args[-1])
        assert f"main on worker {worker}" in out.stdout  # the log, followed to the end
        assert (tmp_path / "slice" / f"w{worker}" / "alignment_gap.log").exists()
    assert len(launches) == 1  # one launch: every shard names the same


def test_one_job_over_all_workers_returns_the_runs_exit_status(tmp_path):
    env = {**_stubs(tmp_path, workers=2), "MAIN_EXIT": "75"}
    out = _launch(ROOT, env)
    assert out.returncode == 75, out.stdout[-2000:] + out.stderr[-2000:]
    assert _main_args(tmp_path, 1)[-1] == "--config.distributed.from_environment=True"


def test_a_relaunch_keeps_the_last_runs_log(tmp_path):
    env = _stubs(tmp_path, workers=1)
    for exit_status in ("75", "0"):  # preempted, then resumed to the end
        out = _launch(ROOT, {**env, "MAIN_EXIT": exit_status})
        assert out.returncode == int(exit_status), out.stdout[-2000:] + out.stderr[-2000:]
    home = tmp_path / "slice" / "w0"
    logs = sorted(home.glob("alignment_gap-*.log"))
    assert len(logs) == 2 and all(p.read_text() == "main on worker 0\n" for p in logs), logs
    newest = max(logs, key=lambda p: p.stat().st_mtime_ns)
    assert os.readlink(home / "alignment_gap.log") == str(newest)


def test_a_worker_python_older_than_3_11_stops_before_installing(tmp_path):
    env = _stubs(tmp_path, workers=2, python=OLD_PYTHON)
    out = _launch(ROOT, env)
    assert out.returncode == 2
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("error: Python 3.10.12 on ") and "--python" in line, line
    assert not (tmp_path / "slice" / "w0" / "alignment_gap").exists()  # nothing unpacked


@pytest.mark.parametrize("edited", [False, True])
def test_the_checkout_is_shipped_with_its_uncommitted_edits(tmp_path, edited):
    repo = tmp_path / "checkout"
    (repo / "launch").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "launch", "tpu_vm.sh"), repo / "launch")
    readme = repo / "README.md"
    readme.write_text("committed\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for step in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "c"]):
        subprocess.run(git + step, cwd=repo, check=True, timeout=60)
    if edited:
        readme.write_text("an edit not yet committed\n")
    out = _launch(str(repo), _stubs(tmp_path, workers=1))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    shipped = tmp_path / "slice" / "w0" / "alignment_gap" / "README.md"
    assert shipped.read_text() == readme.read_text()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout
    assert status == (" M README.md\n" if edited else ""), status  # the checkout untouched
    assert "stash" not in subprocess.run(["git", "stash", "list"], cwd=repo, capture_output=True,
                                         text=True, check=True).stdout


def test_local_sh_reads_relative_paths_from_where_it_is_run(tmp_path):
    stub = tmp_path / "python"
    stub.write_text('#!/usr/bin/env bash\npwd; printf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    out = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "--workdir", "out"],
                         cwd=tmp_path, env={**os.environ, "PYTHON": str(stub)},
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.splitlines() == [str(tmp_path), "-m", "alignment_gap.main", "--workdir",
                                       "out"]


SRUN = r'''#!/usr/bin/env bash
# Stands in for srun: $SLURM_NTASKS tasks of the command here, srun's status the highest.
while [[ "$1" == --* ]]; do shift; done
worst=0
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i "$@"; rc=$?
  [ "$rc" -gt "$worst" ] && worst=$rc
done
exit $worst
'''

TASK = r'''#!/usr/bin/env bash
# A task's `python -m alignment_gap.main`: exits with the status $STATUSES gives its task, and
# on 75 says it saved as main does (preemption.record_saved).
status=$(echo $STATUSES | cut -d' ' -f$((SLURM_PROCID + 1)))
if [ "$status" = 75 ]; then
  mkdir -p "$ALIGNMENT_GAP_SAVED_DIR" && echo 75 > "$ALIGNMENT_GAP_SAVED_DIR/process_$SLURM_PROCID"
fi
exit "$status"
'''


@pytest.mark.parametrize("statuses,requeued,status", [
    ("75 75 75", True, 75), ("75 1 75", False, 1), ("0 0 0", False, 0), ("1 1 1", False, 1)])
def test_slurm_requeues_only_when_every_process_saved(tmp_path, statuses, requeued, status):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("python", TASK),
                       ("scontrol", '#!/usr/bin/env bash\necho "$@" >> "$REQUEUES"\n')):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NTASKS": "3",
           "SLURM_JOB_ID": "42", "SLURM_CPUS_PER_TASK": "4", "SLURM_SUBMIT_DIR": str(tmp_path),
           "STATUSES": statuses, "REQUEUES": str(tmp_path / "requeues")}
    (tmp_path / ".alignment_gap_saved" / "42").mkdir(parents=True)  # a previous attempt's
    (tmp_path / ".alignment_gap_saved" / "42" / "process_1").write_text("75\n")
    out = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), "--workdir", "w"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == status, out.stderr
    assert (tmp_path / "requeues").exists() == requeued
    if requeued:
        assert (tmp_path / "requeues").read_text() == "requeue 42\n"
    if statuses == "75 1 75":
        assert "error: 2 of 3 processes saved" in out.stderr



def test_local_multiprocess_refuses_zero_processes():
    """It launched nothing and exited 0."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "local_multiprocess.py"),
                           "--num_processes", "0", "--", "--config", "configs/demo.py:mini"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--num_processes and --devices_per_process must be >= 1" in done.stderr
