"""Log-probabilities of responses under a language model, and the exact per-token KL.

Sequences are `[left-padded prompt | right-padded response]`. The logits that predict response
token j sit at position `P + j - 1`, so one forward pass over the pair gives every response
token's log-prob. The KL is the paper's estimator (Tang et al. 2024, App. D): for responses
sampled from `pi`, sum over tokens of the exact `KL(pi(.|x, y<t) || q(.|x, y<t))` over the
vocabulary, which has far less variance than the log-ratio of the sampled tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignment_gap.models.attention import branched_layout


def response_logits(lm, prompt_BxP, prompt_mask_BxP, response_BxR, response_mask_BxR):
    """Float32 logits `[batch, R, vocab]`; row j predicts response token j."""
    tokens = jnp.concatenate([prompt_BxP, response_BxR], axis=1)
    mask = jnp.concatenate([prompt_mask_BxP, response_mask_BxR], axis=1).astype(bool)
    p, r = prompt_BxP.shape[1], response_BxR.shape[1]
    logits, _ = lm(tokens, mask, logits_window=(p - 1, p + r - 1))
    return logits


def pair_response_logits(lm, prompt_BxP, prompt_mask_BxP, first_BxR, first_mask_BxR,
                         second_BxR, second_mask_BxR):
    """Logits of two responses to one prompt, `[2, batch, R, vocab]` (first, then second).

    One pass over `[prompt | first | second]` with branch ids: the prompt is computed once and
    each response attends to the prompt and to itself only, with the positions it would have
    after the prompt alone - the same logits as two `response_logits` calls over
    `[prompt | first]` and `[prompt | second]` (a third fewer tokens when P = 2R). The pair axis
    leads, unsharded: rows stay where the batch is sharded (joined along the batch axis, the
    two halves were exchanged between devices: 12 all-to-alls in a peer-shape update on two CPU
    devices, 32 collective-permutes in a mini one on a v5e-8; bench/RESULTS.md).
    """
    p, r = prompt_BxP.shape[1], first_BxR.shape[1]
    tokens = jnp.concatenate([prompt_BxP, first_BxR, second_BxR], axis=1)
    mask = jnp.concatenate([prompt_mask_BxP, first_mask_BxR, second_mask_BxR], axis=1)
    mask = mask.astype(bool)
    positions, branches = branched_layout(mask[:, :p], mask[:, p: p + r], mask[:, p + r:])
    # Rows p-1 .. p+2r-2: the last prompt position predicts both responses' first tokens; row
    # p+r-1 (after the first response's last slot) predicts nothing and is dropped.
    logits, _ = lm(tokens, mask, positions_BxL=positions, branches=branches,
                   logits_window=(p - 1, p + 2 * r - 1))
    first = logits[:, :r]
    second = jnp.concatenate([logits[:, :1], logits[:, r + 1:]], axis=1)
    return jnp.stack([first, second])


def token_logprobs(logits_BxRxV, tokens_BxR):
    """log softmax(logits)[token] for each position."""
    logz = jax.nn.logsumexp(logits_BxRxV, axis=-1)
    picked = jnp.take_along_axis(logits_BxRxV, tokens_BxR[..., None], axis=-1)[..., 0]
    return picked - logz


def sequence_logprobs(lm, prompt_BxP, prompt_mask_BxP, response_BxR, response_mask_BxR):
    """(per-token log-probs `[batch, R]`, zero at padding; their sum per sequence `[batch]`)."""
    logits = response_logits(lm, prompt_BxP, prompt_mask_BxP, response_BxR, response_mask_BxR)
    per_token = jnp.where(response_mask_BxR, token_logprobs(logits, response_BxR), 0.0)
    return per_token, per_token.sum(axis=-1)


def per_token_kl(logits_p_BxRxV, logits_q_BxRxV, mask_BxR):
    """Exact KL(p || q) over the vocabulary at each valid position, `[batch, R]` (any leading
    axes)."""
    logp = jax.nn.log_softmax(logits_p_BxRxV, axis=-1)
    logq = jax.nn.log_softmax(logits_q_BxRxV, axis=-1)
    kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
    return jnp.where(mask_BxR, kl, 0.0)


def sequence_kl(policy, reference, prompt_BxP, prompt_mask_BxP, response_BxR, response_mask_BxR):
    """Per-sequence KL(policy || reference) summed over the response's tokens, `[batch]`."""
    args = (prompt_BxP, prompt_mask_BxP, response_BxR, response_mask_BxR)
    kl = per_token_kl(response_logits(policy, *args), response_logits(reference, *args),
                      response_mask_BxR)
    return kl.sum(axis=-1)


def next_token_logprobs(lm, tokens_BxL, mask_BxL):
    """Log-prob of each token given those before it, `[batch, L-1]`, and the target mask."""
    logits, _ = lm(tokens_BxL, mask_BxL)
    target_mask = mask_BxL[:, 1:] & mask_BxL[:, :-1]
    return token_logprobs(logits[:, :-1], tokens_BxL[:, 1:]), target_mask
