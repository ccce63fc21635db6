"""Pretrained checkpoints in and out: Hugging Face directories and GGUF files.

    checkpoint = open_checkpoint("hf:/models/qwen3-0.6b")      # or gguf:FILE, or a bare path
    cfg = checkpoint.model_config(dtype="bfloat16")            # our TransformerConfig
    lm = load_language_model(checkpoint, cfg, mesh, rules)     # straight into its shardings
    export_language_model(lm, checkpoint.family, "/tmp/out", tokenizer,   # transformers / vLLM
                          context_len=checkpoint.context_len)

Every tensor is read a shard at a time into the sharding the mesh gives it
(`jax.make_array_from_callback`): a process reads only the rows its devices hold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from alignment_gap import sharding
from alignment_gap.errors import CheckpointError
from alignment_gap.models.heads import LanguageModel
from alignment_gap.models.transformer import TransformerConfig
from alignment_gap.pretrained import gguf_checkpoint, hf
from alignment_gap.pretrained.layout import param_spec

KINDS = ("hf", "gguf")


@dataclasses.dataclass
class Checkpoint:
    where: str  # the path, for messages
    family: str  # gemma3 | qwen2 | qwen3 | llama3
    fields: dict  # our model fields the checkpoint fixes
    source: object  # names(), shape(name), read(name, rows)
    context_len: int | None = None  # the positions it was made for (not our max_len)

    def model_config(self, **overrides) -> TransformerConfig:
        """Our config of this architecture (`overrides`: dtype, max_len, scan_layers, ...)."""
        return TransformerConfig(**{**self.fields, **overrides})

    def check(self, cfg: TransformerConfig, field: str = "model"):
        """A configured model that differs from the checkpoint: one line, field and fix. Every
        field that changes what the weights compute is compared, those the checkpoint leaves
        at their defaults too (a preset's RoPE scaling on a checkpoint without it)."""
        if differ := _differences(self.model_config(), cfg):
            key = differ[0]
            raise CheckpointError(f"config.{field}.{key} is {getattr(cfg, key)!r} but "
                                  f"{self.where} has {getattr(self.model_config(), key)!r}; "
                                  "use the preset of this checkpoint or set "
                                  f"config.{field}.{key}={getattr(self.model_config(), key)!r}")


# TransformerConfig fields that do not change what a checkpoint's weights compute (the
# preference model's segment embeddings are its own, not the checkpoint's).
_NOT_FUNCTION = ("max_len", "dtype", "scan_layers", "remat", "num_segments")


def _differences(a: TransformerConfig, b: TransformerConfig) -> list[str]:
    """The fields (`_function`) where `a` and `b` compute different functions."""
    mine, other = _function(a), _function(b)
    return [key for key, value in mine.items()
            if other.get(key) != value and not (
                isinstance(value, float) and isinstance(other.get(key), float)
                and np.isclose(other[key], value, rtol=1e-6))]


def _function(cfg: TransformerConfig) -> dict:
    """The fields that fix what the weights compute, with the values a 0 or a default stands
    for written out, and settings that do not apply (a window's pattern without a window,
    llama3's factors without llama3 scaling) left out."""
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
           if f.name not in _NOT_FUNCTION}
    out["head_dim"] = cfg.head_dim or cfg.width // cfg.num_heads
    out["query_scale"] = cfg.query_scale or float(out["head_dim"]) ** -0.5
    out["local_rope_theta"] = cfg.local_rope_theta or cfg.rope_theta
    if not cfg.sliding_window:
        out.pop("global_every")
        out.pop("local_rope_theta")
    if cfg.rope_scaling == "none":
        out.pop("rope_scaling_factor")
    if cfg.rope_scaling != "llama3":
        for key in ("rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len"):
            out.pop(key)
    return out


def checkpoint_path(spec: str) -> str:
    """The path of `hf:DIR`, `gguf:FILE` or a bare path."""
    kind, _, path = spec.partition(":")
    return path if kind in KINDS else spec


