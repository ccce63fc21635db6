"""Every jitted program a config's run executes, built abstractly for ahead-of-time compilation.

    runs = programs.build(config, mesh)     # [Run(name, programs, resident), ...]

A `Program` is the very `jax.jit` object the trainer calls (made by the same factories:
`make_update_step`, `Sampler`, `rank_program`, `eval_programs`, ...) with abstract arguments
(`jax.ShapeDtypeStruct`s carrying their shardings) in place of arrays: models come from
`nnx.eval_shape`, so no weight is ever materialised. A `Run` is one trainer run (a study
stage) and the arrays that stay on the devices while it runs (train state, frozen models,
evaluation data), which every program of the run shares memory with.

Data never enters: token ids are placeholders, and EOS / pad ids, which only appear as
constants, are the synthetic tokenizer's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from alignment_gap import sharding
from alignment_gap.batches import PreferenceBatch, SFTBatch
from alignment_gap.data.relabel import BATCH as RELABEL_BATCH
from alignment_gap.data.relabel import margins_program
from alignment_gap.errors import ConfigError
from alignment_gap.evaluation import eval_programs, eval_sampler, kl_sampler
from alignment_gap.models import KVCache
from alignment_gap.sampling import SamplingConfig
from alignment_gap.sources import online_sampler, rank_program
from alignment_gap.study import pipeline, test_stage
from alignment_gap.study.hypotheses.probe import chunk_rows, margin_h_program, probe_sampler
from alignment_gap.study.run import SIDE_BY_SIDE, rows_for, side_by_side_sampler
from alignment_gap.train import common, policy, preference, sft
from alignment_gap.train.state import make_optimizer, make_update_step, train_state_program

EOS_ID, PAD_ID = 1, 0  # The synthetic tokenizer's; a real one's only change constants.
TASKS = ("sft", "preference_model", "policy", "study")


@dataclasses.dataclass
class Program:
    name: str  # The jitted function's name: what compile logs and the report show.
    jitted: Any
    args: tuple  # Abstract arguments.
    resident_args: tuple[int, ...] = ()  # Which arguments are among the run's resident arrays.
    outputs_resident: bool = False  # Initialisers: their outputs become resident arrays.
    detail: str = ""  # What else tells two programs of one name apart (loss, slices, ...).
    decode_steps: int = 0  # Samplers: the decode loop's most iterations (the last token is
    # drawn after it, with no forward pass).
    prefill: Program | None = None  # Samplers: the prefill alone (see `report.py`, costs).
    layers: int = 1  # Depth of the models it runs (costs are extrapolated in depth).
    # Initialisers: the abstract state they build. Their one argument is a key, so what they
    # build is what tells two models' initialisers apart.
    builds: Any = None

    @property
    def key(self) -> tuple:
        """Two programs with equal keys compile to the same program up to constants (the SFT
        and preference updates' learning rates): the report keeps one."""
        shapes = tuple((x.shape, str(x.dtype), str(x.sharding.spec))
                       for x in jax.tree.leaves((self.args, self.builds)))
        return self.name, self.detail, shapes


@dataclasses.dataclass
class Run:
    name: str
    programs: list[Program]
    resident: dict[str, Any]  # What stays on the devices while the run runs (abstract).


class Builder:
    """Abstract models, batches and keys on one mesh."""

    def __init__(self, mesh, rules):
        self.mesh, self.rules = mesh, rules

    def model(self, kind: str, model_cfg):
        """(abstract module, graphdef, abstract state)."""
        graphdef, state = common.abstract_model(kind, model_cfg, self.mesh, self.rules)
        return nnx.merge(graphdef, state), graphdef, state

    def rows(self, *shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(
            self.mesh, self.rules, len(shape)))

    def replicated(self, *shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.replicated(self.mesh))

    def key(self):
        return jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                                    sharding=sharding.replicated(self.mesh))

    def prompts(self, rows: int, p: int):
        return self.rows(rows, p), self.rows(rows, p, dtype=jnp.bool_)

    def pairs(self, rows: int, p: int, r: int, place=None) -> PreferenceBatch:
        place = place or self.rows
        return PreferenceBatch(place(rows, p), place(rows, p, dtype=jnp.bool_), place(rows, r),
                               place(rows, r, dtype=jnp.bool_), place(rows, r),
                               place(rows, r, dtype=jnp.bool_))

    def train_state(self, params, config):
        """(initialiser program, abstract train state, shardings) for `params` and the
        config's optimiser."""
        tx = make_optimizer(config)
        init, shardings = train_state_program(params, tx, self.mesh, self.rules)
        with sharding.use(self.mesh, self.rules):
            state = sharding.abstract_like(jax.eval_shape(init, params), shardings)
        program = Program("init_train_state", init, (params,), resident_args=(0,),
                          outputs_resident=True, detail=config.model.name)
        return program, state, shardings, tx

    def sampler_program(self, sampler, lm, params, rows: int, p: int, r: int,
                        samples_per_prompt: int = 1, params_resident: bool = True) -> Program:
        """A `Sampler`'s program for `rows` prompts (`lm`: the abstract model it samples;
        `params_resident`: its parameters are among the run's resident arrays)."""
        prompt, mask = self.prompts(rows, p)
        resident = (0,) if params_resident else ()
        prefill = Program(f"{sampler.jitted.__name__}_prefill", _prefill_program(
            lm, self.mesh, self.rules, r), (params, prompt, mask), resident_args=resident,
            layers=lm.cfg.num_layers)
        return Program(sampler.jitted.__name__, sampler.jitted, (params, prompt, mask,
                                                                 self.key()),
                       resident_args=resident, detail=f"{samples_per_prompt} per prompt",
                       decode_steps=r - 1, prefill=prefill, layers=lm.cfg.num_layers)


