"""Hugging Face checkpoint directories: `config.json`, `*.safetensors` (optionally sharded with
`model.safetensors.index.json`), read and written without torch.

Tensors are read with the safetensors NumPy API, a row range at a time (`read`). NumPy has no
bfloat16, so for BF16 tensors (most published checkpoints) the same rows are read through a
memory map of the file at the offsets its header gives, as `ml_dtypes.bfloat16`.
"""

from __future__ import annotations

import glob
import json
import os
import struct

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from alignment_gap import run_dir
from alignment_gap.errors import CheckpointError
from alignment_gap.presets.models import FAMILY_ARCHITECTURE

INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
# Hugging Face model_type -> our family (alignment_gap/presets/models.py).
FAMILIES = {"gemma3_text": "gemma3", "gemma3": "gemma3", "qwen2": "qwen2", "qwen3": "qwen3",
            "llama": "llama3"}


# A multimodal checkpoint's language model under the names of a text-only one: transformers 4
# saved Gemma 3's as `language_model.model.*`, transformers 5 as `model.language_model.*`.
_LANGUAGE_MODEL_PREFIXES = (("language_model.model.", "model."),
                            ("model.language_model.", "model."),
                            ("language_model.lm_head.", "lm_head."))


def _text_name(stored: str) -> str:
    for prefix, plain in _LANGUAGE_MODEL_PREFIXES:
        if stored.startswith(prefix):
            return plain + stored[len(prefix):]
    return stored


class SafetensorsSource:
    """The tensors of one checkpoint directory, by name (a multimodal checkpoint's language
    model under its text-only names)."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX)
        if os.path.exists(index):
            weight_map = _json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no weight_map; copy the checkpoint again")
            files = {name: os.path.join(directory, file) for name, file in weight_map.items()}
        else:
            paths = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
            if not paths:
                raise CheckpointError(f"{directory}: no *.safetensors files; export the model "
                                      "with save_pretrained(safe_serialization=True)")
            files = {}
            for path in paths:
                with _safetensors(path) as f:
                    files.update(dict.fromkeys(f.keys(), path))
        self.stored = {_text_name(name): name for name in files}  # our name -> the file's
        self.files = {_text_name(name): path for name, path in files.items()}

    def stored_name(self, name: str) -> str:
        """How the file names tensor `name` (its Hugging Face name), for messages."""
        return name

    def names(self) -> set[str]:
        return set(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        with _safetensors(self.files[name]) as f:
            return tuple(f.get_slice(self.stored[name]).get_shape())

    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Rows `rows` of tensor `name`, as float32."""
        path, name = self.files[name], self.stored[name]
        with _safetensors(path) as f:
            stored = f.get_slice(name)
            if stored.get_dtype() not in FLOAT_DTYPES:
                raise CheckpointError(f"{path}: tensor {name} is {stored.get_dtype()}; only "
                                      f"{'/'.join(FLOAT_DTYPES)} weights can be imported "
                                      "(dequantise the checkpoint first)")
            if stored.get_dtype() != "BF16":
                return np.asarray(stored[rows], np.float32)
        return np.asarray(_bfloat16_view(path, name)[rows], np.float32)


def _safetensors(path: str):
    """`safe_open(path)`; a cut or foreign file raises CheckpointError naming it."""
    try:
        return safe_open(path, "np")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file "
                              f"({str(e).splitlines()[0]}); copy it again") from None


def _json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); copy it again") from None


def _bfloat16_view(path: str, name: str) -> np.ndarray:
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
    begin, _ = header[name]["data_offsets"]
    return np.memmap(path, dtype=ml_dtypes.bfloat16, mode="r", offset=8 + header_size + begin,
                     shape=tuple(header[name]["shape"]))


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing; a Hugging Face checkpoint directory holds "
                              "config.json beside its *.safetensors")
    config = _json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(config).__name__}, not an object of "
                              "settings; copy the checkpoint's config.json again")
    # Multimodal Gemma 3 keeps the language model's settings under text_config. transformers
    # fills what a config leaves out from the class defaults (a multimodal one lists only what
    # differs): Gemma 3's are written out here; other families' missing keys are named.
    text = config.get("text_config")
    if text is not None:
        config = {**text, "model_type": text.get("model_type") or config.get("model_type", "")}
    if FAMILIES.get(config.get("model_type")) == "gemma3":
        config = {**GEMMA3_TEXT_DEFAULTS, **config}
        if "rope_parameters" not in config:
            config = {"rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, **config}
    return config


# transformers' Gemma3TextConfig defaults (as transformers 5.24.0 sets them); the RoPE bases
# are added in transformers 4's form where a config gives neither form.
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216,
                            num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                            head_dim=256, hidden_activation="gelu_pytorch_tanh",
                            rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096,
                            sliding_window_pattern=6, tie_word_embeddings=True,
                            max_position_embeddings=131_072)


