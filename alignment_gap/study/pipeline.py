"""The study as a pipeline of cached stages (PAPER.md, "Controlled setting").

    D_initial -> golden model -> relabel -> D_golden -> SFT -> proxy model (from SFT)
      -> [golden policy] -> online runs (per seed) -> offline sweep (lr x beta x steps, per seed)
      -> results table -> plots -> report

Every stage is a trainer run (or the relabelling pass) under `<workdir>/stages/<name>-<key>`,
where `key` hashes the stage's own config and the keys of the stages it reads. A finished
stage is skipped, so an interrupted study resumes where it stopped (an interrupted trainer
resumes from its last checkpoint); changing a stage's config changes its key and re-runs it
and everything downstream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import time

import jax
import ml_collections

from alignment_gap.data import builders, datasets
from alignment_gap.data.relabel import model_judge, relabel
from alignment_gap.train import common, policy, preference, sft
from alignment_gap.train.loop import is_finished, write_json
from configs import policy as policy_configs
from configs import preference_model as preference_configs
from configs import sft as sft_configs


@dataclasses.dataclass
class Stage:
    name: str
    config: ml_collections.ConfigDict
    run: callable
    upstream: tuple = ()  # Stages whose outputs this one reads.
    meta: dict = dataclasses.field(default_factory=dict)  # method, seed, lr, ... for results

    @property
    def key(self) -> str:
        payload = json.dumps({"config": self.config.to_dict(),
                              "upstream": [u.key for u in self.upstream]},
                             sort_keys=True, default=str)
        return hashlib.sha1(payload.encode()).hexdigest()[:10]

    def directory(self, workdir: str) -> str:
        return os.path.join(workdir, "stages", f"{self.name}-{self.key}")


def _common(stage_cfg, study, steps, batch_size, learning_rate):
    """Copy the study-wide sections (data, mesh, distributed) into a trainer config."""
    stage_cfg.data = ml_collections.ConfigDict(study.data.to_dict())
    stage_cfg.mesh = ml_collections.ConfigDict(study.mesh.to_dict())
    stage_cfg.distributed = ml_collections.ConfigDict(study.distributed.to_dict())
    stage_cfg.num_steps, stage_cfg.batch_size = steps, batch_size
    stage_cfg.learning_rate = learning_rate
    stage_cfg.warmup_steps = max(1, min(stage_cfg.warmup_steps, steps // 10))
    stage_cfg.checkpoint_every = max(1, min(stage_cfg.checkpoint_every, steps))
    stage_cfg.log_every = max(1, min(stage_cfg.log_every, steps))
    return stage_cfg


def build_stages(study, workdir: str) -> list[Stage]:
    """Every stage of the study, upstream first."""
    def trainer_stage(name, cfg, run, upstream=(), **meta):
        return Stage(name, cfg, run, tuple(upstream), meta)

    s = study
    sft_cfg = _common(sft_configs.get_config("mini"), s, s.sft.steps, s.sft.batch_size,
                      s.sft.learning_rate)
    sft_cfg.model = ml_collections.ConfigDict(s.model.to_dict())
    sft_stage = trainer_stage("sft", sft_cfg, sft.run)

    golden_cfg = _common(preference_configs.get_config("golden_mini"), s, s.golden.steps,
                         s.golden.batch_size, s.golden.learning_rate)
    golden_cfg.model = ml_collections.ConfigDict(s.golden_model.to_dict())
    golden_stage = trainer_stage("golden", golden_cfg, preference.run)

    relabel_cfg = ml_collections.ConfigDict({"data": s.data.to_dict(),
                                             "model": s.golden_model.to_dict()})
    relabel_stage = Stage("relabel", relabel_cfg, None, (golden_stage,))
    golden_data = f"d_golden-{relabel_stage.key}"
    relabel_stage.run = lambda cfg, out: _relabel(s, golden_stage.directory(workdir),
                                                  golden_data, out)

    proxy_cfg = _common(preference_configs.get_config("proxy_mini"), s, s.proxy.steps,
                        s.proxy.batch_size, s.proxy.learning_rate)
    proxy_cfg.model = ml_collections.ConfigDict(s.proxy_model.to_dict())
    proxy_cfg.data.comparisons = golden_data
    proxy_upstream = [relabel_stage]
    if s.proxy_model.to_dict() == s.model.to_dict():  # The paper's proxy starts from SFT.
        proxy_cfg.init_from = sft_stage.directory(workdir)
        proxy_upstream.append(sft_stage)
    proxy_stage = trainer_stage("proxy", proxy_cfg, preference.run, proxy_upstream)

    def policy_cfg(source, seed, lr, beta, steps, proxy_dir="", proxy_model=None,
                   evaluate=True, opponent_dir=""):
        cfg = _common(policy_configs.get_config(f"{source}_mini"), s, steps, s.batch_size, lr)
        cfg.model = ml_collections.ConfigDict(s.model.to_dict())
        cfg.seed, cfg.beta, cfg.loss = seed, beta, s.policy.loss
        cfg.checkpoint_every = min(s.policy.checkpoint_every, steps)
        cfg.log_every = min(cfg.log_every, cfg.checkpoint_every)
        cfg.sampling.temperature = s.policy.temperature
        cfg.sft_checkpoint = sft_stage.directory(workdir)
        cfg.data.comparisons = golden_data
        if proxy_dir:
            cfg.proxy_checkpoint = proxy_dir
            cfg.proxy_model = ml_collections.ConfigDict(proxy_model.to_dict())
        cfg.eval.golden_model = ml_collections.ConfigDict(s.golden_model.to_dict())
        if evaluate:
            cfg.eval.golden_checkpoint = golden_stage.directory(workdir)
            cfg.eval.opponent_checkpoint = opponent_dir
            cfg.eval.prompts, cfg.eval.kl_prompts = s.eval.prompts, s.eval.kl_prompts
            cfg.eval.pairs = s.eval.pairs
        return cfg

    stages = [sft_stage, golden_stage, relabel_stage, proxy_stage]
    opponent, opponent_dir = [], ""
    if s.opponent == "golden_policy":  # Online IPO against the golden model itself.
        cfg = policy_cfg("online", 0, s.online_learning_rates[0], s.policy.beta,
                         s.golden_policy_steps, golden_stage.directory(workdir), s.golden_model,
                         evaluate=False)
        gp = trainer_stage("golden_policy", cfg, policy.run, [sft_stage, golden_stage,
                                                             relabel_stage])
        stages.append(gp)
        opponent, opponent_dir = [gp], gp.directory(workdir)
    evaluated = [sft_stage, golden_stage, relabel_stage, *opponent]
    for seed, lr in itertools.product(s.seeds, s.online_learning_rates):
        cfg = policy_cfg("online", seed, lr, s.policy.beta, s.policy.steps,
                         proxy_stage.directory(workdir), s.proxy_model, opponent_dir=opponent_dir)
        stages.append(trainer_stage(f"online-s{seed}-lr{lr:g}", cfg, policy.run,
                                    [proxy_stage, *evaluated], method="online", seed=seed,
                                    learning_rate=lr, beta=s.policy.beta, steps=s.policy.steps))
    for seed, lr, beta, steps in itertools.product(s.seeds, s.offline_learning_rates,
                                                   s.offline_betas, s.offline_steps):
        cfg = policy_cfg("offline", seed, lr, beta, steps, opponent_dir=opponent_dir)
        stages.append(trainer_stage(f"offline-s{seed}-lr{lr:g}-b{beta:g}-n{steps}", cfg,
                                    policy.run, evaluated, method="offline", seed=seed,
                                    learning_rate=lr, beta=beta, steps=steps))
    return stages


def _relabel(study, golden_dir: str, name: str, out_dir: str):
    """D_initial relabelled by the golden model's sign rule -> comparisons/<name>."""
    rt = common.runtime(_relabel_runtime_config(study), out_dir)
    golden = common.load_frozen("preference", golden_dir, study.golden_model, rt)
    judge = model_judge(golden, rt.tokenizer, study.data.prompt_len, study.data.response_len,
                        rt.mesh, rt.rules)
    sources = datasets.initial_comparisons(study.data)
    relabel(sources, judge, name, study.data.dir)
    agreement = _agreement(sources, builders.Comparisons(name=name, data_dir=study.data.dir)
                           .as_data_source())
    write_json(out_dir, "DONE.json", {"step": 1, "dataset": name,
                                      "kept_initial_label": agreement})


