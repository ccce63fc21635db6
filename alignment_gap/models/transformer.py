"""Decoder-only transformer backbone: RoPE, RMSNorm, gated MLP, grouped-query attention, KV cache.

Every parameter carries logical axis names (`embed`, `heads`, `mlp`, ...); `sharding.py` maps
them onto the mesh. Sequences follow one layout everywhere: a left-padded prompt followed by one
or more right-padded responses. `positions` count valid tokens only (so padding never shifts
RoPE) and `mask` marks valid tokens, which are the only keys attention may read.

Optional `branches` let several continuations of one prompt share a single sequence
(`[prompt | y1 | y2]`): branch 0 is the shared prefix, and a token of branch k > 0 attends to
the prefix and to earlier tokens of its own branch only - exactly what it would see in its own
`[prompt | yk]` sequence, with the prompt computed once instead of once per continuation.
The layout is static (`attention.Branches`: prefix length, branch count and length), so on
CPU attention computes only the scores a branch can see (`attention.attend_branched`).

The KV cache is a plain pytree (`KVCache`) passed in and returned, so the sampler can run it
through `jax.lax.while_loop` under `jax.jit` without any mutable module state.

A full-sequence pass or a sampler's prefill can be read at some slots only (`read_at_BxQ`: a
score's token, a response's logits, a prompt's last token): the last block then runs its
queries, MLP and final norm at those slots, the others serving it only as keys and values.

Two options for large models, both off by default (the CPU presets run unrolled layers):
`scan_layers` stores the blocks' parameters stacked on a leading `layers` axis and runs them
with one `jax.lax.scan` (the KV cache stacked the same way), so compile time no longer grows
with depth; `remat` (`jax.checkpoint` per block) recomputes each block's activations in the
backward pass (`full`) or keeps only the outputs of its weight matmuls (`save_dots`), trading
FLOPs for activation memory.

Pretrained architectures are options of this one model, each off by default (`configs/models.py`
has their presets; `alignment_gap/pretrained` imports their weights): a head width independent of
width / heads, QKV biases (Qwen 2.5), QK-norm (Qwen 3, Gemma 3), norms after attention and MLP as
well as before (Gemma 3), RMSNorm scaled by `1 + scale` (Gemma), GeGLU beside SwiGLU, embeddings
scaled by sqrt(width) (Gemma), local sliding-window layers between global ones with a RoPE base
per kind (Gemma 3), and linear or Llama 3 RoPE scaling.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from alignment_gap import sharding
from alignment_gap.models.attention import (
    Branches,
    attend,
    attend_branched,
    blocked_here,
    positions_from_mask,
    window_mask,
)


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
    scan_layers: bool = False  # Stack the blocks and run them with one scan (see module doc).
    remat: str = "none"  # none | full | save_dots: activation rematerialisation per block.
    # Pretrained architectures (see the module doc); the defaults are our own model.
    head_dim: int = 0  # Width of one attention head; 0: width // num_heads.
    qkv_bias: bool = False  # Biases on the query, key and value projections (Qwen 2.5).
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE.
    post_norms: bool = False  # Norms after attention and MLP too, before the residual add.
    norm_plus_one: bool = False  # RMSNorm multiplies by (1 + scale); scale starts at 0.
    mlp_activation: str = "silu"  # silu (SwiGLU) | gelu_tanh (GeGLU, tanh-approximated GELU).
    embed_scale: bool = False  # Multiply the input embeddings by sqrt(width).
    query_scale: float = 0.0  # Attention logits scale; 0: head_dim ** -0.5.
    sliding_window: int = 0  # >0: local layers see the last `sliding_window` positions only.
    global_every: int = 0  # With a window: layers n-1, 2n-1, ... are global; 0: all are local.
    local_rope_theta: float = 0.0  # RoPE base of local layers; 0: rope_theta.
    rope_scaling: str = "none"  # none | linear | llama3: of the global layers' frequencies.
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 scaling only.
    rope_high_freq_factor: float = 4.0  # llama3 scaling only.
    rope_original_max_len: int = 8192  # llama3 scaling only: the pre-training context.

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.width // self.num_heads)

    def layer_is_local(self, layer: int) -> bool:
        """Whether `layer` attends through the sliding window (a local layer)."""
        if not self.sliding_window:
            return False
        return not (self.global_every and (layer + 1) % self.global_every == 0)

    @classmethod
    def from_config(cls, c, **overrides) -> TransformerConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in c.items() if k in fields}
        values.update(overrides)
        return cls(**values)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # The weight matmuls' outputs are kept; attention scores (batched dots) and elementwise
    # work are recomputed.
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values, `[batch, kv_heads, slots, head_dim]` per layer.

    Unrolled layers keep one array per layer (tuples `k`, `v`): XLA then updates each layer's
    buffer in place inside the decode loop, where slicing a layer out of a stacked array would
    copy it every step. Scanned layers (`scan_layers`) keep one stacked `[layers, ...]` array
    each, carried through the scan, which writes only the new tokens' slots. Heads before slots
    is the layout attention's batched matmuls read, so a decode step never transposes the cache.
    """

    k: tuple | jax.Array
    v: tuple | jax.Array

    @property
    def stacked(self) -> bool:
        return not isinstance(self.k, tuple)

    @classmethod
    def zeros(cls, cfg: TransformerConfig, batch: int, slots: int) -> KVCache:
        shape = (batch, cfg.num_kv_heads, slots, cfg.head_dim)
        dtype = jnp.dtype(cfg.dtype)
        if cfg.scan_layers:
            stacked = (cfg.num_layers, *shape)
            return cls(k=jnp.zeros(stacked, dtype), v=jnp.zeros(stacked, dtype))
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)))

    def constrained(self) -> KVCache:
        """Sharded on batch and kv heads (a no-op outside `sharding.use`)."""
        axes = (("layers",) if self.stacked else ()) + _CACHE_AXES
        return jax.tree.map(lambda x: sharding.constrain(x, axes), self)

    def repeat_rows(self, n: int) -> KVCache:
        """Every row's cache n times, in place (rows: row 0 n times, then row 1, ...), so on
        a data-parallel mesh the copies stay on their row's device."""
        if n == 1:
            return self
        batch_axis = 1 if self.stacked else 0
        return jax.tree.map(lambda x: jnp.repeat(x, n, axis=batch_axis), self)


