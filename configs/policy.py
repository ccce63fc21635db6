"""Policy optimisation from the SFT policy, online (proxy-labelled samples) or offline.

    python -m alignment_gap.main --config configs/policy.py:online_mini --workdir DIR \\
        --config.sft_checkpoint=workdir/sft --config.proxy_checkpoint=workdir/proxy
    python -m alignment_gap.main --config configs/policy.py:offline_mini --workdir DIR \\
        --config.sft_checkpoint=workdir/sft --config.data.comparisons=d_golden-KEY
`data.comparisons` names a relabelled dataset in `data.dir` (a study's relabel stage writes
`d_golden-<key>`, the key of its stage directory); empty: the world's D_initial.
Variants: `online_tiny` / `offline_tiny` (tests), `online_mini` / `offline_mini` (CPU study).
Swapping online for offline is the one field `source`.

The definitions live in `alignment_gap/presets/policy.py` (the library builds on them; this file
is the config you pass with `--config`, loaded by path).
"""

from alignment_gap.presets.policy import *  # noqa: F403
from alignment_gap.presets.policy import get_config  # noqa: F401
