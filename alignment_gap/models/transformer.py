"""Decoder-only transformer backbone: RoPE, RMSNorm, gated MLP, grouped-query attention, KV cache.

Every parameter carries logical axis names (`embed`, `heads`, `mlp`, ...); `sharding.py` maps
them onto the mesh. Sequences follow one layout everywhere: a left-padded prompt followed by one
or more right-padded responses. `positions` count valid tokens only (so padding never shifts
RoPE) and `mask` marks valid tokens, which are the only keys attention may read.

Optional `branches` let several continuations of one prompt share a single sequence
(`[prompt | y1 | y2]`): branch 0 is the shared prefix, and a token of branch k > 0 attends to
the prefix and to earlier tokens of its own branch only - exactly what it would see in its own
`[prompt | yk]` sequence, with the prompt computed once instead of once per continuation.

The KV cache is a plain pytree (`KVCache`) passed in and returned, so the sampler can run it
through `jax.lax.while_loop` under `jax.jit` without any mutable module state.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from alignment_gap import sharding

_MASKED = -1e30  # Finite, so a query with no visible key (a pad slot) gives no NaN.


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    width: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    mlp_dim: int
    max_len: int = 512
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"
    tie_embeddings: bool = False
    num_segments: int = 0  # >0 adds learned segment embeddings (the preference model's 3 parts).

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @classmethod
    def from_config(cls, c, **overrides) -> TransformerConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in c.items() if k in fields}
        values.update(overrides)
        return cls(**values)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values, one `[batch, kv_heads, slots, head_dim]` array per layer.

    Separate arrays (not one stacked array) let XLA update each layer's buffer in place inside
    the decode loop; slicing a layer out of a stacked cache would copy it every step. Heads
    before slots is the layout attention's batched matmuls read, so a decode step never
    transposes the whole cache (in `[batch, slots, ...]` it did, twice per layer per token).
    """

    k: tuple
    v: tuple

    @classmethod
    def zeros(cls, cfg: TransformerConfig, batch: int, slots: int) -> KVCache:
        shape = (batch, cfg.num_kv_heads, slots, cfg.head_dim)
        dtype = jnp.dtype(cfg.dtype)
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)))


def param(rngs: nnx.Rngs, init, shape, axes) -> nnx.Param:
    """A float32 parameter annotated with logical axes; placed on devices by sharding.py."""
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=axes,
                     eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, width: int, eps: float, rngs: nnx.Rngs):
        self.scale = param(rngs, nnx.initializers.ones, (width,), ("norm",))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...]).astype(x.dtype)


def dense(x, w, contract: int = 1):
    """`x[..., K] @ w[K, N]` for K, N possibly multi-axis, as one 2-D matmul.

    XLA:CPU runs a 2-D dot (and, above all, its weight gradient, which contracts batch and
    length) several times faster than the same contraction written as a 3-D einsum.
    """
    k_shape, n_shape = w.shape[:contract], w.shape[contract:]
    k = math.prod(k_shape)
    y = x.reshape(-1, k) @ w.reshape(k, -1)
    return y.reshape(*x.shape[: x.ndim - contract], *n_shape)


