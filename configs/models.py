"""Named model sizes, decoder-only, from a laptop `mini` to the paper's T5X XXL scale.

`--config configs/models.py:60m` gives one size alone (used by bench scripts); other config
files embed `get_config(size)` as their `model` field. Parameter counts are checked in
tests/test_configs.py against the nominal size in the name.
"""

import ml_collections

# name: (width, layers, heads, kv_heads, mlp_dim, vocab)
SIZES = {
    # Seconds on a laptop CPU; the synthetic world's tokenizer is small.
    "nano": (32, 2, 4, 4, 128, 512),  # ~66k parameters: the small end of the scaling variant
    "mini": (64, 2, 4, 4, 256, 512),
    "small": (96, 3, 4, 4, 384, 512),  # ~540k: 8x nano, for the CPU scaling variant
    # The shape ../shared/peerbench uses for TRL and Tunix (4 layers, width 128, vocab 512).
    "peer": (128, 4, 4, 4, 512, 512),
    "60m": (512, 8, 8, 8, 2048, 32_128),
    "250m": (1024, 14, 16, 16, 2816, 32_128),
    "770m": (1536, 24, 16, 16, 4096, 32_128),  # T5X Large scale (the paper's proxy model)
    "3b": (2560, 36, 20, 20, 6912, 32_128),  # T5X XL scale
    "11b": (4096, 60, 32, 8, 11_008, 32_128),  # T5X XXL scale (golden model); grouped-query
}


# Sizes that only run on accelerators scan their layers: compile time flat in depth, and with
# remat=full less memory than unrolled layers (README, "Scale without the hardware").
SCANNED = ("770m", "3b", "11b")


def get_config(size: str = "mini") -> ml_collections.ConfigDict:
    if size not in SIZES:
        raise ValueError(f"model size {size!r} is unknown; choose one of {sorted(SIZES)}")
    width, layers, heads, kv_heads, mlp_dim, vocab = SIZES[size]
    c = ml_collections.ConfigDict()
    c.name = size  # Preset this config started from (informational).
    c.vocab_size = vocab  # Tokenizer vocabulary size; ids >= this are an error.
    c.width = width  # Residual stream width (embedding dimension).
    c.num_layers = layers  # Transformer blocks.
    c.num_heads = heads  # Query heads; must divide width.
    c.num_kv_heads = kv_heads  # Key/value heads (grouped-query attention); must divide num_heads.
    c.mlp_dim = mlp_dim  # Hidden size of the gated (SwiGLU) MLP.
    c.max_len = 512  # Longest sequence (prompt + responses) the KV cache and RoPE will see.
    c.rope_theta = 10_000.0  # RoPE base frequency.
    c.norm_eps = 1e-6  # RMSNorm epsilon.
    c.dtype = "float32"  # Compute dtype: float32 on CPU, bfloat16 on TPU/GPU. Params stay float32.
    c.tie_embeddings = False  # Share the input embedding with the LM head.
    c.scan_layers = size in SCANNED  # Stack the blocks and scan them (compile time flat).
    c.remat = "none"  # none | full | save_dots: recompute block activations in the backward.
    return c
