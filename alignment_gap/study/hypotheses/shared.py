"""What the hypothesis analyses share: their result types, rows of a set of runs, peaks, tables,
and the intervals their verdicts follow from: matched-KL differences of two sets of runs
(`differences.compare`), and Wilson intervals for accuracies counted over pairs. A verdict
agrees or differs only where its interval decides; otherwise it is undecided (None)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from scipy.special import stdtrit

from alignment_gap.study import crossed, differences, report, results

Z = 1.96  # two-sided 95% normal quantile


@dataclasses.dataclass
class Verdict:
    claim: str  # What the paper found.
    ours: str  # What this run found, with its numbers.
    agree: bool | None  # None: too few runs to say.


@dataclasses.dataclass
class Finding:
    name: str
    title: str
    lines: list[str]  # The report section's Markdown body (figures written beside it).
    verdicts: list[Verdict]


def labelled(rows: list[dict], runs: dict) -> list[dict]:
    """The rows of each label's stages, with `method` set to the label."""
    out = []
    for label, stages in runs.items():
        names = {s.name for s in stages}
        out += [dict(r, method=label) for r in rows if r["stage"] in names]
    return out


def outcome_points(plan, runs: dict) -> list[dict]:
    """Per-prompt outcomes of each label's stages (`results.outcome_points`), `method` set to
    the label: the input of `differences.compare` for a hypothesis's own runs."""
    return [dict(p, method=label) for label, stages in runs.items()
            for p in results.outcome_points(stages, plan.workdir, group=None)]


def scored_points(plan, runs: dict) -> list[dict]:
    """`outcome_points` as the verdicts score them: the test stage's scores where every label's
    runs have them, otherwise each evaluation's own prompts split in two (`differences.split`)."""
    points = outcome_points(plan, runs)
    if not all("test_win" in p for p in points):
        points = [{k: v for k, v in p.items() if not k.startswith("test_")} for p in points]
    return points


def run_peaks(points: list[dict], label: str, judge: str = "golden") -> list[float]:
    """Each run of `label`'s peak (`differences.peaks`: its best checkpoint by the golden judge
    on the selection prompts, scored on the test prompts; the oracle: its score of that
    choice)."""
    return list(differences.peaks(points, label, key=lambda p: p["stage"]).get(judge, {})
                .values())


def peak_table(points, labels, describe: dict) -> list[str]:
    lines = ["| runs | what | golden win rate (peak) | oracle win rate (there) | runs |",
             "| --- | --- | --- | --- | --- |"]
    for label in labels:
        n = len({p["stage"] for p in points if p["method"] == label})
        by_seed = differences.peaks(points, label)
        golden, oracle = (report.format_interval(results.mean_ci(list(
            by_seed.get(judge, {}).values()))) for judge in ("golden", "oracle"))
        lines.append(f"| {label} | {describe.get(label, '')} | {golden} | {oracle} | {n} |")
    return lines + ["", "Peaks are descriptive: each seed's best checkpoint by the golden judge "
                    "at whatever KL it reached, chosen on the selection prompts and scored on "
                    "the test prompts, and the oracle's score of that checkpoint (mean +- 95% "
                    "half-width over seeds); the verdicts compare at matched KL."]


def figure(rows, labels, workdir: str, filename: str, title: str) -> str:
    report.frontier_plot(rows, os.path.join(workdir, filename), methods=labels, title=title)
    return f"![{filename}]({filename})"


def runs_section(rows, points, labels, describe: dict, workdir: str, filename: str,
                 title: str) -> list[str]:
    """The frontier figure of these runs (`rows`), then their peak table (`points`:
    `scored_points`)."""
    return [figure(rows, labels, workdir, filename, title), "",
            *peak_table(points, labels, describe)]


def num(x: float, digits: int = 3) -> str:
    return "-" if not np.isfinite(x) else f"{x:.{digits}f}"


def matched(plan, runs: dict, a: str, b: str) -> dict:
    """`a` minus `b` at the largest KL budget both reached, as the main verdict is made
    (checkpoints chosen on half the evaluation prompts, scored on the other half, t-interval
    with seeds and prompts crossed): {judge: row} for the golden judge and the oracle."""
    points = scored_points(plan, {a: runs[a], b: runs[b]})
    comparison = differences.compare(points, methods=(a, b))
    rows = {judge: differences.headline(comparison, judge) for judge in ("golden", "oracle")}
    return {judge: row for judge, row in rows.items()
            if row is not None and np.isfinite(row["difference"])}


# A claim that two sets of runs are alike ("roughly matches", "flat") agrees only where the
# golden interval of their difference lies inside +-this (win-rate points): an interval that
# merely holds 0 is undecided, not agreement.
EQUAL_MARGIN = 0.05
EQUAL, UNDECIDED = "equal", "undecided"


