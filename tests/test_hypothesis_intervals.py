"""The intervals the hypothesis verdicts follow from (study/hypotheses/shared.py and the
classification analysis): their coverage on simulated draws, and verdicts that decide only where
an interval does."""

import numpy as np
import pytest

from alignment_gap.data import relabel
from alignment_gap.data import world as W
from alignment_gap.study import results
from alignment_gap.study.hypotheses import classification, probe, shared


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


def _stream(online_rate, aligned=False, pairs=96, seed=0):
    """Stream checkpoints 0, 6, 12, 18: the proxy right on 0.9, 0.9, 0.6, 0.6 of their pairs,
    both policies on `online_rate` after step 0 (0.5 at it), `offline_own` on half; `aligned`:
    the policies right on the proxy's pairs first, else on pairs drawn at random."""
    rng, points = np.random.default_rng(seed), []
    for step, proxy_rate in ((0, 0.9), (6, 0.9), (12, 0.6), (18, 0.6)):
        rate = online_rate if step else 0.5
        right = lambda r: (np.arange(pairs) < round(r * pairs)).astype(float)
        online = right(rate) if aligned else rng.permutation(right(rate))
        hits = {"proxy/golden": right(proxy_rate), "online/golden": online,
                "offline/golden": online, "offline_own/golden": rng.permutation(right(0.5))}
        points.append({"step": step, "pairs": pairs,
                       "hits": {k: v.tolist() for k, v in hits.items()},
                       **{k: float(v.mean()) for k, v in hits.items()}})
    return points


def _claims(final_online=0.45, pairs=256, online_stream=0.65, aligned=False, stream_pairs=96,
            final_offline=0.65, offline_spread=0.0, offline_streamed=True):
    final = {"online": {0: final_online, 1: final_online},  # two seeds that agree
             "offline": {0: final_offline - offline_spread, 1: final_offline + offline_spread}}
    drift = {"online": {0: -1.0, 1: -1.1}, "offline": {0: -2.0, 1: -2.3}}
    points = _stream(online_stream, aligned, pairs=stream_pairs)
    for q in points[1:] if not offline_streamed else ():  # offline scored at step 0 only
        q["hits"].pop("offline/golden")
    stream, counts = classification.stream_means(points), classification.stream_pairs(points)
    verdicts = classification.claim_verdicts(final, pairs, drift, (0.1, (-0.3, 0.4), 24),
                                             stream, counts, points)
    return {v.claim.split(" ")[0] + " " + v.claim.split(" ")[1]: v for v in verdicts}


def test_the_proxys_lead_is_paired_over_the_pairs_both_classifiers_scored():
    """Two classifiers right on the same pairs differ less from draw to draw than two right on
    unrelated pairs: the paired interval covers the true difference 95% of the time, and is
    narrower than the independent one when the hits go together."""
    rng = np.random.default_rng(2)
    # Per pair (proxy right, policy right): both .55, proxy only .2, policy only .1, neither .15.
    truth, trials, pairs, covered, widths = 0.1, 2000, 320, [], []
    for _ in range(trials):
        kind = rng.choice(4, pairs, p=[0.55, 0.2, 0.1, 0.15])
        proxy, policy = np.isin(kind, (0, 1)).astype(float), np.isin(kind, (0, 2)).astype(float)
        points = [{"step": 6, "hits": {"proxy/golden": proxy[:160].tolist(),
                                       "online/golden": policy[:160].tolist()}},
                  {"step": 12, "hits": {"proxy/golden": proxy[160:].tolist(),
                                        "online/golden": policy[160:].tolist()}}]
        d, lo, hi, n = classification.paired_difference(points, "proxy", "online")
        assert n == pairs and d == pytest.approx(proxy.mean() - policy.mean())
        covered.append(lo <= truth <= hi)
        low, high = shared.difference_interval(proxy.mean(), pairs, policy.mean(), pairs)
        widths.append((hi - lo) / (high - low))
    assert np.mean(covered) == pytest.approx(0.95, abs=0.015)
    assert np.mean(widths) < 0.85  # pairing counts the 65% of pairs on which they agree
    # Only pairs both scored count: offline is missing at step 12, and step 0 is left out.
    points = _stream(0.6)
    points[2]["hits"].pop("offline/golden")
    assert classification.paired_difference(points, "proxy", "offline")[3] == 2 * 96
    assert classification.paired_difference(points, "proxy", "online")[3] == 3 * 96
    # No spread, no interval (not a zero-width one): the verdict stays undecided.
    same = [{"step": 6, "hits": {"proxy/golden": [1.0] * 8, "online/golden": [1.0] * 8}}]
    assert np.isnan(classification.paired_difference(same, "proxy", "online")[1])


