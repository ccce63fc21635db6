"""Online minus offline at matched KL budgets, with t-intervals and a verdict.

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
mean of offline's: the mean of a seeds x test prompts table of paired differences (seed s of
each method shares its upstream stages and data seed; every checkpoint scores the same
prompts). Its variance treats seeds and test prompts as crossed random draws (`crossed.py`:
ANOVA variance components) plus the part of the choice's spread that every seed shares (the
difference re-made with the checkpoints each bootstrap resample of the selection prompts
chooses, less each seed's own share, which the seeds' spread already holds); with upstream
re-draws (chains), the spread of the draws' own differences, which holds everything below
them. The interval is that variance's 95% t-interval (Satterthwaite's degrees of freedom). A
verdict names a winner only when the interval excludes zero; otherwise it is "undecided". The
oracle scores the same chosen checkpoints (the judge picks, as a study without an oracle
would). `bench/verdict_coverage.py` measures how often these intervals cover the truth in
simulated studies.

Pure numpy and scipy's t quantile; `compare` takes plain records, so notebooks and tests call it
on any study.
"""

from __future__ import annotations

import collections

import numpy as np
from scipy.special import stdtrit

from alignment_gap.study import crossed

REPLICATES = 2000  # bootstrap resamples of the selection prompts
LEVEL = 0.95
# Fewer policy seeds than this and the verdict says its interval rests on few degrees of
# freedom (issue 17 asks 5+ for a headline).
HEADLINE_SEEDS = 5


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


def unit(point: dict) -> tuple[int, int]:
    """(upstream chain, policy seed): one seed's runs of both methods share its chain's
    upstream stages and its data seed, so differences pair within a unit."""
    return point.get("chain", 0), point["seed"]


def _check_balanced(units: list[tuple]):
    """Every upstream draw holds the same policy seeds (the plan gives each chain the study's
    seeds), so the draws' differences are means over alike sets."""
    sizes = dict(collections.Counter(chain for chain, _ in units))
    if len(set(sizes.values())) > 1:
        raise ValueError(f"upstream draws hold different numbers of policy seeds (chain: "
                         f"seeds {sizes}); each needs a run of every seed of both methods")


def variance_split(differences: np.ndarray) -> dict | None:
    """[chains, seeds] per-unit differences -> the random-effects split of their variance
    (one-way ANOVA): between chains (the upstream stages' share) and within (policy seeds).
    None without two chains of two seeds."""
    d = np.asarray(differences, float)
    if d.ndim != 2 or d.shape[0] < 2 or d.shape[1] < 2 or not np.isfinite(d).all():
        return None
    k = d.shape[1]
    within = float(d.var(axis=1, ddof=1).mean())
    between = max(0.0, float(d.mean(axis=1).var(ddof=1)) - within / k)
    total = between + within
    return {"between chains": between, "within chains": within,
            "upstream share": between / total if total > 0 else float("nan")}


def label(point: dict) -> str:
    """What a chosen point is, for the report: its run's hyper-parameters and its step."""
    if point["step"] == 0:
        return "SFT (step 0)"
    hyper = "".join(f"{name} {point[key]:g}, " for name, key in
                    (("lr", "learning_rate"), ("beta", "beta"))
                    if point.get(key) is not None)
    return f"{hyper}step {point['step']}"


def prompt_sets(points: list[dict]) -> tuple[list[dict], np.ndarray, np.ndarray, str]:
    """(the points that are scored, selection positions in `win`, test positions, the test
    arrays' key prefix). With a test stage (points carrying `test_win`) only its candidates
    are scored: all of `win` selects and `test_win` tests; otherwise `win`'s halves (`split`)."""
    if any("test_win" in p for p in points):
        scored = [p for p in points if "test_win" in p]
        return (scored, np.arange(len(scored[0]["win"])), np.arange(len(scored[0]["test_win"])),
                "test_")
    return (points, *split(len(points[0]["win"])), "")


