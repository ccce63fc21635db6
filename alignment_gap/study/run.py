"""Entry point of the study task: run the stages, then the table, the plot and the report."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from alignment_gap import run_dir, sharding
from alignment_gap.data import datasets, pipelines
from alignment_gap.sampling import Sampler, SamplingConfig
from alignment_gap.study import (
    differences,
    hypotheses,
    pipeline,
    relabel_stage,
    report,
    results,
    scheduler,
    test_stage,
)
from alignment_gap.train import common, policy_stack


def run(config, workdir: str):
    plan = pipeline.build_plan(config, workdir)
    stages = plan.stages
    pending = [s.name for s in stages if not scheduler.finished(s, workdir)]
    if not pending and jax.process_index() == 0:
        print(f"{workdir}: every stage is already finished; rewriting the report only.")
    sweep = config.sweep
    launch = sweep.get("launch", "")
    earlier = scheduler.failure_records(workdir, launch)  # an earlier attempt's: shards retry
    if earlier and jax.process_index() == 0:
        names = ", ".join(sorted(os.path.basename(d) for d in earlier))
        print(f"stages that failed in an earlier attempt, retried by their shards: {names}")
    scheduler.run_stages(stages, workdir, sweep.shard, sweep.shards, sweep.poll_s,
                         sweep.wait_timeout_s, sweep.get("stack_runs", 1), policy_stack.run,
                         earlier, launch)
    if sweep.shard != 0:  # a sweep host: shard 0 writes the report once every run is done
        if jax.process_index() == 0:
            print(f"shard {sweep.shard} of {sweep.shards}: its stages are finished; shard 0 "
                  "writes the report.")
        return
    scheduler.wait_for(stages, workdir, sweep.poll_s, sweep.wait_timeout_s,
                       "the report needs every run", earlier)
    timings = scheduler.stage_seconds(stages, workdir)
    samples = side_by_side(config, stages, workdir)  # every process: it runs the models
    if jax.process_index() != 0:
        return
    run_dir.write_text(workdir, "samples.json", json.dumps(samples, indent=1))
    all_rows = results.collect(stages, workdir)
    results.write(all_rows, workdir)
    rows = [r for r in all_rows if r["group"] == "main"]
    findings = [hypotheses.get(name).analyse(plan, all_rows, workdir)
                for name in config.hypotheses]
    extras = upstream_extras(plan)
    extras["online runs' ends"] = results.online_ends(stages, workdir, config.policy)
    points = results.outcome_points(stages, workdir)
    extras["golden model agreement with the oracle on policy-vs-opponent samples"] = (
        results.judge_agreement(points))
    if plan.test is not None:  # chosen on the runs' evaluations, scored on other prompts
        points = [p for chain in plan.chains for p in test_stage.tested(
            [q for q in points if q["chain"] == chain.chain], chain.dir(chain.test))]
    comparison = differences.compare(points)
    mixed = differences.compare(points, interpolate=True)
    extras = {k: v for k, v in extras.items() if v is not None}  # e.g. no oracle on real data
    path = report.write_report(config, rows, comparison, timings, extras, workdir, findings,
                               mixed)
    print(results.verdict(comparison))
    for finding in findings:
        agree = sum(v.agree is True for v in finding.verdicts)
        print(f"hypothesis {finding.name}: the paper's findings reproduce in {agree} of "
              f"{len(finding.verdicts)}")
    print(f"report: {path}")


def upstream_extras(plan) -> dict:
    """The upstream models' measured quality for the report's setting; with upstream draws
    (`upstream_chains`), each draw's, as {"draw k": value}."""

    def measured(chain):
        return {
            "golden model validation accuracy (vs D_initial labels)":
                run_dir.final_metrics(chain.dir(chain.golden)).get("eval/accuracy"),
            "proxy model validation accuracy (vs D_golden labels)":
                run_dir.final_metrics(chain.dir(chain.proxy)).get("eval/accuracy"),
            "D_initial labels kept by the golden relabelling":
                relabel_stage.kept_initial_label(chain.dir(chain.relabel)),
            "golden model agreement with the oracle on D_golden pairs":
                relabel_stage.golden_agrees_with_oracle(chain.dir(chain.relabel), chain.study,
                                                        chain.golden_data),
        }

    if len(plan.chains) == 1:
        return measured(plan)
    draws = {f"draw {chain.chain}": measured(chain) for chain in plan.chains}
    per_draw = {key: {name: d[key] for name, d in draws.items() if d[key] is not None}
                for key in draws["draw 0"]}
    return {key: values or None for key, values in per_draw.items()}


SIDE_BY_SIDE = 8  # Test posts in samples.json (at least; a multiple of the mesh's batch shards).


def side_by_side_sampler(lm, mesh, rules, response_len: int):
    """Greedy summaries for `samples.json`."""
    return Sampler(lm, mesh, rules, SamplingConfig(max_new_tokens=response_len, temperature=0.0),
                   name="study_samples")


def rows_for(wanted: int, shards: int, available: int) -> int:
    """At least `wanted` rows (as many as `available` allows) that split over `shards`."""
    return min(-(-wanted // shards) * shards, available // shards * shards)


def side_by_side(config, stages, workdir: str, count: int = SIDE_BY_SIDE) -> dict:
    """Test posts with the SFT, online and best offline policies' (greedy) summaries."""

    rows = [r for r in results.collect(stages, workdir) if r["group"] == "main"]
    best_offline = max((r for r in rows if r["method"] == "offline"),
                       key=lambda r: r["win_rate"], default=None)
    policies = {"sft": next(s for s in stages if s.name == "sft")}
    online = [s for s in stages
              if s.meta.get("method") == "online" and s.meta.get("group") == "main"]
    if online:
        policies["online"] = online[0]
    if best_offline is not None:
        policies["offline"] = next(s for s in stages if s.name == best_offline["stage"])
    stage_cfg = policies["sft"].config
    rt = common.runtime(stage_cfg, os.path.join(workdir, "stages", "samples"))
    source = datasets.prompts(config.data)["test"]
    count = rows_for(count, sharding.batch_shards(rt.mesh, rt.rules), len(source))
    shape = pipelines.BatchShape(count, config.data.prompt_len, config.data.response_len,
                                 sharding.process_rows(rt.mesh, rt.rules, count))
    prompts = rt.global_batch(next(iter(pipelines.prompt_pipeline(
        source, rt.tokenizer, shape, seed=0, shuffle=False, num_epochs=1))))
    out = [{"prompt": pipelines.as_text(source[i]["prompt"])} for i in range(count)]
    for name, stage in policies.items():
        lm = common.load_frozen("lm", stage.directory(workdir), config.model, rt)
        sampler = side_by_side_sampler(lm, rt.mesh, rt.rules, config.data.response_len)
        tokens = sampler(nnx.state(lm), prompts.prompt, prompts.prompt_mask,
                         jax.random.key(0)).tokens
        tokens = np.asarray(multihost_utils.process_allgather(tokens, tiled=True))
        for row, ids in zip(out, tokens, strict=True):
            row[name] = rt.tokenizer.decode(ids)
    return {"policies": {k: v.name for k, v in policies.items()}, "greedy": True,
            "samples": out}
