"""Hypothesis 1, data coverage (paper Sec. 5.1, Fig. 3-4, App. F-G).

Every online run records its batches (`D_online`). Offline IPO then replays that stream with
the online run's own hyper-parameters: in order ("tandem": it must retrace the online run),
shuffled within windows of a few batches and of an eighth of the run (the paper's 4 and 500 of
4k), and shuffled uniformly. If online wins because of what its data covers, the shuffled
replays should keep most of its lead over plain offline IPO on D_golden. The verdicts compare
runs at matched KL budgets with t-intervals (`shared.matched`): a replay
"gains" or "degrades" only where an interval excludes zero.
"""

from __future__ import annotations

import os

from alignment_gap import run_dir
from alignment_gap.metrics import read_jsonl
from alignment_gap.study.hypotheses import shared
from alignment_gap.study.hypotheses.shared import Finding, Verdict

NAME, TITLE = "coverage", "Data coverage: replaying D_online offline"
TRAIN_KEYS = ("loss", "h", "kl_sequence", "grad_norm")


def batches(window, steps: int) -> int:
    """A replay window in batches: an int as given; a fraction below 1, that share of the run's
    steps (at least 2), so it follows --config.policy.steps."""
    return window if isinstance(window, int) else max(2, int(steps * window))


def runs(plan) -> dict:
    s = plan.study
    out = {"online": [], **{label: [] for label, _, _ in s.coverage.orders},
           "offline_same_lr": [], "offline": []}
    for seed in s.seeds:
        online = plan.online(seed)
        out["online"].append(online)
        lr = online.meta["learning_rate"]
        for label, order, window in s.coverage.orders:
            out[label].append(plan.offline(seed, lr, s.policy.beta, s.policy.steps, method=label,
                                           group=NAME,
                                           replay=(online, order, batches(window, s.policy.steps))))
        # D_golden at the replays' learning rate: what a replay's gain is measured against
        # (the main sweep's run where it has one, not a second run of the same config).
        main = [run for run in plan.main_runs("offline") if run.meta["seed"] == seed
                and (run.meta["learning_rate"], run.meta["beta"], run.meta["steps"])
                == (lr, s.policy.beta, s.policy.steps)]
        out["offline_same_lr"] += main[:1] or [
            plan.offline(seed, lr, s.policy.beta, s.policy.steps, method="offline_same_lr",
                         group=NAME)]
    out["offline"] = plan.main_runs("offline")
    return out


def add_stages(plan):
    runs(plan)


def tandem_gap(plan, online_stages, tandem_stages) -> float:
    """Largest relative difference of any training statistic at any step, tandem vs online."""
    worst = 0.0
    for online, tandem in zip(online_stages, tandem_stages, strict=True):
        recs = [{r["step"]: r for r in read_jsonl(os.path.join(plan.dir(st), run_dir.METRICS))
                 if "loss" in r} for st in (online, tandem)]
        for step in set(recs[0]) & set(recs[1]):
            for key in TRAIN_KEYS:
                a, b = recs[0][step][key], recs[1][step][key]
                worst = max(worst, abs(a - b) / max(abs(a), 1e-8))
    return worst


def analyse(plan, rows, workdir: str) -> Finding:
    s, r = plan.study, runs(plan)
    rows = shared.labelled(rows, r)
    labels = list(r)
    describe = {"online": "online IPO (records D_online)", "offline": "offline IPO on D_golden "
                "(the main sweep)", "offline_same_lr": "offline IPO on D_golden at the replays' "
                "(online's) learning rate", "tandem": "D_online in recorded order",
                "shuffled": "D_online shuffled uniformly"}
    for label, order, window in s.coverage.orders:
        if order == "window":
            describe[label] = ("D_online shuffled within windows of "
                               f"{batches(window, s.policy.steps)} batches")
    gap = tandem_gap(plan, r["online"], r["tandem"])
    win_gap = _matched_eval_gap(rows)
    points = shared.scored_points(plan, r)
    lines = shared.runs_section(rows, points, labels, describe, workdir, "coverage.png",
                                "Data coverage: offline IPO on the online stream (cf. Fig. 3-4)")
    lines += ["", f"Tandem replay vs the online run it replays: largest relative difference of "
              f"{'/'.join(TRAIN_KEYS)} at any step {gap:.1e}; largest golden win-rate "
              f"difference at any checkpoint {win_gap:.3f}."]
    verdicts = [Verdict("Tandem replay of D_online reproduces the online run (~0.1%)",
                        f"max relative difference {gap:.1e}, win rate {win_gap:.3f}",
                        bool(gap < 1e-3))]
    # Against offline on D_golden at the replays' own learning rate: a replay differs from it
    # in its data alone (the main sweep's rates differ too). Compared at matched KL.
    verdicts.append(shared.matched_verdict(
        "Offline on D_online shuffled gains little over plain offline", plan, r,
        [("shuffled", "offline_same_lr"), ("online", "shuffled")], gains_little,
        names={"offline_same_lr": "offline at the same learning rate"}, alike=(0,)))
    windows = [label for label, order, _ in s.coverage.orders if order == "window"]
    if windows:
        verdicts.append(shared.matched_verdict(
            "Partial shuffling: flat at first, then degrades", plan, r,
            [("tandem", windows[0]), ("tandem", "shuffled")], flat_then_degrades,
            alike=(0,)))
    return Finding(NAME, TITLE, lines, verdicts)


def gains_little(gain, lead: int) -> bool | None:
    """`gain`: shuffled minus offline (an `alike_side`); `lead`: online minus shuffled. Agrees
    where the gain's interval lies inside +-shared.EQUAL_MARGIN (or below 0) and online still
    leads; differs where the gain is decided."""
    if gain == 1:
        return False
    return True if gain in (shared.EQUAL, -1) and lead > 0 else None


def flat_then_degrades(flat, degrade: int) -> bool | None:
    """`flat`: tandem minus the smallest window (an `alike_side`); `degrade`: tandem minus
    fully shuffled. Agrees where the first is alike within the margin and the second decided
    for tandem."""
    if flat in (1, -1) or degrade < 0:
        return False
    return True if flat == shared.EQUAL and degrade > 0 else None


def _matched_eval_gap(rows) -> float:
    """Largest |win rate(tandem) - win rate(online)| at the same seed and step."""
    online = {(r["seed"], r["step"]): r["win_rate"] for r in rows if r["method"] == "online"}
    diffs = [abs(r["win_rate"] - online[(r["seed"], r["step"])]) for r in rows
             if r["method"] == "tandem" and (r["seed"], r["step"]) in online]
    return float(max(diffs)) if diffs else float("nan")


