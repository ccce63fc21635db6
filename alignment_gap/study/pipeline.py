"""The study's protocol (PAPER.md, "Controlled setting"): which stages, with which configs.

    D_initial -> golden model -> relabel -> D_golden -> SFT -> proxy model (from SFT)
      -> [golden policy] -> online runs (per seed) -> offline sweep (lr x beta x steps, per seed)
      -> [test stage: candidate checkpoints on held-out prompts] -> results table -> plots -> report

`Plan` builds the stages upstream first; hypothesis variants add theirs through the same
helpers. Each trainer stage's config takes its fields from the trainer's preset and every value
that shapes the run from the study config (its `sft` / `golden` / `proxy` / `policy` sections
and the study-wide data, mesh and model sections). What stays the preset's: logging cadence
(`log_every`, at most the run's steps), checkpoint retention (`max_to_keep`), and fields a
stage never reads (an offline run's `proxy_model`, the untested golden policy's `eval` sizes).
A stage's key hashes its whole config, so moving those would rename, and rerun, the stages of
every existing study. How stages are cached and run is `scheduler.py`; the relabel
stage's work is `relabel_stage.py`, the test stage's `test_stage.py`. With `upstream_chains`
> 1 the whole chain above repeats with the upstream seeds re-drawn (`chain_study`), its stages
named `-u<chain>`.
"""

from __future__ import annotations

import functools
import itertools
import os

import ml_collections

from alignment_gap import pretrained, run_dir
from alignment_gap.data import builders, datasets
from alignment_gap.presets import policy as policy_configs
from alignment_gap.presets import preference_model as preference_configs
from alignment_gap.presets import sft as sft_configs
from alignment_gap.study import hypotheses, relabel_stage, test_stage
from alignment_gap.study.scheduler import Stage
from alignment_gap.train import policy, policy_stack, preference, sft


