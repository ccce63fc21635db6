"""What the hypothesis analyses share: their result types, rows of a set of runs, peaks, tables,
small statistics."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from alignment_gap.study import report, results


@dataclasses.dataclass
class Verdict:
    claim: str  # What the paper found.
    ours: str  # What this run found, with its numbers.
    agree: bool | None  # None: too few runs to say.


@dataclasses.dataclass
class Finding:
    name: str
    title: str
    lines: list[str]  # The report section's Markdown body (figures written beside it).
    verdicts: list[Verdict]


def labelled(rows: list[dict], runs: dict) -> list[dict]:
    """The rows of each label's stages, with `method` set to the label."""
    out = []
    for label, stages in runs.items():
        names = {s.name for s in stages}
        out += [dict(r, method=label) for r in rows if r["stage"] in names]
    return out


def outcome_points(plan, runs: dict) -> list[dict]:
    """Per-prompt outcomes of each label's stages (`results.outcome_points`), `method` set to
    the label: the input of `differences.compare` for a hypothesis's own runs."""
    return [dict(p, method=label) for label, stages in runs.items()
            for p in results.outcome_points(stages, plan.workdir, group=None)]


def run_peaks(rows: list[dict], label: str, metric: str = "win_rate") -> list[float]:
    """The best checkpoint (past step 0) of each run of `label`."""
    best = {}
    for r in rows:
        if r["method"] == label and r["step"] > 0 and np.isfinite(r[metric]):
            best[r["stage"]] = max(best.get(r["stage"], -np.inf), r[metric])
    return list(best.values())


def seed_peaks(rows, label: str, metric: str = "win_rate"):
    """(mean, 95% half-width) over seeds of each seed's best checkpoint over its runs."""
    return results.peaks([r for r in rows if r["method"] == label], metric).get(
        label, {"mean_ci": (float("nan"), float("nan"))})["mean_ci"]


def peak_table(rows, labels, describe: dict) -> list[str]:
    lines = ["| runs | what | golden win rate (peak) | oracle win rate (peak) | runs |",
             "| --- | --- | --- | --- | --- |"]
    for label in labels:
        n = len(run_peaks(rows, label))
        golden, oracle = (report.format_interval(seed_peaks(rows, label, metric))
                          for metric in ("win_rate", "oracle_win_rate"))
        lines.append(f"| {label} | {describe.get(label, '')} | {golden} | {oracle} | {n} |")
    return lines


def figure(rows, labels, workdir: str, filename: str, title: str) -> str:
    report.frontier_plot(rows, os.path.join(workdir, filename), methods=labels, title=title)
    return f"![{filename}]({filename})"


def runs_section(rows, labels, describe: dict, workdir: str, filename: str,
                 title: str) -> list[str]:
    """The frontier figure of these runs, then their peak table."""
    return [figure(rows, labels, workdir, filename, title), "",
            *peak_table(rows, labels, describe)]


def overlap(a, b) -> bool:
    """Do two (mean, half-width) intervals overlap (a missing width counts as overlapping)?"""
    (ma, ha), (mb, hb) = a, b
    if not (np.isfinite(ha) and np.isfinite(hb)):
        return True
    return abs(ma - mb) <= ha + hb


def num(x: float, digits: int = 3) -> str:
    return "-" if not np.isfinite(x) else f"{x:.{digits}f}"
