"""The paper's hypotheses (PAPER.md, "Hypotheses tested") as study variants.

Each module adds its runs to the study's `Plan` (`add_stages`) - sharing every stage it has in
common with the main study, so nothing is trained twice - and reads them back (`analyse`) into
a `Finding`: a report section with its figure (golden judge and exact oracle side by side) and
verdict rows comparing what the paper found with what this run found.
"""

from __future__ import annotations

import dataclasses
import importlib

from alignment_gap.config_checks import ConfigError

NAMES = ("coverage", "quality", "classification", "noncontrastive", "scaling")


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


def get(name: str):
    if name not in NAMES:
        raise ConfigError(f"config.hypotheses: {name!r} is unknown; use some of {NAMES}")
    return importlib.import_module(f"alignment_gap.study.hypotheses.{name}")