def matched_verdict(claim: str, plan, runs: dict, pairs, decide, names=None,
                    alike=()) -> Verdict:
    """A verdict on one or more matched differences (`matched` of each (a, b) in `pairs`): its
    words are theirs (`names` renames a label there), its answer `decide(sides)` on their
    golden-judge sides, one argument per pair (None when some pair reached no common budget).
    The pairs listed in `alike` (indices) are read by `alike_side` instead of `side`."""
    names = names or {}
    found = [matched(plan, runs, a, b) for a, b in pairs]
    sides = [alike_side(rows) if i in alike else side(rows) for i, rows in enumerate(found)]
    text = "; ".join(difference_text(rows, names.get(a, a), names.get(b, b))
                     for rows, (a, b) in zip(found, pairs, strict=True))
    if alike:
        text += f" (alike: the golden interval inside +-{EQUAL_MARGIN:g})"
    return Verdict(claim, text, None if None in sides else decide(*sides))


def side(rows: dict, judge: str = "golden") -> int | None:
    """+1 where the first set of runs is better by `judge`'s interval, -1 where the second is,
    0 where it is undecided; None without a matched budget."""
    row = rows.get(judge)
    return None if row is None else interval_side(row["low"], row["high"])


def alike_side(rows: dict, judge: str = "golden") -> int | str | None:
    """+1 / -1 as `side`; EQUAL where the interval lies inside +-EQUAL_MARGIN, UNDECIDED where
    it holds 0 but reaches past that; None without a matched budget."""
    found = side(rows, judge)
    if found != 0:
        return found
    row = rows[judge]
    return EQUAL if -EQUAL_MARGIN < row["low"] and row["high"] < EQUAL_MARGIN else UNDECIDED


def interval_side(low: float, high: float, zero: float = 0.0) -> int:
    """+1 if the interval lies above `zero`, -1 if below, 0 if it holds it."""
    return 1 if low > zero else -1 if high < zero else 0


def difference_text(rows: dict, a: str, b: str) -> str:
    """`a minus b at KL k: golden +d [lo, hi] verdict; oracle ...` (the verdict row's words)."""
    if not rows:
        return f"{a} and {b} reach no KL budget in common"
    return f"{a} minus {b} at KL {next(iter(rows.values()))['kl']:.3g}: {judges_text(rows)}"


def judges_text(rows: dict) -> str:
    """`golden +d [lo, hi] verdict; oracle ...` of {judge: matched-KL row}."""
    def interval(r):
        return (f"[{r['low']:+.3f}, {r['high']:+.3f}]" if np.isfinite(r["low"]) else
                f"(no interval: {r.get('no_interval', 'no spread to estimate')})")

    return "; ".join(f"{judge} {r['difference']:+.3f} {interval(r)} {r['verdict']}"
                     for judge, r in rows.items())


def proportion_interval(p: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy `p` counted over `n` pairs (inside [0, 1] even
    near them; a tie counted as half a hit varies less than a hit or a miss, so it is, if
    anything, wide)."""
    if not n > 0 or not np.isfinite(p):
        return np.nan, np.nan
    z2n = Z * Z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = Z * np.sqrt(p * (1 - p) / n + z2n / (4 * n)) / (1 + z2n)
    return centre - half, centre + half


def seeds_and_pairs_interval(by_seed, pairs: int) -> tuple[float, float]:
    """95% interval of a mean over seeds of accuracies each counted on the same `pairs` pairs:
    the seeds' spread (each seed's accuracy carries its own pair-by-pair noise too) plus the
    shared pairs' binomial variance p (1 - p) / pairs, which the seeds' spread cannot show (every
    seed reads the same pairs) and which bounds that component from above; a t quantile with
    Satterthwaite's degrees of freedom, clipped to [0, 1] and never narrower than Wilson's over
    the pairs (seeds that agree at 0 or 1 would otherwise give a zero-width interval). One seed:
    Wilson over the pairs."""
    values = np.asarray([v for v in by_seed if np.isfinite(v)], float)
    if values.size == 0 or not pairs > 0:
        return np.nan, np.nan
    p = float(values.mean())
    if values.size == 1:
        return proportion_interval(p, pairs)
    var, df = crossed.combine([(float(values.var(ddof=1)) / values.size, values.size - 1),
                               (p * (1 - p) / pairs, pairs - 1)])
    half = float(stdtrit(df, 0.975)) * np.sqrt(var) if var > 0 else 0.0
    low, high = proportion_interval(p, pairs)
    return min(low, max(0.0, p - half)), max(high, min(1.0, p + half))


def difference_interval(p: float, n: int, q: float, m: int) -> tuple[float, float]:
    """95% interval of `p - q`, accuracies over `n` and `m` pairs taken as independent
    (Newcombe's hybrid of the two Wilson intervals): for accuracies on different pairs. On
    the same pairs, use `classification.paired_difference`, which counts that two
    classifiers' hits tend to go together."""
    (lp, up), (lq, uq) = proportion_interval(p, n), proportion_interval(q, m)
    d = p - q
    return d - np.hypot(p - lp, uq - q), d + np.hypot(up - p, q - lq)


def interval_text(low: float, high: float) -> str:
    return f"[{low:.3f}, {high:.3f}]"
