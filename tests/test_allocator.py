"""The caching malloc our entry points preload (alignment_gap/allocator.py), in real processes."""

import os
import platform
import subprocess
import sys

import pytest

from alignment_gap import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = sys.platform.startswith("linux") and platform.machine() == "x86_64"

# A 100 MB output and a 97 MB temporary per call; minor page faults per call, after two calls.
FAULTS_PER_CALL = """
import resource, jax, jax.numpy as jnp
from alignment_gap import allocator
x = jnp.ones((5000, 5000), jnp.float32)
temporary = jax.jit(lambda x: jnp.sum(jnp.sin(x) @ x[:64].T))
output = jax.jit(lambda x: x * 2.0 + 1.0)
faults = []
for fn in (temporary, output):
    jax.block_until_ready(fn(x)); jax.block_until_ready(fn(x))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        jax.block_until_ready(fn(x))
    faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
print(allocator.active(), *faults)
"""


def _clean_env(**extra):
    """This process's environment without a preload (`make test` runs under one)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD", allocator.CHOICE_ENV)}
    env["JAX_PLATFORMS"] = "cpu"
    return {**env, **extra}


def _python(args, **extra):
    out = subprocess.run([sys.executable, *args], env=_clean_env(**extra), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split("\n")[-2].split()


@pytest.mark.skipif(not HERE, reason="the tbb wheel's allocator is for Linux x86-64")
def test_installed_where_it_applies():
    assert allocator.libraries() is not None, "pip install -e . should have installed tbb"


@pytest.mark.skipif(not HERE, reason="the tbb wheel's allocator is for Linux x86-64")
def test_preloaded_blocks_are_reused_without_page_faults():
    system = _python(["-c", FAULTS_PER_CALL], ALIGNMENT_GAP_MALLOC="system")
    cached = _python(["-m", "alignment_gap.allocator", "-c", FAULTS_PER_CALL])
    assert system[0] == "False" and cached[0] == "True"
    for plain, reused in zip(map(float, system[1:]), map(float, cached[1:]), strict=True):
        assert plain > 20_000  # glibc maps and unmaps the ~100 MB block on every call
        # Usually under 100; some runs fault ~5,000 pages a call in XLA's kernels with
        # tcmalloc preloaded as well (not the block: it stays mapped), never the whole block.
        assert reused < plain / 3, (system, cached)


@pytest.mark.skipif(not HERE, reason="the tbb wheel's allocator is for Linux x86-64")
def test_reexec_runs_the_same_command_with_the_allocator():
    code = ("import sys; from alignment_gap import allocator; allocator.reexec(); "
            "print(allocator.active(), sys.argv[1:])")
    assert _python(["-c", code, "a", "b"]) == ["True", "['a',", "'b']"]
    assert _python(["-c", code, "a"], ALIGNMENT_GAP_MALLOC="system") == ["False", "['a']"]


def test_environment_keeps_other_preloads_and_refuses_unknown_choices():
    env = allocator.environment({"LD_PRELOAD": "/x/libother.so", "PATH": "/bin"})
    if allocator.libraries() is not None:
        assert env["LD_PRELOAD"].split(":") == allocator.libraries() + ["/x/libother.so"]
        assert env["TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD"] == str(allocator.KEEP_BYTES)
    off = allocator.environment({"LD_PRELOAD": "/x/libother.so", "ALIGNMENT_GAP_MALLOC": "system"})
    assert off["LD_PRELOAD"] == "/x/libother.so"
    with pytest.raises(SystemExit, match="ALIGNMENT_GAP_MALLOC='jemalloc' is unknown"):
        allocator.environment({"ALIGNMENT_GAP_MALLOC": "jemalloc"})
