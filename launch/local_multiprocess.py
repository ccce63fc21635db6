"""Run `alignment_gap.main` as N processes on this machine, joined by `jax.distributed`.

The multi-host code path (process-sharded data, collectives across processes, process-0-only
writes) on one laptop, with CPU devices per process:

    python launch/local_multiprocess.py --num_processes 2 --devices_per_process 2 -- \\
        --config configs/demo.py:mini --workdir /tmp/demo_2proc

`--sweep` starts N independent jobs instead (no jax.distributed), shard i of N of a study's
runs, sharing one workdir - how a sweep fans out over hosts (`config.sweep`):

    python launch/local_multiprocess.py --sweep --num_processes 2 -- \\
        --config configs/study.py:smoke --workdir /tmp/smoke_sweep

If one process fails, the others are stopped and the launcher exits with its status. SIGTERM
to the launcher is passed to every process: they save the same step and exit with 75 (requeue,
`alignment_gap/preemption.py`), and so does the launcher; rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

EXIT_REQUEUE = 75  # alignment_gap.preemption.EXIT_REQUEUE: saved on a signal, not failed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(num_processes: int, devices_per_process: int, main_args: list[str],
           port: int | None = None, timeout_s: float | None = None, sweep: bool = False) -> int:
    address = f"127.0.0.1:{port or free_port()}"
    launch_id = f"local-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"
    procs = []
    for i in range(num_processes):
        cmd = [sys.executable, "-m", "alignment_gap.main", *main_args]
        if sweep:
            cmd += [f"--config.sweep.shard={i}", f"--config.sweep.shards={num_processes}",
                    f"--config.sweep.launch={launch_id}"]
        else:
            cmd += [f"--config.distributed.coordinator_address={address}",
                    f"--config.distributed.num_processes={num_processes}",
                    f"--config.distributed.process_id={i}",
                    f"--config.distributed.local_cpu_devices={devices_per_process}"]
        procs.append(subprocess.Popen(cmd))
    signal.signal(signal.SIGTERM, lambda signum, frame: [
        p.send_signal(signum) for p in procs if p.poll() is None])
    return supervise(procs, timeout_s)


def supervise(procs, timeout_s: float | None = None) -> int:
    """Wait for `procs`; the first to fail (or the timeout) stops the others. Exit status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    status = 0
    while any([p.poll() is None for p in procs]):  # a list: every process polled each time
        failed = [p.returncode for p in procs if p.returncode not in (None, 0, EXIT_REQUEUE)]
        late = deadline is not None and time.monotonic() > deadline
        if failed or late:
            status = failed[0] if failed else 124
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            break
        time.sleep(0.2)
    for p in procs:
        p.wait()
    return status or next((p.returncode for p in procs if p.returncode), 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--timeout_s", type=float, default=None)
    parser.add_argument("--sweep", action="store_true",
                        help="independent jobs, one sweep shard each, sharing the workdir")
    parser.add_argument("main_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be >= 1")
    main_args = args.main_args[1:] if args.main_args[:1] == ["--"] else args.main_args
    return launch(args.num_processes, args.devices_per_process, main_args, args.port,
                  args.timeout_s, args.sweep)


if __name__ == "__main__":
    sys.exit(main())
