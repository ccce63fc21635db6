"""Online minus offline at matched KL budgets (study/differences.py) on hand-made outcomes, the
classification hypothesis's stream means, and how the report words what they feed.

Each test builds per-prompt outcomes whose right answer is known: a clear winner, no difference,
a checkpoint that is lucky on the selection prompts, budgets one method never reached, one seed.
"""

import numpy as np
import pytest

from alignment_gap.study import differences, report, results
from configs import study as study_configs

N = 64  # evaluation prompts: 32 selection (even positions), 32 test (odd)
NUMBERS = ("kl", "online", "offline", "difference", "low", "high")  # of a budget's row


def point(method, seed, kl, win, oracle=None, step=6):
    p = {"method": method, "seed": seed, "kl": kl, "step": step,
         "win": np.asarray(win, np.float32)}
    if oracle is not None:
        p["oracle_win"] = np.asarray(oracle, np.float32)
    return p


def noisy(rng, rate):
    return (rng.random(N) < rate).astype(np.float32)


def test_a_clear_winner_is_named_by_the_judge_and_the_oracle_beside_it():
    rng = np.random.default_rng(0)
    points = []
    for seed in range(3):
        points.append(point("online", seed, 1.0, noisy(rng, 0.9), oracle=noisy(rng, 0.5)))
        points.append(point("offline", seed, 1.0, noisy(rng, 0.3), oracle=noisy(rng, 0.5)))
    c = differences.compare(points, replicates=500)
    golden, oracle = differences.headline(c), differences.headline(c, "oracle")
    assert golden["verdict"] == "online better" and golden["low"] > 0
    assert golden["difference"] == pytest.approx(golden["online"] - golden["offline"])
    assert oracle["verdict"] == "undecided" and oracle["low"] < 0 < oracle["high"]
    text = results.verdict(c)
    assert "golden judge: online minus offline" in text and "online better" in text
    assert "oracle: online minus offline" in text and "undecided" in text
    assert "32 test prompts and 3 seeds (under 5 seeds: a rough interval from few degrees" in text
    assert "seeds and prompts as crossed random draws" in text and "32 other prompts" in text
    for seed in (3, 4):  # five seeds: no caveat
        points.append(point("online", seed, 1.0, noisy(rng, 0.9), oracle=noisy(rng, 0.5)))
        points.append(point("offline", seed, 1.0, noisy(rng, 0.3), oracle=noisy(rng, 0.5)))
    text = results.verdict(differences.compare(points, replicates=50))
    assert "32 test prompts and 5 seeds, seeds and" in text and "rough" not in text


def test_the_same_outcomes_for_both_methods_are_undecided():
    rng = np.random.default_rng(1)
    points = []
    for seed in range(2):
        win = noisy(rng, 0.6)
        points += [point("online", seed, 2.0, win), point("offline", seed, 2.0, win)]
    row = differences.headline(differences.compare(points, replicates=200))
    assert row["difference"] == 0.0 and row["verdict"] == "undecided"


def test_the_checkpoint_is_chosen_on_selection_prompts_and_scored_on_test_prompts():
    select, test = differences.split(N)
    lucky = np.zeros(N)
    lucky[select] = 1.0  # best on the selection half, never wins a test prompt
    steady = np.full(N, 0.5)
    points = [point("offline", 0, 0.5, lucky, step=6), point("offline", 0, 0.6, steady, step=12),
              point("online", 0, 0.5, steady)]
    row = differences.headline(differences.compare(points, replicates=50))
    assert row["offline"] == 0.0  # the lucky checkpoint, scored where it was not chosen
    assert row["online"] == 0.5


