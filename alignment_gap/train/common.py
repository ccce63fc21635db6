"""What every trainer sets up the same way: mesh, tokenizer, batch shape, models, metadata."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
from flax import nnx

from alignment_gap import checkpoint, pretrained, program_cache, resume_guard, run_dir, sharding
from alignment_gap.data import datasets
from alignment_gap.data.pipelines import BatchShape
from alignment_gap.data.tokenizer import Tokenizer, check_fits_model
from alignment_gap.errors import ConfigError, IncompatibleCheckpoint
from alignment_gap.models import LanguageModel, PreferenceModel, TransformerConfig

MODEL_KINDS = {"lm": LanguageModel, "preference": PreferenceModel}


@dataclasses.dataclass
class Runtime:
    mesh: jax.sharding.Mesh
    rules: tuple
    tokenizer: Tokenizer
    shape: BatchShape  # This process's rows of each global batch.

    def global_batch(self, local):
        return sharding.global_batch(local, self.mesh, self.rules)

    def batch_shardings(self, batch_cls):
        rows = sharding.batch_sharding(self.mesh, self.rules, 2)
        return batch_cls(*[rows] * len(dataclasses.fields(batch_cls)))

    def replicated(self):
        return sharding.replicated(self.mesh)


def finished(config, workdir: str) -> bool:
    """True (and says so) when `workdir` holds a finished run; one finished under a config
    that differs in what it trains is refused (`resume_guard`), not "nothing to do"."""
    resume_guard.check(workdir, config)
    return run_dir.already_finished(workdir, config.num_steps)


def runtime(config, workdir: str) -> Runtime:
    resume_guard.check(workdir, config)
    mesh = sharding.make_mesh(config.mesh)
    tok = datasets.tokenizer(config.data, default=pretrained.checkpoint_path(
        pretrained_checkpoint(config)))
    check_fits_model(tok, config.model.vocab_size)
    rows = sharding.process_rows(mesh, config.mesh.rules, config.batch_size)
    shape = BatchShape(config.batch_size, config.data.prompt_len, config.data.response_len, rows)
    run_dir.write_json(workdir, run_dir.CONFIG, config.to_dict())
    return Runtime(mesh, config.mesh.rules, tok, shape)


def model_config(model_cfg) -> TransformerConfig:
    return TransformerConfig.from_config(model_cfg)


def abstract_model(kind: str, model_cfg, mesh, rules):
    """(graphdef, abstract state in its shardings) of a model kind and config, traced once per
    process (`program_cache`): the test stage loads hundreds of checkpoints of one model."""
    return _abstract_model(kind, model_config(model_cfg), mesh, program_cache.rules_key(rules))


@program_cache.cached
def _abstract_model(kind: str, cfg: TransformerConfig, mesh, rules):
    return sharding.abstract_model(lambda: MODEL_KINDS[kind](cfg, nnx.Rngs(0)), mesh, rules)


def new_model(kind: str, model_cfg, rt: Runtime, seed: int):
    """A freshly initialised model, created in its shardings (program `init_<kind>`)."""
    return sharding.create_sharded(MODEL_KINDS[kind], model_config(model_cfg), seed, rt.mesh,
                                   rt.rules, name=f"init_{kind}")


def init_program(kind: str, model_cfg, mesh, rules):
    """`new_model`'s program (`key -> state`) and the model's graphdef."""
    return sharding.init_program(MODEL_KINDS[kind], model_config(model_cfg), mesh, rules,
                                 name=f"init_{kind}")


def pretrained_checkpoint(config) -> str:
    """The `init.checkpoint` a config starts from ('' when none)."""
    return config.get("init", {}).get("checkpoint", "")


def initial_model(kind: str, config, rt: Runtime, seed: int):
    """The model a trainer starts from: `init.checkpoint`'s pretrained weights (a language
    model whole, a preference model's trunk) or a fresh initialisation."""
    spec = pretrained_checkpoint(config)
    if not spec:
        return new_model(kind, config.model, rt, seed)
    source = pretrained.open_checkpoint(spec)
    if kind == "lm":
        return pretrained.load_language_model(source, model_config(config.model), rt.mesh,
                                              rt.rules)
    return pretrained.load_trunk(new_model(kind, config.model, rt, seed), source)


