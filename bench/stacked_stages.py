"""A study's offline sweep trained as its stages: n runs stacked against one run alone and the
same n runs one after another (the whole stage: data, compiles, evaluations, checkpoints).

    python bench/stacked_stages.py --workdir workdir/study          # 8 runs of the mini study
    python bench/stacked_stages.py --workdir workdir/study --runs 4 --arms alone,stacked
    python bench/stacked_stages.py --workdir workdir/paper2 --config configs/study.py:paper \
        --runs 0 --arms sequential,stacked    # the preset's own grid (seed 0): 12 runs

`--workdir` is a finished study of `--config` (its SFT, golden and relabel stages are linked
into a scratch workdir beside it, never written). The sweep is seed 0's offline runs at n
learning rates (`--runs 0`: the preset's own grid of seed 0, whose runs the workdir has
finished: each arm's evaluations are then compared with theirs). Each arm runs in its own
process with its own compiles, as a study's first stage of a kind does: `alone` (the first
run), `sequential` (the n runs as the scheduler runs them with `sweep.stack_runs=1`: one
process, the evaluation programs compiled once, the update step once per learning rate) and
`stacked` (`sweep.stack_runs=n`). Issue 17's target: 8 offline runs in at most 3x one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

from foundation import cpu_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEARNING_RATES = [1e-4, 2e-4, 3e-4, 5e-4, 7e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3]
UPSTREAM = ("sft", "golden", "relabel")


def sweep_config(config_arg: str, runs: int):
    """The study config `path.py:variant` (read as the command line reads it) with seed 0 only
    and, where `runs` > 0, that many learning rates at the first beta and length."""
    path, _, variant = config_arg.partition(":")
    spec = importlib.util.spec_from_file_location("study_config", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(variant or "mini")
    c.seeds = [0]
    if runs:
        c.offline_learning_rates = LEARNING_RATES[:runs]
        c.offline_betas = [c.offline_betas[0]]
        c.offline_steps = [c.offline_steps[0]]
    return c


def arm(config_arg: str, runs: int, workdir: str, scratch: str, which: str) -> dict:
    """One arm in this process: link the upstream stages, run the offline stages, time them."""
    from alignment_gap.study import pipeline, scheduler
    from alignment_gap.train import policy_stack

    c = sweep_config(config_arg, runs)
    plan = pipeline.build_plan(c, scratch)
    done = pipeline.build_plan(c, workdir)
    os.makedirs(os.path.join(scratch, "stages"), exist_ok=True)
    for name in UPSTREAM:
        source = os.path.abspath(done.dir(next(s for s in done.stages if s.name == name)))
        os.symlink(source, os.path.join(scratch, "stages", os.path.basename(source)))
    offline = [s for s in plan.stages
               if s.meta.get("method") == "offline" and s.meta.get("group") == "main"]
    if which == "alone":
        offline = offline[:1]
    start = time.perf_counter()
    scheduler.run_stages(offline, scratch, stack_runs=len(offline) if which == "stacked" else 1,
                         run_stacked=policy_stack.run)
    seconds = time.perf_counter() - start
    out = {"arm": which, "runs": len(offline), "seconds": seconds}
    if not runs:  # the workdir's own runs of this grid: how far this arm's evaluations are
        out.update(differences([plan.dir(s) for s in offline],
                               [done.dir(next(d for d in done.stages if d.name == s.name))
                                for s in offline]))
    return out


def differences(dirs: list[str], references: list[str]) -> dict:
    """The largest gaps between two sets of runs' logged evaluations (same steps)."""
    from alignment_gap.metrics import read_jsonl

    gaps, rows, equal = {}, 0, 0
    for ours, theirs in zip(dirs, references, strict=True):
        evals = [[r for r in read_jsonl(os.path.join(d, "metrics.jsonl")) if "eval/kl" in r]
                 for d in (ours, theirs)]
        for a, b in zip(*evals, strict=True):
            rows += 1
            equal += a == b
            for key in ("eval/win_rate", "eval/oracle_win_rate", "eval/kl"):
                gaps[key] = max(gaps.get(key, 0.0), abs(a[key] - b[key]))
    return {"rows": rows, "rows_equal": equal, **{f"max_gap {k}": v for k, v in gaps.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a finished study of --config")
    parser.add_argument("--config", default="configs/study.py:mini")
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--arms", default="alone,sequential,stacked")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # one arm, in a child process
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(arm(args.config, args.runs, args.workdir, args.scratch, args.arm)))
        return
    if not 0 <= args.runs <= len(LEARNING_RATES):
        parser.error(f"--runs: 0 (the preset's grid) to {len(LEARNING_RATES)}")
    scratch_root = os.path.abspath(args.workdir).rstrip("/") + "-stacked-bench"
    rows = []
    for which in args.arms.split(","):
        scratch = os.path.join(scratch_root, which)
        shutil.rmtree(scratch, ignore_errors=True)
        out = subprocess.run([sys.executable, __file__, "--workdir", args.workdir, "--config",
                              args.config, "--runs", str(args.runs), "--arm", which,
                              "--scratch", scratch], capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            sys.exit(f"arm {which} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{which}: {rows[-1]['seconds']:.1f} s", flush=True)
    shutil.rmtree(scratch_root, ignore_errors=True)
    alone = next((r["seconds"] for r in rows if r["arm"] == "alone"), None)
    grid = f"{args.runs} learning rates" if args.runs else "the preset's grid"
    print(f"\n{args.config}, seed 0's offline sweep at {grid}; "
          f"{cpu_model()}, {os.cpu_count()} cores")
    print("| arm | runs | seconds | x one run alone | per run |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = f"{r['seconds'] / alone:.2f}x" if alone else "-"
        per = f"{r['seconds'] / alone / r['runs']:.2f}x" if alone else "-"
        print(f"| {r['arm']} | {r['runs']} | {r['seconds']:.1f} | {ratio} | {per} |")
    for r in rows:
        if "rows" in r:
            gaps = ", ".join(f"{k[8:]} {v:.2g}" for k, v in r.items() if k.startswith("max_gap"))
            print(f"{r['arm']} against {args.workdir}'s own runs: {r['rows_equal']} of "
                  f"{r['rows']} evaluations equal; largest gaps: {gaps}")


if __name__ == "__main__":
    main()
