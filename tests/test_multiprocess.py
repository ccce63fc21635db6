"""Real processes joined by jax.distributed: 2 x 2 CPU devices must match 1 x 4 exactly (an
update step, and a relabelling by a preference model sharded over both processes)."""

import json
import os
import subprocess
import sys

import pytest

from alignment_gap import run_dir
from launch.local_multiprocess import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multiprocess_worker.py")
ENV = dict(os.environ, PYTHONPATH=ROOT)


def _run_workers(tmp_path, num_processes, devices, layout="torus"):
    address = f"127.0.0.1:{free_port()}"
    outs = [tmp_path / f"{layout}_{num_processes}_{i}.json" for i in range(num_processes)]
    data = tmp_path / "data"  # the synthetic dataset and tokenizer, built by the first run
    procs = [subprocess.Popen([sys.executable, WORKER, address, str(num_processes), str(i),
                               str(devices), str(out), str(data), layout], env=ENV, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, out in enumerate(outs)]
    for p in procs:
        output, _ = p.communicate(timeout=240)
        assert p.returncode == 0, output[-3000:]
    return [json.loads(o.read_text()) for o in outs]


def test_two_processes_match_one_process(tmp_path):
    (one,) = _run_workers(tmp_path, 1, 4)
    two = _run_workers(tmp_path, 2, 2)
    interleaved = _run_workers(tmp_path, 2, 2, "interleaved")
    assert one["devices"] == 4 and all(r["processes"] == 2 and r["devices"] == 4 for r in two)
    assert sorted(r["rows"] for r in two) == [[[0, 4]], [[4, 8]]]  # each supplies its half
    # Processes alternating along the batch axis each supply two blocks.
    assert sorted(r["rows"] for r in interleaved) == [[[0, 2], [4, 6]], [[2, 4], [6, 8]]]
    for result in two + interleaved:
        for key in ("loss", "grad_norm", "loss_after_step"):
            assert result[key] == pytest.approx(one[key], rel=1e-5), key
        # A model judge relabels on both processes' devices: the same dataset as on one.
        assert result["relabelled"] == one["relabelled"] and len(one["relabelled"]) == 8


def test_launcher_runs_the_demo_on_two_processes(tmp_path):
    workdir = tmp_path / "demo"
    cmd = [sys.executable, os.path.join(ROOT, "launch", "local_multiprocess.py"),
           "--num_processes", "2", "--devices_per_process", "2", "--timeout_s", "240", "--",
           "--config", os.path.join(ROOT, "configs", "demo.py:mini"), "--workdir", str(workdir),
           "--config.num_steps=12", "--config.warmup_steps=2", "--config.log_every=4",
           "--config.eval_prompts=32",
           "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=1"]
    done = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = run_dir.result(str(workdir))  # the demo's summary is its run's result
    assert summary["processes"] == 2 and summary["devices"] == 4
    assert summary["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert done.stdout.count("final_loss") == 1  # only process 0 reports


def test_the_launcher_stops_the_others_as_soon_as_any_process_fails():
    """The second of two processes fails at once: the first is stopped then, not when it ends."""
    import time

    from launch.local_multiprocess import supervise

    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]),
             subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])]
    start = time.monotonic()
    assert supervise(procs, timeout_s=120) == 3
    assert time.monotonic() - start < 30 and procs[0].returncode is not None
