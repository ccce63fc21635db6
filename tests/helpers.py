"""Builders shared by the tests: models on a mesh from a (data, fsdp, tensor) shape."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from alignment_gap import sharding
from alignment_gap.models import LanguageModel, PreferenceModel, TransformerConfig
from alignment_gap.sampling import sample
from tests.conftest import mesh_config


def mesh_and_rules(shape):
    c = mesh_config(shape)
    n = shape[0] * shape[1] * shape[2]
    return sharding.make_mesh(c, jax.devices()[:n]), c.rules


def language_model(model_config, shape=(1, 1, 1), seed=0, **overrides):
    mesh, rules = mesh_and_rules(shape)
    cfg = TransformerConfig.from_config(model_config, **overrides)
    lm = sharding.create_sharded(LanguageModel, cfg, seed, mesh, rules)
    return lm, mesh, rules


def preference_model(model_config, shape=(1, 1, 1), seed=0, **overrides):
    mesh, rules = mesh_and_rules(shape)
    cfg = TransformerConfig.from_config(model_config, **overrides)
    pm = sharding.create_sharded(PreferenceModel, cfg, seed, mesh, rules)
    return pm, mesh, rules


def scanned_copy(lm, model_config, shape=(1, 1, 1), **overrides):
    """A `scan_layers` model holding `lm`'s parameters, its blocks stacked on a layers axis."""
    scanned, mesh, rules = language_model(model_config, shape, scan_layers=True, **overrides)
    state = nnx.state(lm)
    blocks = state["backbone"]["blocks"]
    state["backbone"]["blocks"] = jax.tree.map(lambda *layers: jnp.stack(layers),
                                               *(blocks[i] for i in range(len(blocks))))
    with sharding.use(mesh, rules):
        nnx.update(scanned, jax.device_put(state, sharding.state_shardings(state, mesh)))
    return scanned, mesh, rules


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def sample_unsharded(graphdef, state, prompt_BxP, prompt_mask_BxP, key, cfg, use_cache=True):
    """The sampler on one device, no mesh or rules: cached and naive decoding side by side."""
    return sample(nnx.merge(graphdef, state), prompt_BxP, prompt_mask_BxP, key, cfg, use_cache)
