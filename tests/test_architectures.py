"""Pretrained architectures as options of the one transformer: sliding windows, per-kind RoPE,
QK-norm, post norms, biases, GeGLU, scaled embeddings, RoPE scaling (numbers against Hugging Face
checkpoints are in test_pretrained.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignment_gap import sharding
from alignment_gap.models.transformer import TransformerConfig, rope_frequencies
from alignment_gap.sampling import Sampler, SamplingConfig
from tests.conftest import random_prompts
from tests.helpers import language_model, sample_unsharded, scanned_copy

# Gemma 3's options on the mini shape: layer 0 local (window 3), layer 1 global.
GEMMA_LIKE = dict(head_dim=8, num_kv_heads=2, qk_norm=True, post_norms=True, norm_plus_one=True,
                  mlp_activation="gelu_tanh", embed_scale=True, query_scale=12.0**-0.5,
                  sliding_window=3, global_every=2, local_rope_theta=1e4, rope_theta=1e6,
                  tie_embeddings=True)
QWEN2_LIKE = dict(qkv_bias=True, num_kv_heads=2, rope_theta=1e6)
LLAMA3_LIKE = dict(num_kv_heads=2, rope_theta=5e5, rope_scaling="llama3", rope_scaling_factor=8.0,
                   rope_original_max_len=16)
ARCHITECTURES = {"gemma3": GEMMA_LIKE, "qwen2": QWEN2_LIKE, "llama3": LLAMA3_LIKE}


def _randomised(lm, seed=1):
    """Every parameter random, so that zero biases or unit norms hide nothing."""
    state = nnx.state(lm, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
           for x, k in zip(leaves, keys, strict=True)]
    nnx.update(lm, jax.tree.unflatten(treedef, new))
    return lm


def _logits(lm, tokens, mask):
    return np.asarray(lm(jnp.asarray(tokens), jnp.asarray(mask))[0])


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_cached_sampler_equals_full_recompute_with_prompts_longer_than_the_window(mini_config,
                                                                                   name):
    lm, _, _ = language_model(mini_config, **ARCHITECTURES[name])
    _randomised(lm)
    prompts = random_prompts(np.random.default_rng(0), 6, 9, 512)  # longer than the window
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, eos_id=-1)
    graphdef, state = nnx.split(lm)
    cached, naive = (sample_unsharded(graphdef, state, *prompts, jax.random.key(3), cfg, c)
                     for c in (True, False))
    np.testing.assert_array_equal(cached.tokens, naive.tokens)
    np.testing.assert_allclose(cached.logprobs, naive.logprobs, atol=5e-5)


@pytest.mark.slow
def test_scanned_layers_of_both_kinds_equal_unrolled_ones(mini_config):
    """Mixed local and global layers scan with a per-layer flag: training logits and the
    cached sampler on a mesh equal the unrolled model's (one kind of layer scans as before)."""
    options = GEMMA_LIKE
    lm, mesh, rules = language_model(mini_config, (2, 2, 2), **options)
    _randomised(lm)
    scanned, _, _ = scanned_copy(lm, mini_config, (2, 2, 2), **options)
    tokens, mask = random_prompts(np.random.default_rng(1), 4, 10, 512)
    with sharding.use(mesh, rules):
        np.testing.assert_allclose(_logits(scanned, tokens, mask), _logits(lm, tokens, mask),
                                   atol=1e-4)
    cfg = SamplingConfig(max_new_tokens=5, temperature=1.0, eos_id=-1)
    batch = sharding.global_batch((tokens, mask), mesh, rules)
    unrolled_out, scanned_out = (jax.device_get(Sampler(m, mesh, rules, cfg)(
        nnx.state(m), *batch, jax.random.key(2))) for m in (lm, scanned))
    np.testing.assert_array_equal(scanned_out.tokens, unrolled_out.tokens)


def test_a_local_layer_sees_only_the_window(mini_config):
    """One local layer, window 3: the token at position 0 reaches positions 0-2 and no further;
    as a global layer it reaches every later position."""
    tokens, mask = random_prompts(np.random.default_rng(2), 2, 8, 512)
    mask[:] = True
    changed = tokens.copy()
    changed[:, 0] = (changed[:, 0] + 1) % 512
    for window, reach in ((3, 3), (0, 8)):
        lm, _, _ = language_model(mini_config, num_layers=1, sliding_window=window)
        diff = np.abs(_logits(lm, changed, mask) - _logits(lm, tokens, mask)).max(axis=(0, 2))
        assert (diff[:reach] > 1e-6).all() and (diff[reach:] == 0).all(), (window, diff)


def test_head_dim_independent_of_width_and_heads(mini_config):
    lm, _, _ = language_model(mini_config, head_dim=24, num_kv_heads=2)
    attention = lm.backbone.blocks[0].attn
    assert attention.q.shape == (64, 4, 24) and attention.k.shape == (64, 2, 24)
    assert attention.o.shape == (4, 24, 64)
    tokens, mask = random_prompts(np.random.default_rng(0), 2, 5, 512)
    assert np.isfinite(_logits(lm, tokens, mask)).all()


def test_llama3_rope_scaling_keeps_high_and_divides_low_frequencies():
    base = TransformerConfig(vocab_size=8, width=64, num_layers=1, num_heads=1, num_kv_heads=1,
                             mlp_dim=8, rope_theta=5e5)
    scaled = TransformerConfig(**{**base.__dict__, "rope_scaling": "llama3",
                                  "rope_scaling_factor": 8.0, "rope_original_max_len": 64})
    plain, llama = (np.asarray(rope_frequencies(c, False)) for c in (base, scaled))
    wavelength = 2 * np.pi / plain
    high, low = wavelength < 64 / 4.0, wavelength > 64 / 1.0
    assert high.any() and low.any() and (~high & ~low).any()
    np.testing.assert_allclose(llama[high], plain[high], rtol=1e-6)
    np.testing.assert_allclose(llama[low], plain[low] / 8.0, rtol=1e-6)
    between = ~high & ~low
    assert ((llama[between] < plain[between]) & (llama[between] > plain[between] / 8)).all()
    linear = TransformerConfig(**{**base.__dict__, "rope_scaling": "linear",
                                  "rope_scaling_factor": 4.0})
    np.testing.assert_allclose(np.asarray(rope_frequencies(linear, False)), plain / 4, rtol=1e-6)


def test_local_layers_use_their_own_rope_base():
    cfg = TransformerConfig(vocab_size=8, width=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            mlp_dim=8, rope_theta=1e6, local_rope_theta=1e4, sliding_window=4,
                            global_every=2, rope_scaling="linear", rope_scaling_factor=2.0)
    assert [cfg.layer_is_local(i) for i in range(4)] == [True, False, True, False]
    local, global_ = (np.asarray(rope_frequencies(cfg, k)) for k in (True, False))
    assert local[1] == pytest.approx(1e4 ** (-1 / 8)) and global_[1] == pytest.approx(
        1e6 ** (-1 / 8) / 2)
    traced = jax.jit(lambda flag: rope_frequencies(cfg, flag))
    np.testing.assert_array_equal(traced(jnp.bool_(True)), local)
