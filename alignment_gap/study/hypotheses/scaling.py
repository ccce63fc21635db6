"""Hypothesis 5, scaling the policy (paper Sec. 5.5, Fig. 10-11).

The same study at several policy sizes (>= 8x parameters apart; on CPU `nano`, `mini`,
`small`) with the same proxy and golden models: each size gets its own SFT, online runs and
offline sweep (offline tuned per size: its best over the sweep). Every size plays against one
fixed opponent, the golden policy (the main-size policy trained online against the golden
model), so win rates compare across sizes. The verdicts are matched-KL differences with
t-intervals (`study/differences.py`): online minus offline at each size, and the
largest size's online runs minus the smallest's. The descriptive table shows "best" = the
`scaling.quantile` quantile of each method's run peaks, normalised by online's (the paper's
Fig. 11 normalisation). The paper: peaks rise with size, and the online-offline gap barely
narrows.
"""

from __future__ import annotations

import itertools
import os

import jax
import numpy as np
from flax import nnx

from alignment_gap.models import LanguageModel
from alignment_gap.presets import models
from alignment_gap.study import differences
from alignment_gap.study.hypotheses import shared
from alignment_gap.study.hypotheses.shared import Finding, Verdict
from alignment_gap.study.report import figure
from alignment_gap.train.common import model_config

NAME, TITLE = "scaling", "Scaling the policy"


def _model(study, size: str):
    if size == study.model.name:
        return study.model
    m = models.get_config(size)
    m.max_len, m.dtype = study.model.max_len, study.model.dtype
    return m


def runs(plan) -> dict:
    s, out = plan.study, {}
    opponent = plan.golden_policy()  # one opponent for every size
    for size in s.scaling.sizes:
        # The main study's runs serve its size when they already play the golden policy.
        reuse = size == s.model.name and s.opponent == "golden_policy"
        kw = dict(model=None if reuse else _model(s, size), group="main" if reuse else NAME,
                  opponent=opponent)
        out[("online", size)] = [plan.online(seed, **kw) for seed in s.seeds]
        out[("offline", size)] = [
            plan.offline(seed, lr, beta, steps, **kw)
            for seed, lr, beta, steps in itertools.product(
                s.seeds, s.offline_learning_rates, s.offline_betas, s.offline_steps)]
    return out


def add_stages(plan):
    runs(plan)


def parameter_count(model_cfg) -> int:

    abstract = nnx.eval_shape(lambda: LanguageModel(model_config(model_cfg), nnx.Rngs(0)))
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))


def _difference(row) -> str:
    if row is None:
        return "no matched budget"
    return (f"{row['difference']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}] at KL "
            f"{row['kl']:.3g}, {row['verdict']}")


def _judges(golden, oracle) -> str:
    return f"golden {_difference(golden)}; oracle {_difference(oracle)}"


def _agree(row, better: str) -> bool | None:
    """True when the interval names `better`, None when undecided (or no row), else False."""
    if row is None or row["verdict"] == "undecided":
        return None
    return row["verdict"] == f"{better} better"


def analyse(plan, rows, workdir: str) -> Finding:
    s, r = plan.study, runs(plan)
    q, sizes = s.scaling.quantile, list(s.scaling.sizes)
    table = []
    for size in sizes:
        entry = {"size": size, "params": parameter_count(_model(s, size))}
        points = shared.scored_points(plan, {method: r[(method, size)]
                                             for method in ("online", "offline")})
        for metric, judge in (("win_rate", "golden"), ("oracle_win_rate", "oracle")):
            for method in ("online", "offline"):
                peaks = shared.run_peaks(points, method, judge)
                entry[f"{method}/{metric}"] = float(np.quantile(peaks, q)) if peaks else np.nan
            entry[f"normalised/{metric}"] = (entry[f"offline/{metric}"]
                                             / entry[f"online/{metric}"])
        table.append(entry)
    gaps = {}  # size -> (golden row, oracle row): online minus offline at matched KL
    for size in sizes:
        comparison = differences.compare(shared.outcome_points(
            plan, {"online": r[("online", size)], "offline": r[("offline", size)]}))
        gaps[size] = tuple(differences.headline(comparison, j) for j in ("golden", "oracle"))
    small, large = f"online {sizes[0]}", f"online {sizes[-1]}"
    growth = differences.compare(
        shared.outcome_points(plan, {large: r[("online", sizes[-1])],
                                     small: r[("online", sizes[0])]}), methods=(large, small))
    grown = tuple(differences.headline(growth, j) for j in ("golden", "oracle"))
    _figure(table, q, workdir)
    lines = ["![scaling.png](scaling.png)", "",
             "| policy | parameters | online best | offline best | offline / online | "
             "oracle: online | oracle: offline / online | online - offline at matched KL "
             "(golden) | (oracle) |", "|" + " --- |" * 9]
    for e in table:
        golden, oracle = gaps[e["size"]]
        lines.append(f"| {e['size']} | {e['params']:,} | {shared.num(e['online/win_rate'])} | "
                     f"{shared.num(e['offline/win_rate'])} | "
                     f"{shared.num(e['normalised/win_rate'])} | "
                     f"{shared.num(e['online/oracle_win_rate'])} | "
                     f"{shared.num(e['normalised/oracle_win_rate'])} | {_difference(golden)} | "
                     f"{_difference(oracle)} |")
    lines += ["", f"Win rates against one opponent for every size, the golden policy. Best = "
              f"the {q:.0%} quantile over a method's runs of each run's peak win rate (seeds "
              f"{list(s.seeds)}; offline: the whole sweep), descriptive: at whatever KL, chosen "
              "on the selection prompts and scored on the test prompts. Matched KL: at the "
              "largest budget "
              "both methods reached, checkpoints chosen on the selection prompts and scored "
              "on the test prompts, 95% t-interval (as the main verdict). "
              f"{sizes[-1]} minus {sizes[0]}, online: golden {_difference(grown[0])}; "
              f"oracle {_difference(grown[1])}."]
    persists = [_agree(gaps[size][0], "online") for size in sizes]
    verdicts = [  # decided by the golden judge's interval; the oracle's beside it
        Verdict("A bigger policy reaches a higher win rate (online, at matched KL)",
                f"{sizes[-1]} minus {sizes[0]}: {_judges(*grown)}", _agree(grown[0], large)),
        Verdict("The online-offline gap persists at every size",
                "online minus offline: " + "; ".join(
                    f"{size} {_judges(*gaps[size])}" for size in sizes),
                False if False in persists else None if None in persists else True),
    ]
    return Finding(NAME, TITLE, lines, verdicts)


def _figure(table, q, workdir: str):
    fig, axes = figure(1, 2, (11, 4.2))
    x = [e["params"] for e in table]
    for metric, style in (("win_rate", "-o"), ("oracle_win_rate", ":x")):
        judge = "golden" if metric == "win_rate" else "oracle"
        for i, method in enumerate(("online", "offline")):
            axes[0].plot(x, [e[f"{method}/{metric}"] for e in table], style, color=f"C{i}",
                         label=f"{method} ({judge})")
        axes[1].plot(x, [e[f"normalised/{metric}"] for e in table], style, color="C2",
                     label=f"offline / online ({judge})")
    for ax, yl in zip(axes, (f"best win rate vs the golden policy ({q:.0%} quantile of runs)",
                             "offline best / online best"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("policy parameters")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].axhline(1.0, color="gray", lw=0.8, ls=":")
    fig.suptitle("Scaling the policy with a fixed proxy (cf. Fig. 10-11)")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "scaling.png"), dpi=120)
