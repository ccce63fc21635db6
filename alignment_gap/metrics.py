"""Metric aggregation (clu.metrics) and writers: JSONL + TensorBoard event files, process 0 only.

TensorBoard files are written with tensorboardX, so a CPU install needs no TensorFlow
(clu.metric_writers would import it). Every run writes `metrics.jsonl`, one JSON object per
logged step; notebooks and the study's report read that file.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from clu import metrics as clu_metrics
from tensorboardX import SummaryWriter

from alignment_gap import run_dir
from alignment_gap.errors import DataError


class Window:
    """Averages each metric over the steps since the last `reset()` (clu.metrics.Average)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.added: list[dict[str, float]] = []  # each step's host scalars since the reset

    def add(self, metrics: dict[str, float]):
        self.added.append(dict(metrics))

    def compute(self) -> dict[str, float]:
        """Averages merged in step order. Each Average is built from numpy float32 (what its
        `from_model_output` computes, but with no eager jax op: those took 18% of a smoke
        study's time); the count is float32 so the division is float32, as in jax."""
        averages: dict[str, clu_metrics.Average] = {}
        for metrics in self.added:
            for name, value in metrics.items():
                update = clu_metrics.Average(total=np.float32(value), count=np.float32(1))
                averages[name] = averages[name].merge(update) if name in averages else update
        return {name: float(avg.compute()) for name, avg in averages.items()}


class Writer:
    """Writes scalars to `<workdir>/metrics.jsonl` and `<workdir>/tensorboard/<name>`.
    `purge_step`: TensorBoard hides what earlier event files logged from that step on (a
    resumed run logs those steps again)."""

    def __init__(self, workdir: str, name: str = "train", purge_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, run_dir.METRICS)
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            # Event files are named by the second they open in: the suffix keeps a rerun within
            # the same second from overwriting the earlier attempt's file.
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard", name),
                                     purge_step=purge_step, filename_suffix=f".{time.time_ns()}")

    def write(self, step: int, scalars: dict, prefix: str = ""):
        if not self.enabled:
            return
        record = {"step": int(step), **{f"{prefix}{k}": float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(f"{prefix}{name}", float(value), int(step))
        self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()


def drop_after(workdir: str, step: int):
    """Keep the records of `metrics.jsonl` up to `step`, the step a run resumes from (none when
    it starts afresh: even step 0's evaluation is logged again). Process 0; atomic."""
    path = os.path.join(workdir, run_dir.METRICS)
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:  # the last line may be one a killed process left half
                raise DataError(f"{path}: line {i + 1} is not JSON; delete the file to start "
                                "its log afresh (the checkpoints are unaffected)") from None
    kept = [r for r in records if 0 < step and r["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """`step 120/400  loss 0.512  31.4 steps/s  eta 9s` lines (printed by process 0)."""

    def __init__(self, total_steps: int, first_step: int = 0):
        self.total, self.first = total_steps, first_step
        self.start = time.perf_counter()
        self._last_time, self._last_step = self.start, first_step

    def window_rate(self, step: int) -> float:
        """Steps per second since the previous call (the logging window)."""
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        return rate

    def line(self, step: int, scalars: dict, keys=("loss",)) -> str:
        elapsed = time.perf_counter() - self.start
        rate = (step - self.first) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        shown = "  ".join(f"{k} {scalars[k]:.4g}" for k in keys if k in scalars)
        return f"step {step}/{self.total}  {shown}  {rate:.1f} steps/s  eta {eta:.0f}s"