def peaks(points: list[dict], method: str, key=unit) -> dict:
    """{judge: {group: test win rate}} of `method`'s peaks: per group of its points (`key`:
    each unit by default, or e.g. each run), the checkpoint past step 0 (the start where a
    group has no other) that the selection prompts rate best at any KL, scored on the test
    prompts (`prompt_sets`); checkpoints rated alike share the choice (`tie_weights`). Chosen
    and scored on the same prompts, a best-of-many choice would flatter a large sweep."""
    scored, select_at, test_at, test_key = prompt_sets(points) if points else ([], [], [], "")
    groups = {}
    for p in scored:
        if p["method"] == method:
            groups.setdefault(key(p), []).append(p)
    best = {}
    for k, group in groups.items():  # past step 0 where a group has such a checkpoint
        moved = [p for p in group if p["step"] > 0] or group
        rates = [np.mean(np.asarray(p["win"], float)[select_at]) for p in moved]
        share = tie_weights(np.array(rates)[:, None])[:, 0]
        best[k] = [(w, p) for w, p in zip(share, moved, strict=True) if w > 0]
    judges = {"golden": "win", "oracle": "oracle_win"}
    return {judge: {k: float(sum(w * np.mean(np.asarray(p[test_key + name], float)[test_at])
                                 for w, p in tied))
                    for k, tied in best.items() if all(test_key + name in p for _, p in tied)}
            for judge, name in judges.items()
            if any(test_key + name in p for tied in best.values() for _, p in tied)}


def tie_weights(values: np.ndarray) -> np.ndarray:
    """[M, K] -> [M, K] weights, per column an even share to each of its maxima (within
    rounding): the expected outcome of breaking a tie at random, so that the order in which
    the points came (the plan's, the steps') never picks among equally rated checkpoints."""
    values = np.asarray(values, float)
    top = np.isclose(values, values.max(0, keepdims=True), rtol=0.0, atol=1e-9)
    return top / top.sum(0, keepdims=True)


def _curves(points, budgets, select, scores, interpolate=False) -> tuple[dict, dict, dict]:
    """One method's choices, per unit: ({unit: {judge: [len(budgets), R + 1]}} the test win
    rate of the policy each column of `select` [C, R + 1] chooses, {unit: {judge:
    [len(budgets), P]}} the per-prompt test outcomes of the choice as measured (column 0),
    {unit: [what is chosen at each budget]}); `scores` {judge: [C, P]}: each point's outcomes
    on the P test prompts."""
    rates, outcomes, chosen = {}, {}, {}
    prompts = next(iter(scores.values())).shape[1]
    for key in sorted({unit(p) for p in points}):
        rows = np.array([i for i, p in enumerate(points) if unit(p) == key])
        kl = np.array([points[i]["kl"] for i in rows])
        rates[key] = {j: np.full((len(budgets), select.shape[1]), np.nan) for j in scores}
        outcomes[key] = {j: np.full((len(budgets), prompts), np.nan) for j in scores}
        chosen[key] = [None] * len(budgets)
        for g, budget in enumerate(budgets):
            weights = mixtures(kl, budget, interpolate)
            if weights.size:
                best = tie_weights(weights @ select[rows])  # [M, R + 1]
                for judge, score in scores.items():
                    policies = weights @ score[rows]  # [M, P]: each affordable policy's outcomes
                    rates[key][judge][g] = policies.mean(1) @ best
                    outcomes[key][judge][g] = best[:, 0] @ policies
                tied = np.flatnonzero(best[:, 0])  # as measured (column 0)
                chosen[key][g] = " or ".join(
                    " + ".join(label(points[rows[i]]) + (f" (x{mix[i]:.2f})" if mix[i] < 1 else "")
                               for i in np.flatnonzero(mix))
                    for mix in weights[tied]) + (" (tied, averaged)" if tied.size > 1 else "")
    return rates, outcomes, chosen