def meta(kind: str, model_cfg, rt: Runtime) -> dict:
    return {"kind": kind, "model": model_cfg.to_dict(), "tokenizer": rt.tokenizer.fingerprint}


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, run_dir.CHECKPOINTS)


def check_frozen(kind: str, frozen_dir: str, model_cfg, rt: Runtime, what: str) -> str:
    """Fail before any compile if `frozen_dir` cannot provide the configured frozen model: a
    finished run (its DONE.json: a run still going, or stopped, would lend whatever step it
    had saved) of that model and tokenizer. Returns the run's identity (`run_identity`)."""
    if not frozen_dir:
        raise IncompatibleCheckpoint(f"{what} is empty; set it to the directory of a finished "
                                     f"{kind} run")
    directory = checkpoint_dir(frozen_dir)
    step, saved = checkpoint.read_meta(directory, what)
    checkpoint.check_compatible(saved, what=what, directory=directory, kind=kind,
                                model=model_cfg.to_dict(), tokenizer_fingerprint=rt.tokenizer
                                .fingerprint)
    identity = run_identity(frozen_dir)
    if identity is None:
        raise IncompatibleCheckpoint(
            f"{what}: {frozen_dir} has not finished (no {run_dir.DONE}; its latest checkpoint "
            f"is step {step}); run it to the end (the same command resumes it), or point to a "
            "finished run")
    return identity


def run_identity(directory: str) -> str | None:
    """A digest of a finished run's DONE.json (its step and final metrics): the same wherever
    the run is moved, another for a run trained again in its place; None if unfinished."""
    done = run_dir.read_json(directory, run_dir.DONE)
    if done is None:
        return None
    return hashlib.sha256(json.dumps(done, sort_keys=True).encode()).hexdigest()[:16]


def check_resume(saved: dict, kind: str, model_cfg, rt: Runtime, workdir: str):
    """A resumed run must continue with the model and tokenizer it was started with."""
    checkpoint.check_compatible(saved, what=f"resuming {workdir}", directory=checkpoint_dir(
        workdir), kind=kind, model=model_cfg.to_dict(), tokenizer_fingerprint=rt.tokenizer
        .fingerprint)


def check_split_sizes(d, sources: dict, batch_size: int, what: str, splits=("train", "validation"),
                      per_record: int = 1):
    """Before the first step: every split a trainer reads holds at least one global batch
    (`per_record`: examples made from each record). The fix named fits the data kind."""
    for split in splits:
        n = len(sources[split]) * per_record
        if n >= batch_size:
            continue
        if d.kind == "synthetic":
            fix = f"set config.data.{split}_pairs >= {batch_size} or config.batch_size <= {n}"
            field = f"data.{split}_pairs"
        else:
            fix = (f"give more records in {d.manual_dir or 'data.manual_dir'} (a split the "
                   f"published data lacks is ~5% of train) or set config.batch_size <= {n}")
            field = "batch_size"
        raise ConfigError(f"config.{field}: the {what} {split} split holds {n} examples, fewer "
                          f"than one batch of {batch_size}; {fix}")


def validation_batches(pipeline, count: int, global_batch, what: str) -> list:
    """The first `count` batches of a validation pipeline; a clear error when there are none."""
    batches = [global_batch(b) for _, b in zip(range(count), pipeline, strict=False)]
    if not batches:
        raise ConfigError(f"config.data.validation_pairs: the {what} validation split holds "
                          "fewer examples than one batch; make it larger (real data: more "
                          "records, ~5% of train are carved) or batch_size smaller")
    return batches


def load_frozen(kind: str, run_dir: str, model_cfg, rt: Runtime, step: int | None = None):
    """A model with the parameters of another run (its latest, or checkpoint `step`), read
    straight into its shardings (nothing is initialised first)."""
    graphdef, abstract = abstract_model(kind, model_cfg, rt.mesh, rt.rules)
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    restored = checkpoint.load_params(checkpoint_dir(run_dir), abstract, shardings, step)
    return nnx.merge(graphdef, restored)
