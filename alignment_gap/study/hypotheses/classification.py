"""Hypothesis 3, classification vs generation (paper Sec. 5.3, Fig. 6-8, App. E).

A policy is also a classifier: it prefers `y1` iff `h(y1, y2) > 0` (its log-ratio margin over
SFT). From the main runs' evaluations: accuracy on held-out D_golden pairs over training,
likelihood drift of the winners, and win rate against accuracy. An analysis stage adds, at the
start and each checkpoint of the seed-0 online run, the accuracy on the online stream's next
pairs (sampled by the policy at that checkpoint and not yet trained on; labels: the golden
model and, beyond the paper, the oracle) of the proxy model, the online policy and the offline
policy, and the offline policy classifying pairs of its own samples.
"""

from __future__ import annotations

import os

import grain
import jax
import ml_collections
import numpy as np
from flax import serialization

from alignment_gap import run_dir
from alignment_gap.sources import FIELDS, stream_chunks
from alignment_gap.study import results
from alignment_gap.study.hypotheses import probe, shared
from alignment_gap.study.hypotheses.shared import Finding, Verdict
from alignment_gap.study.report import color, figure
from alignment_gap.study.scheduler import Stage

NAME, TITLE = "classification", "Classification vs generation"
CLASSIFIERS = ("proxy", "online", "offline", "offline_own")
MIN_RUNS = 5  # a bootstrap over fewer runs has too few distinct draws for a percentile interval


def stream_stage(plan):
    s = plan.study
    online = plan.online(s.seeds[0])
    offline = _offline_partner(plan)
    # per_pair_outcomes: part of the stage's key, so results written before each pair's
    # outcome was kept (the paired intervals need them) are computed again.
    cfg = ml_collections.ConfigDict({"stream_pairs": s.classification.stream_pairs,
                                     "per_pair_outcomes": True})
    stage = Stage("classification-stream", cfg, None,
                  (online, offline, plan.proxy, plan.golden, plan.sft))
    stage.run = lambda cfg, out: _stream_accuracy(plan, online, offline, out)
    return plan.add(stage)


def _offline_partner(plan):
    """The main offline run at seed 0 with the first swept hyper-parameters."""
    s = plan.study
    return plan.offline(s.seeds[0], s.offline_learning_rates[0], s.offline_betas[0],
                        s.offline_steps[0])


def add_stages(plan):
    stream_stage(plan)


def _read_stream(directory: str) -> dict[int, list[dict]]:
    records = grain.sources.ArrayRecordDataSource(stream_chunks(directory))
    by_step: dict[int, list[dict]] = {}
    for i in range(len(records)):
        record = serialization.msgpack_restore(records[i])
        by_step.setdefault(int(record["step"]), []).append(record)
    return by_step


