"""Hypothesis 4, a non-contrastive loss (paper Sec. 5.4, Fig. 9).

Best-of-2 (SFT on the winner of each pair, no reference, no loser) online against the proxy,
offline on D_golden (its own learning-rate sweep; compared with online at matched KL budgets,
`study/differences.py`), and offline on the Best-of-2 online run's own stream shuffled. If the gap
comes from contrastive losses, it should vanish here; the paper finds it persists (except on
Chatbot Arena), and that the shuffled online stream roughly matches online.
"""

from __future__ import annotations

from alignment_gap.study import differences, report
from alignment_gap.study.hypotheses import shared
from alignment_gap.study.hypotheses.shared import Finding, Verdict

NAME, TITLE = "noncontrastive", "A non-contrastive loss: Best-of-2"
LOSS = "best_of_two"


def runs(plan) -> dict:
    s, lr = plan.study, plan.study.noncontrastive.learning_rate
    out = {"online_b2": [], "offline_b2": [], "shuffled_b2": []}
    for seed in s.seeds:
        online = plan.online(seed, lr, loss=LOSS, group=NAME)
        out["online_b2"].append(online)
        out["offline_b2"] += [plan.offline(seed, offline_lr, s.policy.beta, s.policy.steps,
                                           method="offline_b2", group=NAME, loss=LOSS)
                              for offline_lr in s.noncontrastive.offline_learning_rates]
        out["shuffled_b2"].append(plan.offline(seed, lr, s.policy.beta, s.policy.steps,
                                               method="shuffled_b2", group=NAME, loss=LOSS,
                                               replay=(online, "shuffle", 1)))
    out["online"] = [plan.online(seed) for seed in s.seeds]
    out["offline"] = plan.main_runs("offline")
    return out


def add_stages(plan):
    runs(plan)


def _judges(comparison) -> str:
    """Both judges' differences at the comparison's headline budget."""
    rows = {judge: differences.headline(comparison, judge) for judge in ("golden", "oracle")}
    return shared.judges_text({judge: r for judge, r in rows.items() if r is not None})


def analyse(plan, rows, workdir: str) -> Finding:
    r = runs(plan)
    rows = shared.labelled(rows, r)
    labels = list(r)
    describe = {"online_b2": "Best-of-2 online (proxy picks the winner)",
                "offline_b2": "Best-of-2 on D_golden winners",
                "shuffled_b2": "Best-of-2 on online_b2's stream, shuffled",
                "online": "online IPO (main)", "offline": "offline IPO (main sweep)"}
    points = shared.scored_points(plan, r)
    lines = shared.runs_section(rows, points, labels, describe, workdir, "noncontrastive.png",
                                "Best-of-2: online vs offline (cf. Fig. 9)")
    # Online against offline's own lr sweep at matched KL, from per-prompt outcomes.
    points, methods = shared.outcome_points(plan, r), ("online_b2", "offline_b2")
    comparison = differences.compare(points, methods=methods)
    mixed = differences.compare(points, methods=methods, interpolate=True)
    row = differences.headline(comparison)
    lines += ["", "Best-of-2 online minus offline at matched KL budgets (as the main study's "
              "verdict; offline over its learning rates "
              f"{list(plan.study.noncontrastive.offline_learning_rates)}):", "",
              *report.budget_table(comparison, methods), "",
              "The same through interpolated frontiers (mixtures of two checkpoints, as in the "
              "main report):", "", *report.budget_table(mixed, methods)]
    gap = (None if row is None or row["verdict"] == "undecided"
           else row["verdict"] == "online_b2 better")
    verdicts = [
        Verdict("With Best-of-2 the online-offline gap persists",
                "no matched budget" if row is None else
                f"online minus offline at KL {row['kl']:.3g}: {_judges(comparison)}; through "
                f"interpolated frontiers: {_judges(mixed)}", gap),
        shared.matched_verdict("Best-of-2 on the online stream, shuffled, roughly matches online",
                               plan, r, [("shuffled_b2", "online_b2")], roughly_matches,
                               alike=(0,)),
    ]
    return Finding(NAME, TITLE, lines, verdicts)


def roughly_matches(difference) -> bool | None:
    """Agrees where the difference's interval lies inside +-shared.EQUAL_MARGIN (an
    `alike_side`), differs where it excludes 0; an interval that holds 0 but reaches past the
    margin is undecided."""
    return True if difference == shared.EQUAL else False if difference in (1, -1) else None
