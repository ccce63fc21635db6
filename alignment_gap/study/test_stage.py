"""The study's test stage: the candidate checkpoints scored on prompts that chose none of them.

Every policy run evaluates each of its checkpoints on the test split's first `eval.prompts`
prompts (KL, and the golden judge's and the oracle's verdicts against the opponent). With
`eval.test_prompts > 0` those evaluations are the *selection* set: they measure KL and choose
checkpoints and sweep points. This stage, after the main runs, scores the *candidates* on the
next `eval.test_prompts` prompts of the split, which no choice has seen, with sampling noise of
their own (`evaluation.evaluation_key`: under the runs' key, row i of the test prompts had drawn
the noise of selection prompt i), and
`differences.compare` reports those scores (`tested`).

Candidates (`candidates`): per method and seed, every checkpoint whose selection win rate is
within `eval.candidate_margin` of the best among that method's and seed's checkpoints with no
more KL. Any other checkpoint is beaten by more than the margin at every budget that affords
it, alone (the stepped frontier) and inside a mixture (the interpolated frontier: a mixture with
a dominated checkpoint is beaten by the same mixture with the one that dominates it). So the
re-selection on resampled selection prompts ranges over the candidates: a resample would have
to move a non-candidate by more than the margin to choose it. Step 0 (the SFT policy, the same
for every run of a seed) is a candidate of every method and is scored once per seed.

Outcomes: `scored/<run stage or start-s<seed>>/outcomes/step_N.npz`, written as each candidate is
scored (`run_dir.write_outcomes`), so an interrupted stage resumes with the rest.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from flax import nnx

from alignment_gap import run_dir
from alignment_gap.errors import DataError
from alignment_gap.study import results
from alignment_gap.train import common
from alignment_gap.train import policy as policy_trainer


def config(study) -> ml_collections.ConfigDict:
    """What the stage adds to its upstream runs (their keys hash everything else)."""
    e = study.eval
    # `draws`: the test prompts' sampling noise is their own (`evaluation.evaluation_key`);
    # stages scored before, on the selection prompts' noise row by row, are not reused.
    return ml_collections.ConfigDict({"selection_prompts": e.prompts,
                                      "test_prompts": e.test_prompts,
                                      "candidate_margin": e.candidate_margin,
                                      "draws": "own key per prompt window"})


def candidates(points: list[dict], margin: float) -> list[dict]:
    """The evaluations (`results.outcome_points`) worth scoring on the test prompts: within
    `margin` of the best selection win rate at no more KL, per method and seed; step 0 once
    per method and seed."""
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault((p["method"], p["seed"]), []).append(p)
    out = []
    for key in sorted(groups):
        best, started = -float("inf"), False
        for p in sorted(groups[key], key=lambda p: (p["kl"], -p["win"].mean())):
            win = float(p["win"].mean())
            best = max(best, win)
            if p["step"] == 0:
                if not started:
                    out.append(p)
                started = True
            elif win >= best - margin:
                out.append(p)
    return out


def _scored_dir(out_dir: str, point: dict) -> str:
    name = f"start-s{point['seed']}" if point["step"] == 0 else point["stage"]
    return os.path.join(out_dir, "scored", name)


def tested(points: list[dict], out_dir: str) -> list[dict]:
    """`points` with the candidates' test outcomes added as `test_win`, `test_oracle_win`
    (synthetic world) and `test_kl`: the input `differences.compare` scores on the test
    prompts (the other points still set its KL budgets)."""
    scored, read = {}, {}
    for p in candidates(points, _margin(out_dir)):
        folder = _scored_dir(out_dir, p)
        if folder not in read:  # each folder's files once, not once per candidate
            read[folder] = run_dir.read_outcomes(folder)
        arrays = read[folder].get(p["step"])
        if arrays is None:
            raise DataError(f"{_scored_dir(out_dir, p)} has no outcomes of step {p['step']}, a "
                            f"candidate of the test stage; delete {out_dir} and rerun the study")
        scored[id(p)] = {f"test_{k}": v for k, v in arrays.items()}
    return [{**p, **scored.get(id(p), {})} for p in points]


def _margin(out_dir: str) -> float:
    return float(run_dir.result(out_dir)["candidate_margin"])


def evaluation_config(run_config, study, seed: int):
    """A run's config, evaluating on the test prompts (those after the selection prompts)."""
    cfg = ml_collections.ConfigDict(run_config.to_dict())
    cfg.seed = seed
    cfg.eval.first_prompt = study.eval.prompts
    cfg.eval.prompts = cfg.eval.kl_prompts = study.eval.test_prompts
    cfg.eval.pairs = 0  # classifier accuracy is not what the test prompts are for
    return cfg


def run(plan, runs, out_dir: str):
    """Score the candidates of `runs` (the main study's policy runs) on the test prompts."""
    study = plan.study
    stage_of = {s.name: s for s in runs}
    points = results.outcome_points(runs, plan.workdir)
    chosen = candidates(points, study.eval.candidate_margin)
    rt = None
    done = {folder: set(run_dir.read_outcomes(folder)) for folder in
            {_scored_dir(out_dir, p) for p in chosen}}  # steps already scored (a resume)
    for seed in sorted({p["seed"] for p in chosen}):
        todo = [p for p in chosen if p["seed"] == seed
                and p["step"] not in done[_scored_dir(out_dir, p)]]
        todo = list({(_scored_dir(out_dir, p), p["step"]): p for p in todo}.values())
        if not todo:
            continue
        cfg = evaluation_config(stage_of[todo[0]["stage"]].config, study, seed)
        rt = rt or common.runtime(cfg, out_dir)
        lm = common.load_frozen("lm", plan.dir(plan.sft), study.model, rt)
        sft_params = nnx.state(lm)
        evaluator = policy_trainer.make_evaluator(cfg, rt, lm, sft_params)
        for i, p in enumerate(todo):
            params = sft_params if p["step"] == 0 else nnx.state(common.load_frozen(
                "lm", plan.dir(stage_of[p["stage"]]), study.model, rt, p["step"]))
            _, outcomes = evaluator.evaluate(params)
            run_dir.write_outcomes(_scored_dir(out_dir, p), p["step"], outcomes)
            if jax.process_index() == 0:
                print(f"test prompts, seed {seed}: {i + 1}/{len(todo)} candidates scored "
                      f"({p['stage']} step {p['step']})", flush=True)
    run_dir.finish(out_dir, candidates=len(chosen), evaluations=len(points),
                   candidate_margin=study.eval.candidate_margin)
