"""Side-by-side groups of rows on a one-device CPU mesh, for small models.

A small model's ops run one after another on one core, and XLA:CPU runs calls made from
different threads at once: a batch split into two groups of rows, each a call from its own
thread, keeps both cores busy (bench/RESULTS.md). The peer-shape sampler (1.2M parameters,
4.5 MiB) took 38% less time, the proxy's ranking 7-21% less, and the policy's update step
(`train/state.py`: the groups' gradients, then one program applies their mean) 4.7-7.1% less.
A larger model's ops already keep both cores busy and two groups compete for them: the 60m
sampler (254 MiB) took 28-32% more. Between the two the limit is a guess. Not tied to the core
count, so that a run does the same on every machine: groups give the whole batch's results, up
to the last bits of floats (matmuls over fewer rows round differently).

A group's program takes the whole batch and the index of its first row block (`first`), so
every group is one program; `merge_groups` concatenates their outputs in the batch's order.
"""

from __future__ import annotations

import concurrent.futures
import math

import jax
import jax.numpy as jnp

from alignment_gap import sharding

CPU_GROUPS = 2
GROUPS_MAX_PARAM_BYTES = 16 << 20
_POOL = concurrent.futures.ThreadPoolExecutor(CPU_GROUPS, thread_name_prefix="cpu_group")
_TRACED: set = set()  # (group program, batch shape) pairs that have run once


def default_groups(mesh, state) -> int:
    """CPU_GROUPS on a one-device CPU mesh for a model of at most GROUPS_MAX_PARAM_BYTES
    (`state`: its arrays or their shapes), else 1: accelerators, several CPU devices (which
    already run side by side) and larger models run one call."""
    one_cpu = mesh.devices.size == 1 and mesh.devices.flat[0].platform == "cpu"
    size = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
    return CPU_GROUPS if one_cpu and size <= GROUPS_MAX_PARAM_BYTES else 1


def run_groups(program, args: tuple, groups: int, rows: int, shape, mesh, rules) -> list:
    """`program(*args, first)` for each group's first row (0, rows / groups, ...), each from
    its own thread under `mesh` and `rules` (a thread has none of the caller's contexts),
    results ready. `shape`: the batch's; a program's first call at a shape traces and
    compiles, once, before the other groups start (not in every thread at once)."""
    def one(first):
        with sharding.use(mesh, rules):
            return jax.block_until_ready(program(*args, jnp.int32(first)))

    shape_key = (id(program), shape)
    firsts = range(0, rows, rows // groups)
    if shape_key in _TRACED:
        return list(_POOL.map(one, firsts))
    outputs = [one(firsts[0]), *_POOL.map(one, firsts[1:])]
    _TRACED.add(shape_key)
    return outputs


def group_rows(x, first, groups: int, rows_per_prompt: int = 1):
    """The rows of `x` (a whole batch's, prompt-major) that belong to the group whose first
    prompt is `first` (traced), one of `groups` equal blocks of prompts."""
    size = x.shape[0] // groups
    return jax.lax.dynamic_slice_in_dim(x, rows_per_prompt * first, size)


@jax.jit
def merge_groups(outputs: list):
    """The groups' outputs (trees of row-major arrays) as the whole batch's, in order."""
    return jax.tree.map(lambda *parts: jnp.concatenate(parts), *outputs)
