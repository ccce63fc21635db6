"""A caching `malloc` for XLA:CPU: oneTBB's scalable allocator, preloaded into our processes.

XLA:CPU allocates each execution's temporaries as one block (140 MB for the peer-shape update
step) with `posix_memalign` from a worker thread. glibc serves a request that large with a
fresh `mmap` and unmaps it on free, so every step touches every page of it anew: 36,500 page
faults and about 60 ms of kernel time per peer-shape update step on a 2-core VM (and
`MALLOC_MMAP_MAX_` / `MALLOC_TRIM_THRESHOLD_` cannot help: a worker thread's arena is capped at
64 MB, above which glibc maps regardless). oneTBB's `libtbbmalloc_proxy` (the `tbb` wheel)
replaces `malloc` and, told to keep blocks of 1 MB and more (`TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD`),
hands the same block back step after step (bench/RESULTS.md has the measurements). Where
temporaries stay small (under glibc's 32 MB mapping threshold) glibc reused them already, and
oneTBB re-maps YNNPACK's 6.4 MB scratch buffers instead: the mini study's update step alone is
up to ~10% slower, though `make study` as a whole took 8-17% less time.

A library cannot be swapped in under a running process, so entry points call `reexec()` first:
where the library is installed (Linux x86-64) and not yet loaded, it runs the same command again
with `LD_PRELOAD` set; children inherit the setting. `python -m alignment_gap.allocator ARGS`
runs `python ARGS` the same way (the Makefile's tests and benchmarks). Set
`ALIGNMENT_GAP_MALLOC=system` to keep glibc's `malloc`.

Import-light on purpose (no jax of its own): `reexec()` runs before an entry point's heavy
imports. Measured on CPU only; GPU and TPU hosts get it too unless told `system`.
"""

from __future__ import annotations

import os
import sys

CHOICE_ENV = "ALIGNMENT_GAP_MALLOC"  # "tbb" (the default where installed) or "system"
CHOICES = ("tbb", "system")
LIBRARIES = ("libtbbmalloc.so.2", "libtbbmalloc_proxy.so.2")  # the proxy needs the first
# Blocks of at least this many bytes are kept for reuse, never given back to the system.
KEEP_BYTES = 1 << 20


def choice(env=None) -> str:
    value = (os.environ if env is None else env).get(CHOICE_ENV, "tbb") or "tbb"
    if value not in CHOICES:
        raise SystemExit(f"error: ${CHOICE_ENV}={value!r} is unknown; use one of {CHOICES}")
    return value


def libraries() -> list[str] | None:
    """The `tbb` wheel's allocator libraries in this environment, or None where absent (another
    platform, or installed without the dependency)."""
    if not sys.platform.startswith("linux"):
        return None
    paths = [os.path.join(sys.prefix, "lib", name) for name in LIBRARIES]
    return paths if all(os.path.exists(p) for p in paths) else None


def environment(env=None) -> dict:
    """`env` (default: this process's) with the allocator preloaded, where it applies."""
    env = dict(os.environ if env is None else env)
    paths = libraries()
    if choice(env) == "system" or paths is None:
        return env
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p and p not in paths]
    env["LD_PRELOAD"] = ":".join(paths + preload)
    env.setdefault("TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD", str(KEEP_BYTES))
    return env


def requested() -> bool:
    """Whether this process was started with the allocator preloaded."""
    paths = libraries()
    return paths is not None and paths[-1] in os.environ.get("LD_PRELOAD", "").split(":")


def active() -> bool:
    """Whether the allocator is loaded in this process (its proxy mapped into memory)."""
    try:
        with open("/proc/self/maps") as maps:
            return any(LIBRARIES[1] in line for line in maps)
    except OSError:
        return False


def reexec():
    """Run this process's command again with the allocator preloaded, unless it is already
    (or was asked for and could not load: then carry on without it), is absent, or
    `ALIGNMENT_GAP_MALLOC=system`."""
    if requested() or libraries() is None or choice() == "system":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], environment())


if __name__ == "__main__":
    # `python -m alignment_gap.allocator ARGS`: `python ARGS` with the allocator preloaded.
    os.execve(sys.executable, [sys.executable] + sys.argv[1:], environment())
