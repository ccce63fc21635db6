"""Per-device memory of an online policy run at scale, from the sharded abstract state.

    python bench/memory_table.py

For each (policy size, accelerator preset): the policy's float32 parameters and AdamW moments,
the frozen float32 reference, proxy and golden judge (loaded for evaluation), each sharded by
the rule table on the preset's mesh (exact: `NamedSharding.shard_shape` on an abstract mesh,
no devices needed), plus an estimate of
the update step's saved activations in bfloat16 (no rematerialisation, one micro-batch):
per layer `B L (6 d + 3 f) + B H L^2` values over the pairs' `[prompt | chosen | rejected]`
sequences (L = P + 2R), plus float32 logits at the 2R response positions, `B 2R V`, for the
policy and the reference, with the batch split over data x fsdp and heads / MLP / vocab over
tensor. Batch: 32 pairs, prompt 512 + two responses of 64 tokens (TL;DR-sized).
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding

from alignment_gap import sharding
from alignment_gap.models import LanguageModel, PreferenceModel, TransformerConfig
from alignment_gap.presets import meshes, models

GIB = 1024**3
# preset: (accelerator, memory per device in GiB, (data, fsdp, tensor))
PRESETS = {
    "v5p x 8 chips": ("TPU v5p", 95, (1, 8, 1)),
    "v5p x 32 chips": ("TPU v5p", 95, (1, 8, 4)),
    "v4 x 32 chips": ("TPU v4", 32, (1, 8, 4)),
    "v5e x 64 chips": ("TPU v5e", 16, (1, 16, 4)),
    "H100 x 8": ("H100 80 GB", 80, (1, 8, 1)),
    "H100 x 16 (2 nodes)": ("H100 80 GB", 80, (1, 16, 1)),
}
# (policy, proxy, golden judge loaded for evaluation, presets)
RUNS = [("3b", "770m", "11b", ["v5p x 8 chips", "v4 x 32 chips", "H100 x 8"]),
        ("11b", "770m", "11b", ["v5p x 32 chips", "v5e x 64 chips", "H100 x 16 (2 nodes)"])]
PAIRS, PROMPT, RESPONSE = 32, 512, 64
LENGTH = PROMPT + 2 * RESPONSE  # one sequence per pair, the prompt read once


def state_bytes_per_device(cfg, cls, mesh) -> int:
    abstract = nnx.eval_shape(lambda: cls(cfg, nnx.Rngs(0)))
    with nnx.logical_axis_rules(meshes.RULES):  # an abstract mesh needs no mesh context
        specs = nnx.get_partition_spec(nnx.state(abstract, nnx.Param))
    total = 0
    for leaf, spec in zip(jax.tree.leaves(nnx.state(abstract, nnx.Param)),
                          jax.tree.leaves(specs), strict=True):
        shard = NamedSharding(mesh, spec).shard_shape(leaf.shape)
        total += math.prod(shard) * 4
    return total


def activation_bytes_per_device(cfg, shape) -> float:
    data, fsdp, tensor = shape
    b = PAIRS / (data * fsdp)
    d, f, h, v = cfg.width, cfg.mlp_dim / tensor, cfg.num_heads / tensor, cfg.vocab_size / tensor
    per_layer = b * LENGTH * (6 * d + 3 * f) + b * h * LENGTH**2
    return cfg.num_layers * per_layer * 2 + 2 * b * 2 * RESPONSE * v * 4


def main():
    rows = []
    for policy_size, proxy_size, golden_size, presets in RUNS:
        policy_cfg = TransformerConfig.from_config(models.get_config(policy_size))
        proxy_cfg = TransformerConfig.from_config(models.get_config(proxy_size))
        golden_cfg = TransformerConfig.from_config(models.get_config(golden_size))
        for name in presets:
            accel, hbm, shape = PRESETS[name]
            mesh = AbstractMesh(shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
            params = state_bytes_per_device(policy_cfg, LanguageModel, mesh)
            proxy = state_bytes_per_device(proxy_cfg, PreferenceModel, mesh)
            golden = state_bytes_per_device(golden_cfg, PreferenceModel, mesh)
            acts = activation_bytes_per_device(policy_cfg, shape)
            total = 4 * params + proxy + golden + acts  # params, 2 Adam moments, reference
            rows.append((f"{policy_size} ({proxy_size}, {golden_size})", name, shape, params,
                         proxy, golden, acts, total, hbm))
    print(f"\nOnline policy run, {PAIRS} pairs x {LENGTH} tokens ([prompt | chosen | rejected]) "
          "per step; "
          "GiB per device\n")
    print("| policy (proxy, golden) | preset | mesh d x f x t | params | Adam | reference | proxy "
          "| golden | activations (est.) | total | device | fits |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run, name, shape, params, proxy, golden, acts, total, hbm in rows:
        print(f"| {run} | {name} | {'x'.join(map(str, shape))} | {params / GIB:.1f} | "
              f"{2 * params / GIB:.1f} | {params / GIB:.1f} | {proxy / GIB:.2f} | "
              f"{golden / GIB:.1f} | {acts / GIB:.1f} | {total / GIB:.1f} | {hbm} | "
              f"{'yes' if total / GIB < 0.9 * hbm else 'NO'} |")


if __name__ == "__main__":
    main()
