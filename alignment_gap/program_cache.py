"""Jitted programs built once per process, keyed by what fixes them.

A study runs its stages (trainer runs, the test stage's evaluations) in one process, and each
stage builds its evaluator and samplers afresh. A `jax.jit` of a new closure misses JAX's
tracing and lowering caches even when the program is the same one (same model graph, mesh,
rule table, shardings and settings); only XLA's compile was served, from the persistent cache.
So every stage re-traced and re-lowered the same evaluation, sampling and ranking programs.

The factories of programs that depend on hashable arguments alone are wrapped in `cached`: a
second stage asking for the same program gets the same jitted function, whose compiled
executable JAX already holds. So are models' abstract states (`train/common.abstract_model`), an
abstract trace of the model's initialiser that every checkpoint load needs. Rules and shardings
go in through the hashable forms below.
"""

from __future__ import annotations

import functools

import jax

# Distinct programs a process keeps: a study needs a handful per model size (the scaling
# hypothesis has three sizes); jitted functions hold their executables, so the cache is bounded.
CAPACITY = 64


def cached(factory):
    """Memoize a factory of jitted programs on its (hashable) arguments."""
    return functools.lru_cache(maxsize=CAPACITY)(factory)


def rules_key(rules) -> tuple:
    """The logical-axis rule table as nested tuples (a config may hold lists). The rules are
    part of a program's key: model code reads them while tracing, not through its arguments."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def shardings_key(tree) -> tuple:
    """A hashable stand-in for a tree of shardings; `shardings_of` rebuilds the tree."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaves)


def shardings_of(key: tuple):
    treedef, leaves = key
    return jax.tree.unflatten(treedef, leaves)