def test_a_budget_counts_only_checkpoints_within_it_and_says_where_a_method_ended():
    rng = np.random.default_rng(3)
    near, far, offline = noisy(rng, 0.1), noisy(rng, 0.95), noisy(rng, 0.55)
    points = [point("online", 0, 0.2, near), point("online", 0, 4.0, far),
              point("offline", 0, 0.3, offline)]
    c = differences.compare(points, budgets=[0.25, 0.3, 4.0], replicates=50)
    below, low, high = c["rows"]["golden"]
    test = differences.split(N)[1]
    assert np.isnan(below["offline"]) and below["verdict"] == "undecided"  # none within 0.25
    assert (low["online"], low["offline"]) == (pytest.approx(near[test].mean()),
                                               pytest.approx(offline[test].mean()))
    assert low["verdict"] == "offline better"
    assert (high["online"], high["offline"]) == (pytest.approx(far[test].mean()),
                                                 pytest.approx(offline[test].mean()))
    # Past offline's last checkpoint its curve stays there: no longer a matched budget.
    assert high["verdict"] == "online better" and high["unmatched"] == (
        "offline's runs end at 0.3 nats")
    assert c["headline_kl"] == pytest.approx(0.3)  # the most KL offline used
    assert "unmatched" not in low and "unmatched" not in below
    assert "online better (offline's runs end at 0.3 nats) |" in report.budget_table(c)[-1]


def test_methods_that_share_no_budget_cannot_be_compared_and_say_why():
    points = [point("online", 0, 5.0, np.ones(N)), point("offline", 0, 0.5, np.zeros(N))]
    c = differences.compare(points, replicates=20)
    assert np.isnan(differences.headline(c)["difference"])
    assert "No KL budget is reached by every seed" in results.verdict(c)


def test_one_seed_says_the_interval_covers_prompts_only():
    rng = np.random.default_rng(2)
    points = [point("online", 0, 1.0, noisy(rng, 0.7)), point("offline", 0, 1.0, noisy(rng, 0.5))]
    assert "one seed: prompts only" in results.verdict(differences.compare(points, replicates=50))


def test_seeds_that_agree_exactly_have_no_interval():
    assert np.isnan(results.mean_ci([0.75, 0.75])[1])
    assert results.mean_ci([0.7, 0.8])[1] > 0
    # Past the table (10 values) the t quantile, not the normal one: 11 values spread like the
    # first 10 give a wider interval than 1.96 would (2.228 / 1.96 = 1.137 times).
    eleven = np.arange(11.0)
    sd = eleven.std(ddof=1) / np.sqrt(11)
    assert results.mean_ci(eleven)[1] == pytest.approx(2.228 * sd, rel=1e-3)


def test_a_method_whose_runs_all_moved_past_a_budget_is_scored_there_by_its_start():
    rng = np.random.default_rng(4)
    start, moved = noisy(rng, 0.2), noisy(rng, 0.9)
    points = [point("online", 0, 0.0, start, step=0), point("online", 0, 0.05, moved),
              point("offline", 0, 0.0, start, step=0), point("offline", 0, 0.4, moved)]
    row = differences.headline(differences.compare(points, replicates=50))
    test = differences.split(N)[1]
    assert row["kl"] == pytest.approx(0.05)  # the most online used
    assert (row["online"], row["offline"]) == (moved[test].mean(), start[test].mean())
    assert row["verdict"] == "online better"


def test_stream_accuracies_average_the_checkpoints_after_step_0():
    """At step 0 every policy is the SFT policy: margins 0, accuracy exactly 0.5 (a tie)."""
    from alignment_gap.study.hypotheses import classification

    points = [{"step": 0, "proxy/golden": 0.8, "online/golden": 0.5},
              {"step": 6, "proxy/golden": 0.7, "online/golden": 0.9},
              {"step": 12, "proxy/golden": 0.6, "online/golden": 0.7}]
    means = classification.stream_means(points)
    assert means == {"proxy/golden": pytest.approx(0.65), "online/golden": pytest.approx(0.8)}


