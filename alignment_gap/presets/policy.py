"""The policy trainer's base config and its variants, online and offline (passed as
`configs/policy.py`)."""

import ml_collections

from alignment_gap.presets import common, models

VARIANTS = {  # name: (source, steps, global batch, learning rate, microbatches)
    "online_tiny": ("online", 6, 8, 1e-4, 2),
    "offline_tiny": ("offline", 6, 8, 1e-4, 2),
    "online_mini": ("online", 400, 32, 2e-4, 4),
    "offline_mini": ("offline", 400, 32, 5e-4, 4),
}


def get_config(variant: str = "online_mini") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"policy variant {variant!r} is unknown; use one of {sorted(VARIANTS)}")
    source, steps, batch, lr, microbatches = VARIANTS[variant]
    c = ml_collections.ConfigDict()
    c.task = "policy"  # Which trainer main.py runs.
    common.add_runtime(c, model_size="mini")
    common.add_training(c, steps=steps, batch_size=batch, learning_rate=lr,
                        warmup_steps=max(1, steps // 20))
    c.end_lr_fraction = 1.0  # Constant after warm-up, as the paper's policy runs.
    # Gradient accumulation: each update (and online, the proxy's scoring) runs as this many
    # sequential slices of the batch - the same update, less activation memory. On CPU, slices
    # that fit cache run faster: the mini update takes 0.050 s in 4 slices vs 0.079 s in one
    # (bench/RESULTS.md).
    c.microbatches = microbatches
    c.source = source  # online | offline: the one switch between the two paths.
    c.loss = "ipo"  # ipo | dpo | slic | best_of_two (alignment_gap/losses.py).
    c.beta = 0.1  # KL regularisation strength.
    # Run directory of the SFT model: the policy's start and the reference (empty with
    # init.checkpoint: both are the pretrained model).
    c.sft_checkpoint = ""
    c.proxy_checkpoint = ""  # online: run directory of the proxy preference model.
    c.proxy_model = models.get_config("mini")  # online: the proxy's architecture.
    c.record_stream = False  # online: write every batch to <workdir>/stream (D_online).
    c.replay = ml_collections.ConfigDict()
    c.replay.stream = ""  # offline: a recorded stream directory to replay instead of a dataset.
    c.replay.order = "tandem"  # tandem (as recorded) | shuffle | window (shuffle within k).
    c.replay.window = 4  # window: batches per shuffled window.
    c.sampling = ml_collections.ConfigDict()
    c.sampling.temperature = 1.0  # Policy sampling temperature (online).
    c.sampling.top_k = 0  # 0: off.
    c.sampling.top_p = 1.0  # 1: off.
    c.eval = ml_collections.ConfigDict()
    c.eval.golden_checkpoint = ""  # Run directory of the golden preference model; empty: no eval.
    c.eval.golden_model = models.get_config("mini")  # The golden model's architecture.
    c.eval.opponent_checkpoint = ""  # Run directory of the opponent policy; empty: the SFT policy.
    # An opponent of another architecture (one opponent for policies of several sizes) is named
    # by adding eval.opponent_model (a model config, as eval.golden_model); absent: the policy's.
    c.eval.prompts = 512  # Fixed test prompts for win rates (the paper uses 2048).
    c.eval.kl_prompts = 256  # Of those, prompts whose samples give the KL budget (paper: 256).
    c.eval.pairs = 256  # Held-out comparisons for classifier accuracy and likelihood drift.
    # Stop before num_steps once the golden win rate has been below its best at this many
    # evaluations in a row (the curve has turned; 0: off), or once the KL passes kl_cap (0: off).
    c.eval.stop_after_falls = 0
    c.eval.kl_cap = 0.0
    c.model.max_len = c.proxy_model.max_len = c.eval.golden_model.max_len = 128
    if variant.endswith("tiny"):
        c.data.train_pairs, c.data.validation_pairs, c.data.test_pairs = 200, 32, 32
        c.log_every, c.checkpoint_every = 2, 3
        c.eval.prompts, c.eval.kl_prompts, c.eval.pairs = 16, 8, 16
    return c
