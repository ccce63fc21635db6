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
import glob
import hashlib
import itertools
import json
import os
import time

import jax
import ml_collections

from alignment_gap import pretrained
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
    # One tokenizer for every stage: the configured one, else the pretrained policy's.
    stage_cfg.data.tokenizer = study.data.tokenizer or pretrained.checkpoint_path(
        study.init.checkpoint)
    stage_cfg.init.checkpoint = ""  # set per stage below: what starts from pretrained weights
    stage_cfg.mesh = ml_collections.ConfigDict(study.mesh.to_dict())
    stage_cfg.distributed = ml_collections.ConfigDict(study.distributed.to_dict())
    stage_cfg.num_steps, stage_cfg.batch_size = steps, batch_size
    stage_cfg.learning_rate = learning_rate
    stage_cfg.warmup_steps = max(1, min(stage_cfg.warmup_steps, steps // 10))
    stage_cfg.checkpoint_every = max(1, min(stage_cfg.checkpoint_every, steps))
    stage_cfg.log_every = max(1, min(stage_cfg.log_every, steps))
    return stage_cfg


class Plan:
    """The study's stages, built upstream first. Hypothesis variants add theirs through the
    same helpers, so a stage they share with the main study (SFT, the online runs, ...) has the
    same key and is run once."""

    def __init__(self, study, workdir: str):
        self.study, self.workdir, self.stages = study, workdir, []
        self._by_name: dict[str, Stage] = {}
        s = study
        self.sft = self.add(self.sft_stage(s.model))
        golden_cfg = _common(preference_configs.get_config("golden_mini"), s, s.golden.steps,
                             s.golden.batch_size, s.golden.learning_rate)
        golden_cfg.model = ml_collections.ConfigDict(s.golden_model.to_dict())
        golden_cfg.init.checkpoint = s.golden_init
        self.golden = self.add(Stage("golden", golden_cfg, preference.run))

        relabel_cfg = ml_collections.ConfigDict({"data": s.data.to_dict(),
                                                 "model": s.golden_model.to_dict()})
        relabel_stage = Stage("relabel", relabel_cfg, None, (self.golden,))
        self.golden_data = f"d_golden-{relabel_stage.key}"
        golden_dir = self.dir(self.golden)
        relabel_stage.run = lambda cfg, out: _relabel(s, golden_dir, self.golden_data, out)
        self.relabel = self.add(relabel_stage)

        proxy_cfg = _common(preference_configs.get_config("proxy_mini"), s, s.proxy.steps,
                            s.proxy.batch_size, s.proxy.learning_rate)
        proxy_cfg.model = ml_collections.ConfigDict(s.proxy_model.to_dict())
        proxy_cfg.data.comparisons = self.golden_data
        proxy_upstream = [self.relabel]
        if s.proxy_model.to_dict() == s.model.to_dict():  # The paper's proxy starts from SFT.
            proxy_cfg.init_from = self.dir(self.sft)
            proxy_upstream.append(self.sft)
        else:
            proxy_cfg.init.checkpoint = s.proxy_init
        self.proxy = self.add(Stage("proxy", proxy_cfg, preference.run, tuple(proxy_upstream)))

        self.opponent = None
        if s.opponent == "golden_policy":  # Online IPO against the golden model itself.
            cfg = self.policy_cfg("online", 0, s.online_learning_rates[0], s.policy.beta,
                                  s.golden_policy_steps, proxy=self.golden,
                                  proxy_model=s.golden_model, evaluate=False)
            self.opponent = self.add(Stage("golden_policy", cfg, policy.run,
                                           (self.sft, self.golden, self.relabel)))

    def dir(self, stage: Stage) -> str:
        return stage.directory(self.workdir)

    def add(self, stage: Stage) -> Stage:
        """Append a stage once; a second stage with the same name must be the same stage."""
        if stage.name in self._by_name:
            if self._by_name[stage.name].key != stage.key:
                raise ValueError(f"two different study stages are both named {stage.name!r}")
            return self._by_name[stage.name]
        self._by_name[stage.name] = stage
        self.stages.append(stage)
        return stage

    def main_runs(self, method: str) -> list[Stage]:
        """The main study's runs of `method` (e.g. the offline sweep a hypothesis compares to)."""
        return [s for s in self.stages
                if s.meta.get("group") == "main" and s.meta.get("method") == method]

    def sft_stage(self, model) -> Stage:
        s = self.study
        cfg = _common(sft_configs.get_config("mini"), s, s.sft.steps, s.sft.batch_size,
                      s.sft.learning_rate)
        cfg.model = ml_collections.ConfigDict(model.to_dict())
        main_policy = model.to_dict() == s.model.to_dict()
        cfg.init.checkpoint = s.init.checkpoint if main_policy else ""
        return Stage("sft" if main_policy else f"sft-{model.name}", cfg, sft.run)

    def policy_cfg(self, source, seed, lr, beta, steps, *, proxy=None, proxy_model=None,
                   evaluate=True, model=None, sft_stage=None, loss=None):
        s = self.study
        model = model or s.model
        cfg = _common(policy_configs.get_config(f"{source}_mini"), s, steps, s.batch_size, lr)
        cfg.model = ml_collections.ConfigDict(model.to_dict())
        cfg.seed, cfg.beta, cfg.loss = seed, beta, loss or s.policy.loss
        cfg.checkpoint_every = min(s.policy.checkpoint_every, steps)
        cfg.max_to_keep = steps // cfg.checkpoint_every + 1  # every checkpoint: analyses read them
        cfg.log_every = min(cfg.log_every, cfg.checkpoint_every)
        cfg.sampling.temperature = s.policy.temperature
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
            cfg.eval.opponent_checkpoint = self.dir(self.opponent) if self.opponent else ""
            cfg.eval.prompts, cfg.eval.kl_prompts = s.eval.prompts, s.eval.kl_prompts
            cfg.eval.pairs = s.eval.pairs
        return cfg

    def _evaluated(self, sft_stage=None) -> tuple:
        return tuple(x for x in (sft_stage or self.sft, self.golden, self.relabel, self.opponent)
                     if x is not None)

    def online(self, seed: int, lr: float | None = None, *, loss=None, model=None,
               group="main") -> Stage:
        """An online run against the proxy (recording D_online); `model`: another policy size."""
        s = self.study
        lr = s.online_learning_rates[0] if lr is None else lr
        sft_stage = self.add(self.sft_stage(model)) if model is not None else None
        cfg = self.policy_cfg("online", seed, lr, s.policy.beta, s.policy.steps,
                              proxy=self.proxy, proxy_model=s.proxy_model, model=model,
                              sft_stage=sft_stage, loss=loss)
        tag = "".join(f"-{t}" for t in (loss, model and model.name) if t)
        return self.add(Stage(f"online{tag}-s{seed}-lr{lr:g}", cfg, policy.run,
                              (self.proxy, *self._evaluated(sft_stage)),
                              dict(method="online", seed=seed, learning_rate=lr,
                                   beta=s.policy.beta, steps=s.policy.steps, group=group)))

    def offline(self, seed: int, lr: float, beta: float, steps: int, *, method="offline",
                group="main", loss=None, model=None, comparisons=None, replay=None,
                upstream=()) -> Stage:
        """An offline run on D_golden, another comparisons dataset, or a replayed stream.

        `replay`: (online stage, order, window)."""
        sft_stage = self.add(self.sft_stage(model)) if model is not None else None
        cfg = self.policy_cfg("offline", seed, lr, beta, steps, model=model,
                              sft_stage=sft_stage, loss=loss)
        if comparisons:
            cfg.data.comparisons = comparisons
        if replay is not None:
            stream_stage, order, window = replay
            cfg.replay.stream = os.path.join(self.dir(stream_stage), "stream")
            cfg.replay.order, cfg.replay.window = order, window
            upstream = (*upstream, stream_stage)
        name = f"{method}-s{seed}-lr{lr:g}-b{beta:g}-n{steps}"
        if model is not None:
            name = f"{method}-{model.name}-s{seed}-lr{lr:g}-b{beta:g}-n{steps}"
        return self.add(Stage(name, cfg, policy.run, (*self._evaluated(sft_stage), *upstream),
                              dict(method=method, seed=seed, learning_rate=lr, beta=beta,
                                   steps=steps, group=group)))


def build_plan(study, workdir: str) -> Plan:
    """The main study (online runs per seed, the offline sweep) plus any hypothesis variants."""
    from alignment_gap.study import hypotheses

    plan = Plan(study, workdir)
    s = study
    for seed, lr in itertools.product(s.seeds, s.online_learning_rates):
        plan.online(seed, lr)
    for seed, lr, beta, steps in itertools.product(s.seeds, s.offline_learning_rates,
                                                   s.offline_betas, s.offline_steps):
        plan.offline(seed, lr, beta, steps)
    for name in s.hypotheses:
        hypotheses.get(name).add_stages(plan)
    return plan


def build_stages(study, workdir: str) -> list[Stage]:
    """Every stage of the study, upstream first."""
    return build_plan(study, workdir).stages


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


class StageFailed(RuntimeError):
    """A stage this host needs failed (here or on another host of a sweep)."""


FAILED = "FAILED.json"


def owner(stages: list[Stage], shards: int) -> dict[str, int]:
    """Which sweep shard runs each stage: policy runs round-robin, everything else shard 0."""
    runs = [s for s in stages if "method" in s.meta]
    out = {s.name: 0 for s in stages}
    out.update({s.name: i % shards for i, s in enumerate(runs)})
    return out


def finished(stage: Stage, workdir: str) -> bool:
    return is_finished(stage.directory(workdir), stage.config.get("num_steps", 1))


def _check_not_failed(stage: Stage, workdir: str):
    path = os.path.join(stage.directory(workdir), FAILED)
    if os.path.exists(path):
        with open(path) as f:
            why = json.load(f).get("error", "")
        raise StageFailed(f"stage {stage.name} failed (see {path}): {why}")


def wait_for(stages: list[Stage], workdir: str, poll_s: float, timeout_s: float, why: str):
    """Block until every stage is finished; a failed one raises, so does the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        pending = [s for s in stages if not finished(s, workdir)]
        for stage in pending:
            _check_not_failed(stage, workdir)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise StageFailed(f"config.sweep.wait_timeout_s: {timeout_s:g} s passed waiting for "
                              f"stage {pending[0].name} ({why}); is its shard running?")
        time.sleep(poll_s)


def run_stages(stages: list[Stage], workdir: str, shard: int = 0, shards: int = 1,
               poll_s: float = 5.0, timeout_s: float = 86_400.0) -> dict:
    """Run this shard's unfinished stages, each once its upstream stages are finished; returns
    {stage name: seconds} for this shard's runs.

    With one shard this is every stage in order. With several (a sweep fanned out over hosts
    sharing `workdir`), shard k runs its share (`owner`) and waits for upstream stages other
    shards run; a stage that raises leaves `FAILED.json`, which stops every shard waiting on it.
    """
    name = "timings.json" if shards == 1 else f"timings-shard{shard}-of-{shards}.json"
    timings_path = os.path.join(workdir, name)
    timings = {}
    if os.path.exists(timings_path):
        with open(timings_path) as f:
            timings = json.load(f)
    owners = owner(stages, shards)
    mine = [s for s in stages if owners[s.name] == shard]
    deadline = time.monotonic() + timeout_s
    while True:
        pending = [s for s in mine if not finished(s, workdir)]
        if not pending:
            return timings
        # The first stage whose inputs are ready (scanning in order keeps one host sequential
        # and never deadlocks: the stage graph is acyclic).
        ready = next((s for s in pending if all(finished(u, workdir) for u in s.upstream)),
                     None)
        if ready is None:
            for stage in pending:
                for upstream in stage.upstream:
                    _check_not_failed(upstream, workdir)
            if time.monotonic() > deadline:
                raise StageFailed(f"config.sweep.wait_timeout_s: {timeout_s:g} s passed with "
                                  f"stage {pending[0].name} still waiting for its inputs")
            time.sleep(poll_s)
            continue
        _run_one(ready, workdir, timings)
        write_json(workdir, name, timings)
        if not finished(ready, workdir):
            raise StageFailed(f"stage {ready.name} returned without finishing "
                              f"({ready.directory(workdir)} has no DONE.json)")


def _run_one(stage: Stage, workdir: str, timings: dict):
    out = stage.directory(workdir)
    if jax.process_index() == 0:
        print(f"== stage {stage.name} -> {out}", flush=True)
    failed = os.path.join(out, FAILED)
    if os.path.exists(failed) and jax.process_index() == 0:
        os.remove(failed)  # a retry
    start = time.perf_counter()
    try:
        stage.run(stage.config, out)
    except BaseException as e:
        if jax.process_index() == 0:
            write_json(out, FAILED, {"error": f"{type(e).__name__}: {e}".splitlines()[0]})
        raise
    timings[stage.name] = time.perf_counter() - start


def merged_timings(workdir: str) -> dict:
    """Every shard's stage timings (a sweep writes one file per shard)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(workdir, "timings*.json"))):
        with open(path) as f:
            out.update(json.load(f))
    return out
