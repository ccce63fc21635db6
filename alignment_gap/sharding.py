"""One mesh for every model: distributed start-up, mesh from config, logical-axis rules, batches.

Models name their axes (`embed`, `heads`, `batch`, ...); the config's rule table maps names to
mesh axes. Everything that traces a model runs inside `use(mesh, rules)`, so parameter
shardings, activation constraints and batch shardings all come from the same table. On CPU
devices that each hold the model whole, `per_device` runs a program as each device's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alignment_gap import program_cache
from alignment_gap.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def initialize_distributed(dist_cfg) -> None:
    """Start `jax.distributed` when the config asks for several processes; no-op otherwise."""
    if dist_cfg.local_cpu_devices:
        jax.config.update("jax_num_cpu_devices", int(dist_cfg.local_cpu_devices))
    if dist_cfg.from_environment:
        jax.distributed.initialize(
            initialization_timeout=dist_cfg.initialization_timeout_s,
            heartbeat_timeout_seconds=dist_cfg.heartbeat_timeout_s,
        )
    elif dist_cfg.num_processes > 1:
        if not dist_cfg.coordinator_address:
            raise ConfigError("config.distributed.coordinator_address: empty, and num_processes="
                              f"{dist_cfg.num_processes} needs one; set it to process 0's "
                              "host:port (or distributed.from_environment=True on a TPU VM)")
        if not 0 <= dist_cfg.process_id < dist_cfg.num_processes:
            raise ConfigError(f"config.distributed.process_id: {dist_cfg.process_id} is not in "
                              f"[0, num_processes={dist_cfg.num_processes}); number them 0 .. "
                              f"{dist_cfg.num_processes - 1}")
        jax.distributed.initialize(
            coordinator_address=dist_cfg.coordinator_address,
            num_processes=dist_cfg.num_processes,
            process_id=dist_cfg.process_id,
            initialization_timeout=dist_cfg.initialization_timeout_s,
            heartbeat_timeout_seconds=dist_cfg.heartbeat_timeout_s,
        )
    else:
        return
    logging.info("jax.distributed: process %d of %d, %d global devices",
                 jax.process_index(), jax.process_count(), jax.device_count())


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Fill the one -1 axis; config_checks.py has already verified the product divides."""
    shape = [int(mesh_cfg[a]) for a in MESH_AXES]
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = num_devices // known
    return tuple(shape)


_AUTO = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)


def device_grid(devices, mesh_shape: tuple[int, int, int]) -> np.ndarray:
    """Devices arranged as the (data, fsdp, tensor) mesh, the same grid on a pod as in
    ahead-of-time compilation for its topology (`aot.topology`): within a slice in the order
    the torus favours, splitting a physical axis where whole ones do not fit (fsdp 8 x tensor 8
    on a 4x4x4 v5p-128); across TPU slices, the data axis spans the slices, so only
    data-parallel traffic crosses the data-center network."""
    devices = list(devices)
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    if devices[0].platform != "tpu" or len(slices) == 1:
        return mesh_utils.create_device_mesh(mesh_shape, devices,
                                             allow_split_physical_axes=True)
    data, fsdp, tensor = mesh_shape
    if data % len(slices):
        raise ConfigError(f"config.mesh.data: {data} is not a multiple of the {len(slices)} "
                          "TPU slices; the data axis spans the slices, so make it a multiple "
                          "(or -1)")
    return mesh_utils.create_hybrid_device_mesh((data // len(slices), fsdp, tensor),
                                                (len(slices), 1, 1), devices,
                                                allow_split_physical_axes=True)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    return mesh_from_grid(device_grid(devices[:int(np.prod(shape))], shape))


def mesh_from_grid(devices_DxFxT) -> jax.sharding.Mesh:
    """A mesh over devices already arranged as (data, fsdp, tensor)."""
    return jax.sharding.Mesh(devices_DxFxT, MESH_AXES, axis_types=_AUTO)


@contextlib.contextmanager
def use(mesh, rules):
    """The mesh and rule table that model code traces under."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(tuple(r) for r in rules)):
        yield


def logical_spec(logical_axes) -> P:
    """PartitionSpec for logical axis names under the active rules (unknown names: replicated)."""
    rules = dict(flax_spmd.get_logical_axis_rules())
    return P(*(rules.get(name) for name in logical_axes))


def constrain(x, logical_axes):
    """Sharding constraint on an activation; a no-op outside `use(...)`."""
    if not flax_spmd.get_logical_axis_rules() or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(logical_axes))


def state_shardings(abstract_state, mesh):
    """NamedShardings of an nnx state from its parameters' logical annotations."""
    return nnx.get_named_sharding(abstract_state, mesh)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (what restores, loads and ahead-of-time
    compilation take in place of arrays)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def abstract_model(build_fn, mesh, rules):
    """(graphdef, state of ShapeDtypeStructs in their shardings) of `build_fn()`'s module;
    nothing is allocated."""
    with use(mesh, rules):
        graphdef, state = nnx.split(nnx.eval_shape(build_fn))
        return graphdef, abstract_like(state, state_shardings(state, mesh))


def init_program(module_cls, cfg, mesh, rules, name: str = "init_model"):
    """(jitted initialiser `key -> state`, graphdef) of `module_cls(cfg, nnx.Rngs(key))`, every
    parameter created directly in its sharded layout (explicit out_shardings).

    The key is an argument, not a constant of the program: models that differ only in seed
    (a study's golden and proxy, a test's policy and reference) share one program, built once
    per process (`program_cache`) and compiled once per persistent compilation cache. The
    parameters are those of a constant seed, bit for bit (tests/test_models.py)."""
    return _init_program(module_cls, cfg, mesh, program_cache.rules_key(rules), name)


@program_cache.cached
def _init_program(module_cls, cfg, mesh, rules, name: str):
    graphdef, abstract = abstract_model(lambda: module_cls(cfg, nnx.Rngs(0)), mesh, rules)

    def init(key):
        return nnx.state(module_cls(cfg, nnx.Rngs(key)))

    init.__name__ = name
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    return jax.jit(init, out_shardings=shardings), graphdef


def create_sharded(module_cls, cfg, seed: int, mesh, rules, name: str = "init_model"):
    """`module_cls(cfg, nnx.Rngs(seed))` with every parameter created directly in its sharded
    layout (e.g. `create_sharded(LanguageModel, cfg, 0, mesh, rules)`).

    Initialisation is one jitted program (`init_program`), so it works the same on one device,
    a fake CPU mesh and several processes, and never materialises a full copy.
    """
    init, graphdef = init_program(module_cls, cfg, mesh, rules, name)
    with use(mesh, rules):
        return nnx.merge(graphdef, init(jax.random.key(seed)))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh, rules, ndim: int) -> NamedSharding:
    """Leading axis over the batch mesh axes, the rest replicated."""
    axes = dict(tuple(r) for r in rules).get("batch")
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def rows_spec(rules) -> P:
    """The spec of an array split by rows over the batch mesh axes (`batch_sharding`'s)."""
    return P(batch_axes(rules))


