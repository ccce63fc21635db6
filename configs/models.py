"""Named model sizes and pretrained architectures: `--config configs/models.py:60m`.

The definitions live in `alignment_gap/presets/models.py` (the library builds on them; this file
is the config you pass with `--config`, loaded by path).
"""

from alignment_gap.presets.models import *  # noqa: F403
from alignment_gap.presets.models import get_config  # noqa: F401