def param(rngs: nnx.Rngs, init, shape, axes) -> nnx.Param:
    """A float32 parameter annotated with logical axes; placed on devices by sharding.py."""
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=axes,
                     eager_sharding=False)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, in float32; times `scale`, or `1 + scale` (Gemma)."""

    def __init__(self, width: int, cfg: TransformerConfig, rngs: nnx.Rngs, axis_name="norm"):
        init = nnx.initializers.zeros if cfg.norm_plus_one else nnx.initializers.ones
        self.scale = param(rngs, init, (width,), (axis_name,))
        self.eps = cfg.norm_eps
        self.plus_one = cfg.norm_plus_one

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...]
        return (normed * (1.0 + scale if self.plus_one else scale)).astype(x.dtype)


def dense(x, w, contract: int = 1, out_dtype=None):
    """`x[..., K] @ w[K, N]` for K, N possibly multi-axis, as one 2-D matmul; `out_dtype`: the
    product's dtype (float32 from bfloat16 operands: accumulated and kept at full precision).

    XLA:CPU runs a 2-D dot (and, above all, its weight gradient, which contracts batch and
    length) several times faster than the same contraction written as a 3-D einsum.
    """
    k_shape, n_shape = w.shape[:contract], w.shape[contract:]
    k = math.prod(k_shape)
    y = jnp.matmul(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=out_dtype)
    return y.reshape(*x.shape[: x.ndim - contract], *n_shape)


def is_prefill(cache_index) -> bool:
    """A chunk written at slot 0, known when tracing: the cache's first (prefill) call."""
    return isinstance(cache_index, int) and cache_index == 0


def rows_at(a_BxL, at):
    """`a[:, at]` along the length axis: `at` is a static `(start, stop)` window or per-row slots
    `[batch, Q]` (trailing axes of `a` kept)."""
    if isinstance(at, tuple):
        return a_BxL[:, at[0]: at[1]]
    return jnp.take_along_axis(a_BxL, at.reshape(at.shape + (1,) * (a_BxL.ndim - 2)), axis=1)


def rope_frequencies(cfg: TransformerConfig, local):
    """Inverse RoPE wavelengths `[head_dim / 2]` of a local or global layer (`local` may be a
    traced boolean: scanned layers of both kinds)."""
    half = cfg.head_dim // 2
    base = lambda theta: theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    global_freqs = scale_rope(base(cfg.rope_theta), cfg)
    if local is False:
        return global_freqs
    local_freqs = base(cfg.local_rope_theta or cfg.rope_theta)
    return local_freqs if local is True else jnp.where(local, local_freqs, global_freqs)