def _prefill_program(lm, mesh, rules, r: int):
    """The sampler's prefill alone (the prompt through the model into a fresh cache): with
    it, the report splits a sampler's cost into prefill + decode steps (XLA counts a loop's
    body once)."""
    graphdef, _ = nnx.split(lm)

    def prefill(state, prompt, prompt_mask):
        model = nnx.merge(graphdef, state)
        p = prompt.shape[1]
        slots = jnp.concatenate([prompt_mask.astype(bool),
                                 jnp.zeros((prompt.shape[0], r), bool)], axis=1)
        cache = KVCache.zeros(model.cfg, prompt.shape[0], p + r).constrained()
        return model(prompt, prompt_mask.astype(bool), cache=cache, cache_index=0,
                     cache_mask_BxS=slots, logits_window=(p - 1, p))

    return jax.jit(prefill)


def _sampling(config) -> SamplingConfig:
    s = config.sampling
    return SamplingConfig(max_new_tokens=config.data.response_len, temperature=s.temperature,
                          top_k=s.top_k, top_p=s.top_p, eos_id=EOS_ID, pad_id=PAD_ID)


def sft_run(config, b: Builder, name: str = "sft") -> Run:
    p, r = config.data.prompt_len, config.data.response_len
    layers = config.model.num_layers
    init_lm, graphdef = common.init_program("lm", config.model, b.mesh, b.rules)
    _, _, params = b.model("lm", config.model)
    init_state, state, shardings, tx = b.train_state(params, config)
    batch = SFTBatch(*b.prompts(config.batch_size, p), b.rows(config.batch_size, r),
                     b.rows(config.batch_size, r, dtype=jnp.bool_))
    update = make_update_step(graphdef, tx, sft.sft_loss, b.mesh, b.rules, shardings,
                              jax.tree.map(lambda x: x.sharding, batch), name="sft_update")
    return Run(name, [
        Program("init_lm", init_lm, (b.key(),), outputs_resident=True,
                detail=config.model.name, builds=params),
        init_state,
        Program("sft_update", update.jitted, (state, batch, None, None), resident_args=(0,),
                layers=layers),
        Program("sft_eval_loss", sft.eval_loss_program(graphdef, b.mesh), (state.params, batch),
                resident_args=(0,), layers=layers),
    ], {"train state": state})


