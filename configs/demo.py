"""The foundation demo: train a small LM to sort its prompt, then sample from it with the cache.

Until the study pipeline exists this is what `make study` runs. It exercises the pieces the
study is built from: a sharded NNX model on a mesh, the jitted update step, the KV-cache
sampler, sequence log-probs and the exact per-token KL to the initial policy.

    python -m alignment_gap.main --config configs/demo.py:mini --workdir /tmp/demo
    python -m alignment_gap.main --config configs/demo.py:mini --workdir /tmp/demo \\
        --config.num_steps=50 --config.model.num_layers=1
"""

import ml_collections

from alignment_gap.presets import meshes, models


def get_config(size: str = "mini") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "demo"  # Which entry point main.py runs.
    c.seed = 0  # Model init, data and sampling seed.
    c.model = models.get_config(size)  # Policy architecture (configs/models.py).
    c.model.max_len = 64
    c.mesh = meshes.get_config("cpu")  # Mesh shape and logical-axis rules (configs/meshes.py).
    c.distributed = meshes.distributed_config()  # jax.distributed start-up (one process here).
    c.alphabet = 10  # Distinct symbols in prompts (token ids 2 .. 2 + alphabet).
    c.prompt_len = 8  # Symbols to sort.
    c.response_len = 9  # Sorted symbols + EOS.
    c.batch_size = 64  # Sequences per update step (global, across processes).
    c.num_steps = 1500  # Update steps (~25 s on 2 cores; ~65% of sampled sorts exact).
    c.learning_rate = 3e-3  # AdamW peak learning rate (linear warm-up, cosine decay).
    c.warmup_steps = 40  # Warm-up steps.
    c.log_every = 50  # Steps between progress lines.
    c.eval_prompts = 256  # Prompts sampled at the end to measure accuracy, KL and speed.
    c.sampling = ml_collections.ConfigDict()
    c.sampling.max_new_tokens = 9  # Longest response sampled.
    c.sampling.temperature = 1.0  # 0: greedy.
    c.sampling.top_k = 0  # 0: off.
    c.sampling.top_p = 1.0  # 1: off.
    c.sampling.eos_id = 1  # End-of-sequence token id.
    c.sampling.pad_id = 0  # Padding token id.
    return c
