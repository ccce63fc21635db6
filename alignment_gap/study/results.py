"""The results table (one row per evaluated checkpoint) and the numbers the report states.

Pure functions of the table, so notebooks and tests call them on any study's `results.json`.
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np

from alignment_gap.metrics import read_jsonl

COLUMNS = ("stage", "group", "size", "method", "seed", "learning_rate", "beta", "steps", "step",
           "kl", "win_rate", "oracle_win_rate", "classifier_accuracy", "likelihood_drift",
           "response_length")


def collect(stages, workdir: str) -> list[dict]:
    """Every `eval/` row of every policy run, with the run's method and hyper-parameters."""
    rows = []
    for stage in stages:
        if "method" not in stage.meta:
            continue
        path = os.path.join(stage.directory(workdir), "metrics.jsonl")
        if not os.path.exists(path):
            continue
        for record in read_jsonl(path):
            if "eval/win_rate" not in record:
                continue
            row = {"stage": stage.name, "size": stage.config.model.name, **stage.meta,
                   "step": record["step"]}
            row.update({k[len("eval/"):]: v for k, v in record.items() if k.startswith("eval/")})
            rows.append({c: row.get(c, float("nan")) for c in COLUMNS})
    return rows


def write(rows: list[dict], workdir: str):
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of a 95% t-interval (nan width with one value)."""
    values = np.asarray([v for v in values if np.isfinite(v)], float)
    if values.size == 0:
        return float("nan"), float("nan")
    if values.size == 1:
        return float(values[0]), float("nan")
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}
    half = t.get(values.size, 1.96) * values.std(ddof=1) / math.sqrt(values.size)
    return float(values.mean()), float(half)


def peaks(rows, metric: str = "win_rate") -> dict:
    """Per method: the best checkpoint of each seed (offline: best over its whole sweep)."""
    out = {}
    for method in sorted({r["method"] for r in rows}):
        by_seed = {}
        for r in rows:
            if r["method"] == method and r["step"] > 0 and np.isfinite(r[metric]):
                by_seed[r["seed"]] = max(by_seed.get(r["seed"], -np.inf), r[metric])
        out[method] = {"per_seed": by_seed, "mean_ci": mean_ci(list(by_seed.values()))}
    return out


KL_BINS = ((0.0, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, 8.0), (8.0, float("inf")))


def matched_kl(rows, metric: str = "win_rate", bins=KL_BINS) -> list[dict]:
    """Best value of each method within each KL bin, averaged over seeds (the frontier)."""
    out = []
    for lo, hi in bins:
        entry = {"kl_bin": (lo, hi)}
        for method in sorted({r["method"] for r in rows}):
            best = {}
            for r in rows:
                if r["method"] == method and r["step"] > 0 and lo <= r["kl"] < hi:
                    best[r["seed"]] = max(best.get(r["seed"], -np.inf), r[metric])
            entry[method] = mean_ci(list(best.values())) if best else (float("nan"),
                                                                       float("nan"))
        out.append(entry)
    return out


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Upper-left Pareto frontier of (kl, value): no other point has less KL and more value."""
    best, out = -np.inf, []
    for kl, value in sorted(points):
        if value > best:
            out.append((kl, value))
            best = value
    return out


def verdict(rows) -> str:
    """One plain sentence on whether online beat offline, with the numbers behind it."""
    p = peaks(rows)
    if "online" not in p or "offline" not in p:
        return "The study has not produced both online and offline runs yet."
    (on, on_ci), (off, off_ci) = p["online"]["mean_ci"], p["offline"]["mean_ci"]
    seeds = len(p["online"]["per_seed"])
    ci = lambda h: "" if not np.isfinite(h) else f" +- {h:.3f}"
    numbers = (f"peak golden win rate online {on:.3f}{ci(on_ci)} vs offline {off:.3f}"
               f"{ci(off_ci)} ({seeds} seed{'s' * (seeds != 1)})")
    separated = np.isfinite(on_ci) and np.isfinite(off_ci) and (on - on_ci) > (off + off_ci)
    if on > off and separated:
        peak = f"Online beats offline: {numbers}; the 95% intervals do not overlap."
    elif on > off:
        peak = (f"Online is ahead but not clearly: {numbers}; the difference is within the "
                "noise of this many seeds and prompts.")
    else:
        peak = f"Online does NOT beat offline here: {numbers}."
    return f"{peak} {_matched_sentence(rows)}"


def _matched_sentence(rows) -> str:
    both, ahead, clear = [], [], []
    for entry in matched_kl(rows):
        (on, on_h), (off, off_h) = entry.get("online", (np.nan,) * 2), entry.get(
            "offline", (np.nan,) * 2)
        if not (np.isfinite(on) and np.isfinite(off)):
            continue
        lo, hi = entry["kl_bin"]
        both.append((lo, hi))
        if on > off:
            ahead.append((on - off, lo, hi))
            if np.isfinite(on_h) and np.isfinite(off_h) and on - on_h > off + off_h:
                clear.append((lo, hi))
    if not both:
        return "No KL budget was reached by both methods, so none can be matched."
    text = (f"At matched KL, online leads in {len(ahead)} of {len(both)} budgets both methods "
            f"reached")
    if ahead:
        lead, lo, hi = max(ahead)
        text += f" (largest lead {lead:.3f} at KL [{lo:g}, {hi:g}))"
    if clear:
        text += f", with non-overlapping 95% intervals in {len(clear)}"
    return text + "."
