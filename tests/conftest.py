"""Eight fake CPU devices for the mesh tests; everything else builds a one-device mesh."""

import jax
import numpy as np
import pytest

jax.config.update("jax_num_cpu_devices", 8)

from configs import meshes, models  # noqa: E402


@pytest.fixture
def mini_config():
    return models.get_config("mini")


def mesh_config(shape):
    """A mesh config with the given (data, fsdp, tensor) shape and the default rules."""
    c = meshes.get_config("cpu")
    c.data, c.fsdp, c.tensor = shape
    return c


def random_prompts(rng: np.random.Generator, batch: int, length: int, vocab: int,
                   min_len: int = 2):
    """Left-padded prompts of random lengths (token ids >= 2; 0 pads, 1 is EOS)."""
    lengths = rng.integers(min_len, length + 1, batch)
    mask = np.arange(length)[None, :] >= (length - lengths)[:, None]
    tokens = np.where(mask, rng.integers(2, vocab, (batch, length)), 0).astype(np.int32)
    return tokens, mask