def scale_rope(freqs, cfg: TransformerConfig):
    """Context extension: `linear` divides every frequency by the factor; `llama3` divides the
    low frequencies (wavelengths above original_max_len / low_freq_factor), keeps the high ones
    (below original_max_len / high_freq_factor) and interpolates between (Llama 3.1 report)."""
    if cfg.rope_scaling == "none":
        return freqs
    factor = cfg.rope_scaling_factor
    if cfg.rope_scaling == "linear":
        return freqs / factor
    low, high, context = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, \
        cfg.rope_original_max_len
    wavelength = 2 * math.pi / freqs
    smooth = jnp.clip((context / wavelength - low) / (high - low), 0.0, 1.0)
    return (1 - smooth) * freqs / factor + smooth * freqs


def apply_rope(x_BxLxNxH, positions_BxL, freqs):
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
        if cfg.qkv_bias:
            zeros = nnx.initializers.zeros
            self.q_bias = param(rngs, zeros, (n, h), ("heads", "head_dim"))
            self.k_bias = param(rngs, zeros, (k, h), ("kv_heads", "head_dim"))
            self.v_bias = param(rngs, zeros, (k, h), ("kv_heads", "head_dim"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg, rngs, axis_name="head_dim")
            self.k_norm = RMSNorm(h, cfg, rngs, axis_name="head_dim")
        self.cfg = cfg

    def __call__(self, x_BxLxD, positions_BxL, key_mask_BxS, cache_kv=None, cache_index=None,
                 branches: Branches | None = None, *, local=False, key_positions_BxS=None,
                 query_at_BxQ=None):
        """`(output, (k, v))`: this chunk's keys and values `[batch, kv_heads, length, head_dim]`.

        Without `cache_kv`, attention reads the chunk itself. With one (this layer's buffers),
        the chunk is written at slot `cache_index` of a copy the queries read; the caller
        stores the returned chunk in its cache. `local`: a sliding-window layer (a Python or
        traced bool); its window is measured in positions, those of the keys being
        `key_positions_BxS` (default: the chunk's own). `query_at_BxQ` (no cache): queries at
        those slots of each row only, output `[batch, Q, width]`; keys are every slot.
        `branches` (no cache): the chunk is a branched sequence; over all slots or a static
        window, on CPU, its scores are computed branch by branch (`attention.attend_branched`),
        else masked.
        """
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        if query_at_BxQ is not None and cache_kv is not None and not is_prefill(cache_index):
            raise ValueError("query_at_BxQ is for full-sequence passes and prefills, not a "
                             "decode step")
        blocked = branches is not None and not _gathered(query_at_BxQ) and blocked_here()
        query_at = query_at_BxQ
        if blocked:  # queries from the window's first slot, or the prefix's end, to the last
            start = 0 if query_at_BxQ is None else query_at_BxQ[0]
            query_at = (min(start, branches.prefix), branches.slots)
        # Keys are every slot; the queries' positions are those at their slots.
        key_positions_BxL = positions_BxL
        x_query = x_BxLxD if query_at is None else rows_at(x_BxLxD, query_at)
        if query_at is not None:
            positions_BxL = rows_at(positions_BxL, query_at)
        q = dense(x_query, self.q[...].astype(dt))
        k = dense(x_BxLxD, self.k[...].astype(dt))
        v = dense(x_BxLxD, self.v[...].astype(dt))
        if cfg.qkv_bias:
            q, k, v = (y + b[...].astype(dt) for y, b in
                       ((q, self.q_bias), (k, self.k_bias), (v, self.v_bias)))
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        freqs = rope_frequencies(cfg, local)
        q = apply_rope(q, positions_BxL, freqs)
        k = apply_rope(k, key_positions_BxL, freqs)
        length = x_query.shape[1]
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # B x K x L x H
        chunk_kv = (k, v)
        b, kv, h = x_BxLxD.shape[0], cfg.num_kv_heads, cfg.head_dim
        groups = cfg.num_heads // kv
        scale = cfg.query_scale or cfg.head_dim**-0.5
        q = q.reshape(b, length, kv, groups, h)
        if blocked:
            out = attend_branched(q, k, v, key_mask_BxS, positions_BxL, key_positions_BxL,
                                  branches, scale, dt, local=local, window=cfg.sliding_window)
            if query_at_BxQ is not None:  # the window's slots of those computed
                out = out[:, query_at_BxQ[0] - query_at[0]: query_at_BxQ[1] - query_at[0]]
                length = out.shape[1]
            y = dense(out.reshape(b, length, cfg.num_heads, h), self.o[...].astype(dt),
                      contract=2)
            return y, chunk_kv
        if query_at is None:
            query_slot = jnp.arange(length)
        elif isinstance(query_at, tuple):
            query_slot = jnp.arange(*query_at)
        else:
            query_slot = query_at
        if cache_kv is not None:
            query_slot = cache_index + query_slot
            if is_prefill(cache_index):
                # A prefill: causally, a chunk at slot 0 sees only slots below its length, its
                # own keys; attend to those, not the whole buffer (fewer scores, no wait on
                # the write).
                key_mask_BxS = key_mask_BxS[:, :x_BxLxD.shape[1]]
            else:
                k, v = (write_slots(buffer, chunk, cache_index)
                        for buffer, chunk in zip(cache_kv, chunk_kv, strict=True))
        key_slot = jnp.arange(k.shape[2])
        causal = key_slot <= query_slot[..., None]  # L x S, or B x Q x S (query_at_BxQ)
        visible_BxLxS = (causal if causal.ndim == 3 else causal[None]) & key_mask_BxS[:, None, :]
        if branches is not None:  # queries at per-row slots: their branch ids from the slots
            key_branch = jnp.asarray(branches.ids())[None, None, :]
            query_branch = branches.ids_at(query_slot)[..., None]
            visible_BxLxS &= (key_branch == 0) | (key_branch == query_branch)
        if key_positions_BxS is None:
            key_positions_BxS = key_positions_BxL
        near = window_mask(positions_BxL, key_positions_BxS, cfg.sliding_window, local)
        if near is not None:
            visible_BxLxS &= near
        # A key head's group of query heads stacked on the query axis, [batch, kv_heads,
        # groups * length, head_dim]: both products are then plain batched matmuls, with no
        # size-1 group axis for XLA:CPU to transpose around (one group: the usual layout).
        q = q.transpose(0, 2, 3, 1, 4).reshape(b, kv, groups * length, h)
        out = attend(q, k, v, visible_BxLxS[:, None, None], groups, scale, dt)
        out = out.reshape(b, kv, groups, length, h).transpose(0, 3, 1, 2, 4)
        out = out.reshape(b, length, cfg.num_heads, h)
        y = dense(out, self.o[...].astype(dt), contract=2)
        return y, chunk_kv


def _gathered(query_at) -> bool:
    """Queries at per-row slots (an array), not all slots or a static window."""
    return query_at is not None and not isinstance(query_at, tuple)


MLP_ACTIVATIONS = {"silu": jax.nn.silu,
                   "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


class GatedMLP(nnx.Module):
    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        d, f = cfg.width, cfg.mlp_dim
        init = nnx.initializers.normal(stddev=d**-0.5)
        self.gate = param(rngs, init, (d, f), ("embed", "mlp"))
        self.up = param(rngs, init, (d, f), ("embed", "mlp"))
        out_init = nnx.initializers.normal(stddev=f**-0.5 / (2 * cfg.num_layers) ** 0.5)
        self.down = param(rngs, out_init, (f, d), ("mlp", "embed"))
        self.dtype = jnp.dtype(cfg.dtype)
        self.activation = MLP_ACTIVATIONS[cfg.mlp_activation]

    def __call__(self, x_BxLxD):
        dt = self.dtype
        gate = dense(x_BxLxD, self.gate[...].astype(dt))
        up = dense(x_BxLxD, self.up[...].astype(dt))
        hidden = sharding.constrain(self.activation(gate) * up, ("batch", "length", "mlp"))
        return dense(hidden, self.down[...].astype(dt))


class Block(nnx.Module):
    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.width, cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.width, cfg, rngs)
        self.mlp = GatedMLP(cfg, rngs)
        if cfg.post_norms:
            self.post_attn_norm = RMSNorm(cfg.width, cfg, rngs)
            self.post_mlp_norm = RMSNorm(cfg.width, cfg, rngs)
        self.post_norms = cfg.post_norms

    def __call__(self, x, positions, key_mask, cache_kv=None, cache_index=None, branches=None,
                 *, local=False, key_positions=None, query_at=None):
        """`query_at` (per-row slots `[batch, Q]` or a static `(start, stop)` window): the
        block's output at those slots only, `[batch, Q, width]`, attending to every slot as the
        full block would."""
        y, chunk_kv = self.attn(self.attn_norm(x), positions, key_mask, cache_kv, cache_index,
                                branches, local=local, key_positions_BxS=key_positions,
                                query_at_BxQ=query_at)
        if self.post_norms:
            y = self.post_attn_norm(y)
        if query_at is not None:
            x = rows_at(x, query_at)
        x = x + y
        y = self.mlp(self.mlp_norm(x))
        if self.post_norms:
            y = self.post_mlp_norm(y)
        x = x + y
        return sharding.constrain(x, ("batch", "length", "embed_act")), chunk_kv


def stacked_blocks(cfg: TransformerConfig, rngs: nnx.Rngs) -> Block:
    """One `Block` whose parameters carry a leading `layers` axis, layer i at index i."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs):
        return Block(cfg, rngs)

    return create(rngs)


def write_slots(buffer, chunk, start, layer=None):
    """`buffer` with `chunk` written from slot `start` (the slots axis is second to last); a
    stacked buffer `[layers, ...]` is written at `layer`."""
    chunk = chunk.astype(buffer.dtype)
    if layer is None:
        return jax.lax.dynamic_update_slice_in_dim(buffer, chunk, start, axis=buffer.ndim - 2)
    zero = jnp.zeros((), jnp.int32)
    index = (layer, zero, zero, jnp.asarray(start, jnp.int32), zero)
    return jax.lax.dynamic_update_slice(buffer, chunk[None], index)


class Transformer(nnx.Module):
    """Embeddings, blocks and final norm; returns hidden states `[batch, length, width]`."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, nnx.initializers.normal(stddev=1.0),
                           (cfg.vocab_size, cfg.width), ("vocab", "embed"))
        if cfg.num_segments:
            self.segment_embed = param(rngs, nnx.initializers.normal(stddev=1.0),
                                       (cfg.num_segments, cfg.width), ("segments", "embed"))
        if cfg.scan_layers:
            self.blocks = stacked_blocks(cfg, rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.width, cfg, rngs)

    def __call__(self, tokens_BxL, positions_BxL, key_mask_BxS, *, segments_BxL=None,
                 branches: Branches | None = None, cache: KVCache | None = None,
                 cache_index=None, read_at_BxQ=None):
        """Hidden states `[batch, length, width]` (and the cache). `read_at_BxQ` (no cache): the
        hidden states at those slots of each row only, `[batch, Q, width]` - the last block
        runs its queries, MLP and the final norm there alone (a score read at one token, the
        logits of a response). Per-row slots `[batch, Q]`, or a static `(start, stop)` window."""
        if cache is not None and (branches is not None or (
                read_at_BxQ is not None and not is_prefill(cache_index))):
            raise ValueError("branches and read_at_BxQ are for full-sequence passes (and "
                             "read_at_BxQ for a prefill at cache_index 0); a decode step has "
                             "neither")
        dt = jnp.dtype(self.cfg.dtype)
        # Gather from a replicated copy: a gather from a table sharded on (vocab, embed) into a
        # batch-sharded output is a layout XLA's SPMD partitioner can only do by rematerialising.
        table = sharding.constrain(self.embed[...], (None, None))
        x = jnp.take(table, tokens_BxL, axis=0).astype(dt)
        if self.cfg.embed_scale:
            x = x * jnp.asarray(self.cfg.width**0.5, dt)
        if segments_BxL is not None:
            segment_table = sharding.constrain(self.segment_embed[...], (None, None))
            x = x + jnp.take(segment_table, segments_BxL, axis=0).astype(dt)
        x = sharding.constrain(x, ("batch", "length", "embed_act"))
        if cache is None:
            x = self._blocks(x, positions_BxL, key_mask_BxS, branches, read_at_BxQ)
            return self.final_norm(x), None
        # A decode step's keys are the cache's slots; their positions count its valid slots.
        key_positions = None
        if self.cfg.sliding_window and not is_prefill(cache_index):
            key_positions = positions_from_mask(key_mask_BxS)
        layer_args = (positions_BxL, key_mask_BxS)
        if self.cfg.scan_layers:
            x, cache = self._scan_with_cache(x, *layer_args, cache, cache_index, key_positions,
                                             read_at_BxQ)
        else:
            new_k, new_v = [], []
            last = self.cfg.num_layers - 1
            for i, (block, k_buffer, v_buffer) in enumerate(
                    zip(self.blocks, cache.k, cache.v, strict=True)):
                x, (k, v) = block(x, *layer_args, (k_buffer, v_buffer), cache_index,
                                  local=self.cfg.layer_is_local(i), key_positions=key_positions,
                                  query_at=read_at_BxQ if i == last else None)
                new_k.append(write_slots(k_buffer, k, cache_index))
                new_v.append(write_slots(v_buffer, v, cache_index))
            cache = KVCache(tuple(new_k), tuple(new_v))
        return self.final_norm(x), cache

    def _layer_kinds(self):
        """(`local`, per-layer flags): `local` is the one kind of every layer, or None when
        they differ - then the flags `[layers]` travel through the scan beside the parameters."""
        flags = [self.cfg.layer_is_local(i) for i in range(self.cfg.num_layers)]
        if len(set(flags)) == 1:
            return flags[0], None
        return None, jnp.asarray(flags)

    def _blocks(self, x, positions, key_mask, branches, read_at=None):
        """Every block over a full sequence (training, scoring), with `remat` if configured;
        with `read_at`, the last block's output at those slots only."""
        def apply(graphdef, state, x, local, query_at=None):
            return nnx.merge(graphdef, state)(x, positions, key_mask, branches=branches,
                                              local=local, query_at=query_at)[0]

        def checkpointed(fn):
            if self.cfg.remat == "none":
                return fn
            # jax.checkpoint of the block as a pure function of its state. nnx.remat would
            # write the state back into the module afterwards, which fails for a frozen model
            # merged inside the loss (the reference policy). Under scan, the loop already
            # keeps XLA from merging recomputation with the forward pass: no CSE barrier.
            return jax.checkpoint(fn, policy=REMAT_POLICIES[self.cfg.remat],
                                  prevent_cse=not self.cfg.scan_layers, static_argnums=(0,))

        last = self.cfg.num_layers - 1
        if not self.cfg.scan_layers:
            for i, block in enumerate(self.blocks):
                layer = checkpointed(functools.partial(
                    apply, local=self.cfg.layer_is_local(i),
                    query_at=read_at if i == last else None))
                x = layer(*nnx.split(block), x)
            return x
        graphdef, stacked = nnx.split(self.blocks)
        local, flags = self._layer_kinds()
        if read_at is not None:  # all but the last layer scanned; the last one alone
            final = jax.tree.map(lambda a: a[last], stacked)
            stacked = jax.tree.map(lambda a: a[:last], stacked)
            if flags is None:
                final_layer = checkpointed(functools.partial(apply, local=local,
                                                             query_at=read_at))
                final_args = ()
            else:
                final_layer = checkpointed(functools.partial(apply, query_at=read_at))
                final_args, flags = (flags[last],), flags[:last]
        if flags is None:
            layer = checkpointed(functools.partial(apply, local=local))
            x, _ = jax.lax.scan(lambda x, params: (layer(graphdef, params, x), None), x, stacked)
        else:
            layer = checkpointed(apply)
            x, _ = jax.lax.scan(lambda x, xs: (layer(graphdef, xs[0], x, xs[1]), None), x,
                                (stacked, flags))
        if read_at is not None:
            x = final_layer(graphdef, final, x, *final_args)
        return x

    def _scan_with_cache(self, x, positions, key_mask, cache: KVCache, cache_index,
                         key_positions, read_at=None):
        """Scanned blocks reading and writing the stacked cache (the carry): each layer writes
        only this chunk's slots, so a decode step never copies the cache. With `read_at` (a
        prefill), the last layer runs alone after the scan, its output at those slots only."""
        graphdef, stacked = nnx.split(self.blocks)
        local, flags = self._layer_kinds()
        if flags is None:
            flags = jnp.zeros((self.cfg.num_layers,), bool)  # unread: `local` is static

        def layer(carry, params, flag, query_at=None):
            x, k_all, v_all, i = carry
            x, (k, v) = nnx.merge(graphdef, params)(
                x, positions, key_mask, (k_all[i], v_all[i]), cache_index,
                local=flag if local is None else local, key_positions=key_positions,
                query_at=query_at)
            k_all = write_slots(k_all, k, cache_index, layer=i)
            v_all = write_slots(v_all, v, cache_index, layer=i)
            return x, k_all, v_all, i + 1

        carry = (x, cache.k, cache.v, jnp.int32(0))
        scanned = self.cfg.num_layers - (read_at is not None)
        carry, _ = jax.lax.scan(lambda c, xs: (layer(c, *xs), None), carry,
                                jax.tree.map(lambda a: a[:scanned], (stacked, flags)))
        if read_at is not None:
            last = jax.tree.map(lambda a: a[scanned], (stacked, flags))
            carry = layer(carry, *last, query_at=read_at)
        x, k_all, v_all, _ = carry
        return x, KVCache(k_all, v_all)
