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

# The tests compile many small programs and run each a few times: LLVM at -O0 compiles them
# about a third faster here, and XLA:CPU's older elemental emitters in place of its fusion
# emitters cut tests/test_sampling.py's compile time by another third (62.9 -> 40.8 s). The
# processes the tests start inherit the flags: the smoke study ran in 38 s with both against 46
# at XLA's defaults (and 54 with the elemental emitters alone), 2-core Intel Xeon, 2026-12-05.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
# The slowest files first: pytest-xdist then spreads the rest over the workers as they finish
# (run with --no-loadscope-reorder, which keeps this order). Seconds on 2 cores, Dec 2026.
SLOWEST_FIRST = ("test_study", "test_multihost", "test_models", "test_pretrained_notebook",
                 "test_trainers", "test_faults", "test_aot", "test_stacked", "test_sampling",
                 "test_pretrained", "test_packaging", "test_notebooks", "test_architectures")

from configs import meshes, models  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: over ~10 s on 2 cores; `make test-fast` skips it")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    module = lambda item: item.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
    items.sort(key=lambda item: rank.get(module(item), len(rank)))  # stable: file order kept


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
