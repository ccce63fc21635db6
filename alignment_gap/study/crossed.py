"""The variance of a mean over a seeds x prompts table, both of them random draws.

The study's difference at a KL budget is the mean of d[s, p]: seed s's online outcome on test
prompt p minus its offline outcome (every seed scores the same prompts). Under the crossed
random-effects model d[s, p] = mu + a_s + b_p + e_sp, the mean's variance is
var(a) / S + var(b) / P + var(e) / (S P). The two-way ANOVA mean squares estimate it:
(MS_seeds + MS_prompts - MS_residual) / (S P), with Satterthwaite's degrees of freedom for
the t quantile. Resampling seeds and prompts together instead (the pigeonhole bootstrap, Owen
2007, which this study used before 2026-12-07) counts var(e) about three times, not once, and
on binary outcomes var(e) is most of the variance: its intervals were too wide, and a real
difference printed as undecided (`bench/verdict_coverage.py` measures both; bench/RESULTS.md).

Pure numpy; `variance` takes the table, `combine` adds independent parts.
"""

from __future__ import annotations

import numpy as np


def variance(d) -> tuple[float, float]:
    """(variance of d's grand mean, its degrees of freedom) for a [seeds, prompts] table.

    The seed and prompt components are set to zero where their mean square falls below the
    residual's (a variance cannot be negative; REML does the same on a balanced table), so the
    variance is then the other factor's alone: MS_prompts / (S P) with P - 1 degrees of
    freedom, MS_seeds / (S P) with S - 1, or, with neither, the table's pooled spread. One
    seed: the prompts' spread only (a seed effect cannot be told from the mean). nan where
    the table holds nan or fewer than two prompts."""
    d = np.asarray(d, float)
    seeds, prompts = d.shape
    if prompts < 2 or not np.isfinite(d).all():
        return float("nan"), float("nan")
    by_prompt = d.mean(0)
    if seeds == 1:
        return float(by_prompt.var(ddof=1) / prompts), float(prompts - 1)
    by_seed = d.mean(1)
    cells = seeds * prompts
    ms_seeds = prompts * float(by_seed.var(ddof=1))
    ms_prompts = seeds * float(by_prompt.var(ddof=1))
    residual = d - by_seed[:, None] - by_prompt[None, :] + d.mean()
    ms_residual = float((residual ** 2).sum()) / ((seeds - 1) * (prompts - 1))
    seed_part, prompt_part = ms_seeds > ms_residual, ms_prompts > ms_residual
    if seed_part and prompt_part:
        parts = [(ms_seeds / cells, seeds - 1), (ms_prompts / cells, prompts - 1),
                 (-ms_residual / cells, (seeds - 1) * (prompts - 1))]
    elif seed_part or prompt_part:
        parts = [(ms_seeds / cells, seeds - 1) if seed_part else
                 (ms_prompts / cells, prompts - 1)]
    else:
        parts = [(float(d.var(ddof=1)) / cells, cells - 1)]
    return combine(parts)


def combine(parts) -> tuple[float, float]:
    """Sum of independent variance estimates [(value, degrees of freedom)] and Satterthwaite's
    degrees of freedom for it (inf where every part is exact, i.e. zero)."""
    value = float(sum(v for v, _ in parts))
    spread = sum(v * v / df for v, df in parts if df > 0)
    return value, (value * value / spread if spread > 0 else float("inf"))
