"""Pairwise preference models: the golden model (on D_initial) and the proxy (on D_golden).

    python -m alignment_gap.main --config configs/preference_model.py:golden_mini --workdir DIR
    python -m alignment_gap.main --config configs/preference_model.py:proxy_mini --workdir DIR \\
        --config.data.comparisons=d_golden-KEY --config.init_from=workdir/sft
(`d_golden-<key>`: the dataset a study's relabel stage writes in `data.dir`.)
Variants: `tiny` (tests), `golden_mini` / `proxy_mini` (the CPU study), or a model size.

The definitions live in `alignment_gap/presets/preference_model.py` (the library builds on
them; this file is the config you pass with `--config`, loaded by path).
"""

from alignment_gap.presets.preference_model import *  # noqa: F403
from alignment_gap.presets.preference_model import get_config  # noqa: F401
