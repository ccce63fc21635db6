"""The two model kinds built on the backbone: a language model and a pairwise preference model.

`LanguageModel` is the policy and the reference. `PreferenceModel` is `r(x, y1, y2)`: it reads
the prompt and both responses in one sequence `[prompt | y1 | y2]` (three learned segment
embeddings tell the parts apart) and returns the logit of "y1 is preferred". Labels and
evaluations use the both-order sign rule, `r(x, y1, y2) - r(x, y2, y1) > 0`, which cancels any
position bias an online policy could otherwise exploit (Tang et al. 2024, App. A).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from alignment_gap import sharding
from alignment_gap.models.transformer import (
    KVCache,
    Transformer,
    TransformerConfig,
    dense,
    param,
    positions_from_mask,
)


class LanguageModel(nnx.Module):
    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.backbone = Transformer(cfg, rngs)
        if not cfg.tie_embeddings:
            self.head = param(rngs, nnx.initializers.normal(stddev=cfg.width**-0.5),
                              (cfg.width, cfg.vocab_size), ("embed", "vocab"))

    def __call__(self, tokens_BxL, mask_BxL, *, positions_BxL=None, cache: KVCache | None = None,
                 cache_index=None, cache_mask_BxS=None,
                 logits_window: tuple[int, int] | None = None):
        """Float32 next-token logits `[batch, length, vocab]` (and the updated cache).

        Without a cache, attention reads the valid tokens of this sequence. With one, the chunk
        is written at `cache_index` and attention reads the cache slots where `cache_mask_BxS`.
        `logits_window=(start, stop)`: logits of those positions only - the vocabulary
        projection is skipped where nobody reads it (a prompt's positions, a prefill).
        """
        if positions_BxL is None:
            positions_BxL = positions_from_mask(mask_BxL)
        key_mask = mask_BxL if cache is None else cache_mask_BxS
        hidden, cache = self.backbone(tokens_BxL, positions_BxL, key_mask, cache=cache,
                                      cache_index=cache_index)
        if logits_window is not None:
            hidden = hidden[:, logits_window[0]: logits_window[1]]
        dt = jnp.dtype(self.cfg.dtype)
        if self.cfg.tie_embeddings:
            logits = dense(hidden, self.backbone.embed[...].astype(dt).T)
        else:
            logits = dense(hidden, self.head[...].astype(dt))
        logits = sharding.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
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
        hidden, _ = self.backbone(tokens, positions_from_mask(mask), mask, segments_BxL=segments)
        last = tokens.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)
        pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        return (pooled.astype(jnp.float32) @ self.score[...])[:, 0]


def both_order_margin(model: PreferenceModel, prompt, prompt_mask, y1, y1_mask, y2, y2_mask):
    """`r(x, y1, y2) - r(x, y2, y1)` in probability space; > 0 means y1 wins (the sign rule)."""
    forward = jax.nn.sigmoid(model(prompt, prompt_mask, y1, y1_mask, y2, y2_mask))
    backward = jax.nn.sigmoid(model(prompt, prompt_mask, y2, y2_mask, y1, y1_mask))
    return forward - backward