def open_checkpoint(spec: str) -> Checkpoint:
    """`hf:DIR`, `gguf:FILE`, or a path (a `.gguf` file or a directory with config.json)."""
    path = checkpoint_path(spec)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {spec}: {path} does not exist; give hf:DIR (a "
                              "Hugging Face directory) or gguf:FILE")
    kind = spec.partition(":")[0] if path != spec else (
        "gguf" if path.endswith(".gguf") else "hf")
    if kind == "gguf":
        source = gguf_checkpoint.GgufSource(path)
        family, fields = gguf_checkpoint.architecture(source)
        context = source.field("gemma3.context_length")
    else:
        config = hf.read_config(path)
        family, fields = hf.architecture(config, os.path.join(path, "config.json"))
        source = hf.SafetensorsSource(path)
        context = config.get("max_position_embeddings")
    return Checkpoint(path, family, fields, source, int(context) if context else None)


def pretrained_state(checkpoint: Checkpoint, state, cfg: TransformerConfig):
    """`state` (abstract or concrete, in its shardings) with every parameter the checkpoint
    holds read into it; parameters it has no tensor for (a preference model's score head and
    segment embeddings) are left as they are."""
    names, used = checkpoint.source.names(), set()

    def load(path, leaf):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path][:-1]  # drop .value
        if keys[:1] == ["backbone"] and keys[1:2] == ["segment_embed"] or keys == ["score"]:
            return leaf
        spec, stacked = param_spec(tuple(keys), cfg)
        return _placed(checkpoint, names, spec, stacked, leaf, cfg, used)

    with staging_arrays():
        state = jax.tree_util.tree_map_with_path(load, state)
    # A layer's tensor nothing read: config.json describes another architecture (Gemma 3 with
    # attention_bias, say); dropping it would compute another function. Other tensors (a
    # multimodal checkpoint's vision tower, an untied copy of tied embeddings) are not the
    # language model's layers.
    unused = sorted(n for n in names - used
                    if n.startswith("model.layers.") and not n.endswith("rotary_emb.inv_freq"))
    if unused:
        more = f" and {len(unused) - 1} more" if len(unused) > 1 else ""
        raise CheckpointError(f"{checkpoint.where}: tensor {unused[0]}{more} has no place in "
                              f"the {checkpoint.family} architecture its config.json gives; the "
                              "config does not describe these weights (fix config.json, or "
                              "use a supported architecture)")
    return state


@contextlib.contextmanager
def staging_arrays():
    """NumPy arrays made inside live only until jax or a file has their data, so they ask the
    kernel for no huge pages. NumPy advises huge pages (madvise) for every large array; where
    the kernel then compacts memory at each fault (THP defrag `madvise`, as on our 2-core VMs)
    a fresh GB costs seconds: bench/pretrained_gemma3.py loaded Gemma 3 270M in 15.1-16.5 s
    with the advice and 2.6-2.8 s without (bench/RESULTS.md)."""
    before = np._core.multiarray._set_madvise_hugepage(False)  # as NUMPY_MADVISE_HUGEPAGE=0
    try:
        yield
    finally:
        np._core.multiarray._set_madvise_hugepage(before)


