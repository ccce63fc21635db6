"""Builders shared by the tests: models on a mesh from a (data, fsdp, tensor) shape."""

import jax
from flax import nnx

from alignment_gap import sharding
from alignment_gap.models import LanguageModel, PreferenceModel, TransformerConfig
from tests.conftest import mesh_config


def mesh_and_rules(shape):
    c = mesh_config(shape)
    n = shape[0] * shape[1] * shape[2]
    return sharding.make_mesh(c, jax.devices()[:n]), c.rules


def language_model(model_config, shape=(1, 1, 1), seed=0, **overrides):
    mesh, rules = mesh_and_rules(shape)
    cfg = TransformerConfig.from_config(model_config, **overrides)
    lm = sharding.create_sharded(lambda: LanguageModel(cfg, nnx.Rngs(seed)), mesh, rules)
    return lm, mesh, rules


def preference_model(model_config, shape=(1, 1, 1), seed=0):
    mesh, rules = mesh_and_rules(shape)
    cfg = TransformerConfig.from_config(model_config)
    pm = sharding.create_sharded(lambda: PreferenceModel(cfg, nnx.Rngs(seed)), mesh, rules)
    return pm, mesh, rules
