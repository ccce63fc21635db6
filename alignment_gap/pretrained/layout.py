"""Where each of our parameters lives in a Hugging Face checkpoint, and in what layout.

Hugging Face stores a projection as `[out, in]` with heads merged (`q_proj.weight` is
`[heads * head_dim, width]`); ours keep heads apart and put the input first (`attn.q` is
`[width, heads, head_dim]`). A `Spec` says how one of ours is made from the stored tensor:
`ours = stored.reshape(row_dims + col_dims).transpose(perm)`, and export inverts it. Reading
needs only the stored rows a device's shard covers (`rows_for`): a process never holds a whole
large tensor it does not need.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from alignment_gap.errors import CheckpointError
from alignment_gap.models.transformer import TransformerConfig


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str  # the stored tensor's name ({layer} filled in)
    row_dims: tuple[int, ...]  # the stored first axis, split
    col_dims: tuple[int, ...]  # the stored second axis, split (empty for vectors)
    perm: tuple[int, ...]  # ours = stored.reshape(row_dims + col_dims).transpose(perm)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        cols = (math.prod(self.col_dims),) if self.col_dims else ()
        return (math.prod(self.row_dims),) + cols

    @property
    def shape(self) -> tuple[int, ...]:
        split = self.row_dims + self.col_dims
        return tuple(split[p] for p in self.perm)

    def to_stored(self, ours: np.ndarray) -> np.ndarray:
        return ours.transpose(np.argsort(self.perm)).reshape(self.stored_shape)

    def shard(self, read, index: tuple[slice, ...]) -> np.ndarray:
        """Our array's block at `index`, from `read(name, rows)` of the stored tensor."""
        rows, local = self.rows_for(index)
        stored = read(self.name, rows)
        return stored.reshape((-1,) + self.row_dims[1:] + self.col_dims)[local].transpose(
            self.perm)

    def rows_for(self, index: tuple[slice, ...]) -> tuple[slice, tuple[slice, ...]]:
        """(stored rows to read, index into those rows reshaped) for our shard `index`."""
        split = self.row_dims + self.col_dims
        ours_to_split = [index[self.perm.index(j)] for j in range(len(split))]
        bounds = [range(*s.indices(n)) for s, n in zip(ours_to_split, split, strict=True)]
        inner = self.row_dims[1:]
        if all(len(b) == n for b, n in zip(bounds[1: len(self.row_dims)], inner, strict=True)):
            first, step = bounds[0], math.prod(inner)
            rows = slice(first.start * step, first.stop * step)
            local = [slice(0, len(first))] + [slice(b.start, b.stop) for b in bounds[1:]]
            return rows, tuple(local)
        return slice(None), tuple(slice(b.start, b.stop) for b in bounds)


def _matrix(name, rows, cols, perm):
    return Spec(name, tuple(rows), tuple(cols), tuple(perm))


def block_specs(cfg: TransformerConfig) -> dict[str, Spec]:
    """Our block's parameters (paths below `blocks.<i>`) -> their stored tensors."""
    d, n, k, h, f = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    layer = "model.layers.{layer}."
    specs = {
        "attn_norm.scale": _matrix(layer + "input_layernorm.weight", [d], [], [0]),
        "attn.q": _matrix(layer + "self_attn.q_proj.weight", [n, h], [d], [2, 0, 1]),
        "attn.k": _matrix(layer + "self_attn.k_proj.weight", [k, h], [d], [2, 0, 1]),
        "attn.v": _matrix(layer + "self_attn.v_proj.weight", [k, h], [d], [2, 0, 1]),
        "attn.o": _matrix(layer + "self_attn.o_proj.weight", [d], [n, h], [1, 2, 0]),
        "mlp.gate": _matrix(layer + "mlp.gate_proj.weight", [f], [d], [1, 0]),
        "mlp.up": _matrix(layer + "mlp.up_proj.weight", [f], [d], [1, 0]),
        "mlp.down": _matrix(layer + "mlp.down_proj.weight", [d], [f], [1, 0]),
    }
    if cfg.post_norms:  # Gemma's names: its post_attention_layernorm is *after* attention.
        specs["post_attn_norm.scale"] = _matrix(layer + "post_attention_layernorm.weight", [d],
                                                [], [0])
        specs["mlp_norm.scale"] = _matrix(layer + "pre_feedforward_layernorm.weight", [d], [],
                                          [0])
        specs["post_mlp_norm.scale"] = _matrix(layer + "post_feedforward_layernorm.weight", [d],
                                               [], [0])
    else:
        specs["mlp_norm.scale"] = _matrix(layer + "post_attention_layernorm.weight", [d], [],
                                          [0])
    if cfg.qkv_bias:
        for name, heads in (("q", n), ("k", k), ("v", k)):
            specs[f"attn.{name}_bias"] = _matrix(layer + f"self_attn.{name}_proj.bias",
                                                 [heads, h], [], [0, 1])
    if cfg.qk_norm:
        for name in ("q", "k"):
            specs[f"attn.{name}_norm.scale"] = _matrix(layer + f"self_attn.{name}_norm.weight",
                                                       [h], [], [0])
    return specs


def top_specs(cfg: TransformerConfig) -> dict[str, Spec]:
    """Parameters outside the blocks -> their stored tensors."""
    v, d = cfg.vocab_size, cfg.width
    specs = {"backbone.embed": _matrix("model.embed_tokens.weight", [v], [d], [0, 1]),
             "backbone.final_norm.scale": _matrix("model.norm.weight", [d], [], [0])}
    if not cfg.tie_embeddings:
        specs["head"] = _matrix("lm_head.weight", [v], [d], [1, 0])
    return specs


def param_spec(path: tuple, cfg: TransformerConfig) -> tuple[Spec, bool]:
    """(spec, stacked) of one of our LanguageModel parameter paths, e.g.
    `("backbone", "blocks", 3, "attn", "q")`; `stacked`: a scanned `[layers, ...]` array whose
    spec names layer `{layer}`."""
    parts = [str(p) for p in path]
    if parts[:2] == ["backbone", "blocks"]:
        rest = parts[2:]
        if cfg.scan_layers:
            return block_specs(cfg)[".".join(rest)], True
        spec = block_specs(cfg)[".".join(rest[1:])]
        return dataclasses.replace(spec, name=spec.name.format(layer=rest[0])), False
    dotted = ".".join(parts)
    specs = top_specs(cfg)
    if dotted not in specs:
        raise CheckpointError(f"parameter {dotted}: no pretrained tensor holds it (a "
                              "preference model's score head and segment embeddings are new)")
    return specs[dotted], False