def _placed(checkpoint, names, spec, stacked, leaf, cfg, used: set):
    layers = [dataclasses.replace(spec, name=spec.name.format(layer=i))
              for i in range(cfg.num_layers)] if stacked else [spec]
    used.update(layer.name for layer in layers)
    for layer in layers:
        tensor = checkpoint.source.stored_name(layer.name)
        # Shapes as Hugging Face lists them (GGUF tools print them reversed).
        order = " as [out, in]" if len(layer.stored_shape) == 2 else ""
        if layer.name not in names:
            raise CheckpointError(f"{checkpoint.where}: tensor {tensor} is missing (expected "
                                  f"shape {list(layer.stored_shape)}{order})")
        found = checkpoint.source.shape(layer.name)
        if found != layer.stored_shape:
            raise CheckpointError(f"{checkpoint.where}: tensor {tensor} has shape "
                                  f"{list(found)}, expected {list(layer.stored_shape)}{order}")
    read = checkpoint.source.read
    done = {}  # replicated shards ask for the same block once per device

    def block(index):
        key = tuple((s.start, s.stop) for s in index)
        if key not in done:
            if stacked:
                chosen = range(*index[0].indices(cfg.num_layers))
                done[key] = np.stack([layers[i].shard(read, index[1:]) for i in chosen])
            else:
                done[key] = layers[0].shard(read, index)
        # No copy when the dtype already matches: a copy of the 262k-token embedding is 0.7
        # GB of fresh pages (seconds on our VMs).
        return np.asarray(done[key], leaf.dtype)

    return jax.make_array_from_callback(leaf.shape, leaf.sharding, block)


def load_language_model(checkpoint: Checkpoint, cfg: TransformerConfig, mesh, rules,
                        field: str = "model") -> LanguageModel:
    """A LanguageModel with the checkpoint's weights, nothing initialised first."""
    checkpoint.check(cfg, field)
    graphdef, abstract = sharding.abstract_model(lambda: LanguageModel(cfg, nnx.Rngs(0)), mesh,
                                                 rules)
    return nnx.merge(graphdef, pretrained_state(checkpoint, abstract, cfg))


def load_trunk(model, checkpoint: Checkpoint, field: str = "model"):
    """An initialised model (a preference model) with its backbone from a pretrained LM: the
    segment embeddings start at zero, so the trunk first reads exactly its own embeddings; the
    score head keeps its initialisation."""
    cfg = model.backbone.cfg
    checkpoint.check(cfg, field)
    state = pretrained_state(checkpoint, nnx.state(model), cfg)
    if "segment_embed" in state["backbone"]:
        segments = state["backbone"]["segment_embed"]
        segments[...] = jax.numpy.zeros_like(segments[...])
    nnx.update(model, state)
    return model


def export_language_model(lm: LanguageModel, family: str, directory: str, tokenizer=None,
                          context_len: int | None = None):
    """`lm` as a Hugging Face directory of `family` (config.json + model.safetensors);
    `tokenizer`: its special ids go into config.json (without one it names none, and
    transformers' `generate` then never stops at an end of sequence: pass it);
    `context_len`: config.json's max_position_embeddings, the context a server (vLLM) allows:
    pass the source checkpoint's (`Checkpoint.context_len`), else it is `lm`'s max_len, the
    length it was trained at. No tokenizer files are written: point transformers or vLLM at the
    source checkpoint's (`--tokenizer`)."""
    cfg = lm.cfg
    config = hf.config_for(family, cfg, tokenizer, context_len)
    _, fields = hf.architecture(config, f"{directory}/config.json")
    written = TransformerConfig(**fields)
    if differ := _differences(cfg, written):  # tensors from `cfg`, config.json from `family`
        key = differ[0]
        raise CheckpointError(f"export as {family}: the model's {key} is {getattr(cfg, key)!r} "
                              f"but a {family} config.json says {getattr(written, key)!r}; "
                              "export with the family the model was loaded as "
                              "(Checkpoint.family)")
    tensors = {}
    with staging_arrays():
        for path, value in jax.tree_util.tree_flatten_with_path(nnx.state(lm, nnx.Param))[0]:
            keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)[:-1]
            spec, stacked = param_spec(keys, cfg)
            array = np.asarray(jax.device_get(value), np.float32)
            for i, layer in enumerate(array if stacked else [array]):
                tensors[spec.name.format(layer=i)] = np.ascontiguousarray(spec.to_stored(layer))
        hf.write_tensors(directory, tensors, config)
