"""The SFT trainer's base config and its variants (passed as `configs/sft.py`)."""

import ml_collections

from alignment_gap.presets import common

VARIANTS = {  # name: (model size, steps, global batch, learning rate)
    "tiny": ("mini", 20, 8, 3e-3),
    "mini": ("mini", 1500, 32, 3e-3),
}


def get_config(variant: str = "mini") -> ml_collections.ConfigDict:
    size, steps, batch, lr = common.trainer_variant(VARIANTS, variant, (4000, 64, 1e-4), "sft")
    c = ml_collections.ConfigDict()
    c.task = "sft"  # Which trainer main.py runs.
    common.add_runtime(c, model_size=size)
    common.add_training(c, steps=steps, batch_size=batch, learning_rate=lr,
                        warmup_steps=max(1, steps // 20))
    c.eval_batches = 8  # Validation batches per evaluation (at each checkpoint).
    if variant == "tiny":
        c.data.train_pairs, c.data.validation_pairs, c.data.test_pairs = 200, 32, 32
        c.log_every, c.checkpoint_every, c.eval_batches = 5, 10, 2
    return c