def preference_run(config, b: Builder, name: str = "preference") -> Run:
    p, r = config.data.prompt_len, config.data.response_len
    layers = config.model.num_layers
    init_pm, graphdef = common.init_program("preference", config.model, b.mesh, b.rules)
    _, _, params = b.model("preference", config.model)
    init_state, state, shardings, tx = b.train_state(params, config)
    batch = b.pairs(config.batch_size, p, r)
    update = make_update_step(graphdef, tx, preference.random_order_loss, b.mesh, b.rules,
                              shardings, jax.tree.map(lambda x: x.sharding, batch),
                              {"key": sharding.replicated(b.mesh)}, name="preference_update")
    return Run(name, [
        Program("init_preference", init_pm, (b.key(),), outputs_resident=True,
                detail=config.model.name, builds=params),
        init_state,
        Program("preference_update", update.jitted, (state, batch, {"key": b.key()}, None),
                resident_args=(0,), layers=layers),
        Program("preference_accuracy", preference.accuracy_program(graphdef, b.mesh),
                (state.params, batch), resident_args=(0,), layers=layers),
    ], {"train state": state})


def policy_run(config, b: Builder, name: str = "policy") -> Run:
    """The policy trainer's programs (`train/policy.py`): update, and online sampling and
    ranking, and evaluation when a golden judge is configured."""
    d, e = config.data, config.eval
    p, r, batch_size = d.prompt_len, d.response_len, config.batch_size
    layers = config.model.num_layers
    lm, graphdef, params = b.model("lm", config.model)
    _, ref_graphdef, reference = b.model("lm", config.model)
    init_state, state, shardings, _ = b.train_state(params, config)
    batch = b.pairs(batch_size, p, r)
    extras = {"reference": reference}
    update = policy.make_policy_update(config, graphdef, ref_graphdef, EOS_ID, b.mesh, b.rules,
                                       shardings, jax.tree.map(lambda x: x.sharding, batch),
                                       jax.tree.map(lambda x: x.sharding, reference))
    settings = {k: b.replicated(dtype=jnp.float32) for k in update.settings}
    programs = [init_state, Program("policy_update", update.jitted, (state, batch, extras,
                                                                     settings),
                                    resident_args=(0, 2), layers=layers,
                                    detail=f"{config.loss}, {config.microbatches} micro-batches")]
    resident = {"policy train state": state, "reference policy": reference}
    sampling = _sampling(config)
    if config.source == "online":
        proxy, _, proxy_params = b.model("preference", config.proxy_model)
        sampler = online_sampler(lm, b.mesh, b.rules, sampling)
        programs.append(b.sampler_program(sampler, lm, state.params, batch_size, p, r, 2))
        prompt, mask = b.prompts(batch_size, p)
        programs.append(Program(
            "online_rank", rank_program(proxy, b.mesh, b.rules, config.microbatches),
            (proxy_params, prompt, mask, b.rows(2 * batch_size, r),
             b.rows(2 * batch_size, r, dtype=jnp.bool_)), resident_args=(0,),
            detail=f"{config.microbatches} micro-batches",
            layers=config.proxy_model.num_layers))
        resident["proxy preference model"] = proxy_params
    if e.golden_checkpoint:
        evaluation, held = evaluation_programs(config, b, lm, graphdef, state.params, reference)
        programs += evaluation
        resident.update(held)
    return Run(name, programs, resident)