def _common(stage_cfg, study, section, steps, batch_size, learning_rate):
    """Set a trainer config's study-wide sections (data, mesh, distributed) and its optimiser
    from the study: `section` (the stage's section of the study config) says the schedule."""
    stage_cfg.data = ml_collections.ConfigDict(study.data.to_dict())
    if study.data.kind != "synthetic":  # files changed in place make new stages, not old ones
        stage_cfg.data.source = datasets.source_fingerprint(study.data)
    # One tokenizer for every stage: the configured one, else the pretrained policy's.
    stage_cfg.data.tokenizer = study.data.tokenizer or pretrained.checkpoint_path(
        study.init.checkpoint)
    stage_cfg.init.checkpoint = ""  # set per stage below: what starts from pretrained weights
    stage_cfg.mesh = ml_collections.ConfigDict(study.mesh.to_dict())
    stage_cfg.distributed = ml_collections.ConfigDict(study.distributed.to_dict())
    stage_cfg.num_steps, stage_cfg.batch_size = steps, batch_size
    stage_cfg.learning_rate = learning_rate
    stage_cfg.warmup_steps = max(1, min(section.warmup_steps, steps // 10))
    stage_cfg.end_lr_fraction = section.end_lr_fraction
    stage_cfg.weight_decay, stage_cfg.grad_clip = section.weight_decay, section.grad_clip
    stage_cfg.log_every = max(1, min(stage_cfg.log_every, steps))
    return stage_cfg


def _model_stage_config(preset, study, section):
    """SFT, the golden and the proxy model: the run `section` of the study config describes."""
    cfg = _common(preset, study, section, section.steps, section.batch_size,
                  section.learning_rate)
    cfg.seed, cfg.eval_batches = section.seed, section.eval_batches
    cfg.checkpoint_every = max(1, min(section.checkpoint_every, section.steps))
    if "patience" in section:  # preference models stop at a validation plateau
        cfg.patience, cfg.min_improvement = section.patience, section.min_improvement
    return cfg


class Plan:
    """The study's stages, built upstream first. Hypothesis variants add theirs through the
    same helpers, so a stage they share with the main study (SFT, the online runs, ...) has the
    same key and is run once."""

    def __init__(self, study, workdir: str, chain: int = 0, into: Plan | None = None):
        """`chain` > 0: an upstream re-draw (`chain_study`) whose stages are named `...-u<chain>`
        and added to `into`'s list."""
        self.study, self.workdir, self.chain = study, workdir, chain
        self.stages = into.stages if into is not None else []
        self._by_name: dict[str, Stage] = into._by_name if into is not None else {}
        self._by_key: dict[str, Stage] = into._by_key if into is not None else {}
        self.chains = [self]
        s = study
        self.sft = self.add(self.sft_stage(s.model))
        golden_cfg = _model_stage_config(preference_configs.get_config("golden_mini"), s,
                                         s.golden)
        golden_cfg.model = ml_collections.ConfigDict(s.golden_model.to_dict())
        golden_cfg.init.checkpoint = s.golden_init
        self.golden = self.add(Stage("golden", golden_cfg, preference.run))

        golden_dir = self.dir(self.golden)
        self.relabel = relabel = self.add(
            Stage("relabel", relabel_stage.config(s), None, (self.golden,)))
        # Named by the key of the directory in use: a study keyed the older way (`full_key`)
        # named its D_golden so.
        self.golden_data = f"d_golden-{relabel.directory_key(workdir)}"
        relabel.run = lambda cfg, out: relabel_stage.run(s, golden_dir, self.golden_data, out)
        relabel.outputs_present = functools.partial(builders.comparisons_built, s.data.dir,
                                                    self.golden_data)

        proxy_cfg = _model_stage_config(preference_configs.get_config("proxy_mini"), s, s.proxy)
        proxy_cfg.model = ml_collections.ConfigDict(s.proxy_model.to_dict())
        proxy_cfg.data.comparisons = self.golden_data
        proxy_upstream = [self.relabel]
        if s.proxy_model.to_dict() == s.model.to_dict():  # The paper's proxy starts from SFT.
            proxy_cfg.init_from = self.dir(self.sft)
            proxy_upstream.append(self.sft)
        else:
            proxy_cfg.init.checkpoint = s.proxy_init
        self.proxy = self.add(Stage("proxy", proxy_cfg, preference.run, tuple(proxy_upstream)))

        self.opponent = self.golden_policy() if s.opponent == "golden_policy" else None
        self.test = None  # the test stage (`add_test_stage`), where eval.test_prompts is set

    def golden_policy(self) -> Stage:
        """The paper's fixed opponent: the main-size policy trained online against the golden
        model itself (the win-rate opponent of every run when `opponent` is golden_policy; of
        every size in the scaling variant)."""
        s = self.study
        cfg = self.policy_cfg("online", 0, s.online_learning_rates[0], s.policy.beta,
                              s.golden_policy_steps, proxy=self.golden,
                              proxy_model=s.golden_model, evaluate=False)
        return self.add(Stage("golden_policy", cfg, policy.run,
                              (self.sft, self.golden, self.relabel)))

    def add_test_stage(self) -> Stage:
        """Score the main runs' candidate checkpoints on test prompts none of them was chosen
        on (`test_stage.py`); call it once the main runs are added."""
        runs = [st for st in self.stages if st.meta.get("group") == "main"
                and st.meta.get("chain", 0) == self.chain]
        stage = Stage("test", test_stage.config(self.study), None, (self.sft, *runs))
        stage.run = lambda cfg, out: test_stage.run(self, runs, out)
        self.test = self.add(stage)
        return self.test

    def dir(self, stage: Stage) -> str:
        return stage.directory(self.workdir)

    def add(self, stage: Stage) -> Stage:
        """Append a stage once; a second stage with the same name must be the same stage, and
        one with the same key (config and inputs) the same name: a run is never trained twice
        under two names."""
        if self.chain and "chain" not in stage.meta:  # named once, however often it is added
            stage.name = f"{stage.name}-u{self.chain}"
            stage.meta["chain"] = self.chain
        if stage.name in self._by_name:
            if self._by_name[stage.name].key != stage.key:
                raise ValueError(f"two different study stages are both named {stage.name!r}")
            return self._by_name[stage.name]
        twin = self._by_key.get(stage.key)
        if twin is not None:
            raise ValueError(f"study stage {stage.name!r} would train {twin.name!r} again (same "
                             f"config and inputs); use that stage (e.g. Plan.main_runs) instead")
        self._by_name[stage.name] = stage
        self._by_key[stage.key] = stage
        self.stages.append(stage)
        return stage

    def main_runs(self, method: str) -> list[Stage]:
        """The main study's runs of `method` in this plan's chain (e.g. the offline sweep a
        hypothesis compares to)."""
        return [s for s in self.stages if s.meta.get("group") == "main"
                and s.meta.get("method") == method and s.meta.get("chain", 0) == self.chain]

    def sft_stage(self, model) -> Stage:
        s = self.study
        cfg = _model_stage_config(sft_configs.get_config("mini"), s, s.sft)
        cfg.model = ml_collections.ConfigDict(model.to_dict())
        main_policy = model.to_dict() == s.model.to_dict()
        cfg.init.checkpoint = s.init.checkpoint if main_policy else ""
        return Stage("sft" if main_policy else f"sft-{model.name}", cfg, sft.run)

    def policy_cfg(self, source, seed, lr, beta, steps, *, proxy=None, proxy_model=None,
                   evaluate=True, model=None, sft_stage=None, loss=None, opponent=None,
                   checkpoint_every=0):
        """A policy run's trainer config; `checkpoint_every`: other than policy.checkpoint_every
        (offline's own interval)."""
        s = self.study
        model = model or s.model
        cfg = _common(policy_configs.get_config(f"{source}_mini"), s, s.policy, steps,
                      s.batch_size, lr)
        cfg.model = ml_collections.ConfigDict(model.to_dict())
        cfg.seed, cfg.beta, cfg.loss = seed, beta, loss or s.policy.loss
        _checkpoint_schedule(cfg, checkpoint_every or s.policy.checkpoint_every, steps,
                             s.policy.get("early_checkpoints", ()) if evaluate else ())
        cfg.sampling.temperature = s.policy.temperature
        cfg.sampling.top_k, cfg.sampling.top_p = s.policy.top_k, s.policy.top_p
        cfg.microbatches = s.policy.get("microbatches", 1)
        cfg.sft_checkpoint = self.dir(sft_stage or self.sft)
        cfg.data.comparisons = self.golden_data
        if proxy is not None:
            cfg.proxy_checkpoint = self.dir(proxy)
            cfg.proxy_model = ml_collections.ConfigDict(proxy_model.to_dict())
            cfg.record_stream = True  # D_online, for the data-coverage and quality variants
        cfg.eval.golden_model = ml_collections.ConfigDict(s.golden_model.to_dict())
        if evaluate:
            cfg.eval.golden_checkpoint = self.dir(self.golden)
            opponent = opponent or self.opponent
            cfg.eval.opponent_checkpoint = self.dir(opponent) if opponent else ""
            if opponent and opponent.config.model.to_dict() != model.to_dict():
                cfg.eval.opponent_model = ml_collections.ConfigDict(
                    opponent.config.model.to_dict())
            cfg.eval.prompts, cfg.eval.kl_prompts = s.eval.prompts, s.eval.kl_prompts
            cfg.eval.pairs = s.eval.pairs
        return cfg

    def _evaluated(self, sft_stage=None, opponent=None) -> tuple:
        return tuple(x for x in (sft_stage or self.sft, self.golden, self.relabel,
                                 opponent or self.opponent) if x is not None)

    def online(self, seed: int, lr: float | None = None, *, beta: float | None = None,
               loss=None, model=None, group="main", opponent=None) -> Stage:
        """An online run against the proxy (recording D_online); `beta`: other than
        policy.beta (named `-b<beta>`); `model`: another policy size; `opponent`: a policy stage
        to win against instead of the study's opponent."""
        s = self.study
        lr = s.online_learning_rates[0] if lr is None else lr
        beta = s.policy.beta if beta is None else beta
        sft_stage = self.add(self.sft_stage(model)) if model is not None else None
        cfg = self.policy_cfg("online", seed, lr, beta, s.policy.steps,
                              proxy=self.proxy, proxy_model=s.proxy_model, model=model,
                              sft_stage=sft_stage, loss=loss, opponent=opponent)
        cfg.eval.stop_after_falls = s.policy.get("stop_after_falls", 0)
        cfg.eval.kl_cap = s.policy.get("kl_cap", 0.0)
        if s.policy.get("stop_margin", 0.0):  # set only where used: no other key changes
            cfg.eval.stop_margin = s.policy.stop_margin
        tag = "".join(f"-{t}" for t in (loss, model and model.name) if t)
        beta_tag = f"-b{beta:g}" if beta != s.policy.beta else ""  # policy.beta's keep names
        return self.add(Stage(f"online{tag}-s{seed}-lr{lr:g}{beta_tag}", cfg, policy.run,
                              (self.proxy, *self._evaluated(sft_stage, opponent)),
                              dict(method="online", seed=seed, learning_rate=lr, beta=beta,
                                   steps=s.policy.steps, group=group)))

    def offline(self, seed: int, lr: float, beta: float, steps: int, *, method="offline",
                group="main", loss=None, model=None, comparisons=None, replay=None,
                upstream=(), opponent=None) -> Stage:
        """An offline run on D_golden, another comparisons dataset, or a replayed stream.

        `replay`: (online stage, order, window)."""
        sft_stage = self.add(self.sft_stage(model)) if model is not None else None
        cfg = self.policy_cfg("offline", seed, lr, beta, steps, model=model,
                              sft_stage=sft_stage, loss=loss, opponent=opponent,
                              checkpoint_every=self.study.policy.get("offline_checkpoint_every",
                                                                     0))
        if comparisons:
            cfg.data.comparisons = comparisons
        if replay is not None:
            stream_stage, order, window = replay
            cfg.replay.stream = os.path.join(self.dir(stream_stage), run_dir.STREAM)
            cfg.replay.order, cfg.replay.window = order, window
            upstream = (*upstream, stream_stage)
        name = f"{method}-s{seed}-lr{lr:g}-b{beta:g}-n{steps}"
        if model is not None:
            name = f"{method}-{model.name}-s{seed}-lr{lr:g}-b{beta:g}-n{steps}"
        return self.add(Stage(name, cfg, policy.run,
                              (*self._evaluated(sft_stage, opponent), *upstream),
                              dict(method=method, seed=seed, learning_rate=lr, beta=beta,
                                   steps=steps, group=group),
                              stack=policy_stack.stack_key(cfg)))


def _checkpoint_schedule(cfg, every: int, steps: int, early=()):
    """Checkpoint (and evaluate) a policy run every `every` steps, at the `early` steps between
    (set only where there are any: no other stage key changes) and at the end; keep them all,
    the analyses read them."""
    cfg.checkpoint_every = min(every, steps)
    extra = sorted(k for k in early if 0 < k < steps and k % cfg.checkpoint_every)
    cfg.max_to_keep = steps // cfg.checkpoint_every + 1 + len(extra)
    cfg.log_every = min(cfg.log_every, cfg.checkpoint_every)
    if extra:
        cfg.checkpoint_steps = extra


def chain_study(study, chain: int):
    """The study with its upstream re-drawn: world (synthetic data), SFT, golden and proxy
    seeds shifted by `chain` (chain 0 is the study itself)."""
    s = ml_collections.ConfigDict(study.to_dict())
    s.data.world_seed += chain
    for section in (s.sft, s.golden, s.proxy):
        section.seed += chain
    return s


def _main_runs(plan: Plan):
    s = plan.study
    for seed, lr, beta in itertools.product(s.seeds, s.online_learning_rates,
                                            s.get("online_betas") or [s.policy.beta]):
        plan.online(seed, lr, beta=beta)
    for seed, lr, beta, steps in itertools.product(s.seeds, s.offline_learning_rates,
                                                   s.offline_betas, s.offline_steps):
        plan.offline(seed, lr, beta, steps)
    if s.eval.get("test_prompts", 0):
        plan.add_test_stage()


def build_plan(study, workdir: str) -> Plan:
    """The main study (online runs per seed, the offline sweep, the test stage), repeated on
    each upstream re-draw (`upstream_chains`), plus any hypothesis variants (on chain 0)."""
    plan = Plan(study, workdir)
    _main_runs(plan)
    for chain in range(1, study.get("upstream_chains", 1)):
        plan.chains.append(Plan(chain_study(study, chain), workdir, chain, into=plan))
        _main_runs(plan.chains[-1])
    for name in study.hypotheses:
        hypotheses.get(name).add_stages(plan)
    return plan
