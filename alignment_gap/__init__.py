"""alignment_gap: why online preference optimisation beats offline at the same KL budget.

A JAX / Flax NNX framework for the controlled study of Tang et al. 2024 (arXiv 2405.08448).
"""

import importlib.util
import os

__version__ = "0.1.0"

_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                "jax_rocm7_plugin")


def _skip_absent_tpu():
    """With libtpu installed (the `tpu` and `test` extras, for ahead-of-time compilation) but
    no TPU attached, JAX would load libtpu at start-up, print its warnings and fall back to the
    CPU. Where no TPU chip is on the PCI bus and no GPU plugin is installed, go to the CPU
    directly. `JAX_PLATFORMS` (or `jax_platforms` set in code) wins."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    if any(importlib.util.find_spec(name) is not None for name in _GPU_PLUGINS):
        return
    import jax

    try:  # JAX's own test for TPU chips (private: if it moves, leave JAX to decide)
        from jax._src.hardware_utils import num_available_tpu_chips_and_device_id
    except ImportError:
        return
    if jax.config.jax_platforms or num_available_tpu_chips_and_device_id()[0]:
        return
    jax.config.update("jax_platforms", "cpu")


_skip_absent_tpu()
