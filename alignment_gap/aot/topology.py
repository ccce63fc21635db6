"""Accelerator names -> the devices to compile for, and each chip's published limits.

    target = topology.resolve("v5p-64")   # 32 TPU v5p devices (a 2x4x4 slice); no TPU needed
    target.devices, target.chip.hbm_gib

Names are the ones Cloud TPU sells. v4 and v5p names count TensorCores (two per chip; JAX sees
one device per chip, "megacore"), so v5p-64 is 32 chips in a 2x4x4 torus; v5e (`v5litepod-N`
or `v5e-N`) and v6e names count chips on a 2-D torus. `--slices K` describes K such slices
joined over the data-center network (multi-slice). `cpu:N` is N fake CPU devices: the same
programs compiled by XLA:CPU, for a dry run without libtpu.

The TPU devices come from `jax.experimental.topologies.get_topology_desc`, which asks libtpu
to describe a slice without any TPU attached; programs compiled for them are the real TPU
programs, with the compiler's own memory and cost analysis.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import jax
import numpy as np
from jax.experimental import topologies

from alignment_gap import sharding


@dataclasses.dataclass(frozen=True)
class Chip:
    kind: str
    hbm_gib: float  # Published HBM capacity per chip (compared as GiB).
    peak_tflops: float  # Published peak bf16 dense TFLOP/s per chip.
    hbm_gbps: float  # Published HBM bandwidth per chip, GB/s.
    source: str


# Google's published per-chip figures (Cloud TPU system-architecture pages, read 2026-12-01).
CHIPS = {
    "v4": Chip("TPU v4", 32, 275, 1200, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 16, 197, 819, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 95, 459, 2765, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 32, 918, 1640, "https://cloud.google.com/tpu/docs/v6e"),
}
# libtpu's names for the generations in `get_topology_desc(topology_name=...)`.
_LIBTPU_NAMES = {"v4": "v4", "v5e": "v5e", "v5p": "v5", "v6e": "v6e"}
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
_SMALL_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}
_ALIASES = {"v5litepod": "v5e"}


class TopologyError(ValueError):
    """A topology name that cannot be described; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # As given, e.g. "v5p-64".
    generation: str  # v4 | v5e | v5p | v6e | cpu
    shape: tuple[int, ...]  # Chips along each torus axis of one slice.
    slices: int
    devices: tuple  # Every device of every slice (one per chip).
    chip: Chip | None  # None for fake CPU devices (no published limits).

    @property
    def chips(self) -> int:
        return len(self.devices)

    @property
    def topology(self) -> str:
        return "x".join(map(str, self.shape))


def _balanced_3d(cubes: int) -> tuple[int, int, int]:
    """The 3-D factorisation a <= b <= c of `cubes` with the smallest sum (Cloud TPU's
    full-cube shapes: 2 cubes 1x1x2, 16 cubes 2x2x4, 96 cubes 4x4x6)."""
    best = None
    for a in range(1, cubes + 1):
        for b in range(a, cubes // a + 1):
            if cubes % (a * b) == 0 and cubes // (a * b) >= b:
                shape = (a, b, cubes // (a * b))
                if best is None or sum(shape) < sum(best):
                    best = shape
    return best


def slice_shape(generation: str, chips: int) -> tuple[int, ...]:
    """The torus shape of a slice with `chips` chips (the default shape Cloud TPU creates)."""
    if generation in ("v5e", "v6e"):
        if chips not in _SHAPES_2D:
            raise TopologyError(f"--topology: {generation} slices have {sorted(_SHAPES_2D)} "
                                f"chips, not {chips}; use one of those")
        return _SHAPES_2D[chips]
    if chips in _SMALL_3D:
        return _SMALL_3D[chips]
    if chips % 64 or chips == 0:
        cores = _CORES_PER_CHIP[generation]
        names = ", ".join(f"{generation}-{n * cores}" for n in sorted(_SMALL_3D))
        raise TopologyError(f"--topology: {generation} slices are {names} ({sorted(_SMALL_3D)} "
                            "chips) or whole 4x4x4 cubes (multiples of 64 chips), not "
                            f"{chips} chips; use one of those")
    return tuple(4 * n for n in _balanced_3d(chips // 64))


def parse(name: str) -> tuple[str, int]:
    """("v5p", chips) from a Cloud TPU name such as v5p-64, v5litepod-16 or v6e-8."""
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if not match:
        raise TopologyError(f"--topology: {name!r} is not a TPU slice name; use e.g. v4-8, "
                            "v5litepod-16 (or v5e-16), v5p-64, v6e-8, or cpu:N for fake CPU "
                            "devices")
    generation = _ALIASES.get(match.group(1), match.group(1))
    count = int(match.group(2))
    cores = _CORES_PER_CHIP[generation]
    if count % cores:
        raise TopologyError(f"--topology: {generation} names count TensorCores, two per chip; "
                            f"{name} is not a whole number of chips")
    return generation, count // cores


def cpu_devices(name: str) -> int:
    """N of `cpu:N` (fake CPU devices)."""
    count = name.split(":", 1)[1]
    if not count.isdigit() or int(count) < 1:
        raise TopologyError(f"--topology: {name!r}: cpu:N needs a device count N >= 1, e.g. "
                            "cpu:8")
    return int(count)


def _prepare_libtpu():
    # Without these, libtpu (finding no TPU VM metadata) prints warnings and an error line
    # while it loads; the topology description does not read them.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Describing a slice claims no TPU, so several processes (parallel tests, two compiles)
    # may load libtpu at once; otherwise the second stops at libtpu's /tmp lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def resolve(name: str, slices: int = 1) -> Target:
    """The devices of `slices` slices named `name` (or `cpu:N`)."""
    if slices < 1:
        raise TopologyError(f"--slices: must be >= 1, got {slices}")
    if name.startswith("cpu:"):
        count = cpu_devices(name)
        if slices != 1:
            raise TopologyError("--slices: fake CPU devices form one slice; drop --slices")
        if jax.device_count("cpu") < count:
            raise TopologyError(f"--topology: {name} needs {count} CPU devices but JAX has "
                                f"{jax.device_count('cpu')}; run it in a fresh process")
        return Target(name, "cpu", (count,), 1, tuple(jax.devices("cpu")[:count]), None)
    generation, chips = parse(name)
    shape = slice_shape(generation, chips)
    _prepare_libtpu()
    kwargs = {"chip_config_name": "megacore"} if _CORES_PER_CHIP[generation] == 2 else {}
    if slices > 1:
        kwargs["num_slices"] = slices
    if chips == 1:  # one chip on its host (libtpu's default host block is 2x2x1)
        kwargs["chips_per_host_bounds"] = (1, 1, 1)
    topology = f"{_LIBTPU_NAMES[generation]}:{'x'.join(map(str, shape))}"
    try:
        described = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                                 **kwargs)
    except Exception as e:  # libtpu missing or the name refused: say which
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fix = ("this libtpu does not describe that slice; try another name" if
               importlib.util.find_spec("libtpu") else
               "install it with `pip install -e '.[tpu]'` (or the test extra)")
        raise TopologyError(f"--topology: libtpu could not describe {topology} ({first}); "
                            f"{fix}") from e
    return Target(name, generation, shape, slices, tuple(described.devices),
                  CHIPS[generation])


def device_grid(target: Target, mesh_shape: tuple[int, int, int]) -> np.ndarray:
    """The target's devices as the (data, fsdp, tensor) mesh a run on it builds
    (`sharding.device_grid`)."""
    return sharding.device_grid(target.devices, mesh_shape)
