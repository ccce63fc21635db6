"""Mesh shapes and logical-axis rules: `--config configs/meshes.py:fsdp`.

The definitions live in `alignment_gap/presets/meshes.py` (the library builds on them; this file
is the config you pass with `--config`, loaded by path).
"""

from alignment_gap.presets.meshes import *  # noqa: F403
from alignment_gap.presets.meshes import get_config  # noqa: F401
