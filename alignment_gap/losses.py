"""Losses as pure functions of log-probabilities (Tang et al. 2024, Sec. 2; PAPER.md).

The offline and online paths call the same functions. Policy losses take summed sequence
log-probs of the winner `w` and loser `l` under the policy and the SFT reference and return a
per-example loss; callers average.

IPO scale: we use Azar et al.'s `(h - 1/(2 beta))^2`. The paper's appendix writes
`(beta h - 1/2)^2`, which has the same minimiser and a gradient scaled by `beta^2`; with ours a
given learning rate means the same step size at every beta.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

POLICY_LOSSES = ("ipo", "dpo", "slic", "best_of_two")


def margin(policy_w, policy_l, ref_w, ref_l):
    """`h = log pi(yw)/pi_ref(yw) - log pi(yl)/pi_ref(yl)`."""
    return (policy_w - ref_w) - (policy_l - ref_l)


def tie_half(h):
    """Classifier credit of a margin: 1 if h > 0, 0 if h < 0, 1/2 for a tie (e.g. the reference
    itself, where h = 0)."""
    return jnp.where(h > 0, 1.0, jnp.where(h < 0, 0.0, 0.5))


def ipo(h, beta):
    return (h - 1.0 / (2.0 * beta)) ** 2


def dpo(h, beta):
    return -jax.nn.log_sigmoid(beta * h)


def slic(h, beta):
    return jnp.maximum(0.0, 1.0 - beta * h)


def best_of_two(policy_w):
    """Non-contrastive: SFT on the winner of each pair; no reference, no beta."""
    return -policy_w


def policy_loss(name, beta, policy_w, policy_l, ref_w, ref_l):
    """Per-example loss of the named method. `name` may also be its index in POLICY_LOSSES, a
    traced integer where stacked runs differ in loss (`train/stacked.py`)."""
    if not isinstance(name, str):
        branches = [lambda *a, n=n: policy_loss(n, beta, *a) for n in POLICY_LOSSES]
        return jax.lax.switch(name, branches, policy_w, policy_l, ref_w, ref_l)
    if name == "best_of_two":
        return best_of_two(policy_w)
    h = margin(policy_w, policy_l, ref_w, ref_l)
    if name == "ipo":
        return ipo(h, beta)
    if name == "dpo":
        return dpo(h, beta)
    if name == "slic":
        return slic(h, beta)
    raise ValueError(f"loss {name!r} is unknown; choose one of {POLICY_LOSSES}")


def next_token_loss(per_token_logprobs, mask):
    """SFT: mean negative log-likelihood over valid tokens."""
    mask = mask.astype(jnp.float32)
    return -(per_token_logprobs * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def preference_model_loss(logit_first, winner_first):
    """Pairwise model likelihood per example, `-log r(x, yw, yl)` when the winner was read first
    and `-log(1 - r(x, yl, yw))` when second (App. A averages both orders; a trainer that draws
    the order per example has the same expected loss): `logit_first` = logit of r(x, first,
    second)."""
    return optax.sigmoid_binary_cross_entropy(logit_first, jnp.asarray(winner_first, jnp.float32))
