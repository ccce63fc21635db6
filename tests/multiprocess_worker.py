"""One process of the multi-process equivalence test: two update steps on a fixed batch, then
a relabelling of a small synthetic dataset by a preference model sharded over every process.

    python tests/multiprocess_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID DEVICES OUT.json \
        DATA_DIR [interleaved]

Every process builds the same global batch from a seed and supplies only its own rows, so
the result must not depend on how devices are split across processes; the judge's program runs
on every process's devices while process 0 writes the relabelled dataset. `interleaved` orders
the devices so that the processes alternate along the batch axis (fsdp 4): each then supplies two
blocks of rows, as hosts do on a torus-ordered TPU mesh.
"""

import json
import sys

import jax
import numpy as np
import optax

from alignment_gap import logprobs, losses, sharding
from alignment_gap.data import builders, relabel, tokenizer
from alignment_gap.data import world as W
from alignment_gap.data.pipelines import as_text
from alignment_gap.models import LanguageModel, PreferenceModel, TransformerConfig
from alignment_gap.train.state import init_train_state, make_update_step
from configs import meshes, models

GLOBAL_ROWS = 8


def loss_fn(model, batch, extras):
    per_token, mask = logprobs.next_token_logprobs(model, batch["tokens"], batch["mask"])
    return losses.next_token_loss(per_token, mask), {}


def relabelled(data_dir, mesh, rules, layout) -> list:
    """(chosen, rejected) of every train record as a random preference model judges them."""
    world = W.WorldConfig(seed=2)
    tok = tokenizer.synthetic_tokenizer(data_dir, world, vocab_size=256, corpus_posts=300)
    source = builders.prepare(builders.synthetic_builder("comparisons", data_dir, world, train=8,
                                                         validation=0, test=0))
    judge_model = sharding.create_sharded(
        PreferenceModel, TransformerConfig.from_config(models.get_config("mini")), 0, mesh, rules)
    judge = relabel.model_judge(judge_model, tok, 32, 8, mesh, rules)
    name = f"judged_{jax.process_count()}_{layout}"
    out = relabel.relabel(source, judge, name, data_dir)["train"]
    return [[as_text(out[i][k]) for k in ("chosen", "rejected")] for i in range(len(out))]


def interleaved_mesh():
    """fsdp 4 over the devices of every process in turn: process p holds shards p and p + n."""
    by_process = [[d for d in jax.devices() if d.process_index == p]
                  for p in range(jax.process_count())]
    order = [d for group in zip(*by_process, strict=True) for d in group]
    return sharding.mesh_from_grid(np.array(order).reshape(1, len(order), 1))


def main(coordinator, num_processes, process_id, devices, out_path, data_dir, layout="torus"):
    dist = meshes.distributed_config()
    dist.coordinator_address = coordinator
    dist.num_processes, dist.process_id = int(num_processes), int(process_id)
    dist.local_cpu_devices = int(devices)
    dist.initialization_timeout_s = 60
    sharding.initialize_distributed(dist)

    mesh_cfg = meshes.get_config("cpu")
    mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = 1, 2, 2
    mesh = sharding.make_mesh(mesh_cfg) if layout == "torus" else interleaved_mesh()
    rules = mesh_cfg.rules
    cfg = TransformerConfig.from_config(models.get_config("mini"))
    lm = sharding.create_sharded(LanguageModel, cfg, 0, mesh, rules)
    tx = optax.adamw(1e-3)
    graphdef, state, state_sh = init_train_state(lm, tx, mesh, rules)

    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 512, (GLOBAL_ROWS, 12)).astype(np.int32)
    mask = np.arange(12)[None] < rng.integers(4, 13, (GLOBAL_ROWS, 1))
    mine = sharding.process_rows(mesh, rules, GLOBAL_ROWS)
    batch = sharding.global_batch({"tokens": mine.select(tokens), "mask": mine.select(mask)},
                                  mesh, rules)
    batch_sh = jax.tree.map(lambda x: x.sharding, batch)
    step = make_update_step(graphdef, tx, loss_fn, mesh, rules, state_sh, batch_sh)
    state, first = step(state, batch)
    state, second = step(state, batch)
    result = {"loss": float(first["loss"]), "grad_norm": float(first["grad_norm"]),
              "loss_after_step": float(second["loss"]), "processes": jax.process_count(),
              "devices": jax.device_count(), "rows": [list(b) for b in mine.blocks],
              "relabelled": relabelled(data_dir, mesh, rules, layout)}
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
    # Don't let a lagging peer's shutdown barrier turn a finished test into a timeout.
    jax.distributed.shutdown() if jax.process_count() > 1 else None
