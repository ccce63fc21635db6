"""Preemption: SIGTERM or SIGINT finishes the current step, saves, records it and exits to requeue.

Schedulers preempt with SIGTERM and kill with SIGKILL after a grace period (SLURM's GraceTime,
a Cloud TPU spot VM's notice). `install()` (the entry point calls it) turns the first SIGTERM
or SIGINT into a request; the training loop asks `reached()` after every update and, when
it is true, saves a checkpoint of that step, records `PREEMPTED.json` in the run directory and
raises `Preempted`. `main` exits with `EXIT_REQUEUE` (75, EX_TEMPFAIL: "try again"), and the
same command resumes from the saved step. A second signal of the same kind is not caught: it
stops the process at once (the last good checkpoint is still intact).

Several processes (`jax.distributed`): jax's preemption sync manager takes SIGTERM on any
process and, through the coordination service, agrees on the next step every process reaches
(`multihost_utils.reached_preemption_sync_point`), so all of them save the same step. SIGINT
is forwarded to the process itself as SIGTERM to take the same path. The step number given to
the sync point counts every loop step this process ran, across the stages of a study, so it
only increases (the protocol needs that) and is the same on every process.

Stages without update steps (dataset builds, relabelling, the report) run to their end; the
study stops before its next stage.

A launcher running several processes learns which of them saved: with `$ALIGNMENT_GAP_SAVED_DIR`
set, each process that exits 75 leaves `process_<index>` there (`record_saved`). srun reports
the highest status of its tasks, so 75 alone cannot tell "every process saved" from "one failed
while the others saved"; `launch/slurm.sbatch` requeues only on the first.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

EXIT_REQUEUE = 75  # sysexits.h EX_TEMPFAIL; SLURM: `RequeueExit=75` or `scontrol requeue`
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


SAVED_DIR_ENV = "ALIGNMENT_GAP_SAVED_DIR"


def record_saved():
    """Leave `$ALIGNMENT_GAP_SAVED_DIR/process_<index>` (where set): this process saved and
    exits 75."""
    directory = os.environ.get(SAVED_DIR_ENV)
    if directory:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"process_{jax.process_index()}"), "w") as f:
            f.write(f"{EXIT_REQUEUE}\n")


class Preempted(Exception):  # noqa: N818 - not an error: the run stopped on request
    """The run saved its state and stopped on a preemption signal; rerun to resume."""


class _State:
    requested: str | None = None  # the signal's name, once one arrived (this process)
    agreed = False  # several processes: the sync point was reached
    counter = 0  # loop steps this process ran (the sync point's step number)


_state = _State()


def _multi_process() -> bool:
    return jax.process_count() > 1


def _handle(signum, frame):
    name = signal.Signals(signum).name
    signal.signal(signum, signal.SIG_DFL)  # a second one stops at once
    if _multi_process() and signum != signal.SIGTERM:
        os.kill(os.getpid(), signal.SIGTERM)  # to jax's preemption notifier
        return
    _state.requested = name


def install():
    """Catch the first SIGTERM / SIGINT (main thread only; a no-op elsewhere). With several
    processes, SIGTERM stays with jax's preemption notifier (`jax.distributed.initialize`
    installs it) and only SIGINT is caught here."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in _SIGNALS:
        if _multi_process() and signum == signal.SIGTERM:
            continue
        signal.signal(signum, _handle)


def requested() -> str | None:
    """The name of the signal that asked this process to stop, if any (single process)."""
    return _state.requested


def reached() -> bool:
    """Whether to save and stop after the step just taken. Called once per loop step on every
    process (the multi-process protocol counts the calls)."""
    _state.counter += 1
    if _multi_process() and multihost_utils.reached_preemption_sync_point(_state.counter):
        _state.agreed = True
    return stop_requested()


def stop_requested() -> bool:
    """Whether to stop before the next stage: a signal arrived (one process), or every process
    passed the sync point (several; a signal during a stage without update steps is acted on
    at the next stage's first step)."""
    return _state.agreed if _multi_process() else _state.requested is not None

