"""alignment_gap: why online preference optimisation beats offline at the same KL budget.

A JAX / Flax NNX framework for the controlled study of Tang et al. 2024 (arXiv 2405.08448).
"""

__version__ = "0.1.0"
