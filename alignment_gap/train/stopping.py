"""When a run stops before its last step: rules over the evaluations it has logged.

Pure functions of an evaluation history (oldest first). A resumed run rebuilds the history from
its `metrics.jsonl` up to the step it resumes from (`logged`), so it stops where an
uninterrupted run would.

- `plateaued`: a preference model's validation accuracy has not gained `min_improvement` over
  its earlier best for `patience` evaluations (the paper trains those to the plateau).
- `turned`: a policy's golden win rate has been below its best (by more than a margin) at the
  last `falls` evaluations: the curve has passed its peak (the paper's rise and fall).
- `over_cap`: a policy's KL budget is spent.
"""

from __future__ import annotations

import os

from alignment_gap import run_dir
from alignment_gap.metrics import read_jsonl


def plateaued(history: list[float], patience: int, min_improvement: float) -> bool:
    best_before = max(history[:-patience], default=-1.0)
    return len(history) > patience and max(history[-patience:]) <= best_before + min_improvement


def turned(history: list[float], falls: int, margin: float = 0.0) -> bool:
    """True once the last `falls` values all lie more than `margin` below the best before them
    (`falls` > 0). A margin of about the evaluation's noise keeps chance dips from ending a
    rising run."""
    if falls <= 0 or len(history) <= falls:
        return False
    return max(history[-falls:]) < max(history[:-falls]) - margin


def over_cap(kl: float, cap: float) -> bool:
    """True when `cap` > 0 and `kl` exceeds it."""
    return cap > 0 and kl > cap


def logged(workdir: str, key: str, upto_step: int) -> list[float]:
    """The values of `key` logged in `workdir/metrics.jsonl` at steps up to `upto_step`."""
    path = os.path.join(workdir, run_dir.METRICS)
    if not os.path.exists(path):
        return []
    return [r[key] for r in read_jsonl(path) if key in r and r["step"] <= upto_step]
