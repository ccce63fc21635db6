"""The results table (one row per evaluated checkpoint) and the numbers the report states.

`collect`, `outcome_points` and `online_ends` read a study's run directories; the rest are
pure functions of the table, so notebooks and tests call them on any study's `results.json`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os

import numpy as np
from scipy.special import stdtrit  # the t quantile (scipy.stats costs 0.6 s to import)

from alignment_gap import run_dir
from alignment_gap.metrics import read_jsonl
from alignment_gap.study import differences

COLUMNS = ("stage", "group", "size", "method", "chain", "seed", "learning_rate", "beta", "steps",
           "step",
           "kl", "win_rate", "oracle_win_rate", "classifier_accuracy", "likelihood_drift",
           "response_length")


def collect(stages, workdir: str) -> list[dict]:
    """Every `eval/` row of every policy run, with the run's method and hyper-parameters."""
    rows = []
    for stage in stages:
        if "method" not in stage.meta:
            continue
        path = os.path.join(stage.directory(workdir), run_dir.METRICS)
        if not os.path.exists(path):
            continue
        for record in read_jsonl(path):
            if "eval/win_rate" not in record:
                continue
            row = {"stage": stage.name, "size": stage.config.model.name, "chain": 0,
                   **stage.meta, "step": record["step"]}
            row.update({k[len("eval/"):]: v for k, v in record.items() if k.startswith("eval/")})
            rows.append({c: row.get(c, float("nan")) for c in COLUMNS})
    return rows


def write(rows: list[dict], workdir: str):
    run_dir.write_text(workdir, "results.json", json.dumps(rows, indent=1))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    run_dir.write_text(workdir, "results.csv", table.getvalue())


# Two-sided 95% t quantiles by sample size as the reports have always printed them (two
# decimals); larger samples use the exact quantile.
T_975 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of a 95% t-interval; nan width (no interval) from one value or
    values that agree exactly (two seeds that happened to agree are not a zero-width interval)."""
    values = np.asarray([v for v in values if np.isfinite(v)], float)
    if values.size == 0:
        return float("nan"), float("nan")
    if values.size == 1 or np.all(values == values[0]):  # no spread to estimate from
        return float(values.mean()), float("nan")
    t = T_975.get(values.size) or float(stdtrit(values.size - 1, 0.975))
    half = t * values.std(ddof=1) / math.sqrt(values.size)
    return float(values.mean()), float(half)


def held_out_peaks(comparison: dict, judge: str = "golden") -> dict:
    """Per method {"per_seed": {seed: peak}, "mean_ci": (mean, 95% half-width)} from
    `differences.compare`'s peaks: each seed's checkpoint the selection prompts rate best at any
    KL, scored on the test prompts."""
    out = {}
    for method, by_judge in comparison.get("peaks", {}).items():
        by_seed = {key: v for key, v in by_judge.get(judge, {}).items() if np.isfinite(v)}
        if by_seed:
            out[method] = {"per_seed": by_seed, "mean_ci": mean_ci(list(by_seed.values()))}
    return out


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Upper-left Pareto frontier of (kl, value): no other point has less KL and more value."""
    best, out = -np.inf, []
    for kl, value in sorted(points):
        if value > best:
            out.append((kl, value))
            best = value
    return out


def outcome_points(stages, workdir: str, group: str | None = "main") -> list[dict]:
    """Every evaluation of `group`'s policy runs (None: of every policy run among `stages`)
    with its per-prompt outcomes (`run_dir.read_outcomes`): the input of
    `differences.compare`. Step 0 (the SFT policy, KL 0) is kept: it is the policy every
    budget can afford."""
    points = []
    for stage in stages:
        if "method" not in stage.meta or group not in (None, stage.meta.get("group")):
            continue
        for step, arrays in run_dir.read_outcomes(stage.directory(workdir)).items():
            points.append({**arrays, "stage": stage.name, "method": stage.meta["method"],
                           "seed": stage.meta["seed"], "chain": stage.meta.get("chain", 0),
                           "learning_rate": stage.meta.get("learning_rate"),
                           "beta": stage.meta.get("beta"), "step": step,
                           "kl": float(np.mean(arrays["kl"]))})
    return points


def judge_agreement(points: list[dict]) -> dict | None:
    """How far the golden judge's verdict on a policy sample against the opponent's agrees
    with the oracle's (both 1 / 0.5 / 0; credit 1 - |golden - oracle|, so an oracle tie
    earns either verdict half, as on D_golden's pairs: `relabel.oracle_agreement`), per
    method, over the evaluations after step 0 and over each run's last one: the golden model
    graded on the samples the policies produce, where over-optimisation would open a gap.
    None without oracle outcomes (real data)."""
    points = [p for p in points if "oracle_win" in p and p["step"] > 0]
    if not points:
        return None
    last = {}
    for p in points:
        if p["step"] > last.get(p["stage"], -1):
            last[p["stage"]] = p["step"]
    rate = lambda ps: round(float(np.mean(np.concatenate(
        [1.0 - np.abs(np.asarray(p["win"]) - np.asarray(p["oracle_win"])) for p in ps]))), 3)
    return {method: {"all evaluations": rate([p for p in points if p["method"] == method]),
                     "last evaluations": rate([p for p in points if p["method"] == method
                                               and p["step"] == last[p["stage"]]])}
            for method in sorted({p["method"] for p in points})}


def online_ends(stages, workdir: str, policy) -> str | None:
    """Where the main online runs ended under the stop rule (None where it is off): how many
    ran every step and the steps the rule stopped the others at, so a reader sees whether the
    curves turned or the step cap cut them."""
    falls, cap = policy.get("stop_after_falls", 0), policy.get("kl_cap", 0.0)
    if not falls and not cap:
        return None
    runs = [s for s in stages
            if s.meta.get("method") == "online" and s.meta.get("group") == "main"]
    ends = [run_dir.result(s.directory(workdir)) for s in runs]
    fired = [int(e["step"]) for e in ends if e.get("stopped_early")]
    stopped = sorted(step for step in fired if step < policy.steps)
    margin = policy.get("stop_margin", 0.0)
    rule = " or ".join(r for r in (
        falls and (f"the golden win rate below its best{f' by over {margin:g}' if margin else ''}"
                   f" at {falls} evaluations"),
        cap and f"KL over {cap:g} nats") if r)
    at_last = len(fired) - len(stopped)  # the rule fired at the last evaluation anyway
    return (f"the rule ({rule}) stopped {len(stopped)} of {len(runs)} before step "
            f"{policy.steps}" + (f" (at steps {stopped})" if stopped else "")
            + f"; {len(runs) - len(stopped)} ran all {policy.steps} steps"
            + (f" (the rule fired at the last one in {at_last})" if at_last else ""))


def verdict(comparison: dict) -> str:
    """The study's verdict (`differences.sentence`): a winner only where the interval of the
    difference excludes zero, the oracle's view beside the golden judge's."""
    return differences.sentence(comparison)

