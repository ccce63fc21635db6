"""Online minus offline at matched KL budgets, with paired bootstrap intervals and a verdict.

Every policy evaluation records each prompt's outcome (`run_dir.write_outcomes`): the golden
judge's verdict against the opponent (1 / 0.5 / 0), the oracle's (synthetic world) and the KL
of the KL prompts. Checkpoints are *chosen* on selection prompts and *scored* on disjoint test
prompts, so the best-of-many choice does not flatter the number reported: with the study's
test stage (`test_stage.py`, points carrying `test_win`), every evaluation prompt selects and
the stage's own prompts test; without it the evaluation prompts are split into two halves
(even positions select, odd ones test).

A method's budget curve for one seed: at KL budget k, the test win rate of the checkpoint the
selection half rates best among its checkpoints with KL <= k (offline: over all its sweep's
runs of that seed). The difference at k is the mean over seeds of online's curve minus the
mean of offline's. Its interval is a paired bootstrap: each replicate redraws the seeds (one
draw for both methods: seed s of each shares its upstream stages and data seed) and the prompts
of both halves (the same prompts for every checkpoint of both methods), and repeats selection,
curves and difference; the interval is the 2.5th-97.5th percentile. A verdict names a winner
only when that interval excludes zero; otherwise it is "undecided". The oracle scores the same
chosen checkpoints (the judge picks, as a study without an oracle would).

Pure numpy; `compare` takes plain records, so notebooks and tests call it on any study.
"""

from __future__ import annotations

import numpy as np

REPLICATES = 2000
LEVEL = 0.95


