"""Mesh shapes and the logical-axis rules that map model axes onto them.

Axes: `data` (pure data parallelism), `fsdp` (data parallel + parameters sharded), `tensor`
(Megatron-style: heads and MLP columns split). -1 on one axis fills the remaining devices.
"""

import ml_collections

# name: (data, fsdp, tensor)
SHAPES = {
    "cpu": (-1, 1, 1),  # All local devices as data parallel (one device by default on CPU).
    "fsdp": (1, -1, 1),  # Every device shards parameters and batch.
    "fsdp_tp2": (1, -1, 2),
    "fsdp_tp4": (1, -1, 4),
    "fsdp_tp8": (1, -1, 8),  # e.g. 11b on a v5p-64 or 8 x H100 nodes
}

# Logical axis -> mesh axis (or axes, or None = replicated). Models annotate their parameters
# with the names on the left; only this table knows about the mesh.
RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),  # Stacked blocks (model.scan_layers): every device holds every layer.
    ("norm", None),
    ("embed_act", None),  # Residual-stream width: replicated (the batch axis is sharded).
    ("score", None),
    ("segments", None),
)


def get_config(name: str = "cpu") -> ml_collections.ConfigDict:
    if name not in SHAPES:
        raise ValueError(f"mesh preset {name!r} is unknown; choose one of {sorted(SHAPES)}")
    data, fsdp, tensor = SHAPES[name]
    c = ml_collections.ConfigDict()
    c.data = data  # Data-parallel axis size (-1: fill).
    c.fsdp = fsdp  # Fully-sharded data-parallel axis size (-1: fill).
    c.tensor = tensor  # Tensor-parallel axis size (-1: fill).
    c.rules = RULES  # Logical-axis rules, see RULES above.
    return c


def distributed_config() -> ml_collections.ConfigDict:
    """How processes find each other; the defaults mean one process, no jax.distributed."""
    c = ml_collections.ConfigDict()
    c.coordinator_address = ""  # host:port of process 0; empty and num_processes=1: single process.
    c.num_processes = 1  # Processes in the job.
    c.process_id = 0  # This process's index.
    c.from_environment = False  # True on TPU pods / SLURM: initialize() reads the environment.
    c.local_cpu_devices = 0  # >0: CPU devices per process (local multi-process runs and tests).
    c.initialization_timeout_s = 120  # Give up (clear error) when peers do not show up.
    c.heartbeat_timeout_s = 30  # A peer silent this long is dead: the others exit, not hang.
    return c
