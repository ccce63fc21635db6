"""Losses against hand-computed values; log-prob and exact-KL utilities against numpy."""

import math

import numpy as np
import pytest

from alignment_gap import logprobs, losses
from tests.helpers import language_model


def test_policy_losses_by_hand():
    # h = (-3 - -4) - (-6 - -5) = 1 + 1 = 2
    args = dict(policy_w=-3.0, policy_l=-6.0, ref_w=-4.0, ref_l=-5.0)
    assert float(losses.margin(**args)) == 2.0
    assert float(losses.policy_loss("ipo", 0.1, **args)) == pytest.approx((2 - 5) ** 2)
    assert float(losses.policy_loss("dpo", 0.5, **args)) == pytest.approx(math.log1p(math.e**-1))
    assert float(losses.policy_loss("slic", 0.25, **args)) == pytest.approx(0.5)
    assert float(losses.policy_loss("slic", 1.0, **args)) == 0.0
    assert float(losses.policy_loss("best_of_two", 0.1, **args)) == 3.0
    with pytest.raises(ValueError, match="loss 'ppo' is unknown"):
        losses.policy_loss("ppo", 0.1, **args)


def test_sft_and_preference_model_losses_by_hand():
    per_token = np.array([[-1.0, -2.0, -9.0]])
    mask = np.array([[True, True, False]])
    assert float(losses.next_token_loss(per_token, mask)) == pytest.approx(1.5)
    # Winner first, r(x,yw,yl)=sigmoid(0)=1/2: -log(1/2); winner second, r(x,yl,yw)=
    # sigmoid(log 3)=3/4: -log(1 - 3/4).
    value = losses.preference_model_loss(np.float32([0.0, math.log(3)]), np.array([True, False]))
    np.testing.assert_allclose(value, [-math.log(0.5), -math.log(0.25)], rtol=1e-6)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_per_token_kl_is_exact_over_the_vocabulary():
    rng = np.random.default_rng(0)
    p_logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    q_logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    mask = np.array([[True, True, False], [True, False, False]])
    lp, lq = _log_softmax(p_logits), _log_softmax(q_logits)
    expected = np.where(mask, (np.exp(lp) * (lp - lq)).sum(-1), 0.0)
    got = logprobs.per_token_kl(p_logits, q_logits, mask)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert (np.asarray(got)[mask] > 0).all()


def test_sequence_logprobs_and_kl_on_models(mini_config):
    policy, _, _ = language_model(mini_config, seed=0)
    other, _, _ = language_model(mini_config, seed=1)
    rng = np.random.default_rng(0)
    prompt = rng.integers(2, 512, (3, 4)).astype(np.int32)
    prompt_mask = np.ones_like(prompt, bool)
    response = rng.integers(2, 512, (3, 5)).astype(np.int32)
    response_mask = np.arange(5)[None] < np.array([[5], [3], [1]])
    per_token, total = logprobs.sequence_logprobs(policy, prompt, prompt_mask, response,
                                                  response_mask)
    # Against a hand-built full forward pass: row j of the response read at position P+j-1.
    full, _ = policy(np.concatenate([prompt, response], 1),
                     np.concatenate([prompt_mask, response_mask], 1))
    lsm = _log_softmax(np.asarray(full))
    manual = np.take_along_axis(lsm[:, 3:8], response[..., None], -1)[..., 0]
    np.testing.assert_allclose(per_token, np.where(response_mask, manual, 0), atol=1e-5)
    np.testing.assert_allclose(total, np.asarray(per_token).sum(-1), rtol=1e-6)
    assert np.asarray(per_token)[~response_mask].tolist() == [0.0] * int((~response_mask).sum())
    self_kl = logprobs.sequence_kl(policy, policy, prompt, prompt_mask, response, response_mask)
    np.testing.assert_allclose(self_kl, 0.0, atol=1e-5)
    kl = np.asarray(logprobs.sequence_kl(policy, other, prompt, prompt_mask, response,
                                         response_mask))
    assert (kl > 0).all() and kl[0] > kl[2]  # more tokens, more KL (same prompt distribution)


def test_sft_validation_loss_weighs_every_token_alike(mini_config):
    """Over batches of 16 and 2 response tokens, the mean per token, not of batch means."""
    from flax import nnx

    from alignment_gap import sharding
    from alignment_gap.batches import SFTBatch
    from alignment_gap.train.sft import eval_loss_program, validation_loss

    lm, mesh, rules = language_model(mini_config)
    graphdef, params = nnx.split(lm)
    rng = np.random.default_rng(0)
    batches = []
    for length in (8, 1):
        mask = np.repeat(np.arange(8)[None] < length, 2, axis=0)
        batches.append(SFTBatch(rng.integers(2, 500, (2, 5)), np.ones((2, 5), bool),
                                np.where(mask, rng.integers(2, 500, (2, 8)), 0), mask))
    program = eval_loss_program(graphdef, mesh)
    with sharding.use(mesh, rules):
        got = validation_loss([program(params, b) for b in batches])
    nll = [-(np.asarray(logprobs.sequence_logprobs(lm, b.prompt, b.prompt_mask, b.response,
                                                   b.response_mask)[0]) * b.response_mask).sum()
           for b in batches]
    assert got == pytest.approx(sum(nll) / 18, rel=1e-5)
    assert abs(got - (nll[0] / 16 + nll[1] / 2) / 2) > 1e-3  # the mean of batch means differs
