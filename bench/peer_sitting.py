"""Issue 19's sitting in one command: ours, the peers, ours again, and the ratios.

    python bench/peer_sitting.py --label 15

Runs one after another (never two at once: these machines have 2 cores), at
`../shared/peerbench`'s shape:

    ours, run a:  bench/policy_step.py --shape peer, 1 device 1 slice, then 2 devices 2 slices
    peers:        ../shared/peerbench/run_all.sh with RUNS=2 (TRL online DPO and DPO, Tunix DPO
                  and sampler, each run twice; the matmul peaks of jax and torch)
    ours, run b:  the same configurations in reverse order

then prints the two tables `bench/RESULTS.md` keeps per sitting (the peers; ours beside the
peers' means) and how many of our runs meet each target: online step >= 2x TRL's online DPO,
offline step >= 1.5x TRL's DPO and >= 2x Tunix's DPO, sampler call >= 2x Tunix's sampler. Paste
them under a heading naming the CPU model line the script prints. Everything it read goes
to bench/out/sitting_<label>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ((1, 1), (2, 2))  # (devices, microbatches): one device; one XLA device per core
# Target: (our key, peer key, the least ratio of the peer's time to ours).
TARGETS = {
    "online >= 2x TRL online DPO": ("online_step_s", "trl_online_dpo", 2.0),
    "offline >= 1.5x TRL DPO": ("offline_step_s", "trl_dpo", 1.5),
    "offline >= 2x Tunix DPO": ("offline_step_s", "tunix_dpo", 2.0),
    "sampler >= 2x Tunix sampler": ("sampler_call_s", "tunix_sampler", 2.0),
}
ONLINE, OFFLINE_TRL, OFFLINE_TUNIX, SAMPLER = TARGETS
# Peer -> (results file stem, the field holding its seconds per step or call).
PEERS = {"trl_online_dpo": ("trl_online_dpo_ipo", "steady_mean_s"),
         "trl_dpo": ("trl_dpo_ipo", "steady_mean_s"),
         "tunix_dpo": ("tunix_dpo", "steady_mean_s"),
         "tunix_sampler": ("tunix_sampler", "mean_s")}


def read_peers(results_dir: str, runs: int, since: float) -> dict:
    """Each peer's seconds per run, and the matmul peaks, from files written after `since`."""
    def load(stem):
        path = os.path.join(results_dir, stem + ".json")
        if not os.path.exists(path) or os.path.getmtime(path) < since:
            raise SystemExit(f"error: {path} is missing or older than this sitting: the peer "
                             f"run failed (its log is in {os.path.dirname(results_dir)}/logs)")
        with open(path) as f:
            return json.load(f)

    peers = {name: [load(f"{stem}_r{i}")[key] for i in range(1, runs + 1)]
             for name, (stem, key) in PEERS.items()}
    peers["matmul_gflops"] = {lib: load(f"matmul_{lib}")["gflops_at_median"]
                              for lib in ("jax", "torch")}
    return peers


def ratios(ours: dict, peers: dict) -> dict:
    """The peer's mean time over ours, per target."""
    return {target: statistics.mean(peers[peer]) / ours[key]
            for target, (key, peer, _) in TARGETS.items()}


def meets(ratio: dict) -> dict:
    return {target: ratio[target] >= TARGETS[target][2] for target in TARGETS}


def _seconds(values) -> str:
    mean = f"{statistics.mean(values):.3f}"
    return mean if len(values) == 1 else f"{mean} ({', '.join(f'{v:.3f}' for v in values)})"


def _each(runs, key, fmt) -> str:
    """One value per run: "a / b"."""
    return " / ".join(format(run[key], fmt) for run in runs)


