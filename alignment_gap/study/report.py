"""The Fig. 1 style plot and the Markdown report a person reads."""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from alignment_gap import run_dir
from alignment_gap.data import datasets
from alignment_gap.study import results

COLORS = {"online": "tab:blue", "offline": "tab:orange"}
FIG1_TITLE = "Online vs offline IPO at matched KL (cf. Tang et al. 2024, Fig. 1)"


def _schedule(policy) -> str:
    """When the policy runs are evaluated, in words."""
    every = policy.checkpoint_every
    offline = policy.get("offline_checkpoint_every", 0) or every
    early = list(policy.get("early_checkpoints", []))
    return (f"at step 0, every {every} steps" + (f" (offline: {offline})" if offline != every
                                                 else "")
            + (f", at steps {early}" if early else "") + " and at each run's last step")


def color(method: str, index: int) -> str:
    return COLORS.get(method, f"C{(index + 2) % 10}")


def figure(rows: int, cols: int, figsize, **subplots) -> tuple[Figure, np.ndarray]:
    """A figure and its axes, made without pyplot: no matplotlib backend is chosen or changed,
    so a notebook that imports this keeps its inline plots (save with `fig.savefig`)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, **subplots)


def frontier_plot(rows, path: str, methods=("online", "offline"), title: str = FIG1_TITLE):
    """x = log KL, y = golden win rate (left) and oracle win rate (right); one dot per
    checkpoint of every run of a method, and the method's Pareto frontier over its runs."""
    metrics = [("win_rate", "golden-model win rate")]
    if any(np.isfinite(r["oracle_win_rate"]) for r in rows):
        metrics.append(("oracle_win_rate", "oracle win rate (synthetic world)"))
    fig, axes = figure(1, len(metrics), (6 * len(metrics), 4.5), squeeze=False)
    for ax, (metric, label) in zip(axes[0], metrics, strict=True):
        for index, method in enumerate(methods):
            pts = [(r["kl"], r[metric]) for r in rows
                   if r["method"] == method and r["step"] > 0 and r["kl"] > 0]
            if not pts:
                continue
            kl, value = np.array(pts).T
            ax.scatter(kl, value, s=14, alpha=0.35, color=color(method, index))
            edge = results.frontier(pts)
            ax.plot(*np.array(edge).T, "-o", ms=4, color=color(method, index),
                    label=f"{method} (frontier, in-sample)")
        ax.axhline(0.5, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("KL(policy || SFT), nats (log scale)")
        ax.set_ylabel(label)
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def format_interval(mean_ci) -> str:
    """`mean +- half-width`; `mean (no interval)` where it cannot be estimated; `-` where
    there is no mean."""
    mean, half = (_number(x) for x in mean_ci)
    if not np.isfinite(mean):
        return "-"
    return f"{mean:.3f}" + (f" +- {half:.3f}" if np.isfinite(half) else " (no interval)")


def _number(x) -> float:
    """`x` as a float, None (what summary.json holds where a number is undefined) as NaN."""
    return float("nan") if x is None else float(x)


def strict_json(value):
    """`value` (JSON-like, numpy scalars included) with every NaN or infinity as None: the
    summary is read by jq and JavaScript too, which refuse Python's NaN and Infinity."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def setting_value(value) -> str:
    """A measured setting as prose: fractions to three decimals, {split: value} as
    `split value, ...`, one level deeper as `name: split value, ...; ...`."""
    if isinstance(value, dict):
        nested = any(isinstance(v, dict) for v in value.values())
        return ("; " if nested else ", ").join(
            f"{k}{':' if nested else ''} {setting_value(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _outside(comparison: dict) -> str:
    return " and ".join(f"{share:.1%} of {method}'s" for method, share in
                        comparison.get("outside_candidates", {}).items())


def budget_table(comparison: dict, methods=("online", "offline")) -> list[str]:
    """`a` minus `b` at each KL budget (`differences.compare`), the golden judge's and the
    oracle's columns."""
    a, b = methods
    judges = list(comparison["rows"])
    if not judges:
        return [f"No seed has both {a} and {b} evaluations yet."]
    head = "| KL budget (nats) |" + "".join(
        f" {j}: {a} | {j}: {b} | {j}: {a} - {b} [95%] |" for j in judges)
    lines = [head, "| --- |" + " --- | --- | --- |" * len(judges)]
    for i, budget in enumerate(comparison["budgets"]):
        mark = " (headline)" if budget == comparison["headline_kl"] else ""
        cells = []
        for j in judges:
            r = {k: _number(v) if k in (a, b, "difference", "low", "high") else v
                 for k, v in comparison["rows"][j][i].items()}
            interval = ("no interval" if not np.isfinite(r["low"]) else
                        f"[{r['low']:+.3f}, {r['high']:+.3f}]")
            unmatched = f" ({r['unmatched']})" if r.get("unmatched") else ""
            cells.append(f" {r[a]:.3f} | {r[b]:.3f} | {r['difference']:+.3f} "
                         f"{interval}: {r['verdict']}{unmatched} |")
        lines.append(f"| {budget:.3g}{mark} |" + "".join(cells))
    return lines


def markdown(study, rows, comparison, timings: dict, extras: dict, findings=(),
             mixed=None) -> str:
    """The report; `mixed`: the same comparison through mixtures of two checkpoints
    (`differences.compare(..., interpolate=True)`), shown below the verdict's own table."""
    p, g = results.held_out_peaks(comparison), results.held_out_peaks(comparison, "oracle")
    prompts = comparison.get("prompts", {})
    lines = ["# Online vs offline: the controlled study", "",
             f"**{results.verdict(comparison)}**", "",
             "![frontier](frontier.png)", "",
             "The figure is descriptive: each frontier is the best of every checkpoint of every "
             "run and seed on all the evaluation prompts, each panel by its own judge, so it "
             "favours the method with more runs (offline's sweep); the table below chooses on "
             "selection prompts and scores on others.", "",
             "## Online minus offline at matched KL budgets", "",
             "At each budget, each seed's checkpoint with KL at most the budget that the "
             f"{comparison.get('prompts', {}).get('selection', 0)} selection prompts rate best "
             f"(each method: over its whole sweep), scored on the "
             f"{comparison.get('prompts', {}).get('test', 0)} disjoint test prompts"
             + (" of the test stage (it scores the checkpoints within "
                f"{study.eval.candidate_margin:g} of the best selection win rate at no more "
                "KL, among which the selection-prompt resamples re-choose; of the choices a "
                f"resample would make among every evaluation, {_outside(comparison)} fell "
                "outside them)"
                if comparison.get("test_stage") else "")
             + "; mean over "
             "seeds; 95% t-interval, seeds and test prompts as crossed random draws plus the "
             "part of the choice's spread over resampled selection prompts that every seed "
             "shares (with upstream draws: over the draws' own differences). A method is "
             "better only where "
             "the interval excludes zero. The oracle scores the checkpoints the judge chose.", "",
             *budget_table(comparison), "",
             *choices_table(comparison),
             *_mixed_section(mixed),
             "## Peak win rate (best checkpoint per seed at any KL by the golden judge: chosen "
             f"on the {prompts.get('selection', 0)} selection prompts, scored on the "
             f"{prompts.get('test', 0)} test prompts; each method's best over its sweep; the "
             "oracle scores that checkpoint)", "",
             "| method | golden win rate | oracle win rate (there) | seeds |",
             "| --- | --- | --- | --- |"]
    peak_rows = [f"| {method} | {format_interval(p[method]['mean_ci'])} | "
                 f"{format_interval(g.get(method, {}).get('mean_ci', (np.nan, np.nan)))} | "
                 f"{len(p[method]['per_seed'])} |" for method in sorted(p)]
    lines += peak_rows
    lines += ["", "+- is the half-width of a 95% t-interval over seeds"
              + ("; no interval: one seed, or seeds that agree exactly"
                 if any("(no interval)" in row for row in peak_rows) else "")
              + ". Peaks are at whatever KL each method reached; the budget table above is the "
              "comparison.", "", "## Setting", "",
              f"- opponent: {study.opponent}; judge: the golden preference model (both-order "
              "sign rule); oracle: " + ("the synthetic world's exact score"
                                        if study.data.kind == "synthetic" else "none (real data)"),
              f"- policy `{study.model.name}`, proxy `{study.proxy_model.name}`, golden "
              f"`{study.golden_model.name}`; loss {study.policy.loss}; seeds {list(study.seeds)}",
              f"- {datasets.describe(study.data)}",
              *([f"- upstream draws 0-{study.upstream_chains - 1}: the world, SFT, golden and "
                 "proxy seeds shifted by the draw's number (their stages named `-u<draw>`)"]
                if study.get("upstream_chains", 1) > 1 else []),
              f"- every checkpoint evaluated on {study.eval.prompts} prompts of the test "
              "split (the verdict's section says which of them select and which score), KL on "
              f"{study.eval.kl_prompts}; {_schedule(study.policy)}",
              f"- online sweep: lr {list(study.online_learning_rates)} x beta "
              f"{sorted({r['beta'] for r in rows if r['method'] == 'online'})}",
              f"- offline sweep: lr {list(study.offline_learning_rates)} x beta "
              f"{list(study.offline_betas)} x steps {list(study.offline_steps)}"]
    for key, value in extras.items():
        lines.append(f"- {key}: {setting_value(value)}")
    lines += ["", "## Stage wall time (this machine, seconds; skipped stages keep earlier "
              "times)", "", "| stage | s |", "| --- | --- |"]
    lines += [f"| {name} | {sec:.0f} |" for name, sec in timings.items()]
    lines += ["", f"Total: {sum(timings.values()):.0f} s. Results: `results.csv`, "
              "`results.json`; the study's config: `config.json`; every run's metrics: "
              "`stages/*/metrics.jsonl`.", ""]
    if findings:
        lines += hypotheses_markdown(study, findings)
    return "\n".join(lines)


def hypotheses_markdown(study, findings) -> list[str]:
    """One section per hypothesis variant, then the table that ends the report."""
    lines = []
    for i, finding in enumerate(findings, 1):
        lines += [f"## Hypothesis {i}: {finding.title}", "", *finding.lines, ""]
    lines += ["## Verdicts: what the paper found, what this run found", "",
              f"Seeds {list(study.seeds)}; a row agrees or differs by the golden judge (the "
              "oracle beside it where a row compares runs) and only where the interval it shows "
              "decides; otherwise it is undecided. Runs are compared at matched KL (paired "
              "t-intervals, seeds and prompts crossed), final accuracies over seeds and pairs, "
              "stream accuracies by Wilson intervals over the pairs counted (two classifiers on "
              "the same pairs by a paired t-interval), drifts by t-intervals over seeds; the "
              "rules are in "
              "`alignment_gap/study/hypotheses/`.", "",
              "| hypothesis | the paper found | this run found | agree? |",
              "| --- | --- | --- | --- |"]
    for finding in findings:
        for v in finding.verdicts:
            agree = {True: "agree", False: "**differ**", None: "undecided"}[v.agree]
            lines.append(f"| {finding.name} | {v.claim} | {v.ours} | {agree} |")
    return lines + [""]


def choices_table(comparison) -> list[str]:
    """What the selection prompts choose at each budget, per method: each run's learning rate,
    beta and step, with how many seeds chose it (is the offline sweep's best inside its grid?)."""
    chosen = comparison.get("chosen")
    if not chosen:
        return []
    methods = list(chosen)
    lines = ["What the selection prompts chose there (each seed's checkpoint: its run's "
             "learning rate and beta, and its step):", "",
             "| KL budget (nats) | " + " | ".join(methods) + " |",
             "| --- |" + " --- |" * len(methods)]
    for g, budget in enumerate(comparison["budgets"]):
        cells = []
        for m in methods:
            counts = collections.Counter(c for c in chosen[m][g] if c is not None)
            cells.append("; ".join(f"{what}{f' (x{n} seeds)' if n > 1 else ''}"
                                   for what, n in counts.most_common()) or "-")
        lines.append(f"| {budget:.3g} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _mixed_section(mixed) -> list[str]:
    if not mixed or not mixed.get("rows"):
        return []
    return ["### Through mixtures of two checkpoints (interpolated frontiers)", "",
            "The same, except that a budget between two evaluations may be spent on a mixture "
            "of a checkpoint within it and one beyond it: each prompt is answered by the second "
            "with the probability that makes their mean KL the budget (the mixture's KL is at "
            "most that mean, its win rate exactly the mixture of theirs). The verdict above "
            "stands on single checkpoints.", "", *budget_table(mixed), ""]


def write_report(study, rows, comparison, timings, extras, workdir: str, findings=(),
                 mixed=None) -> str:
    run_dir.write_json(workdir, run_dir.CONFIG, study.to_dict())  # what this report is of
    frontier_plot(rows, os.path.join(workdir, "frontier.png"))
    text = markdown(study, rows, comparison, timings, extras, findings, mixed)
    run_dir.write_text(workdir, "report.md", text)
    run_dir.write_text(workdir, "summary.json", json.dumps(strict_json(
        {"verdict": results.verdict(comparison), "comparison": comparison,
         "comparison_interpolated": mixed, "peaks": results.held_out_peaks(comparison),
         "oracle_peaks": results.held_out_peaks(comparison, "oracle"), "timings": timings,
         **extras,
         "hypotheses": [dataclasses.asdict(f) for f in findings]}), indent=2, default=str,
        allow_nan=False))
    return os.path.join(workdir, "report.md")