def test_interpolated_frontiers_mix_the_checkpoints_either_side_of_a_budget():
    # One seed; online: the start (KL 0, wins half) and a checkpoint at KL 2 that wins all.
    # At budget 1 the best single checkpoint within it is the start (0.5); the mixture that
    # takes the KL-2 checkpoint's response on half the prompts spends exactly 1 nat and wins
    # 0.75. Offline never moves (0.5 everywhere), so only the interpolated view sees a gap.
    half = np.tile([1.0, 0.0, 0.0, 1.0], N // 4)  # 0.5 on both halves
    points = [point("online", 0, 0.0, half, step=0), point("online", 0, 2.0, np.ones(N)),
              point("offline", 0, 0.0, half, step=0), point("offline", 0, 2.5, half)]
    step = differences.compare(points, budgets=[1.0], replicates=50)
    mixed = differences.compare(points, budgets=[1.0], replicates=50, interpolate=True)
    assert step["rows"]["golden"][0]["online"] == pytest.approx(0.5)
    assert mixed["rows"]["golden"][0]["online"] == pytest.approx(0.75)
    assert mixed["rows"]["golden"][0]["offline"] == pytest.approx(0.5)
    assert mixed["interpolated"] and not step["interpolated"]
    weights = differences.mixtures(np.array([0.0, 2.0]), 1.0, interpolate=True)
    assert weights.tolist() == [[1.0, 0.0], [0.5, 0.5]]  # the start; the half-half mixture
    assert differences.mixtures(np.array([0.0, 2.0]), 3.0, True).tolist() == [[1, 0], [0, 1]]


def test_with_a_test_stage_every_evaluation_prompt_selects_and_its_own_prompts_score():
    """Points carrying `test_win` (the test stage's candidates) are chosen on all of `win` and
    scored on `test_win`: a checkpoint that is lucky on the selection prompts wins nothing on
    the test prompts, and the report says how many prompts of each kind it used."""
    lucky, steady = np.ones(N), np.full(N, 0.5)
    points = [point("offline", 0, 0.5, lucky, step=6), point("offline", 0, 0.6, steady, step=12),
              point("online", 0, 0.5, steady)]
    for p, test in zip(points, (np.zeros(16), np.full(16, 0.5), np.full(16, 0.75)), strict=True):
        p["test_win"] = test
    points.append(point("offline", 0, 2.0, np.zeros(N), step=18))  # not a candidate: unscored
    c = differences.compare(points, replicates=50)
    row = differences.headline(c)
    assert (row["offline"], row["online"]) == (0.0, 0.75)
    assert c["reached"]["offline"] == 2.0 and c["rows"]["golden"][-1]["offline"] == 0.0
    assert c["chosen"]["offline"][-1] == ["step 6"]  # the lucky one, as the report says
    assert c["prompts"] == {"selection": N, "test": 16} and c["test_stage"]
    assert "16 test prompts and 1 seed" in results.verdict(c)


def test_the_test_stage_scores_only_checkpoints_a_resample_could_choose():
    """Candidates: within the margin of the best selection win rate at no more KL, per method
    and seed; step 0 once per method and seed."""
    from alignment_gap.study import test_stage

    def rated(method, kl, rate, step, stage="run"):
        return {**point(method, 0, kl, np.full(N, rate), step=step), "stage": stage}

    points = [rated("online", 0.0, 0.5, 0, "a"), rated("online", 0.0, 0.5, 0, "b"),
              rated("online", 0.2, 0.70, 6, "a"), rated("online", 0.4, 0.60, 12, "a"),
              rated("online", 0.5, 0.68, 6, "b"), rated("online", 0.9, 0.80, 12, "b"),
              rated("offline", 0.0, 0.5, 0), rated("offline", 0.3, 0.4, 6)]
    chosen = {(p["method"], p["stage"], p["step"]) for p in test_stage.candidates(points, 0.03)}
    assert chosen == {("online", "a", 0), ("online", "a", 6), ("online", "b", 6),
                      ("online", "b", 12), ("offline", "run", 0)}
    # With no margin only the frontier itself: b's step 6 (0.68 < 0.70 at less KL) drops out.
    assert ("online", "b", 6) not in {(p["method"], p["stage"], p["step"])
                                      for p in test_stage.candidates(points, 0.0)}


def test_upstream_draws_set_the_interval_and_their_share_of_the_variance_is_estimated():
    """With several upstream draws, the interval is the t-interval of the draws' own
    differences (everything below a draw varies within it). The random-effects split on a
    hand-made table: chain means 0.1 and 1.1 (between-chain variance 0.5 - 0.02 / 2), seeds
    0.2 apart (within 0.02)."""
    table = np.array([[0.0] * 8 + [1.0] * 8] * 4)  # 4 units x 16 prompts; draw means 0.5
    table[2] += 0.2  # draw 1's units: 0.7 and 0.6
    table[3] += 0.1
    row = differences.interval(table, np.zeros((4, 5)), [0, 0, 1, 1], 32)
    draws = np.array([0.5, 0.65])
    half = 12.706 * draws.std(ddof=1) / np.sqrt(2)  # t with 1 degree of freedom
    assert row["difference"] == pytest.approx(draws.mean())
    assert (row["low"], row["high"], row["df"]) == (pytest.approx(draws.mean() - half, rel=1e-4),
                                                    pytest.approx(draws.mean() + half, rel=1e-4),
                                                    1.0)
    split = differences.variance_split([[0.0, 0.2], [1.0, 1.2]])
    assert split["within chains"] == pytest.approx(0.02)
    assert split["between chains"] == pytest.approx(0.49)
    assert split["upstream share"] == pytest.approx(0.49 / 0.51)
    assert differences.variance_split([[0.0, 0.2]]) is None  # one chain: nothing to split
    # A draw missing a seed's runs: said, not a lopsided mean.
    rng = np.random.default_rng(4)
    points = [{**point(m, seed, 1.0, noisy(rng, 0.5)), "chain": chain}
              for chain, seed in ((0, 0), (0, 1), (1, 0)) for m in ("online", "offline")]
    with pytest.raises(ValueError, match=r"different numbers of policy seeds \(chain: seeds "
                                         r"\{0: 2, 1: 1\}\)"):
        differences.compare(points, replicates=10)


def test_a_study_with_upstream_draws_pairs_within_each_draw_and_says_so():
    rng = np.random.default_rng(3)
    points = []
    for chain in range(2):
        for seed in range(2):  # seed s of each chain is its own unit
            lead = 0.3 if chain == 0 else 0.0
            for method, rate in (("online", 0.5 + lead), ("offline", 0.5)):
                points.append({**point(method, seed, 1.0, noisy(rng, rate)), "chain": chain})
    c = differences.compare(points, replicates=300)
    assert (c["chains"], c["units"], c["seeds"]) == (2, 4, [0, 1])
    assert set(c["variance"]) == {"golden"} and 0.0 <= c["variance"]["golden"][
        "upstream share"] <= 1.0
    text = results.verdict(c)
    assert "over the differences of 2 upstream draws" in text
    assert "2 policy seeds in each" in text
    assert "The upstream draws account for" in text


def test_the_report_says_how_often_a_resample_would_choose_outside_the_candidates():
    """A checkpoint the test stage did not score but as good on the selection prompts as the
    candidate is some resamples' choice; one far below is none's."""
    rng = np.random.default_rng(5)
    candidate = point("online", 0, 0.5, noisy(rng, 0.6))
    candidate["test_win"] = np.full(16, 0.6)
    for rate, outside in ((0.6, True), (0.0, False)):
        other = point("online", 0, 0.4, noisy(rng, rate), step=12)
        offline = {**point("offline", 0, 0.5, noisy(rng, 0.5)), "test_win": np.full(16, 0.5)}
        c = differences.compare([candidate, other, offline], replicates=200)
        share = c["outside_candidates"]["online"]
        assert (0.05 < share < 0.95) if outside else share == 0.0, share
        assert c["outside_candidates"]["offline"] == 0.0


def test_peaks_are_chosen_on_selection_prompts_and_scored_on_test_prompts():
    """Each seed's peak is the checkpoint past step 0 that the selection prompts rate best at
    any KL, scored on the test prompts: a checkpoint lucky on the selection half scores its
    test half, not the selection half's 1.0; the start is no peak."""
    select, _ = differences.split(N)
    lucky = np.zeros(N)
    lucky[select] = 1.0
    points = [point("offline", 0, 0.0, np.ones(N), step=0), point("offline", 0, 3.0, lucky),
              point("offline", 0, 0.5, np.full(N, 0.5), step=12),
              point("online", 0, 0.0, np.ones(N), step=0), point("online", 0, 0.5, np.ones(N))]
    peaks = results.held_out_peaks(differences.compare(points, replicates=20))
    assert peaks["offline"]["per_seed"] == {"0": 0.0} and peaks["online"]["per_seed"] == {"0": 1.0}


def test_the_report_explains_its_peak_intervals_and_writes_measured_settings_as_prose():
    extras = {"agreement": {"test": 0.84912, "validation": 0.8},
              "on samples": {"online": {"all": 0.6761, "last": 0.69}, "offline": {"all": 0.5}}}
    for wins, no_interval in (((0.7, 0.8), False), ((0.75, 0.75), True)):
        points = [point(m, seed, 1.0, np.full(N, w)) for m in ("online", "offline")
                  for seed, w in enumerate(wins)]
        comparison = differences.compare(points, replicates=20)
        text = report.markdown(study_configs.get_config("smoke"), [], comparison, {}, extras)
        assert "+- is the half-width of a 95% t-interval over seeds" in text
        assert ("no interval: one seed, or seeds that agree exactly" in text) == no_interval
        assert "- agreement: test 0.849, validation 0.800\n" in text
        assert "- on samples: online: all 0.676, last 0.690; offline: all 0.500\n" in text


def test_the_crossed_variance_counts_seeds_prompts_and_noise_once_each():
    """Hand-made tables: seeds and prompts adding up without noise (the variance of the grand
    mean is var(seed means) / S + var(prompt means) / P); seeds that agree (their component is
    zero, so the prompts' spread alone); one seed (prompts only)."""
    from alignment_gap.study import crossed

    seed_effect, prompt_effect = np.array([0.0, 0.1, 0.5]), np.linspace(-0.3, 0.3, 8)
    additive = seed_effect[:, None] + prompt_effect[None, :]
    value, df = crossed.variance(additive)
    assert value == pytest.approx(seed_effect.var(ddof=1) / 3 + prompt_effect.var(ddof=1) / 8)
    parts = [(seed_effect.var(ddof=1) / 3, 2), (prompt_effect.var(ddof=1) / 8, 7)]
    assert df == pytest.approx(value ** 2 / sum(v * v / k for v, k in parts))
    rng = np.random.default_rng(0)
    agree = prompt_effect[None, :] + rng.normal(0, 0.02, (3, 8))
    agree -= agree.mean(1, keepdims=True)  # every seed's mean is 0: no seed component
    value, df = crossed.variance(agree)
    assert (value, df) == (pytest.approx(agree.mean(0).var(ddof=1) / 8), 7.0)
    assert crossed.variance(agree[:1]) == (pytest.approx(agree[0].var(ddof=1) / 8), 7.0)
    assert np.isnan(crossed.variance(np.full((3, 1), 0.5))[0])  # one prompt: nothing to say


def test_the_verdicts_intervals_cover_the_truth_about_95_percent_of_the_time():
    """Simulated studies with no difference between the methods (both draw their checkpoints'
    outcomes from one distribution; seeds and prompts differ; the checkpoint is chosen on the
    selection prompts): the interval's implied variance is about the difference's true
    variance over studies, and about 5% of verdicts name a winner. Measured on these 400
    studies: 1.20 times the true variance, a winner in 2.75% of them; resampling seeds and
    prompts together (the estimator before 2026-12-07): 1.75 times, 0.5%."""
    from scipy.special import stdtrit

    rng = np.random.default_rng(7)
    rows = []
    for study in range(400):
        difficulty, points = rng.normal(0, 1, N), []
        for method in ("online", "offline"):
            by_prompt = rng.normal(0, 0.5, N)
            for seed in range(4):
                seed_effect = rng.normal(0, 0.3)
                for k in (1, 2, 3):
                    logit = 0.3 * np.log(k) + seed_effect + rng.normal(0, 0.1) + difficulty
                    win = rng.random(N) < 1 / (1 + np.exp(-(logit + by_prompt)))
                    points.append(point(method, seed, float(k), win, step=k))
        rows.append(differences.compare(points, budgets=[3.0], replicates=50, seed=study)
                    ["rows"]["golden"][0])
    diff = np.array([r["difference"] for r in rows])
    low, high = np.array([r["low"] for r in rows]), np.array([r["high"] for r in rows])
    quantile = stdtrit(np.array([r.get("df", 1e9) for r in rows], float), 0.975)
    implied = np.mean(((high - low) / 2 / quantile) ** 2)
    assert 0.8 < implied / diff.var(ddof=1) < 1.3
    named = np.mean((low > 0) | (high < 0))
    assert 0.015 <= named <= 0.09, named


def test_the_selection_prompts_spread_counts_what_moves_every_seed_alike():
    """Two units' differences over four selection resamples: a part both share (+-1) and a
    part each has alone (orthogonal patterns). The shared part's variance (4/3) is what a new
    set of selection prompts adds to the mean over seeds; one seed alone carries all of its
    spread (8/3), which then widens its interval beyond the prompts' own."""
    shared, alone = np.array([1.0, -1.0, 1.0, -1.0]), np.array([[1.0, 1.0, -1.0, -1.0],
                                                                  [1.0, -1.0, -1.0, 1.0]])
    resampled = shared[None, :] + alone
    assert differences._shared_choice_spread(resampled) == pytest.approx(4 / 3)
    assert differences._shared_choice_spread(resampled[:1]) == pytest.approx(8 / 3)
    rng = np.random.default_rng(8)
    table = rng.normal(0.1, 1.0, (1, 64))
    still, moving = (differences.interval(table, r, [0], 32)
                     for r in (np.zeros((1, 4)), 0.1 * resampled[:1]))
    assert moving["se"] ** 2 == pytest.approx(still["se"] ** 2 + 0.01 * 8 / 3)


def test_checkpoints_rated_alike_share_the_choice_whatever_order_they_come_in():
    """Outcomes of 0 / 0.5 / 1 tie often on a coarse grid of rates: the curve and the peak
    take the tied checkpoints' mean, so listing the runs the other way round (plan order,
    step order) changes nothing, where taking the first had flipped the difference's sign."""
    rng = np.random.default_rng(5)
    select, test = differences.split(N)
    points = []
    for seed in range(3):
        good, bad = noisy(rng, 0.8), noisy(rng, 0.3)
        bad[select] = good[select]  # the same selection rate, different test rates
        points += [point("offline", seed, 0.5, good, step=6),
                   point("offline", seed, 0.5, bad, step=12),
                   point("online", seed, 0.6, noisy(rng, 0.55))]
    forward, backward = (differences.compare(p, replicates=100) for p in (points, points[::-1]))
    for one, other in zip(forward["rows"]["golden"], backward["rows"]["golden"], strict=True):
        assert one["verdict"] == other["verdict"]
        assert np.allclose([one[k] for k in NUMBERS], [other[k] for k in NUMBERS],
                           rtol=0, atol=1e-12, equal_nan=True)
    offline = [p for p in points if p["method"] == "offline"]
    assert differences.headline(forward)["offline"] == pytest.approx(
        np.mean([p["win"][test].mean() for p in offline]))
    assert "(tied, averaged)" in forward["chosen"]["offline"][-1][0]
    peaks = differences.peaks(points, "offline")
    assert peaks == differences.peaks(points[::-1], "offline")
    assert peaks["golden"][0, 0] == pytest.approx(np.mean([p["win"][test].mean()
                                                           for p in offline[:2]]))


def test_every_seed_and_prompt_alike_is_no_interval_and_no_winner():
    """Online winning every test prompt of every seed against offline's ties is no spread to
    estimate from: not a zero-width interval naming a winner (as `results.mean_ci`)."""
    points = [point(m, seed, 1.0, np.full(16, 1.0 if m == "online" else 0.5))
              for seed in range(2) for m in ("online", "offline")]
    row = differences.headline(differences.compare(points, replicates=50))
    assert row["difference"] == 0.5 and np.isnan(row["low"]) and row["verdict"] == "undecided"
    text = results.verdict(differences.compare(points, replicates=50))
    assert "(no interval: every seed and prompt gave the same difference), undecided" in text


def test_an_evaluation_without_a_finite_kl_is_left_out_and_named():
    """One nan KL had turned every budget nan (when listed first) or been silently skipped."""
    rng = np.random.default_rng(6)
    points = [point(m, seed, kl, noisy(rng, 0.6), step=6 if kl else 0) for seed in range(2)
              for m, kl in (("online", 0.0), ("online", 0.5), ("offline", 0.0), ("offline", 0.8))]
    diverged = point("offline", 1, float("nan"), noisy(rng, 0.1), step=18)
    for listed in ([diverged] + points, points + [diverged]):
        c = differences.compare(listed, replicates=50)
        assert c["headline_kl"] == 0.5 and np.isfinite(c["budgets"]).all()
        assert c["unplaced"] == ["offline seed 1 step 18"]
        assert "Left out for want of a finite KL: offline seed 1 step 18." in results.verdict(c)


def test_a_seed_whose_start_beats_its_checkpoints_keeps_its_peak():
    """Per seed, past step 0 where it has a later checkpoint: a seed with only its start
    among the candidates is scored there, not dropped from the peaks' mean."""
    points = [point("online", 0, 0.0, np.full(N, 0.5), step=0),
              point("online", 0, 1.0, np.full(N, 0.6)),
              point("online", 1, 0.0, np.full(N, 0.7), step=0)]
    assert differences.peaks(points, "online") == {"golden": {(0, 0): pytest.approx(0.6),
                                                              (0, 1): pytest.approx(0.7)}}


def test_a_summary_with_undefined_numbers_is_strict_json_and_reads_back_into_the_tables():
    """One seed's interval and a peak without one hold NaN: summary.json writes null there
    (jq and JavaScript refuse NaN), and the tables a notebook draws from it read null as none."""
    import json

    rng = np.random.default_rng(2)
    points = [point("online", 0, 1.0, noisy(rng, 0.7)), point("offline", 0, 1.0, noisy(rng, 0.5))]
    comparison = differences.compare(points, replicates=50)
    peaks = results.held_out_peaks(comparison)
    summary = {"comparison": comparison, "peaks": peaks, "df": np.float64(np.inf)}
    text = json.dumps(report.strict_json(summary), allow_nan=False, default=str)
    assert "NaN" not in text and "Infinity" not in text
    read = json.loads(text)
    assert read["df"] is None
    assert report.budget_table(read["comparison"]) == report.budget_table(comparison)
    assert ({m: report.format_interval(v["mean_ci"]) for m, v in read["peaks"].items()}
            == {m: report.format_interval(v["mean_ci"]) for m, v in peaks.items()})


def test_the_test_prompts_draw_noise_of_their_own():
    """The sampler draws each row's noise from the evaluation key by row: under the runs' key,
    test prompt i would draw what selection prompt i drew. The runs' own evaluations keep
    `key(seed)`."""
    import jax

    from alignment_gap.evaluation import evaluation_key
    from alignment_gap.study import test_stage

    noise = lambda key, rows: jax.random.gumbel(key, (rows, 8))
    selection = noise(evaluation_key(3), 32)
    assert np.array_equal(jax.random.key_data(evaluation_key(3)),
                          jax.random.key_data(jax.random.key(3)))
    assert np.array_equal(noise(evaluation_key(3, 0), 64)[:32], selection)  # rows repeat
    test = noise(evaluation_key(3, 32), 32)
    assert abs(np.corrcoef(np.asarray(test).ravel(), np.asarray(selection).ravel())[0, 1]) < 0.2
    assert test_stage.config(study_configs.get_config("smoke"))["draws"]  # reruns old stages
