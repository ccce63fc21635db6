"""Named model sizes, decoder-only, from a laptop `mini` to the paper's T5X XXL scale, and the
published shapes of pretrained families (Gemma 3, Qwen 2.5, Qwen 3, Llama 3).

`--config configs/models.py:60m` gives one size alone (used by bench scripts); other config
files embed `get_config(size)` as their `model` field. Parameter counts are checked in
tests/test_configs.py against the nominal size in the name. A pretrained preset describes the
architecture only; its weights come from `init.checkpoint` (`alignment_gap/pretrained`), whose
`config.json` or GGUF metadata must agree with it.
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


# Published shapes (each family's config.json): name -> (width, layers, heads, kv_heads, head_dim,
# mlp_dim, vocab, tied embeddings). Family options follow in FAMILIES.
PRETRAINED = {
    "gemma3_270m": ("gemma3", 640, 18, 4, 1, 256, 2048, 262_144, True),
    "gemma3_1b": ("gemma3", 1152, 26, 4, 1, 256, 6912, 262_144, True),
    "gemma3_4b": ("gemma3", 2560, 34, 8, 4, 256, 10_240, 262_208, True),
    "gemma3_12b": ("gemma3", 3840, 48, 16, 8, 256, 15_360, 262_208, True),
    "gemma3_27b": ("gemma3", 5376, 62, 32, 16, 128, 21_504, 262_208, True),
    "qwen2_5_0_5b": ("qwen2", 896, 24, 14, 2, 64, 4864, 151_936, True),
    "qwen2_5_1_5b": ("qwen2", 1536, 28, 12, 2, 128, 8960, 151_936, True),
    "qwen2_5_3b": ("qwen2", 2048, 36, 16, 2, 128, 11_008, 151_936, True),
    "qwen2_5_7b": ("qwen2", 3584, 28, 28, 4, 128, 18_944, 152_064, False),
    "qwen3_0_6b": ("qwen3", 1024, 28, 16, 8, 128, 3072, 151_936, True),
    "qwen3_1_7b": ("qwen3", 2048, 28, 16, 8, 128, 6144, 151_936, True),
    "qwen3_4b": ("qwen3", 2560, 36, 32, 8, 128, 9728, 151_936, True),
    "qwen3_8b": ("qwen3", 4096, 36, 32, 8, 128, 12_288, 151_936, False),
    "llama3_2_1b": ("llama3", 2048, 16, 32, 8, 64, 8192, 128_256, True),
    "llama3_2_3b": ("llama3", 3072, 28, 24, 8, 128, 8192, 128_256, True),
    "llama3_1_8b": ("llama3", 4096, 32, 32, 8, 128, 14_336, 128_256, False),
}

# What a family is, whatever its size (the checkpoint importers set these too): Gemma 3 has
# GeGLU, (1 + scale) norms before and after attention and MLP, QK-norm and embeddings times
# sqrt(width); Qwen 2.5 QKV biases; Qwen 3 QK-norm; Llama 3 none of them.
FAMILY_ARCHITECTURE = {
    "gemma3": dict(qk_norm=True, post_norms=True, norm_plus_one=True, mlp_activation="gelu_tanh",
                   embed_scale=True),
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True),
    "llama3": {},
}
FAMILIES = {
    # 5 local layers (window 512, RoPE base 1e4) : 1 global (base 1e6).
    "gemma3": dict(FAMILY_ARCHITECTURE["gemma3"], sliding_window=512, global_every=6,
                   rope_theta=1e6, local_rope_theta=1e4, norm_eps=1e-6),
    "qwen2": dict(FAMILY_ARCHITECTURE["qwen2"], rope_theta=1e6, norm_eps=1e-6),
    "qwen3": dict(FAMILY_ARCHITECTURE["qwen3"], rope_theta=1e6, norm_eps=1e-6),
    "llama3": dict(rope_theta=5e5, rope_scaling="llama3", rope_scaling_factor=32.0,
                   rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                   rope_original_max_len=8192, norm_eps=1e-5),
}
# Per-model departures from the family.
PRETRAINED_OPTIONS = {
    # Larger Gemma 3 models: window 1024, global RoPE linearly scaled by 8; the 27b's queries
    # are scaled by (width / heads) ** -0.5 = 168 ** -0.5, not head_dim ** -0.5.
    "gemma3_4b": dict(sliding_window=1024, rope_scaling="linear", rope_scaling_factor=8.0),
    "gemma3_12b": dict(sliding_window=1024, rope_scaling="linear", rope_scaling_factor=8.0),
    "gemma3_27b": dict(sliding_window=1024, rope_scaling="linear", rope_scaling_factor=8.0,
                       query_scale=168.0**-0.5),
    "llama3_1_8b": dict(rope_scaling_factor=8.0),
}

# Sizes that only run on accelerators scan their layers: compile time flat in depth, and with
# remat=full less memory than unrolled layers (README, "Scale without the hardware").
SCANNED = ("770m", "3b", "11b")


def get_config(size: str = "mini") -> ml_collections.ConfigDict:
    if size in PRETRAINED:
        return _pretrained(size)
    if size not in SIZES:
        raise ValueError(f"model size {size!r} is unknown; choose one of "
                         f"{sorted(SIZES) + sorted(PRETRAINED)}")
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
    # Pretrained architectures (alignment_gap/models/transformer.py); the defaults are ours.
    c.head_dim = 0  # Width of one head; 0: width // num_heads.
    c.qkv_bias = False  # Biases on the query, key and value projections (Qwen 2.5).
    c.qk_norm = False  # RMSNorm of each head's queries and keys (Qwen 3, Gemma 3).
    c.post_norms = False  # Norms after attention and MLP as well as before (Gemma 3).
    c.norm_plus_one = False  # RMSNorm times (1 + scale) (Gemma).
    c.mlp_activation = "silu"  # silu (SwiGLU) | gelu_tanh (GeGLU, Gemma).
    c.embed_scale = False  # Embeddings times sqrt(width) (Gemma).
    c.query_scale = 0.0  # Attention logit scale; 0: head_dim ** -0.5.
    c.sliding_window = 0  # >0: local layers attend to the last sliding_window positions.
    c.global_every = 0  # With a window: every n-th layer is global; 0: all local.
    c.local_rope_theta = 0.0  # RoPE base of local layers; 0: rope_theta.
    c.rope_scaling = "none"  # none | linear | llama3 (global layers' frequencies).
    c.rope_scaling_factor = 1.0
    c.rope_low_freq_factor = 1.0  # llama3 scaling.
    c.rope_high_freq_factor = 4.0  # llama3 scaling.
    c.rope_original_max_len = 8192  # llama3 scaling: the pre-training context length.
    return c


def _pretrained(name: str) -> ml_collections.ConfigDict:
    family, width, layers, heads, kv_heads, head_dim, mlp_dim, vocab, tied = PRETRAINED[name]
    c = get_config("mini")
    c.update(name=name, vocab_size=vocab, width=width, num_layers=layers, num_heads=heads,
             num_kv_heads=kv_heads, head_dim=head_dim, mlp_dim=mlp_dim, tie_embeddings=tied,
             scan_layers=True)
    c.update(FAMILIES[family])
    c.update(PRETRAINED_OPTIONS.get(name, {}))
    return c
