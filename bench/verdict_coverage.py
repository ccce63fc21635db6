"""How often the main verdict's intervals cover the truth, in simulated studies.

    python bench/verdict_coverage.py [--studies 1000] [--replicates 400]
        [--baseline FILE]   # another differences.py, e.g. from `git show REV:alignment_gap/...`

Each simulated study has S seeds of two methods, 4 checkpoints per seed at KL 1..4, and
per-prompt binary outcomes drawn as Bernoulli(logistic(the method's quality at the checkpoint
+ seed effect + checkpoint noise + prompt difficulty + method x prompt effect + prompt taste x
checkpoint)) on 2P evaluation prompts (even ones select, odd ones test, as
`differences.compare` splits them). "Taste": how much a prompt favours later checkpoints, so
a set of selection prompts moves every seed's choice alike. Every study draws new seeds and new
prompts. The truth at the headline budget (KL 4) is the mean difference over all studies of a
design (0 in the null designs, where both methods are one distribution). Printed per design:
the true SD of the difference over studies; the interval's implied SE (half-width over its
quantile: t for `differences.compare` rows with `df`, 1.96 otherwise) relative to it, as the
median over studies and as the mean of its square over the true variance; how often the 95%
interval covers the truth; the share of verdicts that name a winner (5% in a null design).
The same studies go to every estimator.
"""

from __future__ import annotations

import argparse
import types

import numpy as np
from scipy.special import stdtrit

from alignment_gap.study import differences

CHECKPOINTS = 4
# name, seeds, test prompts, then sds: seed, checkpoint noise, method x prompt, taste; lead
DESIGNS = [
    ("null, outcome noise only", 3, 64, 0.0, 0.0, 0.0, 0.0, 0.0),
    ("null, seeds differ", 3, 64, 0.3, 0.1, 0.0, 0.0, 0.0),
    ("null, prompts differ", 3, 64, 0.0, 0.1, 0.5, 0.0, 0.0),
    ("null, seeds and prompts, 5 seeds", 5, 128, 0.3, 0.1, 0.5, 0.0, 0.0),
    ("null, seeds and prompts, 8 seeds, 32 prompts", 8, 32, 0.3, 0.1, 0.5, 0.0, 0.0),
    ("null, prompts' taste, 5 seeds", 5, 128, 0.1, 0.05, 0.3, 1.0, 0.0),
    ("online leads, 5 seeds", 5, 128, 0.3, 0.1, 0.5, 0.0, 0.2),
    ("online leads, 3 seeds", 3, 128, 0.2, 0.1, 0.3, 0.0, 0.2),
]


def simulate(rng, seeds, prompts, seed_sd, noise_sd, interaction_sd, taste_sd, lead):
    """One study's evaluation points (`differences.compare`'s input)."""
    n = 2 * prompts
    difficulty = rng.normal(0.0, 1.0, n)
    points = []
    for method, shift in (("online", lead), ("offline", 0.0)):
        by_prompt = rng.normal(0.0, interaction_sd, n)
        taste = rng.normal(0.0, taste_sd, n)
        for seed in range(seeds):
            seed_effect = rng.normal(0.0, seed_sd)
            for k in range(1, CHECKPOINTS + 1):
                quality = 0.3 * np.log(k) + shift + seed_effect + rng.normal(0.0, noise_sd)
                logit = quality + difficulty + by_prompt + taste * (k - (CHECKPOINTS + 1) / 2)
                win = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
                points.append({"method": method, "seed": seed, "kl": float(k), "step": k,
                               "win": win})
    return points


def load(path: str):
    """A differences.py from a file (an older version, for the same studies)."""
    module = types.ModuleType("baseline_differences")
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), module.__dict__)  # noqa: S102 - a local file
    return module


def run(module, design, studies: int, replicates: int, seed: int = 0) -> dict:
    _, seeds, prompts, *effects = design
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(studies):
        points = simulate(rng, seeds, prompts, *effects)
        c = module.compare(points, budgets=[float(CHECKPOINTS)], replicates=replicates, seed=i)
        rows.append(c["rows"]["golden"][0])
    diff = np.array([r["difference"] for r in rows])
    low, high = np.array([r["low"] for r in rows]), np.array([r["high"] for r in rows])
    df = np.array([r.get("df", np.inf) for r in rows], float)
    se = (high - low) / 2 / stdtrit(np.where(np.isfinite(df), df, 1e9), 0.975)
    truth = 0.0 if effects[-1] == 0 else float(diff.mean())
    return {"sd": float(diff.std(ddof=1)),
            "se_ratio": float(np.median(se) / diff.std(ddof=1)),
            "var_ratio": float(np.mean(se ** 2) / diff.var(ddof=1)),
            "coverage": float(np.mean((low <= truth) & (truth <= high))),
            "named": float(np.mean((low > 0) | (high < 0))),
            "df": float(np.median(df))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--replicates", type=int, default=400)
    parser.add_argument("--baseline", help="another differences.py to measure beside this one")
    args = parser.parse_args()
    estimators = {"this code": differences}
    if args.baseline:
        estimators[f"baseline ({args.baseline})"] = load(args.baseline)
    print(f"{args.studies} simulated studies per design, {args.replicates} bootstrap "
          f"replicates, {CHECKPOINTS} checkpoints per seed\n")
    print("| design | estimator | true SD | implied SE / SD (median) | implied variance / "
          "true (mean) | df (median) | coverage | winner named |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for design in DESIGNS:
        for name, module in estimators.items():
            r = run(module, design, args.studies, args.replicates)
            print(f"| {design[0]} | {name} | {r['sd']:.4f} | {r['se_ratio']:.2f} | "
                  f"{r['var_ratio']:.2f} | {r['df']:.3g} | {_share(r['coverage'], args.studies)}"
                  f" | {_share(r['named'], args.studies)} |", flush=True)


def _share(p: float, studies: int) -> str:
    """A share of simulated studies with its Monte Carlo standard error."""
    return f"{p:.3f} +- {np.sqrt(p * (1 - p) / studies):.3f}"


if __name__ == "__main__":
    main()
