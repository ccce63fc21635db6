"""Sections every trainer config shares: data, optimiser, loop. Each field is commented once."""

import ml_collections

from alignment_gap.presets import meshes, models


def data_config() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.kind = "synthetic"  # synthetic | tldr | hh | arena (validation/test carved if unpublished)
    d.dir = "workdir/data"  # TFDS data_dir: built datasets and the synthetic tokenizer live here.
    d.manual_dir = ""  # tldr / hh / arena: directory holding the published files.
    d.hh_subset = "helpful-base"  # hh: which subset directory.
    d.comparisons = ""  # Name of a relabelled comparisons dataset in dir (e.g. D_golden).
    d.sft_source = "comparisons"  # synthetic: SFT on comparisons (both sides) or demonstrations.
    d.world_seed = 0  # synthetic: which world (posts, writers, labels).
    d.label_temperature = 0.25  # synthetic: Bradley-Terry temperature of the labels (noise).
    d.train_pairs = 20_000  # synthetic: D_initial train size (and prompt set size).
    d.validation_pairs = 1_000  # synthetic: validation size.
    d.test_pairs = 1_000  # synthetic: test size.
    # A sentencepiece .model, a tokenizer.json, a Hugging Face directory or a .gguf file; empty:
    # init.checkpoint's, or (synthetic) one trained on the world.
    d.tokenizer = ""
    d.vocab_size = 512  # Pieces of the trained synthetic tokenizer (<= model.vocab_size).
    d.prompt_len = 64  # Prompt tokens (left-padded, long prompts keep their end).
    d.response_len = 24  # Response tokens including EOS (right-padded).
    d.num_threads = 2  # grain reader threads per process.
    return d


def add_training(c, *, steps, batch_size, learning_rate, warmup_steps):
    """Optimiser and loop fields, shared by every trainer."""
    c.seed = 0  # Initialisation, data order and sampling seed.
    c.batch_size = batch_size  # Global examples (pairs, or sequences for SFT) per update.
    c.num_steps = steps  # Update steps.
    c.learning_rate = learning_rate  # AdamW peak learning rate.
    c.warmup_steps = warmup_steps  # Linear warm-up steps.
    c.end_lr_fraction = 0.1  # Cosine decay ends at this fraction of the peak.
    c.weight_decay = 0.0  # AdamW decoupled weight decay (of weights, not norm scales or biases).
    c.grad_clip = 1.0  # Global-norm gradient clipping (0: off).
    c.log_every = 50  # Steps between metric writes and progress lines.
    c.checkpoint_every = 500  # Steps between checkpoints (and at the end).
    c.max_to_keep = 2  # Checkpoints kept.
    return c


def add_runtime(c, model_size="mini", mesh="cpu"):
    c.model = models.get_config(model_size)  # Architecture of the trained model.
    c.init = ml_collections.ConfigDict()
    # Pretrained weights to start from: hf:DIR (Hugging Face), gguf:FILE, or a bare path. The
    # model config must be the checkpoint's architecture (its preset, e.g. gemma3_270m); a
    # preference model takes its trunk. data.tokenizer defaults to the checkpoint's tokenizer.
    c.init.checkpoint = ""
    c.mesh = meshes.get_config(mesh)  # Mesh shape and logical-axis rules.
    c.distributed = meshes.distributed_config()  # jax.distributed start-up.
    c.data = data_config()
    return c


def trainer_variant(variants: dict, variant: str, default: tuple, trainer: str) -> tuple:
    """A trainer preset's settings: its own variant, else a model size (`presets/models.py`)
    with `default`'s steps, batch and learning rate."""
    if variant in variants:
        return variants[variant]
    if variant not in (*models.SIZES, *models.PRETRAINED):
        raise ValueError(f"{trainer} variant {variant!r} is unknown; use one of "
                         f"{sorted(variants)} or a model size, one of "
                         f"{sorted(models.SIZES) + sorted(models.PRETRAINED)}")
    return (variant, *default)