def evaluation_programs(config, b: Builder, lm, graphdef, params, sft_params):
    """(programs, resident arrays) of a policy run's evaluations (`evaluation.py`)."""
    d, e = config.data, config.eval
    p, r, layers = d.prompt_len, d.response_len, config.model.num_layers
    sampling, programs, resident = _sampling(config), [], {}
    _, golden_graphdef, golden = b.model("preference", e.golden_model)
    judge, kl, pair_logprobs, classify = eval_programs(graphdef, golden_graphdef, b.mesh,
                                                       b.rules)
    sampler = eval_sampler(lm, b.mesh, b.rules, sampling)
    programs.append(b.sampler_program(sampler, lm, params, e.prompts, p, r))
    own = kl_sampler(lm, b.mesh, b.rules, sampling)  # the KL's own samples (`Evaluator`)
    if own is not None:
        programs.append(b.sampler_program(own, lm, params, e.prompts, p, r))
    if e.opponent_checkpoint:
        opponent_model = e.get("opponent_model") or None  # absent: the policy's
        opponent_lm, _, opponent = b.model("lm", opponent_model or config.model)
        # Sampled once as the evaluator starts, then freed (`Evaluator` keeps the samples):
        # its parameters count in that call, not among the run's resident arrays. Another
        # architecture samples with its own program.
        opponent_sampler = (eval_sampler(opponent_lm, b.mesh, b.rules, sampling)
                            if opponent_model else sampler)
        programs.append(b.sampler_program(opponent_sampler, opponent_lm, opponent, e.prompts,
                                          p, r, params_resident=False))
    prompt, mask = b.prompts(e.prompts, p)
    ours = (b.rows(e.prompts, r), b.rows(e.prompts, r, dtype=jnp.bool_))
    theirs = (b.rows(e.prompts, r), b.rows(e.prompts, r, dtype=jnp.bool_))
    programs += [
        Program("eval_judge", judge, (golden, prompt, mask, *ours, *theirs),
                resident_args=(0, 1, 2, 5, 6), layers=e.golden_model.num_layers),
        Program("eval_kl", kl, (params, sft_params, prompt, mask, *ours),
                resident_args=(0, 1, 2, 3), layers=layers),
    ]
    resident.update({"golden judge": golden, "evaluation prompts and opponent samples":
                     (prompt, mask, *theirs)})
    if e.pairs:
        pairs = b.pairs(e.pairs, p, r)
        sft_logprobs = (b.replicated(e.pairs, dtype=jnp.float32),) * 2
        programs += [Program("eval_pair_logprobs", pair_logprobs, (sft_params, pairs),
                             resident_args=(0, 1), layers=layers),
                     Program("eval_classify", classify, (params, sft_logprobs, pairs),
                             resident_args=(0, 1, 2), layers=layers)]
        resident["evaluation pairs"] = pairs
    return programs, resident


def test_run(study, b: Builder, name: str = "test") -> Run:
    """`study/test_stage.py`: a run's evaluations on the test prompts, one checkpoint at a
    time (any main run's config: they evaluate alike)."""
    plan = pipeline.build_plan(study, workdir="<aot>")
    run_config = next(s.config for s in plan.test.upstream if "method" in s.meta)
    config = test_stage.evaluation_config(run_config, study, 0)
    lm, graphdef, params = b.model("lm", config.model)
    _, _, sft_params = b.model("lm", config.model)
    programs, resident = evaluation_programs(config, b, lm, graphdef, params, sft_params)
    return Run(name, programs, {"policy": params, "SFT policy": sft_params, **resident})


def margins(b: Builder, model_cfg, rows: int, p: int, r: int):
    """(program, params) of a preference model's both-order margins over `rows` host pairs
    (numpy in: replicated)."""
    _, graphdef, params = b.model("preference", model_cfg)
    pair = b.pairs(rows, p, r, place=b.replicated)
    return Program("preference_margins", margins_program(graphdef, b.mesh),
                   (params, pair.prompt, pair.prompt_mask, pair.chosen, pair.chosen_mask,
                    pair.rejected, pair.rejected_mask), resident_args=(0,),
                   detail=model_cfg.name, layers=model_cfg.num_layers), params


def relabel_run(study, b: Builder, name: str = "relabel") -> Run:
    """`study/relabel_stage.py`: the golden judge over batches of D_initial."""
    program, golden = margins(b, study.golden_model, RELABEL_BATCH, study.data.prompt_len,
                              study.data.response_len)
    return Run(name, [program], {"golden judge": golden})