def _shared_choice_spread(resampled: np.ndarray) -> float:
    """The variance a new set of selection prompts adds to the mean over units, from each
    unit's difference under R resamples [units, R]: the mean covariance between two units'
    (what moves every seed alike; each seed's own luck in choosing is already in the seeds'
    spread). One unit: its whole spread, which nothing else holds."""
    units = len(resampled)
    each = float(resampled.var(axis=1, ddof=1).mean())
    if units == 1:
        return each
    of_mean = float(resampled.mean(0).var(ddof=1))
    return max(0.0, (units * of_mean - each) / (units - 1))


def interval(table, resampled, chains, selection_prompts: int, level: float = LEVEL) -> dict:
    """The difference and its t-interval at one budget. `table` [units, P]: each unit's
    per-prompt difference of the choices as measured; `resampled` [units, R]: each unit's
    difference of the choices a resample of the `selection_prompts` makes (scored on all test
    prompts); `chains` [units]: each unit's upstream draw. One draw: seeds x prompts crossed
    (`crossed.variance`) plus the choice's spread that the seeds share; several: the draws'
    differences."""
    table = np.asarray(table, float)
    center = float(table.mean()) if table.size else float("nan")
    draws = sorted(set(chains))
    if len(draws) > 1:
        by_draw = np.array([table[np.asarray(chains) == c].mean() for c in draws])
        var, df = float(by_draw.var(ddof=1) / len(draws)), float(len(draws) - 1)
    else:
        parts = [crossed.variance(table)]
        resampled = np.asarray(resampled, float)
        if resampled.shape[1] > 1 and selection_prompts > 1:
            parts.append((_shared_choice_spread(resampled), float(selection_prompts - 1)))
        var, df = crossed.combine(parts)
    # Every cell alike (each seed and prompt the same difference, e.g. one method winning
    # every prompt of a small evaluation): no spread to estimate from, and a zero-width
    # interval would name a winner on a handful of prompts (as `results.mean_ci` refuses).
    alike = table.size > 1 and np.ptp(table) == 0
    if alike or not (np.isfinite(center) and np.isfinite(var) and var > 0):
        why = ("every seed and prompt gave the same difference" if alike else
               "too few test prompts or seeds to estimate a spread")
        return {"difference": center, "low": np.nan, "high": np.nan, "se": np.nan,
                "df": np.nan, "no_interval": why}
    half = float(stdtrit(df, 0.5 + level / 2)) * np.sqrt(var)
    return {"difference": center, "low": center - half, "high": center + half,
            "se": float(np.sqrt(var)), "df": df}


def _outside_share(points, budgets, select) -> float:
    """With a test stage: the share of resampled choices (per seed, budget and replicate, made
    among every evaluation on `select` [C, R + 1]) that land on a checkpoint the stage did not
    score. The bootstrap re-chooses among the candidates only, so this says how often the
    candidate margin cut a resample's choice short (0: never)."""
    scored = np.array(["test_win" in p for p in points])
    hits = total = 0
    for key in sorted({unit(p) for p in points}):
        rows = np.array([i for i, p in enumerate(points) if unit(p) == key])
        kl = np.array([points[i]["kl"] for i in rows])
        for budget in budgets:
            within = rows[kl <= budget]
            if within.size:
                share = tie_weights(select[within, 1:])  # [within, R]
                hits += float((~scored[within]) @ share.sum(1))
                total += share.shape[1]
    return hits / total if total else float("nan")


