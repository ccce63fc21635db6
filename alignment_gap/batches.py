"""The batch types every source produces and every trainer consumes.

Prompts are left-padded to a fixed length and responses right-padded (see models/transformer.py
for why); masks mark real tokens. The offline dataset iterator and the online generation loop
both yield `PreferenceBatch`, so the update step cannot tell which source fed it.
"""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PromptBatch:
    prompt: jax.Array  # [batch, P] int32, left-padded
    prompt_mask: jax.Array  # [batch, P] bool


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SFTBatch:
    prompt: jax.Array
    prompt_mask: jax.Array
    response: jax.Array  # [batch, R] int32, right-padded, EOS-terminated when it fits
    response_mask: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PreferenceBatch:
    prompt: jax.Array
    prompt_mask: jax.Array
    chosen: jax.Array  # [batch, R] the preferred response
    chosen_mask: jax.Array
    rejected: jax.Array  # [batch, R] the other one
    rejected_mask: jax.Array


def split_rows(tree, k: int):
    """Every array `[B, ...]` -> `[k, B / k, ...]`, row i into slice i % k: each slice keeps the
    batch's sharding over devices (contiguous blocks would put whole slices on single shards)."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1),
                        tree)


def merge_rows(tree):
    """Inverse of `split_rows`: `[k, B / k, ...]` -> `[B, ...]` in the original row order."""
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), tree)
