"""Eight fake CPU devices for the mesh tests; everything else builds a one-device mesh.

The runs the tests start as processes (trainers, studies, notebooks, the wheel's smoke study)
share one persistent compilation cache per test session: the smoke study alone runs in three
of them, and a program compiled once is read back by the others. Both xdist workers use it;
JAX locks its entries when a size limit is set.
"""

import os

import jax
import numpy as np
import pytest

import alignment_gap  # noqa: F401  (first: with libtpu installed but no TPU, it picks the CPU)

jax.config.update("jax_num_cpu_devices", 8)

# This process compiles many small programs and runs each a few times: LLVM at -O0 compiles
# them about a third faster here. XLA reads its flags once, when the backend starts, so the
# processes the tests start (trainers, studies) keep the default flags.
_XLA_FLAGS = os.environ.get("XLA_FLAGS")
os.environ["XLA_FLAGS"] = f"{_XLA_FLAGS or ''} --xla_backend_optimization_level=0".strip()
jax.devices()
if _XLA_FLAGS is None:
    del os.environ["XLA_FLAGS"]
else:
    os.environ["XLA_FLAGS"] = _XLA_FLAGS

from configs import meshes, models  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: over ~10 s on 2 cores; `make test-fast` skips it")


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """For processes the tests start (this process keeps JAX's in-memory caches only)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, shared by the workers
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(root / "jax_cache")
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)  # turns on JAX's file lock
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


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
