"""The synthetic world: deterministic posts, an oracle that rewards what it says it rewards."""

import numpy as np
import pytest

from alignment_gap.data import world as W

WORLD = W.WorldConfig(seed=3)


def test_posts_depend_only_on_seed_and_index():
    assert W.make_post(WORLD, 7) == W.make_post(WORLD, 7)
    assert W.make_post(WORLD, 7) != W.make_post(WORLD, 8)
    assert W.make_post(WORLD, 7) != W.make_post(W.WorldConfig(seed=4), 7)
    post = W.make_post(WORLD, 7)
    assert 15 <= len(post.words) <= 50 and set(post.words) <= set(W.WORDS)
    assert len(post.key_words) == WORLD.key_words
    assert W.post_words_from_prompt(W.prompt_text(post)) == list(post.words)


def _good_summary(post):
    verb = next(w for w in post.words if w in W.VERBS)
    k1, k2, k3 = post.key_words
    return ["my", k1, verb, "the", k2, "and", k3]


def test_oracle_rewards_coverage_and_punishes_each_fault():
    post = W.make_post(WORLD, 11)
    good = _good_summary(post)
    base = W.oracle_score(WORLD, post.words, good)
    invented_noun = next(n for n in W.NOUNS if n not in post.words)
    worse = {
        "drops a key word": good[:5],
        "invents a noun": good[:-1] + [invented_noun],
        "repeats itself": good + ["and", good[1]],
        "rambles past the cap": good + ["and", "the"] * 4 + [good[1]],
        "scrambled": [good[i] for i in (4, 0, 6, 2, 1, 5, 3)],
        "empty": [],
    }
    for fault, summary in worse.items():
        assert W.oracle_score(WORLD, post.words, summary) < base, fault


def test_labels_follow_bradley_terry_noise():
    comparisons = [W.make_comparison(WORLD, i) for i in range(1500)]
    agree = np.mean([c.chosen_score >= c.rejected_score for c in comparisons])
    assert 0.75 < agree < 0.95  # mostly right, sometimes wrong: a learnable, noisy signal
    assert W.preference_probability(WORLD, 1.0, 0.0) == pytest.approx(
        1 - W.preference_probability(WORLD, 0.0, 1.0))
    colder = W.WorldConfig(seed=3, label_temperature=0.05)
    cold = [W.make_comparison(colder, i) for i in range(1500)]
    assert np.mean([c.chosen_score >= c.rejected_score for c in cold]) > agree


def test_writers_are_of_mixed_quality():
    post = W.make_post(WORLD, 5)
    rng = np.random.default_rng(0)
    good = [W.oracle_score(WORLD, post.words, W.write_summary(post, 0.95, rng))
            for _ in range(200)]
    poor = [W.oracle_score(WORLD, post.words, W.write_summary(post, 0.05, rng))
            for _ in range(200)]
    assert np.mean(good) > np.mean(poor) + 0.5
    assert np.std(good + poor) > 0.3


def test_pick_draws_what_numpy_choice_draws():
    """The writers draw with `pick`, not `rng.choice`: the same items from the same stream, so
    every world text (datasets, tokenizer corpus) is what it was."""
    for seed in range(20):
        ours, numpy = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 1])
        for n in (1, 2, 5, 7, 40):
            items = [f"w{i}" for i in range(n)]
            assert ([W.pick(ours, items) for _ in range(30)]
                    == [str(numpy.choice(items)) for _ in range(30)])
        assert ours.random() == numpy.random()
