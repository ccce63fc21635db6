"""The intervals the hypothesis verdicts follow from (study/hypotheses/shared.py and the
classification analysis): their coverage on simulated draws, and verdicts that decide only where
an interval does."""

import numpy as np
import pytest

from alignment_gap.study.hypotheses import classification, shared


def test_accuracy_intervals_cover_the_true_rate_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    n, m, p, q, trials = 256, 320, 0.7, 0.6, 4000
    hits = rng.binomial(n, p, trials) / n
    others = rng.binomial(m, q, trials) / m
    single = [lo <= p <= hi for lo, hi in (shared.proportion_interval(h, n) for h in hits)]
    paired = [lo <= p - q <= hi for lo, hi in
              (shared.difference_interval(h, n, o, m) for h, o in zip(hits, others, strict=True))]
    assert np.mean(single) == pytest.approx(0.95, abs=0.015)
    assert np.mean(paired) == pytest.approx(0.95, abs=0.015)


def test_an_interval_decides_only_when_it_excludes_zero():
    assert shared.interval_side(0.01, 0.2) == 1
    assert shared.interval_side(-0.2, -0.01) == -1
    assert shared.interval_side(-0.01, 0.2) == 0
    assert shared.interval_side(np.nan, np.nan) == 0  # no interval: undecided
    assert shared.side({}) is None  # no matched budget
    row = {"kl": 1.0, "difference": 0.1, "low": 0.02, "high": 0.2, "verdict": "a better"}
    assert shared.side({"golden": row}) == 1
    assert shared.difference_text({"golden": row}, "a", "b") == (
        "a minus b at KL 1: golden +0.100 [+0.020, +0.200] a better")


def _runs(rng, runs, per_run, slope, noise):
    rows = []
    for i in range(runs):
        accuracy = rng.uniform(0.5, 0.9, per_run)
        win = slope * accuracy + rng.normal(0, noise, per_run)
        rows += [{"stage": f"run{i}", "step": 6 * (k + 1), "classifier_accuracy": a,
                  "win_rate": w} for k, (a, w) in enumerate(zip(accuracy, win, strict=True))]
    return rows


def test_the_correlation_interval_resamples_whole_runs():
    rng = np.random.default_rng(1)
    r, (lo, hi), n = classification.run_correlation(_runs(rng, 6, 6, 1.0, 0.01), replicates=300)
    assert n == 36 and r > 0.95 and 0.9 < lo <= r <= hi
    r, (lo, hi), _ = classification.run_correlation(_runs(rng, 6, 6, 0.0, 0.1), replicates=300)
    assert lo < r < hi and lo < 0 < hi  # no relation: the interval holds zero
    # One run: its checkpoints are one draw, so there is no interval to give.
    _, interval, _ = classification.run_correlation(_runs(rng, 1, 8, 1.0, 0.01), replicates=50)
    assert np.isnan(interval).all()


def _claims(final_online=0.45, pairs=256, proxy=0.80, online_stream=0.75, count=320):
    final = {"online": final_online, "offline": 0.65}
    drift = {"online": {0: -1.0, 1: -1.1}, "offline": {0: -2.0, 1: -2.3}}
    stream = {"proxy/golden": proxy, "online/golden": online_stream,
              "offline/golden": online_stream, "offline_own/golden": 0.5}
    counts = dict.fromkeys(stream, count)
    points = [{"step": s, "pairs": 64, "proxy/golden": a}
              for s, a in ((0, 0.9), (6, 0.9), (12, 0.6), (18, 0.6))]
    verdicts = classification.claim_verdicts(final, pairs, drift, (0.1, (-0.3, 0.4), 24),
                                             stream, counts, points)
    return {v.claim.split(" ")[0] + " " + v.claim.split(" ")[1]: v for v in verdicts}


def test_classification_verdicts_decide_only_where_their_intervals_do():
    close = _claims()  # online 0.45 on 256 pairs: [0.390, 0.511] holds chance
    assert close["Offline policies"].agree is None and "[0.390, 0.511]" in close[
        "Offline policies"].ours
    assert _claims(pairs=4096)["Offline policies"].agree is True  # [0.435, 0.465]
    assert _claims(final_online=0.6)["Offline policies"].agree is False  # above chance
    # The proxy 0.05 ahead on 320 pairs each is within noise; 0.2 ahead is not.
    assert close["On the"].agree is None
    assert _claims(online_stream=0.6)["On the"].agree is True
    assert _claims(proxy=0.6, online_stream=0.8)["On the"].agree is False
    assert close["Win rate"].agree is True  # [-0.3, 0.4] inside (-0.5, 0.5)
    # Drift: every seed falls, offline more, but two seeds give a t-interval of 12.7 sd.
    assert close["The likelihood"].agree is None
    assert close["The proxy's"].agree is True  # 0.9 -> 0.6 on 128 pairs each half
    assert close["No policy"].agree is False  # online's own samples at 0.75 of 320
