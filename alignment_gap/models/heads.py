"""The two model kinds built on the backbone: a language model and a pairwise preference model.

`LanguageModel` is the policy and the reference. `PreferenceModel` is `r(x, y1, y2)`: it reads
the prompt and both responses in one sequence `[prompt | y1 | y2]` (three learned segment
embeddings tell the parts apart) and returns the logit of "y1 is preferred". Labels and
evaluations use the both-order sign rule, `r(x, y1, y2) - r(x, y2, y1) > 0`, which cancels any
position bias an online policy could otherwise exploit (Tang et al. 2024, App. A). The score is
read at one token per order, so the last block computes its queries and MLP there only (the
other positions serve it as keys and values: `read_at_BxQ` in `transformer`).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from alignment_gap import sharding
from alignment_gap.models.attention import branched_layout, positions_from_mask
from alignment_gap.models.transformer import (
    KVCache,
    Transformer,
    TransformerConfig,
    dense,
    is_prefill,
    param,
)


class LanguageModel(nnx.Module):
    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.backbone = Transformer(cfg, rngs)
        if not cfg.tie_embeddings:
            self.head = param(rngs, nnx.initializers.normal(stddev=cfg.width**-0.5),
                              (cfg.width, cfg.vocab_size), ("embed", "vocab"))

    def __call__(self, tokens_BxL, mask_BxL, *, positions_BxL=None, branches=None,
                 cache: KVCache | None = None, cache_index=None, cache_mask_BxS=None,
                 logits_window: tuple[int, int] | None = None):
        """Float32 next-token logits `[batch, length, vocab]` (and the updated cache).

        Without a cache, attention reads the valid tokens of this sequence. With one, the chunk
        is written at `cache_index` and attention reads the cache slots where `cache_mask_BxS`.
        `logits_window=(start, stop)`: logits of those positions only - the vocabulary
        projection is skipped where nobody reads it (a prompt's positions, a prefill).
        `branches`: continuations sharing one sequence (`branched_layout`); pass their
        `positions_BxL` too.
        """
        if logits_window is not None and not 0 <= logits_window[0] < logits_window[1] <= (
                tokens_BxL.shape[1]):
            # The window's slots are also the causal mask's query positions: counted from the
            # start, within the chunk (a negative start read no key, silently).
            raise ValueError(f"logits_window {tuple(logits_window)} is not within the "
                             f"{tokens_BxL.shape[1]} positions given: use 0 <= start < stop "
                             "<= length")
        if positions_BxL is None:
            positions_BxL = positions_from_mask(mask_BxL)
        key_mask = mask_BxL if cache is None else cache_mask_BxS
        # The last block runs only where logits are read (`read_at_BxQ`), in a full pass or a
        # prefill; a decode step's chunk is all read.
        reads_some = logits_window is not None and (cache is None or is_prefill(cache_index))
        read_at = tuple(logits_window) if reads_some else None
        hidden, cache = self.backbone(tokens_BxL, positions_BxL, key_mask,
                                      branches=branches, cache=cache,
                                      cache_index=cache_index, read_at_BxQ=read_at)
        if logits_window is not None and read_at is None:
            hidden = hidden[:, logits_window[0]: logits_window[1]]
        dt = jnp.dtype(self.cfg.dtype)
        # Float32 out of the matmul itself: rounded to bfloat16 first, every log-prob (and a
        # DPO / IPO log-ratio, a sum over tokens) would carry bfloat16's error.
        weights = self.backbone.embed[...].astype(dt).T if self.cfg.tie_embeddings else \
            self.head[...].astype(dt)
        logits = dense(hidden, weights, out_dtype=jnp.float32)
        logits = sharding.constrain(logits, ("batch", "length", "vocab"))
        return logits, cache


PROMPT, FIRST, SECOND = 0, 1, 2  # Segment ids of the preference model's input.


def pair_sequence(prompt_BxP, prompt_mask_BxP, y1_BxR, y1_mask_BxR, y2_BxR, y2_mask_BxR):
    """`[prompt | y1 | y2]` tokens, mask and segment ids for the preference model."""
    tokens = jnp.concatenate([prompt_BxP, y1_BxR, y2_BxR], axis=1)
    mask = jnp.concatenate([prompt_mask_BxP, y1_mask_BxR, y2_mask_BxR], axis=1).astype(bool)
    segments = jnp.concatenate([
        jnp.full(prompt_BxP.shape, PROMPT), jnp.full(y1_BxR.shape, FIRST),
        jnp.full(y2_BxR.shape, SECOND)], axis=1).astype(jnp.int32)
    return tokens, mask, segments


class PreferenceModel(nnx.Module):
    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        if cfg.num_segments < 3:
            cfg = TransformerConfig(**{**cfg.__dict__, "num_segments": 3})
        self.cfg = cfg
        self.backbone = Transformer(cfg, rngs)
        self.score = param(rngs, nnx.initializers.normal(stddev=cfg.width**-0.5),
                           (cfg.width, 1), ("embed", "score"))

    def __call__(self, prompt_BxP, prompt_mask_BxP, y1_BxR, y1_mask_BxR, y2_BxR, y2_mask_BxR):
        """Logit of P(y1 preferred to y2 | x), read at the last valid token; shape `[batch]`."""
        tokens, mask, segments = pair_sequence(prompt_BxP, prompt_mask_BxP, y1_BxR, y1_mask_BxR,
                                               y2_BxR, y2_mask_BxR)
        hidden, _ = self.backbone(tokens, positions_from_mask(mask), mask, segments_BxL=segments,
                                  read_at_BxQ=_last_valid(mask, 0)[:, None])
        return self._score(hidden[:, 0])

    def both_orders(self, prompt_BxP, prompt_mask_BxP, y1_BxR, y1_mask_BxR, y2_BxR, y2_mask_BxR):
        """(`r(x, y1, y2)`, `r(x, y2, y1)`) from one pass over `[prompt | y1 y2 | y2 y1]`.

        The two orders are branches of one sequence (see `transformer`): the prompt is computed
        once, each order reads it and itself with the positions and segment ids it has in its
        own `[prompt | . | .]` sequence, so the logits equal two `__call__`s.
        """
        p, r = prompt_BxP.shape[1], y1_BxR.shape[1]
        if y2_BxR.shape[1] != r:  # the orders' segments and read slots assume one length
            raise ValueError(f"both_orders: the responses are padded to {r} and "
                             f"{y2_BxR.shape[1]} tokens; pad both to one length")
        forward_tokens, forward_mask, forward_segments = pair_sequence(
            prompt_BxP, prompt_mask_BxP, y1_BxR, y1_mask_BxR, y2_BxR, y2_mask_BxR)
        _, backward_mask, _ = pair_sequence(prompt_BxP, prompt_mask_BxP, y2_BxR, y2_mask_BxR,
                                            y1_BxR, y1_mask_BxR)
        backward_part = lambda a: jnp.concatenate([a[:, p + r:], a[:, p: p + r]], axis=1)
        tokens = jnp.concatenate([forward_tokens, backward_part(forward_tokens)], axis=1)
        mask = jnp.concatenate([forward_mask, backward_mask[:, p:]], axis=1)
        segments = jnp.concatenate([forward_segments, forward_segments[:, p:]], axis=1)
        positions, branches = branched_layout(forward_mask[:, :p], forward_mask[:, p:],
                                              backward_mask[:, p:])
        forward_end = _last_valid(forward_mask, 0)
        # With both responses empty each order ends on the prompt's last token.
        backward_end = _last_valid(mask[:, p + 2 * r:], p + 2 * r, fallback=forward_end)
        hidden, _ = self.backbone(tokens, positions, mask, segments_BxL=segments,
                                  branches=branches,
                                  read_at_BxQ=jnp.stack([forward_end, backward_end], axis=1))
        return self._score(hidden[:, 0]), self._score(hidden[:, 1])

    def _score(self, pooled_BxD):
        """The logit from the hidden state at the read token (the last block computed the
        sequence's other positions only as keys and values)."""
        return (pooled_BxD.astype(jnp.float32) @ self.score[...])[:, 0]


def _last_valid(mask_BxL, offset: int, fallback=None):
    """`offset` + index of each row's last True; `fallback` (or the last slot) where none is."""
    last = offset + mask_BxL.shape[1] - 1 - jnp.argmax(mask_BxL[:, ::-1], axis=1)
    if fallback is None:
        return last
    return jnp.where(mask_BxL.any(axis=1), last, fallback)


def both_order_margin(model: PreferenceModel, prompt, prompt_mask, y1, y1_mask, y2, y2_mask):
    """A margin with the sign of `r(x, y1, y2) - r(x, y2, y1)` (probabilities); > 0 means y1
    wins (the sign rule), exactly 0 for two equal responses. It is the logits' difference,
    which has that sign (the sigmoid is increasing) where the probabilities' own difference
    rounds to 0: both past ~17 in float32, a clear preference read as a tie."""
    forward, backward = model.both_orders(prompt, prompt_mask, y1, y1_mask, y2, y2_mask)
    # With y1 = y2 the two orders are one sequence, a tie by definition; their branches sit in
    # different places of the packed sequence and XLA:CPU may sum them in another order (on an
    # Intel Xeon one pair in eight differed in the last bits and was read as a win).
    return jnp.where(same_responses(y1, y1_mask, y2, y2_mask), 0.0, forward - backward)


def same_responses(y1_BxR, y1_mask_BxR, y2_BxR, y2_mask_BxR):
    """[B] bool: the two responses hold the same tokens (padding ignored)."""
    y1_mask_BxR, y2_mask_BxR = y1_mask_BxR.astype(bool), y2_mask_BxR.astype(bool)
    return jnp.all((y1_mask_BxR == y2_mask_BxR) & (~y1_mask_BxR | (y1_BxR == y2_BxR)), axis=-1)