def split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(selection, test) prompt positions of an evaluation over n prompts."""
    positions = np.arange(n)
    return positions[0::2], positions[1::2]


def verdict_of(lo: float, hi: float, a: str = "online", b: str = "offline") -> str:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "undecided"
    if lo > 0:
        return f"{a} better"
    if hi < 0:
        return f"{b} better"
    return "undecided"


def _draws(rng, n: int, replicates: int) -> np.ndarray:
    """[replicates + 1, n] prompt weights: row 0 the data as measured, then resamples."""
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=replicates)
    return np.vstack([np.ones((1, n)), counts]) / n


def mixtures(kl: np.ndarray, budget: float, interpolate: bool) -> np.ndarray:
    """[M, C] weights of the policies affordable at `budget` over C checkpoints: each
    checkpoint with KL <= budget and, with `interpolate`, each mixture of one of those with one
    beyond it whose mean KL is the budget exactly (a prompt's response comes from the first with
    probability p: the mixture's KL is at most the mean of theirs, its win rate exactly theirs)."""
    below, above = np.flatnonzero(kl <= budget), np.flatnonzero(kl > budget)
    rows = [np.eye(len(kl))[below]]
    if interpolate and below.size and above.size:
        i, j = np.repeat(below, above.size), np.tile(above, below.size)
        p = (kl[j] - budget) / (kl[j] - kl[i])
        pairs = np.zeros((i.size, len(kl)))
        pairs[np.arange(i.size), i] = p
        pairs[np.arange(i.size), j] = 1.0 - p
        rows.append(pairs)
    return np.concatenate(rows)


def _curves(points, budgets, select, scores, interpolate=False) -> dict:
    """{seed: {judge: [len(budgets), R] curve}} of one method: `select` and each of `scores`
    ({judge: ...}) are [C, R] per point; the policy chosen on `select` is scored by each."""
    out = {}
    replicate = np.arange(select.shape[1])
    for seed in sorted({p["seed"] for p in points}):
        rows = np.array([i for i, p in enumerate(points) if p["seed"] == seed])
        kl = np.array([points[i]["kl"] for i in rows])
        curves = {j: np.full((len(budgets), select.shape[1]), np.nan) for j in scores}
        for g, budget in enumerate(budgets):
            weights = mixtures(kl, budget, interpolate)
            if weights.size:
                best = np.argmax(weights @ select[rows], axis=0)
                for judge, score in scores.items():
                    curves[judge][g] = (weights @ score[rows])[best, replicate]
        out[seed] = curves
    return out


def compare(points: list[dict], methods=("online", "offline"), *, budgets=None,
            replicates: int = REPLICATES, seed: int = 0, interpolate: bool = False) -> dict:
    """Online minus offline at matched KL budgets.

    `points`: one per evaluation with `method`, `seed`, `kl` and per-prompt arrays `win` and,
    where there is an oracle, `oracle_win` (the same prompts in every point); with `test_win`
    (and `test_oracle_win`) in every point, those are the test scores. Include each
    run's step 0 (the SFT policy at KL 0): the policy any budget affords, so a method whose
    runs all moved further than a budget is scored there by what it started from.
    `budgets`: KL budgets (default: 8 log-spaced from the smallest positive KL evaluated to
    the largest, plus the headline budget: the largest KL both methods reached). Returns the
    budgets, the headline budget and, per judge ("golden", "oracle"), one row per budget:
    each method's curve (mean over seeds), the difference, its interval and the verdict.
    `interpolate`: the curves are frontiers through mixtures of two checkpoints (`mixtures`),
    so a budget between two evaluations gets the policy between them, not the one below.
    """
    a, b = methods
    points = [p for p in points if p["method"] in methods]
    groups = {m: [p for p in points if p["method"] == m] for m in methods}
    seeds = sorted({p["seed"] for p in groups[a]} & {p["seed"] for p in groups[b]})
    if not seeds:
        return {"seeds": [], "rows": {}, "budgets": [], "headline_kl": float("nan"),
                "prompts": {}}
    points = [p for p in points if p["seed"] in seeds]
    groups = {m: [p for p in points if p["method"] == m] for m in methods}
    reached = {m: max(p["kl"] for p in groups[m]) for m in methods}
    least = {m: max(min(p["kl"] for p in groups[m] if p["seed"] == s) for s in seeds)
             for m in methods}  # the least budget at which every seed of m has a checkpoint
    headline = min(reached.values())
    if budgets is None:
        positive = [p["kl"] for p in points if p["kl"] > 0]
        lowest = max(max(least.values()), min(positive, default=1e-3))
        top = max(reached.values())
        budgets = np.geomspace(max(lowest, 1e-3), max(top, lowest * 1.01, 1e-3), 8)
        budgets = sorted({*(float(x) for x in budgets), float(headline)})
    budgets = np.asarray(budgets, float)

    tested = all("test_win" in p for p in points)
    n = len(points[0]["win"])
    if tested:  # the test stage's candidates: all evaluation prompts select, its own test
        select_at, test_at, test_key = np.arange(n), np.arange(len(points[0]["test_win"])), "test_"
    else:
        (select_at, test_at), test_key = split(n), ""
    rng = np.random.default_rng(seed)
    select_w = _draws(rng, len(select_at), replicates)  # [R, n_select]
    test_w = _draws(rng, len(test_at), replicates)
    seed_draws = np.vstack([np.arange(len(seeds))[None],
                            rng.integers(0, len(seeds), (replicates, len(seeds)))])

    judges = ["golden"] + (["oracle"] if all("oracle_win" in p for p in points) else [])
    out = {"seeds": seeds, "budgets": [float(x) for x in budgets], "headline_kl": headline,
           "reached": reached, "least": least, "replicates": replicates, "rows": {},
           "prompts": {"selection": len(select_at), "test": len(test_at)},
           "interpolated": interpolate, "test_stage": tested}
    curves = {}
    for m in methods:
        def stacked(key, group=groups[m]):
            return np.stack([p[key] for p in group]).astype(float)

        select = stacked("win")[:, select_at] @ select_w.T  # [C, R + 1]
        scores = {"golden": stacked(f"{test_key}win")[:, test_at] @ test_w.T}
        if "oracle" in judges:
            scores["oracle"] = stacked(f"{test_key}oracle_win")[:, test_at] @ test_w.T
        curves[m] = _curves(groups[m], budgets, select, scores, interpolate)
    tail = (1 - LEVEL) / 2 * 100
    for judge in judges:
        # [seeds, budgets, R + 1] -> mean over each replicate's drawn seeds.
        by_seed = {m: np.stack([curves[m][s][judge] for s in seeds]) for m in methods}
        means = {m: np.stack([by_seed[m][seed_draws[r], :, r].mean(0)
                              for r in range(replicates + 1)], axis=-1) for m in methods}
        diff = means[a] - means[b]
        rows = []
        for g, budget in enumerate(budgets):
            resampled = diff[g, 1:]
            lo, hi = ((np.nan, np.nan) if np.isnan(resampled).any()
                      else np.percentile(resampled, [tail, 100 - tail]))
            rows.append({"kl": float(budget), a: float(means[a][g, 0]),
                         b: float(means[b][g, 0]), "difference": float(diff[g, 0]),
                         "low": float(lo), "high": float(hi),
                         "verdict": verdict_of(lo, hi, a, b)})
        out["rows"][judge] = rows
    return out


def headline(comparison: dict, judge: str = "golden") -> dict | None:
    """The row at the headline budget (the largest KL both methods reached)."""
    rows = comparison["rows"].get(judge)
    if not rows:
        return None
    return min(rows, key=lambda r: abs(r["kl"] - comparison["headline_kl"]))


def sentence(comparison: dict, a: str = "online", b: str = "offline") -> str:
    """The study's verdict in one paragraph: the golden judge's and the oracle's, each with
    the interval it follows from."""
    row = headline(comparison)
    if row is not None and not np.isfinite(row["difference"]):
        return (f"No KL budget is reached by every seed of both {a} and {b} (their least KL: "
                f"{', '.join(f'{m} {v:.3g}' for m, v in comparison['least'].items())} nats; "
                f"their most: {', '.join(f'{m} {v:.3g}' for m, v in comparison['reached'].items())}"
                "), so they cannot be compared at a matched budget.")
    if row is None:
        return (f"No seed has both {a} and {b} runs with recorded evaluations yet, so they "
                "cannot be compared.")
    seeds = len(comparison["seeds"])
    over = (f"{comparison['prompts']['test']} test prompts and {seeds} seed"
            f"{'s' * (seeds != 1)}" + (" (one seed: prompts only)" if seeds == 1 else ""))

    def view(r, judge):
        return (f"{judge}: {a} minus {b} {r['difference']:+.3f} "
                f"[{r['low']:+.3f}, {r['high']:+.3f}], {r['verdict']}")

    text = (f"At a KL budget of {row['kl']:.3g} nats (the most both methods used), "
            f"{view(row, 'golden judge')}")
    oracle = headline(comparison, "oracle")
    if oracle is not None:
        text += f"; {view(oracle, 'oracle')}"
    return (f"{text}. (95% paired bootstrap over {over}; checkpoints chosen on "
            f"{comparison['prompts']['selection']} other prompts.)")
