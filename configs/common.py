"""The config sections every trainer shares (runtime, data, training).

The definitions live in `alignment_gap/presets/common.py` (the library builds on them; this file
is the config you pass with `--config`, loaded by path).
"""

from alignment_gap.presets.common import *  # noqa: F403
from alignment_gap.presets.common import get_config  # noqa: F401
