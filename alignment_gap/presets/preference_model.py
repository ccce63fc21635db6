"""The preference-model trainer's base config and its variants (passed as
`configs/preference_model.py`)."""

import ml_collections

from alignment_gap.presets import common

VARIANTS = {  # name: (model size, steps, global batch, learning rate)
    "tiny": ("mini", 20, 8, 1e-3),
    "golden_mini": ("mini", 3000, 32, 1e-3),
    "proxy_mini": ("mini", 2000, 32, 1e-3),
}


def get_config(variant: str = "golden_mini") -> ml_collections.ConfigDict:
    size, steps, batch, lr = common.trainer_variant(VARIANTS, variant, (4000, 32, 1e-4),
                                                    "preference_model")
    c = ml_collections.ConfigDict()
    c.task = "preference_model"  # Which trainer main.py runs.
    common.add_runtime(c, model_size=size)
    common.add_training(c, steps=steps, batch_size=batch, learning_rate=lr,
                        warmup_steps=max(1, steps // 20))
    c.init_from = ""  # Run directory of a language model (e.g. SFT) to start the backbone from.
    c.eval_batches = 16  # Validation batches per evaluation (at each checkpoint).
    c.patience = 3  # Evaluations without improvement before stopping (validation plateau).
    c.min_improvement = 0.002  # Accuracy gain that counts as improvement.
    if variant == "tiny":
        c.data.train_pairs, c.data.validation_pairs, c.data.test_pairs = 200, 32, 32
        c.log_every, c.checkpoint_every, c.eval_batches = 5, 10, 2
    return c