def batch_shards(mesh, rules) -> int:
    """How many blocks the batch's rows are split into."""
    return int(np.prod([mesh.shape[a] for a in batch_axes(rules)]))


def whole_on_every_cpu_device(mesh, rules, shardings) -> bool:
    """Several CPU devices over the batch axes, each holding every array of `shardings` whole
    (parameters of a data-parallel mesh): a program there may run as each device's own
    (`per_device`), with no collective but those it asks for."""
    return (batch_shards(mesh, rules) > 1 and mesh.devices.flat[0].platform == "cpu"
            and all(s.is_fully_replicated for s in jax.tree.leaves(shardings)))


def per_device(fn, mesh, in_specs, out_specs):
    """`fn` as each device's program over its own rows and whole copies (`jax.shard_map`;
    `in_specs` / `out_specs`: spec prefixes of its arguments / outputs, `rows_spec` or `P()`).
    Model code in it traces with no rule table, so its activation constraints are no-ops."""
    def on_one_device(*args):
        with nnx.logical_axis_rules(()):
            return fn(*args)

    return jax.shard_map(on_one_device, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)


@dataclasses.dataclass(frozen=True)
class ProcessRows:
    """The rows of every global batch that one process supplies: sorted, disjoint [start, stop)
    blocks. One block on most meshes; several where the mesh's device order interleaves the
    processes along the batch axes (the torus order of a v5p-64 at fsdp 8 x tensor 4 gives each
    host two blocks, each shared with the host beside it on the tensor axis)."""

    blocks: tuple[tuple[int, int], ...]

    @classmethod
    def every(cls, global_rows: int) -> ProcessRows:
        return cls(((0, global_rows),))

    @property
    def count(self) -> int:
        return sum(stop - start for start, stop in self.blocks)

    @property
    def indices(self) -> tuple[int, ...]:
        """The global row of each local row, in the order a loader stacks them."""
        return tuple(i for start, stop in self.blocks for i in range(start, stop))

    def select(self, global_array):
        """This process's rows of a whole global batch (tests and synthetic loaders)."""
        return np.asarray(global_array)[list(self.indices)]


def rows_of_process(mesh, rules, global_rows: int, process_index: int) -> ProcessRows:
    """The rows of a global batch held by the devices of process `process_index` (a TPU
    topology's devices carry their host's index, so any host's share can be read anywhere)."""
    index_map = batch_sharding(mesh, rules, 1).devices_indices_map((global_rows,))
    held = sorted({(i[0].start or 0, global_rows if i[0].stop is None else i[0].stop)
                   for device, i in index_map.items() if device.process_index == process_index})
    merged: list[tuple[int, int]] = []
    for start, stop in held:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    return ProcessRows(tuple(merged))


def process_rows(mesh, rules, global_rows: int) -> ProcessRows:
    """The rows of a global batch this process must supply (a data loader reads only these)."""
    return rows_of_process(mesh, rules, global_rows, jax.process_index())


def global_batch(local_tree, mesh, rules):
    """Process-local numpy rows (`process_rows(...).select` of the global batch, in that
    order) -> global jax arrays sharded on batch."""
    shards = batch_shards(mesh, rules)
    local_shards = process_rows(mesh, rules, shards).count

    def to_global(x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * shards // local_shards, *x.shape[1:])
        return jax.make_array_from_process_local_data(batch_sharding(mesh, rules, x.ndim), x,
                                                      global_shape)
    return jax.tree.map(to_global, local_tree)


def batch_axes(rules) -> tuple[str, ...]:
    """The mesh axes the batch's rows are split over."""
    axes = dict(tuple(r) for r in rules).get("batch")
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)
