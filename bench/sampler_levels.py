"""Where a run's sampler-call level comes from: its own placement in memory, or the machine.

    python bench/sampler_levels.py                   # 8 processes, ASLR on and off in turn
    python bench/sampler_levels.py --processes 4 --calls 30

The peer-shape sampler call keeps to one level within a run and moves by up to 60% between runs
(bench/RESULTS.md). Each process here builds two random-init peer policies, each with its own
compiled sampler program (own parameters, code and cached buffers), and alternates calls
between them: if where a program and its data lie set the level, the two copies differ within a
process; if the machine does, they move together. Processes alternate address-space
randomisation on and off (`setarch -R`, in on-off-off-on order so that a drift cancels): the
table gives each process's medians (and each 10-call block's), then how adjacent pairs differ.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

BLOCK = 10


def child(calls: int) -> dict:
    """Two sampler copies alternated call by call; their call times in ms (warm-up dropped)."""
    import jax
    from flax import nnx
    from policy_step import SHAPES, random_models

    from alignment_gap.sampling import Sampler, SamplingConfig

    size, _, p, r, prompts = SHAPES["peer"]
    mesh, rules, cfg, policy_a, policy_b, _ = random_models(size, p + 2 * r, 1)
    sampling = SamplingConfig(max_new_tokens=r, temperature=1.0, eos_id=-1)
    copies = [(Sampler(policy, mesh, rules, sampling, name=f"sample_{n}"),
               nnx.state(policy, nnx.Param)) for n, policy in (("a", policy_a), ("b", policy_b))]
    prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, (prompts, p)).astype(np.int32)
    mask = np.ones_like(prompt, bool)
    times = ([], [])
    for i in range(2 * (calls + 3)):
        sampler, params = copies[i % 2]
        t0 = time.perf_counter()
        jax.block_until_ready(sampler(params, prompt, mask, jax.random.key(1)).tokens)
        times[i % 2].append((time.perf_counter() - t0) * 1e3)
    return {"a": times[0][3:], "b": times[1][3:]}


def run_process(aslr: bool, calls: int) -> dict:
    from alignment_gap import allocator

    command = [sys.executable, __file__, "--child", "--calls", str(calls)]
    if not aslr:
        command = ["setarch", "-R", *command]
    out = subprocess.run(command, capture_output=True, text=True, env=allocator.environment())
    if out.returncode:
        raise SystemExit(f"error: a child process failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(i: int, aslr: bool, times: dict) -> str:
    blocks = lambda t: " ".join(f"{np.median(t[j:j + BLOCK]):.1f}"
                                for j in range(0, len(t) - BLOCK + 1, BLOCK))
    return (f"| {i} | {'on' if aslr else 'off'} | {np.median(times['a']):.1f} | "
            f"{np.median(times['b']):.1f} | {blocks(times['a'])} | {blocks(times['b'])} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=8, help="an even number")
    parser.add_argument("--calls", type=int, default=30, help="timed calls per copy")
    parser.add_argument("--out", default="bench/out/sampler_levels.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.calls)))
        return
    if args.processes < 2 or args.processes % 2:
        parser.error(f"--processes must be an even number of at least 2, not {args.processes}")
    if shutil.which("setarch") is None:
        raise SystemExit("error: `setarch` (util-linux) is not on PATH; it runs the processes "
                         "with address-space randomisation off")
    from foundation import cpu_model

    print(f"{cpu_model()}, {time.strftime('%Y-%m-%d %H:%M')}; peer-shape sampler call, ms "
          f"(median of {args.calls} calls per copy; blocks of {BLOCK})\n")
    print("| process | ASLR | copy a | copy b | copy a's blocks | copy b's blocks |")
    print("| --- | --- | --- | --- | --- | --- |")
    medians, copy_gaps, runs = [], [], []
    for i in range(args.processes):
        aslr = i % 4 in (0, 3)
        times = run_process(aslr, args.calls)
        print(row(i, aslr, times), flush=True)
        runs.append({"aslr": aslr, **times})
        medians.append((aslr, float(np.median(times["a"] + times["b"]))))
        copy_gaps.append(abs(np.median(times["a"]) - np.median(times["b"])))
    pairs = [(a, b) if a[0] else (b, a) for a, b in zip(medians[::2], medians[1::2], strict=True)]
    gaps = [on[1] - off[1] for on, off in pairs]
    print(f"\nCopies a and b of one process: medians within {max(copy_gaps):.1f} ms. Process "
          f"medians {min(m for _, m in medians):.1f}-{max(m for _, m in medians):.1f} ms. ASLR off "
          f"below its pair's ASLR-on process in {sum(g > 0 for g in gaps)} of {len(gaps)} pairs; "
          f"on minus off: median {np.median(gaps):+.1f} ms ({min(gaps):+.1f} to {max(gaps):+.1f}).")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"cpu": cpu_model(), "calls_ms": runs}, f)


if __name__ == "__main__":
    main()