def test_classification_verdicts_decide_only_where_their_intervals_do():
    close = _claims()  # online 0.45 on 256 pairs: [0.389, 0.511] holds chance
    assert close["Offline policies"].agree is None and "[0.389, 0.511]" in close[
        "Offline policies"].ours
    assert _claims(pairs=4096)["Offline policies"].agree is True  # [0.435, 0.465]
    assert _claims(final_online=0.6)["Offline policies"].agree is False  # above chance
    # The claim is the paper's 60-70% band as well as the order: offline clearly above chance
    # but clearly outside the band differs; an interval that reaches into it agrees.
    assert _claims(pairs=4096, final_offline=0.85)["Offline policies"].agree is False
    assert _claims(pairs=4096, final_offline=0.55)["Offline policies"].agree is False
    assert _claims(pairs=4096, final_offline=0.59)["Offline policies"].agree is True
    # The final accuracy is a mean over seeds: two offline seeds at 0.60 and 0.70 put the
    # mean in the band on any number of pairs, but two seeds that far apart do not place it
    # there (t with about one degree of freedom); 0.64 and 0.66 on 4,096 pairs do.
    spread = _claims(pairs=4096, offline_spread=0.05)["Offline policies"]
    assert spread.agree is None and "over 2 seeds and 4096 pairs" in spread.ours
    assert _claims(pairs=4096, offline_spread=0.01)["Offline policies"].agree is True
    # Seeds that agree at an end are not certain: never narrower than Wilson over the pairs.
    low, high = shared.seeds_and_pairs_interval([0.0, 0.0], 256)
    assert (low, high) == (0.0, pytest.approx(shared.proportion_interval(0.0, 256)[1])) and high > 0
    assert "band 60%-70%" in close["Offline policies"].ours
    # The proxy 0.05 ahead on 288 pairs, right on pairs unrelated to the policies', is within
    # noise; at the same rates with the policies right where the proxy is, it is not; 0.25
    # ahead is not; 0.2 behind is the other way.
    assert close["On the"].agree is None and "(288 pairs)" in close["On the"].ours
    assert _claims(aligned=True)["On the"].agree is True
    assert _claims(online_stream=0.45)["On the"].agree is True
    assert _claims(online_stream=0.9)["On the"].agree is False
    # "Both policies": online's lead alone cannot settle it (it can refute it).
    alone = _claims(aligned=True, offline_streamed=False)["On the"]
    assert alone.agree is None and "offline: no stream pairs scored after step 0" in alone.ours
    assert _claims(online_stream=0.9, offline_streamed=False)["On the"].agree is False
    assert close["Win rate"].agree is True  # [-0.3, 0.4] inside (-0.5, 0.5)
    # Drift: every seed falls, offline more, but two seeds give a t-interval of 12.7 sd.
    assert close["The likelihood"].agree is None
    assert close["The proxy's"].agree is True  # 0.9 -> 0.6 on 192 pairs each half
    assert close["No policy"].agree is False  # online's own samples at 0.65 of 288
    # At chance on 288 pairs ([0.443, 0.557]) more than a little above chance is not ruled out:
    # undecided; on 2,880 ([0.482, 0.518]) it is.
    assert _claims(online_stream=0.5)["No policy"].agree is None
    assert _claims(online_stream=0.5, stream_pairs=960)["No policy"].agree is True


def _rows(low, high):
    return {"golden": {"kl": 1.0, "difference": (low + high) / 2, "low": low, "high": high,
                       "verdict": ""}}


