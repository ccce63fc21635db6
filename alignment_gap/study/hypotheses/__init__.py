"""The paper's hypotheses (PAPER.md, "Hypotheses tested") as study variants.

Each module adds its runs to the study's `Plan` (`add_stages`) - sharing every stage it has in
common with the main study, so nothing is trained twice - and reads them back (`analyse`) into
a `Finding`: a report section with its figure (golden judge and exact oracle side by side) and
verdict rows comparing what the paper found with what this run found.
"""

from __future__ import annotations

from alignment_gap.errors import ConfigError
from alignment_gap.presets.hypotheses import HYPOTHESES
from alignment_gap.study.hypotheses import (
    classification,
    coverage,
    noncontrastive,
    quality,
    scaling,
)

MODULES = {m.NAME: m for m in (coverage, quality, classification, noncontrastive, scaling)}


def get(name: str):
    if name not in HYPOTHESES:
        raise ConfigError(f"config.hypotheses: {name!r} is unknown; use some of {HYPOTHESES}")
    return MODULES[name]
