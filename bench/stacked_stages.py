"""A study's offline sweep trained as its stages: n runs stacked against one run alone and the
same n runs one after another (the whole stage: data, compiles, evaluations, checkpoints).

    python bench/stacked_stages.py --workdir workdir/study          # 8 runs of the mini study
    python bench/stacked_stages.py --workdir workdir/study --runs 4 --arms alone,stacked

`--workdir` is a finished study of `--config` (its SFT, golden and relabel stages are linked
into a scratch workdir beside it, never written). The sweep is seed 0's offline runs at n
learning rates; each arm runs in its own process with its own compiles, as a study's first
stage of a kind does: `alone` (the first learning rate), `sequential` (the n runs as the
scheduler runs them with `sweep.stack_runs=1`: one process, the evaluation programs compiled
once, the update step once per learning rate) and `stacked` (`sweep.stack_runs=n`). Seconds
are the scheduler's for its stages. Issue 17's target: 8 offline runs in at most 3x one run.
"""

from __future__ import annotations

import argparse
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
    sys.path.insert(0, ROOT)
    from configs import study as study_configs

    c = study_configs.get_config(config_arg.split(":", 1)[1] if ":" in config_arg else "mini")
    c.seeds = [0]
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
    offline = [s for s in plan.stages if s.meta.get("method") == "offline"]
    if which == "alone":
        offline = offline[:1]
    start = time.perf_counter()
    timings = scheduler.run_stages(offline, scratch, stack_runs=runs if which == "stacked" else 1,
                                   run_stacked=policy_stack.run)
    return {"arm": which, "runs": len(offline), "seconds": time.perf_counter() - start,
            "stage_seconds": sum(timings.values())}


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
    if args.runs > len(LEARNING_RATES):
        parser.error(f"--runs: at most {len(LEARNING_RATES)}")
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
    print(f"\n{args.config}, seed 0's offline sweep at {args.runs} learning rates; "
          f"{cpu_model()}, {os.cpu_count()} cores")
    print("| arm | runs | seconds | x one run alone | per run |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = f"{r['seconds'] / alone:.2f}x" if alone else "-"
        per = f"{r['seconds'] / alone / r['runs']:.2f}x" if alone else "-"
        print(f"| {r['arm']} | {r['runs']} | {r['seconds']:.1f} | {ratio} | {per} |")


if __name__ == "__main__":
    main()