def _rope(config: dict, kind: str) -> dict:
    """RoPE settings of the layers of `kind` ("full_attention" or "sliding_attention": Gemma
    3's local layers) in transformers 5's `rope_parameters` (one set, or one per layer kind)
    or 4's `rope_theta` / `rope_scaling` / `rope_local_base_freq` form. Like transformers 5,
    a `rope_parameters` without `rope_theta` keeps its scaling and takes the base from the
    top level (a Gemma 3 local layer: `rope_local_base_freq`, default 10,000)."""
    local = kind == "sliding_attention"
    base = (config.get("rope_local_base_freq") or 10_000.0 if local else
            config.get("rope_theta") or (1_000_000.0 if FAMILIES.get(config.get("model_type"))
                                         == "gemma3" else 10_000.0))
    params = config.get("rope_parameters")
    if isinstance(params, dict) and not any(isinstance(v, dict) for v in params.values()):
        return {"rope_theta": base, **params}  # one set for every layer
    if isinstance(params, dict) and isinstance(params.get(kind), dict):
        return {"rope_theta": base, **params[kind]}
    return {**({} if local else config.get("rope_scaling") or {}), "rope_theta": base}


def architecture(config: dict, where: str) -> tuple[str, dict]:
    """(family, our model fields) of a Hugging Face `config.json`."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported; supported: "
                              f"{sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    try:
        heads = config["num_attention_heads"]
        fields = dict(vocab_size=config["vocab_size"], width=config["hidden_size"],
                      num_layers=config["num_hidden_layers"], num_heads=heads,
                      num_kv_heads=config.get("num_key_value_heads") or heads,
                      head_dim=config.get("head_dim") or (
                          128 if family == "qwen3" else config["hidden_size"] // heads),
                      mlp_dim=config["intermediate_size"], norm_eps=config["rms_norm_eps"],
                      tie_embeddings=config.get("tie_word_embeddings", family == "gemma3"))
        rope = _rope(config, "full_attention")
        fields["rope_theta"] = float(rope["rope_theta"])
        fields.update(_rope_scaling(rope, where))
        fields.update(FAMILY_ARCHITECTURE[family])
        if family == "gemma3":
            fields.update(_gemma3(config, where))
    except KeyError as e:
        raise CheckpointError(f"{where}: {e.args[0]} is missing; add the value the model was "
                              "trained with (transformers' default for its config class)"
                              ) from None
    if family == "qwen2":
        _require(config, where, use_sliding_window=False)
    elif family == "qwen3":
        _require(config, where, attention_bias=False, use_sliding_window=False)
    elif family == "llama3":
        _require(config, where, attention_bias=False, mlp_bias=False)
    if family != "gemma3" and config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {config['hidden_act']!r} is not supported "
                              "(silu only)")
    return family, fields


def _rope_scaling(rope: dict, where: str) -> dict:
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return {}
    if kind == "linear":
        return dict(rope_scaling="linear", rope_scaling_factor=float(rope["factor"]))
    if kind == "llama3":
        return dict(rope_scaling="llama3", rope_scaling_factor=float(rope["factor"]),
                    rope_low_freq_factor=float(rope["low_freq_factor"]),
                    rope_high_freq_factor=float(rope["high_freq_factor"]),
                    rope_original_max_len=int(rope["original_max_position_embeddings"]))
    raise CheckpointError(f"{where}: RoPE scaling {kind!r} is not supported (linear, llama3)")


def _gemma3(config: dict, where: str) -> dict:
    if config.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise CheckpointError(f"{where}: hidden_activation {config['hidden_activation']!r} is "
                              "not supported (gelu_pytorch_tanh)")
    for capping in ("final_logit_softcapping", "attn_logit_softcapping"):
        if config.get(capping):
            raise CheckpointError(f"{where}: {capping} is set; logit soft-capping is not "
                                  "supported")
    # EmbeddingGemma (gemma3_text too) attends both ways: not a causal language model.
    _require(config, where, use_bidirectional_attention=False, attention_bias=False)
    local_rope = _rope(config, "sliding_attention")
    if _rope_scaling(local_rope, where):
        raise CheckpointError(f"{where}: RoPE scaling {local_rope.get('rope_type')!r} on the "
                              "sliding-attention layers is not supported (their RoPE is "
                              "unscaled in every published Gemma 3)")
    layers = config["num_hidden_layers"]
    kinds = config.get("layer_types") or [
        "full_attention" if (i + 1) % config.get("sliding_window_pattern", 6) == 0
        else "sliding_attention" for i in range(layers)]
    full = [i for i, kind in enumerate(kinds) if kind == "full_attention"]
    every = full[0] + 1 if full else 0
    if kinds != ["full_attention" if every and (i + 1) % every == 0 else "sliding_attention"
                 for i in range(layers)]:
        raise CheckpointError(f"{where}: layer_types is not one global layer every n; "
                              "only that pattern is supported")
    if config["sliding_window"] is None:
        raise CheckpointError(f"{where}: sliding_window is null; set it to the window the "
                              "model was trained with (transformers' Gemma 3 default: 4096)")
    return dict(sliding_window=int(config["sliding_window"]), global_every=every,
                local_rope_theta=float(local_rope["rope_theta"]),
                query_scale=float(config.get("query_pre_attn_scalar", 256)) ** -0.5)


def _require(config: dict, where: str, **expected):
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise CheckpointError(f"{where}: {key}={config[key]!r} is not supported "
                                  f"(expected {value!r})")


def write_tensors(directory: str, tensors: dict[str, np.ndarray], config: dict):
    """One `model.safetensors` and `config.json`, each written whole under a temporary name
    (removed if writing fails: a full disk leaves no model-sized leftover) and then renamed once
    on disk, the config last: an interrupted export (a power cut included) leaves no
    half-written file, though between the two renames the new weights sit beside the previous
    export's config (where that was another architecture, an import fails on the first shape
    that differs, naming it). A directory that holds other weight files (another checkpoint's
    shards and index, which an import would read in place of these) is refused, not cleared."""
    os.makedirs(directory, exist_ok=True)
    others = sorted(n for n in os.listdir(directory)
                    if n != "model.safetensors" and (n.endswith(".safetensors")
                                                     or n.endswith(".safetensors.index.json")))
    if others:
        raise CheckpointError(f"{directory}: holds other weight files ({', '.join(others[:3])}"
                              f"{', ...' if len(others) > 3 else ''}); export to an empty "
                              "directory, or move them away first")
    weights, config_path = (os.path.join(directory, n) for n in ("model.safetensors",
                                                                  "config.json"))
    try:
        save_file(tensors, weights + ".tmp", metadata={"format": "pt"})
        with open(config_path + ".tmp", "w") as f:
            json.dump(config, f, indent=2)
    except BaseException:
        for leftover in (weights + ".tmp", config_path + ".tmp"):
            if os.path.exists(leftover):
                os.remove(leftover)
        raise
    run_dir.replace_durably(weights + ".tmp", weights)
    run_dir.replace_durably(config_path + ".tmp", config_path)


ARCHITECTURES = {"gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
                 "qwen2": ("qwen2", "Qwen2ForCausalLM"), "qwen3": ("qwen3", "Qwen3ForCausalLM"),
                 "llama3": ("llama", "LlamaForCausalLM")}


def config_for(family: str, cfg, tokenizer=None, context_len: int | None = None) -> dict:
    """The `config.json` that `architecture` reads back as `cfg` (transformers 4 key names,
    which transformers 5 still reads); with `tokenizer`, its BOS, EOS (every stop id) and pad
    ids, which transformers' generate reads from here; max_position_embeddings `context_len`
    (default `cfg.max_len`)."""
    model_type, class_name = ARCHITECTURES[family]
    config = dict(architectures=[class_name], model_type=model_type, vocab_size=cfg.vocab_size,
                  hidden_size=cfg.width, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                  head_dim=cfg.head_dim, intermediate_size=cfg.mlp_dim,
                  rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
                  rope_theta=cfg.rope_theta,
                  max_position_embeddings=context_len or cfg.max_len,
                  torch_dtype="float32")
    if tokenizer is not None:
        stops = list(tokenizer.stop_ids)
        config.update(eos_token_id=stops[0] if len(stops) == 1 else stops,
                      pad_token_id=tokenizer.pad_id)
        if tokenizer.bos_id is not None:
            config["bos_token_id"] = tokenizer.bos_id
    if cfg.rope_scaling == "linear":
        config["rope_scaling"] = dict(rope_type="linear", factor=cfg.rope_scaling_factor)
    elif cfg.rope_scaling == "llama3":
        config["rope_scaling"] = dict(
            rope_type="llama3", factor=cfg.rope_scaling_factor,
            low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_len)
    if family == "gemma3":
        config.update(
            hidden_activation="gelu_pytorch_tanh", sliding_window=cfg.sliding_window,
            rope_local_base_freq=cfg.local_rope_theta or cfg.rope_theta,
            query_pre_attn_scalar=round(cfg.query_scale ** -2) if cfg.query_scale
            else cfg.head_dim,
            layer_types=["sliding_attention" if cfg.layer_is_local(i) else "full_attention"
                         for i in range(cfg.num_layers)])
    elif family == "qwen2":
        config["use_sliding_window"] = False
    else:
        config["attention_bias"] = False
    return config