def _stream_accuracy(plan, online, offline, out: str):
    s = plan.study
    p = probe.Probe(plan, out)
    stream = _read_stream(os.path.join(plan.dir(online), run_dir.STREAM))
    every = min(s.policy.checkpoint_every, s.policy.steps)
    batches = max(1, s.classification.stream_pairs // s.batch_size)
    offline_steps = s.offline_steps[0]
    points = []
    for step in range(0, s.policy.steps - batches + 1, every):
        # The batches sampled right after checkpoint `step`: the policy's own samples, not yet
        # trained on (the batches before it were, which would flatter the online policy).
        recs = [r for k in range(step + 1, step + batches + 1) for r in stream.get(k, [])]
        x = {f: np.stack([r[f] for r in recs]) for f in FIELDS}
        pair = (x["prompt"], x["prompt_mask"], x["chosen"], x["chosen_mask"], x["rejected"],
                x["rejected_mask"])
        golden = p.margin("golden", *pair)
        prompts, chosen, rejected = (p.decode(x[f]) for f in ("prompt", "chosen", "rejected"))
        oracle = p.oracle_margin(prompts, chosen, rejected)
        online_params = p.policy(online, step) if step else p.sft_params
        predictions = {"proxy": p.margin("proxy", *pair), "online": p.h(online_params, *pair)}
        point = {"step": step, "pairs": len(recs), "online_stream_chosen_by_golden":
                 float(np.mean(golden >= 0)), "hits": {}}
        if step <= offline_steps:
            offline_params = p.policy(offline, step) if step else p.sft_params
            predictions["offline"] = p.h(offline_params, *pair)
            own = _own_pairs(p, offline_params, x["prompt"], x["prompt_mask"], step)
            own_margin = p.h(offline_params, *own["pair"])
            _score(point, "offline_own/golden", own_margin, own["golden"])
            _score(point, "offline_own/oracle", own_margin, own["oracle"])
        for name, margin in predictions.items():
            _score(point, f"{name}/golden", margin, golden)
            _score(point, f"{name}/oracle", margin, oracle)
        points.append(point)
    run_dir.finish(out, checkpoints=points)


def _score(point: dict, key: str, margin, labels):
    """The classifier's accuracy at `point[key]`, and each pair's outcome (for paired
    intervals) at `point["hits"][key]`; nothing without labels (no oracle)."""
    if labels is not None:
        point["hits"][key] = probe.hits(margin, labels).tolist()
        point[key] = float(np.mean(point["hits"][key]))


def _own_pairs(p, params, prompt, prompt_mask, step) -> dict:
    """Two samples per prompt from `params`, judged by the golden model (and the oracle)."""
    key = jax.random.fold_in(jax.random.key(4321), step)
    a, am = p.sample(params, prompt, prompt_mask, jax.random.fold_in(key, 0))
    b, bm = p.sample(params, prompt, prompt_mask, jax.random.fold_in(key, 1))
    pair = (prompt, prompt_mask, a, am, b, bm)
    return {"pair": pair, "golden": p.margin("golden", *pair),
            "oracle": p.oracle_margin(p.decode(prompt), p.decode(a), p.decode(b))}


def _mean_curve(rows, method, metric):
    steps = sorted({r["step"] for r in rows if r["method"] == method})
    return steps, [float(np.mean([r[metric] for r in rows
                                  if r["method"] == method and r["step"] == t])) for t in steps]


def _figure(rows, points, path):
    fig, axes = figure(2, 2, (11, 8))
    for i, method in enumerate(("online", "offline")):
        c = color(method, i)
        axes[0, 0].plot(*_mean_curve(rows, method, "classifier_accuracy"), "-o", color=c,
                        label=method)
        axes[1, 0].plot(*_mean_curve(rows, method, "likelihood_drift"), "-o", color=c,
                        label=method)
        pts = [(r["classifier_accuracy"], r["win_rate"]) for r in rows
               if r["method"] == method and r["step"] > 0]
        if pts:
            axes[0, 1].scatter(*np.array(pts).T, color=c, s=16, label=method)
    for i, name in enumerate(CLASSIFIERS):
        for judge, style in (("golden", "-o"), ("oracle", ":x")):
            pts = [(q["step"], q[f"{name}/{judge}"]) for q in points if f"{name}/{judge}" in q]
            if pts:
                axes[1, 1].plot(*np.array(pts).T, style, color=f"C{i}",
                                label=f"{name} ({judge} labels)")
    titles = [("D_golden accuracy (policy as classifier)", "step", "accuracy"),
              ("win rate vs classifier accuracy", "D_golden accuracy", "golden win rate"),
              ("likelihood drift of D_golden winners", "step", "E[log pi(yw) - log pi_sft(yw)]"),
              ("accuracy on the online stream", "online step", "accuracy")]
    for ax, (title, xl, yl) in zip(axes.flat, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in (axes[0, 0], axes[1, 1]):
        ax.axhline(0.5, color="gray", lw=0.8, ls=":")
    fig.suptitle("Classification vs generation (cf. Tang et al. 2024, Fig. 6-8)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def after_start(points: list[dict]) -> list[dict]:
    """The stream checkpoints after step 0 (all of them if there are no others): at step 0
    every policy is the SFT policy, whose margins are all 0 (a tie, exactly 0.5)."""
    return [q for q in points if q["step"] > 0] or points


def stream_means(points: list[dict]) -> dict:
    """Each classifier's accuracy on the online stream ("proxy/golden", ...), averaged over
    `after_start(points)`: step 0 would pull the policies' means toward chance."""
    moved = after_start(points)
    return {f"{n}/{j}": float(np.mean([q[f"{n}/{j}"] for q in moved if f"{n}/{j}" in q]))
            for n in CLASSIFIERS for j in ("golden", "oracle")
            if any(f"{n}/{j}" in q for q in moved)}


def stream_pairs(points: list[dict]) -> dict:
    """How many stream pairs each mean of `stream_means` counts (its checkpoints' pairs)."""
    moved = after_start(points)
    return {f"{n}/{j}": int(sum(q["pairs"] for q in moved if f"{n}/{j}" in q))
            for n in CLASSIFIERS for j in ("golden", "oracle")
            if any(f"{n}/{j}" in q for q in moved)}


def paired_difference(points: list[dict], a: str, b: str, judge: str = "golden"):
    """Classifier `a`'s accuracy minus `b`'s on the same stream pairs (those both scored, at
    the checkpoints of `after_start(points)`), with its 95% interval: a t-interval over the
    pairs' differences in outcome, which counts that two classifiers tend to be right on the
    same pairs. Returns (difference, low, high, pairs); no interval (nan) without spread."""
    moved = [q for q in after_start(points)
             if f"{a}/{judge}" in q.get("hits", {}) and f"{b}/{judge}" in q.get("hits", {})]
    d = np.concatenate([np.subtract(q["hits"][f"{a}/{judge}"], q["hits"][f"{b}/{judge}"])
                        for q in moved]) if moved else np.array([])
    mean, half = results.mean_ci(d)
    return mean, mean - half, mean + half, int(d.size)


def proxy_leads(points: list[dict]) -> dict:
    """(policy, judge) -> the proxy's accuracy minus the policy's on the stream pairs both
    scored, by `paired_difference`; only the pairings with pairs."""
    leads = {(n, judge): paired_difference(points, "proxy", n, judge)
             for n in ("online", "offline") for judge in ("golden", "oracle")}
    return {k: v for k, v in leads.items() if v[3]}


def final_by_seed(rows, method: str, metric: str) -> dict[int, float]:
    """Each seed's `metric` at the last evaluation of each of its runs (offline: mean over
    its sweep's runs)."""
    last = {}
    for r in rows:
        if r["method"] == method and r["step"] >= last.get(r["stage"], {"step": -1})["step"]:
            last[r["stage"]] = r
    seeds = sorted({r["seed"] for r in last.values()})
    return {s: float(np.mean([r[metric] for r in last.values() if r["seed"] == s]))
            for s in seeds}


def run_correlation(rows, replicates: int = 2000, seed: int = 0):
    """Pearson r(classifier accuracy, win rate) over every checkpoint after step 0, and its
    95% bootstrap interval resampling whole runs (a run's checkpoints are not independent);
    no interval from fewer than `MIN_RUNS` runs."""
    by_run = {}
    for r in rows:
        if r["step"] > 0:
            by_run.setdefault(r["stage"], []).append((r["classifier_accuracy"], r["win_rate"]))
    runs = [np.array(v) for v in by_run.values()]
    pearson = lambda pts: (float(np.corrcoef(pts.T)[0, 1]) if len(pts) > 2
                           and np.ptp(pts, axis=0).min() > 0 else np.nan)
    if not runs:
        return np.nan, (np.nan, np.nan), 0
    r = pearson(np.concatenate(runs))
    rng = np.random.default_rng(seed)
    draws = [pearson(np.concatenate([runs[i] for i in rng.integers(0, len(runs), len(runs))]))
             for _ in range(replicates)]
    draws = np.array([d for d in draws if np.isfinite(d)])
    interval = ((np.nan, np.nan) if len(runs) < MIN_RUNS or draws.size < replicates // 2 else
                tuple(float(x) for x in np.percentile(draws, [2.5, 97.5])))
    return r, interval, sum(len(v) for v in runs)


def analyse(plan, rows, workdir: str) -> Finding:
    rows = [r for r in rows if r.get("group") == "main"]
    points = run_dir.result(plan.dir(stream_stage(plan)))["checkpoints"]
    _figure(rows, points, os.path.join(workdir, "classification.png"))
    accuracy = {m: final_by_seed(rows, m, "classifier_accuracy") for m in ("online", "offline")}
    drift = {m: final_by_seed(rows, m, "likelihood_drift") for m in ("online", "offline")}
    corr, corr_interval, n_points = run_correlation(rows)
    moved = after_start(points)
    stream, counts = stream_means(points), stream_pairs(points)
    pairs = plan.study.eval.pairs

    def stream_cell(key):
        if key not in stream:
            return "-"
        interval = shared.proportion_interval(stream[key], counts[key])
        return f"{stream[key]:.3f} {shared.interval_text(*interval)}"

    lines = ["![classification.png](classification.png)", "",
             "| classifier on the online stream | golden labels [95%] | oracle labels [95%] |",
             "| --- | --- | --- |"]
    lines += [f"| {n} | {stream_cell(f'{n}/golden')} | {stream_cell(f'{n}/oracle')} |"
              for n in CLASSIFIERS]
    final = {m: float(np.mean(list(accuracy[m].values()))) if accuracy[m] else np.nan
             for m in accuracy}
    lines += ["", f"Mean over the {len(moved)} checkpoints after step 0 of the seed-0 online run, "
              f"{points[0]['pairs'] if points else 0} stream pairs each (`offline_own`: the "
              "offline policy classifying pairs of its own samples; `online` on the stream is the "
              "online policy on its own samples); intervals: Wilson, over the pairs counted. "
              f"Final D_golden accuracy (mean over seeds, {pairs} pairs): online "
              f"{shared.num(final['online'])}, offline {shared.num(final['offline'])}; Pearson "
              f"r(win rate, accuracy) over all checkpoints {shared.num(corr, 2)}."]
    verdicts = claim_verdicts(accuracy, pairs, drift, (corr, corr_interval, n_points), stream,
                              counts, points)
    return Finding(NAME, TITLE, lines, verdicts)


def claim_verdicts(accuracy, pairs, drift, correlation, stream, counts,
                   points) -> list[Verdict]:
    """Each claim against its interval: the final D_golden accuracies ({method: {seed: value}},
    each seed's on the same `pairs` pairs) over seeds and pairs (`seeds_and_pairs_interval`),
    the stream's accuracies as Wilson intervals over the pairs counted, the proxy's lead over a
    policy as a paired t-interval over the stream pairs both scored, drifts as t-intervals over
    seeds, the correlation by a bootstrap over runs; a claim of no effect agrees only where its
    interval excludes a relevant one (`CHANCE_MARGIN`, and r within +-0.5)."""
    accuracy = {m: {s: a for s, a in v.items() if np.isfinite(a)} for m, v in accuracy.items()}
    final = {m: float(np.mean(list(v.values()))) if v else np.nan for m, v in accuracy.items()}
    levels = {m: shared.seeds_and_pairs_interval(list(accuracy[m].values()), pairs)
              for m in accuracy}
    seeds_counted = max((len(v) for v in accuracy.values()), default=0)
    corr, (lo, hi), n_points = correlation
    seeds = sorted(set(drift["online"]) & set(drift["offline"]))
    falls = {m: results.mean_ci([drift[m][s] for s in seeds]) for m in drift}
    gap = results.mean_ci([drift["offline"][s] - drift["online"][s] for s in seeds])

    def drift_side(mean_ci):  # +1 above zero, -1 below, 0 undecided (or no interval)
        mean, half = mean_ci
        return shared.interval_side(mean - half, mean + half) if np.isfinite(half) else 0

    def drift_text(mean_ci):
        mean, half = mean_ci
        return f"{mean:.2f}" + (f" +- {half:.2f}" if np.isfinite(half) else " (no interval)")

    drift_sides = [drift_side(falls[m]) for m in ("online", "offline")] + [drift_side(gap)]
    beats = proxy_leads(points)
    beaten = [n for n in ("online", "offline") if (n, "golden") in beats]
    beat_sides = [shared.interval_side(*beats[n, "golden"][1:3]) for n in beaten]

    def beat_view(n, judge):
        d, lo, hi, _ = beats[n, judge]
        return f"{d:+.3f} " + (f"[{lo:+.3f}, {hi:+.3f}]" if np.isfinite(lo) else "(no interval)")

    def beat_text(n):
        oracle = f", oracle labels {beat_view(n, 'oracle')}" if (n, "oracle") in beats else ""
        return f"{n} {beat_view(n, 'golden')}{oracle} ({beats[n, 'golden'][3]} pairs)"

    proxy = [(q["proxy/golden"], q["pairs"]) for q in points]
    half = max(1, len(proxy) // 2)
    early, late = proxy[:half], proxy[half:] or proxy
    share = lambda part: (float(np.average([a for a, _ in part], weights=[n for _, n in part])),
                          int(sum(n for _, n in part)))
    decay = shared.difference_interval(*share(early), *share(late))
    own = {n: shared.proportion_interval(stream[f"{n}/golden"], counts[f"{n}/golden"])
           for n in ("online", "offline_own") if f"{n}/golden" in stream}
    return [
        Verdict("Offline policies classify D_golden at 60-70%, online ones below 50%",
                f"final accuracy (95% over {seeds_counted} seed{'s' * (seeds_counted != 1)} and "
                f"{pairs} pairs) " + ", ".join(
                    f"{m} {final[m]:.3f} {shared.interval_text(*levels[m])}"
                    for m in ("offline", "online"))
                + f" (the paper's offline band {OFFLINE_BAND[0]:.0%}-{OFFLINE_BAND[1]:.0%})",
                _offline_in_band_online_below(levels["offline"], levels["online"])),
        Verdict("Win rate and classification accuracy barely correlate",
                f"Pearson r = {corr:.2f} "
                + (f"{shared.interval_text(lo, hi)} (95% bootstrap over runs)"
                   if np.isfinite(lo) else f"(no interval: fewer than {MIN_RUNS} runs)")
                + f" over {n_points} checkpoints",
                True if -0.5 < lo and hi < 0.5 else False if lo > 0.5 or hi < -0.5 else None),
        Verdict("The likelihood of D_golden winners falls for every method, most for offline",
                f"final drift (95% t over {len(seeds)} seed{'s' * (len(seeds) != 1)}) online "
                f"{drift_text(falls['online'])}, offline {drift_text(falls['offline'])}, "
                f"offline minus online {drift_text(gap)} nats",
                False if max(drift_sides[:2]) > 0 or drift_sides[2] > 0 else
                True if drift_sides == [-1, -1, -1] else None),
        Verdict("On the online stream the proxy model out-classifies both policies",
                "proxy minus " + "; ".join(beat_text(n) for n in beaten)
                + " (95% paired t over the pairs both scored)"
                + "".join(f"; {n}: no stream pairs scored after step 0"
                          for n in ("online", "offline") if n not in beaten) if beaten
                else "no stream pairs scored",
                # "both": one policy's lead alone can refute the claim but not settle it
                None if not beat_sides else False if min(beat_sides) < 0
                else True if min(beat_sides) > 0 and len(beaten) == 2 else None),
        Verdict("The proxy's accuracy decays as the policy drifts",
                f"first half of the run {share(early)[0]:.3f}, second half {share(late)[0]:.3f}: "
                f"{share(early)[0] - share(late)[0]:+.3f} [{decay[0]:+.3f}, {decay[1]:+.3f}]",
                shared.interval_side(*decay) > 0 if shared.interval_side(*decay) else None),
        Verdict("No policy classifies its own samples better than chance",
                ", ".join(f"{n} {stream[f'{n}/golden']:.3f} {shared.interval_text(*own[n])}"
                          for n in own),
                _no_better_than_chance(list(own.values()))),
    ]


CHANCE_MARGIN = 0.05  # "no better than chance": every interval below 0.5 + this
OFFLINE_BAND = (0.6, 0.7)  # the paper's offline accuracy on D_golden


def _offline_in_band_online_below(offline, online) -> bool | None:
    """Agrees where online's interval lies below chance and offline's inside the paper's band
    (widened by `shared.EQUAL_MARGIN`); differs where online is above chance or offline's
    interval misses the band (below it or above it): the claim is the level as well as the
    order. An offline interval that reaches into the band and out of it is undecided."""
    if online[0] > 0.5 or offline[1] < OFFLINE_BAND[0] or offline[0] > OFFLINE_BAND[1]:
        return False
    low, high = OFFLINE_BAND[0] - shared.EQUAL_MARGIN, OFFLINE_BAND[1] + shared.EQUAL_MARGIN
    if online[1] < 0.5 and low <= offline[0] and offline[1] <= high:
        return True
    return None


def _no_better_than_chance(intervals) -> bool | None:
    """False if any policy is above chance; True only where every interval rules out more than
    CHANCE_MARGIN above it (an interval that merely holds 0.5 is undecided, not agreement)."""
    if any(low > 0.5 for low, _ in intervals):
        return False
    if intervals and all(high < 0.5 + CHANCE_MARGIN for _, high in intervals):
        return True
    return None