def probe_run(study, b: Builder, name: str) -> Run:
    """A hypothesis analysis stage (`study/hypotheses/probe.py`): samples from finished
    policies, their classifier margins against SFT, and the golden (and proxy) judges."""
    p, r, m = study.data.prompt_len, study.data.response_len, study.model
    lm, graphdef, sft = b.model("lm", m)
    _, _, policy_a = b.model("lm", m)
    _, _, policy_b = b.model("lm", m)
    sampling = SamplingConfig(max_new_tokens=r, temperature=study.policy.temperature,
                              top_k=study.policy.top_k, top_p=study.policy.top_p,
                              eos_id=EOS_ID, pad_id=PAD_ID)
    resident = {"SFT policy": sft, "two probed policies": (policy_a, policy_b)}
    chunk = chunk_rows(b.mesh, b.rules)
    programs = [b.sampler_program(probe_sampler(lm, b.mesh, b.rules, sampling), lm, policy_a,
                                  chunk, p, r)]
    if name == "quality-data":  # two policies' samples, relabelled by the golden judge
        program, resident["golden judge"] = margins(b, study.golden_model, RELABEL_BATCH, p, r)
        return Run(name, programs + [program], resident)
    pair = b.pairs(chunk, p, r, place=b.replicated)
    programs.append(Program("probe_h", margin_h_program(graphdef, b.mesh),
                            (policy_a, sft, pair.prompt, pair.prompt_mask, pair.chosen,
                             pair.chosen_mask, pair.rejected, pair.rejected_mask),
                            resident_args=(0, 1), layers=m.num_layers))
    for judge, cfg in (("golden judge", study.golden_model), ("proxy", study.proxy_model)):
        program, resident[judge] = margins(b, cfg, chunk, p, r)
        programs.append(program)
    return Run(name, programs, resident)


def samples_run(study, b: Builder, name: str = "samples") -> Run:
    """`study/run.py`'s greedy side-by-side summaries, one policy loaded at a time."""
    lm, _, params = b.model("lm", study.model)
    r = study.data.response_len
    sampler = side_by_side_sampler(lm, b.mesh, b.rules, r)
    shards = sharding.batch_shards(b.mesh, b.rules)  # as many rows as the run rounds up to
    rows = rows_for(SIDE_BY_SIDE, shards, SIDE_BY_SIDE * shards)
    return Run(name, [b.sampler_program(sampler, lm, params, rows, study.data.prompt_len, r)],
               {"policy": params})


def study_runs(study, b: Builder) -> list[Run]:
    """Every stage of the study's plan (hypothesis variants included), then its report."""
    runs = []
    for stage in pipeline.build_plan(study, workdir="<aot>").stages:
        if stage.meta.get("chain", 0):  # an upstream re-draw: chain 0's programs again
            continue
        if stage.name in _STAGE_BUILDERS:
            runs.append(_STAGE_BUILDERS[stage.name](study, b, stage.name))
        elif stage.config.get("task") in _BUILDERS:
            runs.append(_BUILDERS[stage.config.task](stage.config, b, stage.name))
        else:
            raise ConfigError(f"stage {stage.name}: the ahead-of-time tool does not know its "
                              "programs; add a builder to alignment_gap/aot/programs.py")
    runs.append(samples_run(study, b))
    return runs


_BUILDERS = {"sft": sft_run, "preference_model": preference_run, "policy": policy_run}
# Study stages that are not trainer runs, by name.
_STAGE_BUILDERS = {"relabel": relabel_run, "quality-data": probe_run,
                   "classification-stream": probe_run, "test": test_run}


def build(config, mesh) -> list[Run]:
    """The runs (with programs) that `config` would execute on `mesh`."""
    b = Builder(mesh, config.mesh.rules)
    if config.task == "study":
        return study_runs(config, b)
    if config.task not in _BUILDERS:
        raise ConfigError(f"config.task: ahead-of-time compilation covers {TASKS}, not "
                          f"{config.task!r}; compile one of those configs")
    return [_BUILDERS[config.task](config, b, config.task)]
