"""SFT of the policy (and reference) on the comparisons' responses, winners and losers alike.

    python -m alignment_gap.main --config configs/sft.py:mini --workdir workdir/sft
Variants: `tiny` (tests, seconds), `mini` (the CPU study), `60m` .. `11b` (model size only).

The definitions live in `alignment_gap/presets/sft.py` (the library builds on them; this file
is the config you pass with `--config`, loaded by path).
"""

from alignment_gap.presets.sft import *  # noqa: F403
from alignment_gap.presets.sft import get_config  # noqa: F401