def compare(points: list[dict], methods=("online", "offline"), *, budgets=None,
            replicates: int = REPLICATES, seed: int = 0, interpolate: bool = False) -> dict:
    """Online minus offline at matched KL budgets.

    `points`: one per evaluation with `method`, `seed`, `kl` and per-prompt arrays `win` and,
    where there is an oracle, `oracle_win` (the same prompts in every point); where points
    carry `test_win` (and `test_oracle_win`: the test stage's candidates), those are the test
    scores and only they are chosen among (the others still set the budgets). Include each
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
    # A diverged evaluation can record no finite KL: no budget affords it (and one nan would
    # turn every budget nan), so it is left out and named.
    unplaced = [f"{p['method']} seed {p['seed']} {label(p)}" for p in points
                if not np.isfinite(p["kl"])]
    points = [p for p in points if np.isfinite(p["kl"])]
    groups = {m: [p for p in points if p["method"] == m] for m in methods}
    units = sorted({unit(p) for p in groups[a]} & {unit(p) for p in groups[b]})
    if not units:
        return {"seeds": [], "rows": {}, "budgets": [], "headline_kl": float("nan"),
                "prompts": {}, "unplaced": unplaced}
    seeds, chains = sorted({s for _, s in units}), sorted({c for c, _ in units})
    points = [p for p in points if unit(p) in units]
    groups = {m: [p for p in points if p["method"] == m] for m in methods}
    reached = {m: max(p["kl"] for p in groups[m]) for m in methods}
    least = {m: max(min(p["kl"] for p in groups[m] if unit(p) == u) for u in units)
             for m in methods}  # the least budget at which every seed of m has a checkpoint
    headline = min(reached.values())
    if budgets is None:
        positive = [p["kl"] for p in points if p["kl"] > 0]
        lowest = max(max(least.values()), min(positive, default=1e-3))
        top = max(reached.values())
        budgets = np.geomspace(max(lowest, 1e-3), max(top, lowest * 1.01, 1e-3), 8)
        budgets = sorted({*(float(x) for x in budgets), float(headline)})
    budgets = np.asarray(budgets, float)

    every = groups  # with a test stage: every evaluation, the candidates and the others
    # The budgets above span every evaluation; the curves, the points that are scored.
    points, select_at, test_at, test_key = prompt_sets(points)
    tested = test_key == "test_"
    groups = {m: [p for p in points if p["method"] == m] for m in methods}
    _check_balanced(units)
    rng = np.random.default_rng(seed)
    # Selection-prompt weights per chain (each chain's world has its own prompts); row 0 the
    # prompts as measured, then resamples.
    select_w = {chain: _draws(rng, len(select_at), replicates) for chain in chains}

    judges = ["golden"] + (["oracle"] if all("oracle_win" in p for p in points) else [])
    out = {"seeds": seeds, "chains": len(chains), "units": len(units),
           "budgets": [float(x) for x in budgets], "headline_kl": headline,
           "reached": reached, "least": least, "replicates": replicates, "rows": {},
           "prompts": {"selection": len(select_at), "test": len(test_at)},
           "interpolated": interpolate, "test_stage": tested, "unplaced": unplaced}
    rates, outcomes = {}, {}
    for m in methods:
        def selection(group):  # [C, R + 1]: each point's win rate under its chain's weights
            return np.stack([select_w[p.get("chain", 0)] @ np.asarray(p["win"], float)[select_at]
                             for p in group])

        def test_scores(group):  # {judge: [C, P]}: each point's outcomes on the test prompts
            return {j: np.stack([np.asarray(p[f"{test_key}{key}"], float)[test_at]
                                 for p in group])
                    for j, key in (("golden", "win"), ("oracle", "oracle_win")) if j in judges}

        rates[m], outcomes[m], chosen = _curves(groups[m], budgets, selection(groups[m]),
                                                test_scores(groups[m]), interpolate)
        out.setdefault("peaks", {})[m] = {
            judge: {(f"{s}-u{c}" if c else str(s)): v for (c, s), v in by_unit.items()}
            for judge, by_unit in peaks(groups[m], m).items()}
        if tested:
            out.setdefault("outside_candidates", {})[m] = _outside_share(
                every[m], budgets, selection(every[m]))
        out.setdefault("chosen", {})[m] = [[chosen[u][g] for u in units]
                                           for g in range(len(budgets))]
    chain_of = [c for c, _ in units]
    for judge in judges:
        # [units, budgets, P] per-prompt outcomes of the choices; [units, budgets, R] the test
        # win rates of the choices each selection resample makes.
        table = {m: np.stack([outcomes[m][u][judge] for u in units]) for m in methods}
        resampled = {m: np.stack([rates[m][u][judge][:, 1:] for u in units]) for m in methods}
        if len(chains) > 1:  # how much of the spread the upstream draws account for
            g = int(np.argmin(np.abs(budgets - headline)))
            per_unit = dict(zip(units, (table[a] - table[b])[:, g].mean(1), strict=True))
            split_table = [[per_unit[u] for u in units if u[0] == chain] for chain in chains]
            out.setdefault("variance", {})[judge] = variance_split(split_table)
        rows = []
        for g, budget in enumerate(budgets):
            row = interval(table[a][:, g] - table[b][:, g],
                           resampled[a][:, g] - resampled[b][:, g], chain_of, len(select_at))
            # Past a method's last checkpoint its curve stays there: not a matched budget.
            ended = "; ".join(f"{m}'s runs end at {reached[m]:.3g} nats" for m in methods
                              if reached[m] < budget)
            rows.append({"kl": float(budget), a: float(table[a][:, g].mean()),
                         b: float(table[b][:, g].mean()), **row,
                         "verdict": verdict_of(row["low"], row["high"], a, b),
                         **({"unmatched": ended} if ended else {})})
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
    seeds, chains = len(comparison["seeds"]), comparison.get("chains", 1)
    over = (f"{comparison['prompts']['test']} test prompts and {seeds} seed"
            f"{'s' * (seeds != 1)}" + (" (one seed: prompts only)" if seeds == 1 else
                                       f" (under {HEADLINE_SEEDS} seeds: a rough interval "
                                       "from few degrees of freedom)"
                                       if seeds < HEADLINE_SEEDS else ""))
    if chains > 1:
        over = (f"the differences of {chains} upstream draws (world, SFT, golden and proxy "
                f"seeds; {comparison['prompts']['test']} test prompts and {seeds} policy seeds "
                "in each)")

    def view(r, judge):
        df = f" ({r['df']:.3g} df)" if np.isfinite(r.get("df", np.nan)) else ""
        interval = (f"[{r['low']:+.3f}, {r['high']:+.3f}]{df}" if np.isfinite(r["low"]) else
                    f"(no interval: {r.get('no_interval', 'no spread to estimate')})")
        return f"{judge}: {a} minus {b} {r['difference']:+.3f} {interval}, {r['verdict']}"

    text = (f"At a KL budget of {row['kl']:.3g} nats (the most both methods used), "
            f"{view(row, 'golden judge')}")
    oracle = headline(comparison, "oracle")
    if oracle is not None:
        text += f"; {view(oracle, 'oracle')}"
    if chains > 1:
        crossed_ = ""
    elif seeds == 1:
        crossed_ = ", plus the choice's spread over resampled selection prompts"
    else:
        crossed_ = (", seeds and prompts as crossed random draws, plus the choice's spread over "
                    "resampled selection prompts that the seeds share")
    text = (f"{text}. (95% t-intervals over {over}{crossed_}; checkpoints chosen on "
            f"{comparison['prompts']['selection']} other prompts.)")
    if comparison.get("unplaced"):
        text += (f" Left out for want of a finite KL: {', '.join(comparison['unplaced'])}.")
    split_ = (comparison.get("variance") or {}).get("golden")
    if split_ is not None:
        text += (f" The upstream draws account for {split_['upstream share']:.0%} of the "
                 "variance of the golden judge's difference between seeds at that budget "
                 f"(between draws {split_['between chains']:.2g}, within "
                 f"{split_['within chains']:.2g}; an estimate from {chains} draws).")
    return text
