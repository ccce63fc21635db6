"""The early-stopping rules (`train/stopping.py`) on hand-made histories."""

import json

from alignment_gap.train import stopping


def test_turned_needs_the_last_falls_evaluations_below_the_best_before_them():
    assert not stopping.turned([0.5, 0.6, 0.7], 2)  # still rising
    assert not stopping.turned([0.5, 0.7, 0.65], 2)  # one fall
    assert stopping.turned([0.5, 0.7, 0.65, 0.68], 2)  # two below the peak
    assert not stopping.turned([0.5, 0.7, 0.65, 0.71], 2)  # a new best resets it
    assert not stopping.turned([0.5, 0.7, 0.7, 0.7], 2)  # level is not a fall
    assert stopping.turned([0.5, 0.7, 0.6], 1)
    assert not stopping.turned([0.9, 0.1, 0.1], 0)  # 0: off
    assert not stopping.turned([0.7, 0.6], 2)  # too short to tell


def test_a_margin_lets_dips_within_the_noise_pass():
    history = [0.5, 0.934, 0.926, 0.914]  # the paper run's seed 0: falls of 0.008 and 0.020
    assert stopping.turned(history, 2)
    assert not stopping.turned(history, 2, margin=0.03)
    assert stopping.turned([0.5, 0.934, 0.89, 0.88], 2, margin=0.03)


def test_over_cap_is_off_at_zero():
    assert stopping.over_cap(2.5, 2.0) and not stopping.over_cap(1.5, 2.0)
    assert not stopping.over_cap(100.0, 0.0)


def test_plateaued_is_the_preference_models_rule():
    assert stopping.plateaued([0.6, 0.7, 0.7, 0.701], 2, 0.002)
    assert not stopping.plateaued([0.6, 0.7, 0.7, 0.71], 2, 0.002)
    assert not stopping.plateaued([0.6, 0.7], 2, 0.002)


def test_a_resumed_run_rebuilds_its_history_up_to_its_checkpoint(tmp_path):
    lines = [{"step": 0, "loss": 1.0}, {"step": 10, "eval/accuracy": 0.6},
             {"step": 20, "eval/accuracy": 0.7}, {"step": 30, "eval/accuracy": 0.65}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert stopping.logged(str(tmp_path), "eval/accuracy", 20) == [0.6, 0.7]  # later: dropped
    assert stopping.logged(str(tmp_path / "fresh"), "eval/accuracy", 20) == []
