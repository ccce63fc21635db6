"""Attention's arithmetic once queries, keys and values are projected: masked softmax(q k^T) v,
and its branched form, which computes only the scores a branched sequence can see.

A branched sequence is `[prefix | branch 1 | ... | branch n]` (`Branches`): several
continuations of one prompt in one row, each reading the prefix and its own earlier tokens
only (`transformer` explains the layout). Masked dense attention over it computes every
query against every slot and throws away the prefix's queries against the branches and each
branch's against the others. `attend_branched` computes the prefix's queries against the
prefix, and each branch's queries against `[prefix | itself]` (the prefix's keys repeated per
branch): for a 64-token prompt and two 24-token responses, 8,320 scores per head instead of
12,544, and the softmax, its backward pass and the value product shrink with them. The results
equal the dense form's within float rounding (tests/test_models.py).

Where: on CPU meshes (`blocked_here`), where it was measured faster (bench/RESULTS.md: the
mini update step 28% less time, proxy ranking 18-20%). Accelerators keep the masked form:
XLA:TPU's cost model counts more bytes accessed for the blocked one at the TPU shapes of
bench/scale_table.py (60m and 770m on a v5e-8: 2-3% fewer FLOPs, 12% more bytes, and the
update is memory-bound there), and no accelerator has measured either yet.

Layouts: queries `[batch, kv_heads, groups * Q, head_dim]` (a key head's query heads stacked
on the query axis, so both products are plain batched matmuls), keys and values `[batch,
kv_heads, S, head_dim]`, any extra batch axes after `kv_heads`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

MASKED = -1e30  # Finite, so a query with no visible key (a pad slot) gives no NaN.


@dataclasses.dataclass(frozen=True)
class Branches:
    """`[prefix | branch 1 | ... | branch count]`, each branch `length` slots. Static (shapes
    only): the masks come from the key mask, the positions travel beside it."""

    prefix: int
    count: int
    length: int

    @property
    def slots(self) -> int:
        return self.prefix + self.count * self.length

    def ids(self) -> np.ndarray:
        """Branch id of each slot `[slots]`: 0 for the prefix, k for branch k."""
        return np.concatenate([np.zeros(self.prefix, np.int32),
                               np.repeat(np.arange(1, self.count + 1, dtype=np.int32),
                                         self.length)])

    def ids_at(self, slots):
        """Branch ids of (traced) slots."""
        return jnp.where(slots < self.prefix, 0, (slots - self.prefix) // self.length + 1)


def branched_layout(prompt_mask_BxP, *branch_masks_BxR):
    """(positions, `Branches`) for `[prompt | branch 1 | branch 2 | ...]`: each branch's tokens
    get the positions they would have right after the prompt. Branches share one length."""
    lengths = {mask.shape[1] for mask in branch_masks_BxR}
    if len(lengths) != 1:
        raise ValueError(f"branches of one sequence share one length; got {sorted(lengths)}")
    prompt_length = prompt_mask_BxP.astype(jnp.int32).sum(axis=1, keepdims=True)
    positions = [positions_from_mask(prompt_mask_BxP)]
    positions += [prompt_length + positions_from_mask(mask) for mask in branch_masks_BxR]
    branches = Branches(prompt_mask_BxP.shape[1], len(branch_masks_BxR), lengths.pop())
    return jnp.concatenate(positions, axis=1), branches


def positions_from_mask(mask_BxL):
    """Position of each token among the valid ones (pads repeat a neighbour's; they are masked)."""
    return jnp.maximum(jnp.cumsum(mask_BxL.astype(jnp.int32), axis=-1) - 1, 0)


def blocked_here() -> bool:
    """Whether branched sequences attend branch by branch under the current mesh: on CPU (or,
    outside a mesh, on a CPU default backend); accelerators keep masked dense attention."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return (device.platform if device is not None else jax.default_backend()) == "cpu"


def window_mask(query_positions, key_positions, window, local):
    """Where a local (sliding-window) layer's query may read a key, or None for a global
    layer; `local` may be traced (scanned layers of both kinds), then global reads all."""
    if local is False:
        return None
    near = query_positions[..., :, None] - key_positions[..., None, :] < window
    return near if local is True else near | ~local


def attend(q, k, v, visible, groups: int, scale: float, dtype):
    """softmax(q k^T * scale) v where `visible` (broadcast to `[..., groups, Q, S]`), in the
    queries' layout `[..., groups * Q, head_dim]`. A query with no visible key reads nothing
    (output 0): a softmax over masked scores alone would spread it over every slot, later ones
    included (the last slot of an all-padding prompt predicts the first response token)."""
    *lead, rows, _ = q.shape
    slots = k.shape[-2]
    # Scores leave the product in float32: rounded to bfloat16 first (8 bits of mantissa),
    # a score near 20 would move by up to 1/16 before the softmax exponentiates it.
    scores = jnp.einsum("...qh,...sh->...qs", q, k.astype(dtype),
                        preferred_element_type=jnp.float32)
    scores = scores.reshape(*lead, groups, rows // groups, slots) * scale
    scores = jnp.where(visible, scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(*lead, rows, slots)
    out = jnp.einsum("...qs,...sh->...qh", probs, v.astype(dtype))
    sees = jnp.broadcast_to(jnp.any(visible, axis=-1, keepdims=True),
                            (*lead, groups, rows // groups, 1)).reshape(*lead, rows, 1)
    return jnp.where(sees, out, jnp.zeros((), out.dtype))


def attend_branched(q_BxQxKxGxH, k_BxKxSxH, v_BxKxSxH, key_mask_BxS, query_positions_BxQ,
                    key_positions_BxS, branches: Branches, scale: float, dtype, *, local=False,
                    window: int = 0):
    """Attention over a branched sequence for queries at slots `[first, slots)` with `first` <=
    `branches.prefix` (Q = slots - first): the prefix's queries read the prefix causally, each
    branch's queries the prefix and their own branch causally. Queries come as `[batch, Q,
    kv_heads, groups, head_dim]`; returns the output in the same layout."""
    b, n_q, kv, groups, h = q_BxQxKxGxH.shape
    p, n, r = branches.prefix, branches.count, branches.length
    first = branches.slots - n_q
    k_pre, v_pre = k_BxKxSxH[:, :, :p], v_BxKxSxH[:, :, :p]
    mask_pre, pos_pre = key_mask_BxS[:, :p], key_positions_BxS[:, :p]
    outputs = []
    if first < p:  # prefix queries: the prefix, causally
        q = q_BxQxKxGxH[:, :p - first].transpose(0, 2, 3, 1, 4).reshape(b, kv, -1, h)
        causal = np.arange(p)[None, :] <= np.arange(first, p)[:, None]
        visible = causal & mask_pre[:, None, :]
        near = window_mask(query_positions_BxQ[:, :p - first], pos_pre, window, local)
        visible = visible if near is None else visible & near
        out = attend(q, k_pre, v_pre, visible[:, None, None], groups, scale, dtype)
        outputs.append(out.reshape(b, kv, groups, p - first, h).transpose(0, 3, 1, 2, 4))
    # Branch queries: [batch, kv, branch, groups * length, h] against [prefix | own branch].
    q = q_BxQxKxGxH[:, p - first:].reshape(b, n, r, kv, groups, h)
    q = q.transpose(0, 3, 1, 4, 2, 5).reshape(b, kv, n, groups * r, h)
    own = lambda a: a[:, :, p:].reshape(b, kv, n, r, h)
    with_prefix = lambda pre, a: jnp.concatenate(
        [jnp.broadcast_to(pre[:, :, None], (b, kv, n, p, h)), own(a)], axis=3)
    keys, values = with_prefix(k_pre, k_BxKxSxH), with_prefix(v_pre, v_BxKxSxH)
    causal = np.concatenate([np.ones((r, p), bool), np.tril(np.ones((r, r), bool))], axis=1)
    own_mask = key_mask_BxS[:, p:].reshape(b, n, 1, r)
    key_mask = jnp.concatenate([jnp.broadcast_to(mask_pre[:, None, None, :], (b, n, 1, p)),
                                own_mask], axis=3)  # [batch, branch, 1, prefix + length]
    visible = causal & key_mask
    query_pos = query_positions_BxQ[:, p - first:].reshape(b, n, r)
    key_pos = jnp.concatenate([jnp.broadcast_to(pos_pre[:, None, :], (b, n, p)),
                               key_positions_BxS[:, p:].reshape(b, n, r)], axis=2)
    near = window_mask(query_pos, key_pos, window, local)
    visible = visible if near is None else visible & near
    out = attend(q, keys, values, visible[:, None, :, None], groups, scale, dtype)
    out = out.reshape(b, kv, n, groups, r, h).transpose(0, 2, 4, 1, 3, 5)
    outputs.append(out.reshape(b, n * r, kv, groups, h))
    return jnp.concatenate(outputs, axis=1) if len(outputs) > 1 else outputs[0]