def test_alike_claims_agree_only_where_the_interval_lies_inside_the_margin():
    from alignment_gap.study.hypotheses import coverage, noncontrastive

    narrow, wide, apart = _rows(-0.03, 0.04), _rows(-0.031, 0.078), _rows(0.01, 0.2)
    assert [shared.alike_side(r) for r in (narrow, wide, apart)] == [
        shared.EQUAL, shared.UNDECIDED, 1]
    assert shared.alike_side({}) is None
    sides = {name: shared.alike_side(r) for name, r in
             (("narrow", narrow), ("wide", wide), ("apart", apart))}
    # A shuffled Best-of-2 stream 'roughly matches' online only on the narrow interval.
    assert [noncontrastive.roughly_matches(sides[k]) for k in ("narrow", "wide", "apart")] == [
        True, None, False]
    assert [coverage.flat_then_degrades(sides[k], 1) for k in ("narrow", "wide", "apart")] == [
        True, None, False]
    assert coverage.flat_then_degrades(sides["narrow"], 0) is None
    assert [coverage.gains_little(sides[k], 1) for k in ("narrow", "wide", "apart")] == [
        True, None, False]
    assert coverage.gains_little(-1, 1) is True and coverage.gains_little(sides["narrow"], 0) \
        is None


def test_the_oracle_peak_is_its_score_of_the_checkpoint_the_judge_chose():
    # From per-prompt outcomes, as the peak tables read them: chosen on the selection half
    # (even positions), scored on the test half (odd ones), one peak per run.
    def point(stage, step, select, test, oracle):
        win = np.ravel(np.column_stack([np.full(8, select), np.full(8, test)]))
        return {"method": "online", "seed": 0, "stage": stage, "step": step, "kl": 0.1 * step,
                "win": win, "oracle_win": np.full(16, oracle)}

    points = [point("a", 0, 1.0, 1.0, 1.0), point("a", 10, 0.9, 0.2, 0.3),
              point("a", 20, 0.6, 0.7, 0.7), point("b", 10, 0.5, 0.5, 0.4)]
    assert shared.run_peaks(points, "online") == [0.2, 0.5]  # a's step 10 (not step 0)
    assert shared.run_peaks(points, "online", "oracle") == [0.3, 0.4]
    table = "\n".join(shared.peak_table(points, ["online"], {}))
    assert "| online |  | 0.200 (no interval) | 0.300 (no interval) | 2 |" in table, table


def test_an_order_the_oracle_does_not_hold_earns_half_wherever_agreement_is_counted():
    """Oracle ties (29% of pairs of good writers' summaries) count half on D_golden's pairs,
    on the policies' samples and in the classifiers' hits: before, D_golden counted them as
    agreement, the samples as disagreement, and the online stream as the proxy's hits."""
    world = W.WorldConfig(seed=0)
    text = "a summary of the post"
    tied = {"prompt": "POST: a post\nTL;DR:", "chosen": text, "rejected": text}
    assert relabel.oracle_agreement([tied, tied], world) == 0.5
    points = [{"stage": "online-s0", "method": "online", "step": 6,
               "win": np.array([1.0, 0.0, 1.0, 0.5]),
               "oracle_win": np.array([0.5, 0.5, 1.0, 0.5])}]
    assert results.judge_agreement(points)["online"]["last evaluations"] == 0.75
    # The proxy's own pick is `a`; the label cannot order the last two pairs.
    assert probe.hits(np.array([1.0, -1.0, 1.0, -1.0]), np.array([1.0, 1.0, 0.0, 0.0])).tolist() \
        == [1.0, 0.0, 0.5, 0.5]


@pytest.mark.parametrize("offline,agree", [
    ((0.509, 0.629), None),  # point 0.570, below the band: the interval does not place it in
    ((0.694, 0.799), None),  # point 0.750, above it
    ((0.58, 0.69), True),  # inside the band widened by EQUAL_MARGIN
    ((0.41, 0.58), False)])  # misses the band
def test_offline_classifies_in_the_papers_band_only_where_its_interval_lies_there(offline,
                                                                                   agree):
    assert classification._offline_in_band_online_below(offline, (0.35, 0.45)) is agree
