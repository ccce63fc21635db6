"""The config sections every trainer shares (runtime, data, training), for config files here.

The definitions live in `alignment_gap/presets/common.py`, which the library builds on.
"""

from alignment_gap.presets.common import *  # noqa: F403
