"""Hypothesis 5, scaling the policy (paper Sec. 5.5, Fig. 10-11).

The same study at several policy sizes (>= 8x parameters apart; on CPU `nano`, `mini`,
`small`) with the same proxy and golden models: each size gets its own SFT, online runs and
offline sweep. Win rates are against each size's own SFT policy, so sizes are compared through
"best" = the `scaling.quantile` quantile of each method's run peaks at a size, normalised by
online's (the paper's Fig. 11 normalisation). The paper: peaks rise with size, and the
online-offline gap barely narrows.
"""

from __future__ import annotations

import itertools
import os

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from alignment_gap.models import LanguageModel
from alignment_gap.presets import models
from alignment_gap.study.hypotheses import shared
from alignment_gap.study.hypotheses.shared import Finding, Verdict
from alignment_gap.train.common import model_config

NAME, TITLE = "scaling", "Scaling the policy"


def _model(study, size: str):
    if size == study.model.name:
        return None  # the main study's runs
    m = models.get_config(size)
    m.max_len, m.dtype = study.model.max_len, study.model.dtype
    return m


def runs(plan) -> dict:
    s, out = plan.study, {}
    for size in s.scaling.sizes:
        model, group = _model(s, size), (NAME if size != s.model.name else "main")
        out[("online", size)] = [plan.online(seed, model=model, group=group) for seed in s.seeds]
        out[("offline", size)] = [
            plan.offline(seed, lr, beta, steps, model=model, group=group)
            for seed, lr, beta, steps in itertools.product(
                s.seeds, s.offline_learning_rates, s.offline_betas, s.offline_steps)]
    return out


def add_stages(plan):
    runs(plan)


def parameter_count(model_cfg) -> int:

    abstract = nnx.eval_shape(lambda: LanguageModel(model_config(model_cfg), nnx.Rngs(0)))
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))


def analyse(plan, rows, workdir: str) -> Finding:
    s, r = plan.study, runs(plan)
    q = s.scaling.quantile
    table = []
    for size in s.scaling.sizes:
        params = parameter_count(_model(s, size) or s.model)
        entry = {"size": size, "params": params}
        for metric in ("win_rate", "oracle_win_rate"):
            for method in ("online", "offline"):
                sub = shared.labelled(rows, {method: r[(method, size)]})
                peaks = shared.run_peaks(sub, method, metric)
                entry[f"{method}/{metric}"] = float(np.quantile(peaks, q)) if peaks else np.nan
            entry[f"normalised/{metric}"] = (entry[f"offline/{metric}"]
                                             / entry[f"online/{metric}"])
        table.append(entry)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    x = [e["params"] for e in table]
    for metric, style in (("win_rate", "-o"), ("oracle_win_rate", ":x")):
        judge = "golden" if metric == "win_rate" else "oracle"
        for i, method in enumerate(("online", "offline")):
            axes[0].plot(x, [e[f"{method}/{metric}"] for e in table], style, color=f"C{i}",
                         label=f"{method} ({judge})")
        axes[1].plot(x, [e[f"normalised/{metric}"] for e in table], style, color="C2",
                     label=f"offline / online ({judge})")
    for ax, yl in zip(axes, (f"best win rate vs own SFT ({q:.0%} quantile of runs)",
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
    plt.close(fig)
    lines = ["![scaling.png](scaling.png)", "",
             "| policy | parameters | online best | offline best | offline / online | "
             "oracle: online | oracle: offline / online |", "|" + " --- |" * 7]
    for e in table:
        lines.append(f"| {e['size']} | {e['params']:,} | {shared.num(e['online/win_rate'])} | "
                     f"{shared.num(e['offline/win_rate'])} | "
                     f"{shared.num(e['normalised/win_rate'])} | "
                     f"{shared.num(e['online/oracle_win_rate'])} | "
                     f"{shared.num(e['normalised/oracle_win_rate'])} |")
    lines += ["", f"Best = the {q:.0%} quantile over a method's runs of each run's peak golden "
              f"win rate (seeds {list(s.seeds)}; offline: the whole sweep). Each size plays "
              "against its own SFT policy; the proxy and golden models are the same for all."]
    first, last = table[0], table[-1]
    norm = [e["normalised/win_rate"] for e in table]
    verdicts = [
        Verdict("A bigger policy reaches a higher peak win rate",
                ", ".join(f"{e['size']} {e['online/win_rate']:.3f}" for e in table)
                + " (online best)", bool(last["online/win_rate"] > first["online/win_rate"])),
        Verdict("The online-offline gap barely narrows with size (offline best < online best)",
                "offline / online " + ", ".join(f"{e['size']} {e['normalised/win_rate']:.3f}"
                                                for e in table),
                bool(all(v < 1.0 for v in norm))),
    ]
    return Finding(NAME, TITLE, lines, verdicts)