def apply_rope(x_BxLxNxH, positions_BxL, theta: float):
    half = x_BxLxNxH.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions_BxL[..., None].astype(jnp.float32) * freqs  # B x L x half
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxNxH.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        d, n, k, h = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init = nnx.initializers.normal(stddev=d**-0.5)
        self.q = param(rngs, init, (d, n, h), ("embed", "heads", "head_dim"))
        self.k = param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"))
        self.v = param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"))
        out_init = nnx.initializers.normal(stddev=(n * h) ** -0.5 / (2 * cfg.num_layers) ** 0.5)
        self.o = param(rngs, out_init, (n, h, d), ("heads", "head_dim", "embed"))
        self.cfg = cfg

    def __call__(self, x_BxLxD, positions_BxL, key_mask_BxS, cache_kv=None, cache_index=None,
                 branches_BxL=None):
        """Full attention when `cache_kv` is None; else write this chunk at `cache_index` and
        return the whole updated buffers as the new `(k, v)`."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        q = dense(x_BxLxD, self.q[...].astype(dt))
        k = dense(x_BxLxD, self.k[...].astype(dt))
        v = dense(x_BxLxD, self.v[...].astype(dt))
        q = apply_rope(q, positions_BxL, cfg.rope_theta)
        k = apply_rope(k, positions_BxL, cfg.rope_theta)
        length = x_BxLxD.shape[1]
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # B x K x L x H
        if cache_kv is None:
            query_slot = jnp.arange(length)
            new_kv = (k, v)
        else:
            k_cache, v_cache = cache_kv
            write = jax.lax.dynamic_update_slice_in_dim
            new_kv = (write(k_cache, k.astype(k_cache.dtype), cache_index, axis=2),
                      write(v_cache, v.astype(v_cache.dtype), cache_index, axis=2))
            query_slot = cache_index + jnp.arange(length)
            if isinstance(cache_index, int) and cache_index == 0:
                # A prefill: causally, a chunk at slot 0 sees only slots below its length, its
                # own keys; attend to those, not the whole buffer (fewer scores, no wait on
                # the write).
                key_mask_BxS = key_mask_BxS[:, :length]
            else:
                k, v = new_kv
        key_slot = jnp.arange(k.shape[2])
        visible_BxLxS = (key_slot[None, :] <= query_slot[:, None])[None] & key_mask_BxS[:, None, :]
        if branches_BxL is not None:
            key_branch, query_branch = branches_BxL[:, None, :], branches_BxL[:, :, None]
            visible_BxLxS &= (key_branch == 0) | (key_branch == query_branch)

        b, groups = x_BxLxD.shape[0], cfg.num_heads // cfg.num_kv_heads
        q = q.reshape(b, length, cfg.num_kv_heads, groups, cfg.head_dim)
        scores = jnp.einsum("blkgh,bksh->bkgls", q, k.astype(dt)).astype(jnp.float32)
        scores = scores * cfg.head_dim**-0.5
        scores = jnp.where(visible_BxLxS[:, None, None], scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bkgls,bksh->blkgh", probs, v.astype(dt))
        out = out.reshape(b, length, cfg.num_heads, cfg.head_dim)
        y = dense(out, self.o[...].astype(dt), contract=2)
        return y, new_kv


class GatedMLP(nnx.Module):
    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        d, f = cfg.width, cfg.mlp_dim
        init = nnx.initializers.normal(stddev=d**-0.5)
        self.gate = param(rngs, init, (d, f), ("embed", "mlp"))
        self.up = param(rngs, init, (d, f), ("embed", "mlp"))
        out_init = nnx.initializers.normal(stddev=f**-0.5 / (2 * cfg.num_layers) ** 0.5)
        self.down = param(rngs, out_init, (f, d), ("mlp", "embed"))
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x_BxLxD):
        dt = self.dtype
        gate = dense(x_BxLxD, self.gate[...].astype(dt))
        up = dense(x_BxLxD, self.up[...].astype(dt))
        hidden = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return dense(hidden, self.down[...].astype(dt))


class Block(nnx.Module):
    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.width, cfg.norm_eps, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.width, cfg.norm_eps, rngs)
        self.mlp = GatedMLP(cfg, rngs)

    def __call__(self, x, positions, key_mask, cache_kv=None, cache_index=None, branches=None):
        y, new_kv = self.attn(self.attn_norm(x), positions, key_mask, cache_kv, cache_index,
                              branches)
        x = x + y
        x = x + self.mlp(self.mlp_norm(x))
        return sharding.constrain(x, ("batch", "length", "embed_act")), new_kv


class Transformer(nnx.Module):
    """Embeddings, blocks and final norm; returns hidden states `[batch, length, width]`."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, nnx.initializers.normal(stddev=1.0),
                           (cfg.vocab_size, cfg.width), ("vocab", "embed"))
        if cfg.num_segments:
            self.segment_embed = param(rngs, nnx.initializers.normal(stddev=1.0),
                                       (cfg.num_segments, cfg.width), ("segments", "embed"))
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.width, cfg.norm_eps, rngs)

    def __call__(self, tokens_BxL, positions_BxL, key_mask_BxS, *, segments_BxL=None,
                 branches_BxL=None, cache: KVCache | None = None, cache_index=None):
        if branches_BxL is not None and cache is not None:
            raise ValueError("branches_BxL is for full-sequence passes; the KV cache has none")
        dt = jnp.dtype(self.cfg.dtype)
        # Gather from a replicated copy: a gather from a table sharded on (vocab, embed) into a
        # batch-sharded output is a layout XLA's SPMD partitioner can only do by rematerialising.
        table = sharding.constrain(self.embed[...], (None, None))
        x = jnp.take(table, tokens_BxL, axis=0).astype(dt)
        if segments_BxL is not None:
            segment_table = sharding.constrain(self.segment_embed[...], (None, None))
            x = x + jnp.take(segment_table, segments_BxL, axis=0).astype(dt)
        x = sharding.constrain(x, ("batch", "length", "embed_act"))
        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            x, (k, v) = block(x, positions_BxL, key_mask_BxS, layer_cache, cache_index,
                              branches_BxL)
            new_k.append(k)
            new_v.append(v)
        new_cache = None if cache is None else KVCache(tuple(new_k), tuple(new_v))
        return self.final_norm(x), new_cache


def positions_from_mask(mask_BxL):
    """Position of each token among the valid ones (pads repeat a neighbour's; they are masked)."""
    return jnp.maximum(jnp.cumsum(mask_BxL.astype(jnp.int32), axis=-1) - 1, 0)


def branched_layout(prompt_mask_BxP, *branch_masks_BxR):
    """Positions and branch ids for `[prompt | branch 1 | branch 2 | ...]`: each branch's tokens
    get the positions they would have right after the prompt, and branch id k (the prompt 0)."""
    prompt_length = prompt_mask_BxP.astype(jnp.int32).sum(axis=1, keepdims=True)
    positions = [positions_from_mask(prompt_mask_BxP)]
    branches = [jnp.zeros(prompt_mask_BxP.shape, jnp.int32)]
    for k, mask in enumerate(branch_masks_BxR, start=1):
        positions.append(prompt_length + positions_from_mask(mask))
        branches.append(jnp.full(mask.shape, k, jnp.int32))
    return jnp.concatenate(positions, axis=1), jnp.concatenate(branches, axis=1)