def tables(label: str, peers: dict, ours: dict) -> str:
    """Markdown: the peers' row, our rows (run a / run b) and the count of targets met.
    `ours` maps a configuration name to its runs' policy_step results."""
    lines = ["| sitting | TRL online DPO | TRL DPO | Tunix DPO | Tunix sampler | "
             "matmul: jax / torch GFLOP/s |", "| --- | --- | --- | --- | --- | --- |",
             f"| {label} | {_seconds(peers['trl_online_dpo'])} s | {_seconds(peers['trl_dpo'])} "
             f"| {_seconds(peers['tunix_dpo'])} | {_seconds(peers['tunix_sampler'])} | "
             f"{peers['matmul_gflops']['jax']:.0f} / {peers['matmul_gflops']['torch']:.0f} |", "",
             "| sitting | ours | online step | vs TRL online | offline step | "
             "vs TRL DPO; Tunix DPO | sampler call | vs Tunix |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    count = []
    for name, runs in ours.items():
        r = [ratios(run, peers) for run in runs]
        lines.append(
            f"| {label} | {name} ({'a / b' if len(runs) == 2 else 'a'}) | "
            f"{_each(runs, 'online_step_s', '.3f')} | {_each(r, ONLINE, '.2f')}x | "
            f"{_each(runs, 'offline_step_s', '.3f')} | {_each(r, OFFLINE_TRL, '.2f')}x; "
            f"{_each(r, OFFLINE_TUNIX, '.2f')}x | {_each(runs, 'sampler_call_s', '.3f')} | "
            f"{_each(r, SAMPLER, '.2f')}x |")
        met = [meets(x) for x in r]
        count.append(f"{name}: online >= 2x in {sum(m[ONLINE] for m in met)} of {len(met)} "
                     f"runs, all four in {sum(all(m.values()) for m in met)}")
    return "\n".join(lines + [""] + count)


def config_name(devices: int, microbatches: int) -> str:
    return (f"{devices} device{'s' if devices > 1 else ''}, "
            f"{microbatches} slice{'s' if microbatches > 1 else ''}")


def run_ours(devices: int, microbatches: int, out: str) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "bench", "policy_step.py"), "--shape", "peer",
           "--devices", str(devices), "--microbatches", str(microbatches), "--out", out]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    with open(out) as f:
        return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default=time.strftime("%Y-%m-%d %H:%M"),
                        help="the sitting's name in the tables (RESULTS.md numbers them)")
    parser.add_argument("--peerbench", default=os.path.join(ROOT, "..", "shared", "peerbench"))
    parser.add_argument("--peer_runs", type=int, default=2)
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.peerbench, "run_all.sh")):
        parser.error(f"--peerbench {args.peerbench} holds no run_all.sh: give the path of "
                     "the workplace's shared/peerbench")
    results_dir = os.path.join(os.environ.get("PEERBENCH_DIR", "/tmp/peerbench"), "results")
    out_dir = os.path.join(ROOT, "bench", "out")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, "sitting_" + "".join(c if c.isalnum() else "_"
                                                      for c in args.label))
    start = time.time()
    ours = {config_name(*c): [] for c in CONFIGS}
    for c in CONFIGS:
        ours[config_name(*c)].append(run_ours(*c, f"{stem}_d{c[0]}_k{c[1]}_a.json"))
    print(f"$ RUNS={args.peer_runs} bash {args.peerbench}/run_all.sh", flush=True)
    subprocess.run(["bash", os.path.join(args.peerbench, "run_all.sh")], check=True,
                   env=dict(os.environ, RUNS=str(args.peer_runs)))
    peers = read_peers(results_dir, args.peer_runs, start)
    for c in reversed(CONFIGS):
        ours[config_name(*c)].append(run_ours(*c, f"{stem}_d{c[0]}_k{c[1]}_b.json"))
    from foundation import cpu_model  # jax's imports, once the timed runs are over

    summary = {"label": args.label, "cpu": cpu_model(), "started": time.strftime(
        "%Y-%m-%d %H:%M UTC", time.gmtime(start)), "ended": time.strftime(
        "%Y-%m-%d %H:%M UTC", time.gmtime()), "peers": peers, "ours": ours}
    with open(stem + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nCPU model name: {summary['cpu']}; {summary['started']} to "
          f"{summary['ended']}\n\n{tables(args.label, peers, ours)}")


if __name__ == "__main__":
    main()