def _relabel_runtime_config(study):
    c = ml_collections.ConfigDict({"data": study.data.to_dict(), "mesh": study.mesh.to_dict(),
                                   "model": study.golden_model.to_dict(), "batch_size": 1})
    c.mesh.rules = study.mesh.rules
    return c


def _agreement(initial: dict, golden: dict) -> dict:
    """Fraction of pairs whose label the golden model kept, per split."""
    out = {}
    for split in initial:
        before = {initial[split][i]["id"]: initial[split][i]["chosen"]
                  for i in range(len(initial[split]))}
        after = golden[split]
        kept = sum(before[after[i]["id"]] == after[i]["chosen"] for i in range(len(after)))
        out[split] = kept / max(len(after), 1)
    return out


def run_stages(stages: list[Stage], workdir: str) -> dict:
    """Run every unfinished stage in order; returns {stage name: seconds} for those run now."""
    timings_path = os.path.join(workdir, "timings.json")
    timings = {}
    if os.path.exists(timings_path):
        with open(timings_path) as f:
            timings = json.load(f)
    for stage in stages:
        out = stage.directory(workdir)
        if is_finished(out, stage.config.get("num_steps", 1)):
            continue
        if jax.process_index() == 0:
            print(f"== stage {stage.name} -> {out}", flush=True)
        start = time.perf_counter()
        stage.run(stage.config, out)
        timings[stage.name] = time.perf_counter() - start
        write_json(workdir, "timings.json", timings)
    return timings
