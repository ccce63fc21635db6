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
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
from flax import serialization

from alignment_gap import run_dir
from alignment_gap.sources import FIELDS, stream_chunks
from alignment_gap.study.hypotheses import probe, shared
from alignment_gap.study.hypotheses.shared import Finding, Verdict
from alignment_gap.study.report import color
from alignment_gap.study.scheduler import Stage

NAME, TITLE = "classification", "Classification vs generation"
CLASSIFIERS = ("proxy", "online", "offline", "offline_own")


def stream_stage(plan):
    s = plan.study
    online = plan.online(s.seeds[0])
    offline = _offline_partner(plan)
    cfg = ml_collections.ConfigDict({"stream_pairs": s.classification.stream_pairs})
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
    stream = _read_stream(os.path.join(plan.dir(online), "stream"))
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
                 float(np.mean(golden >= 0))}
        if step <= offline_steps:
            offline_params = p.policy(offline, step) if step else p.sft_params
            predictions["offline"] = p.h(offline_params, *pair)
            own = _own_pairs(p, offline_params, x["prompt"], x["prompt_mask"], step)
            point["offline_own/golden"] = probe.accuracy(p.h(offline_params, *own["pair"]),
                                                         own["golden"])
            if own["oracle"] is not None:
                point["offline_own/oracle"] = probe.accuracy(p.h(offline_params, *own["pair"]),
                                                             own["oracle"])
        for name, margin in predictions.items():
            point[f"{name}/golden"] = probe.accuracy(margin, golden)
            if oracle is not None:
                point[f"{name}/oracle"] = probe.accuracy(margin, oracle)
        points.append(point)
    run_dir.finish(out, checkpoints=points)


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

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
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
    plt.close(fig)


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


def analyse(plan, rows, workdir: str) -> Finding:
    rows = [r for r in rows if r.get("group") == "main"]
    points = run_dir.result(plan.dir(stream_stage(plan)))["checkpoints"]
    _figure(rows, points, os.path.join(workdir, "classification.png"))
    final = {}
    for method in ("online", "offline"):
        last = {}
        for r in rows:
            if r["method"] == method and r["step"] >= last.get(r["stage"], {"step": -1})["step"]:
                last[r["stage"]] = r
        final[method] = {m: float(np.mean([r[m] for r in last.values()])) if last else np.nan
                         for m in ("classifier_accuracy", "likelihood_drift")}
    pts = np.array([(r["classifier_accuracy"], r["win_rate"]) for r in rows if r["step"] > 0])
    corr = float(np.corrcoef(pts.T)[0, 1]) if len(pts) > 2 else float("nan")
    moved = after_start(points)
    stream = stream_means(points)
    proxy = [q["proxy/golden"] for q in points]
    half = max(1, len(proxy) // 2)
    early, late = float(np.mean(proxy[:half])), float(np.mean(proxy[half:] or proxy))
    lines = ["![classification.png](classification.png)", "",
             "| classifier on the online stream | golden labels | oracle labels |",
             "| --- | --- | --- |"]
    for n in CLASSIFIERS:
        lines.append(f"| {n} | {shared.num(stream.get(f'{n}/golden', np.nan))} | "
                     f"{shared.num(stream.get(f'{n}/oracle', np.nan))} |")
    lines += ["", f"Mean over the {len(moved)} checkpoints after step 0 of the seed-0 online run, "
              f"{points[0]['pairs'] if points else 0} stream pairs each (`offline_own`: the "
              "offline policy classifying pairs of its own samples; `online` on the stream is the "
              "online policy on its own samples). Final D_golden accuracy: online "
              f"{shared.num(final['online']['classifier_accuracy'])}, offline "
              f"{shared.num(final['offline']['classifier_accuracy'])}; Pearson r(win rate, "
              f"accuracy) over all checkpoints {shared.num(corr, 2)}."]
    on_acc, off_acc = (final[m]["classifier_accuracy"] for m in ("online", "offline"))
    on_drift, off_drift = (final[m]["likelihood_drift"] for m in ("online", "offline"))
    verdicts = [
        Verdict("Offline policies classify D_golden at 60-70%, online ones below 50%",
                f"final accuracy offline {off_acc:.3f}, online {on_acc:.3f}",
                bool(off_acc > 0.55 and on_acc < 0.52)),
        Verdict("Win rate and classification accuracy barely correlate",
                f"Pearson r = {corr:.2f} over {len(pts)} checkpoints", bool(abs(corr) < 0.5)),
        Verdict("The likelihood of D_golden winners falls for every method, most for offline",
                f"final drift online {on_drift:.2f}, offline {off_drift:.2f} nats",
                bool(on_drift < 0 and off_drift < 0 and off_drift < on_drift)),
        Verdict("On the online stream the proxy model out-classifies both policies",
                ", ".join(f"{n} {stream.get(f'{n}/golden', np.nan):.3f}"
                          for n in ("proxy", "online", "offline")),
                bool(stream["proxy/golden"] > max(stream["online/golden"],
                                                  stream.get("offline/golden", 0.0)))),
        Verdict("The proxy's accuracy decays as the policy drifts",
                f"first half of the run {early:.3f}, second half {late:.3f}",
                bool(late < early)),
        Verdict("No policy classifies its own samples better than chance",
                f"online {stream['online/golden']:.3f}, offline "
                f"{stream.get('offline_own/golden', np.nan):.3f}",
                bool(stream["online/golden"] <= 0.55
                     and stream.get("offline_own/golden", 0.0) <= 0.55)),
    ]
    return Finding(NAME, TITLE, lines, verdicts)
