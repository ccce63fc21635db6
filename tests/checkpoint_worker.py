"""One of two processes saving or restoring a train state sharded over both (the checkpointer's
multi-process restore test).

    python tests/checkpoint_worker.py COORDINATOR PROCESS_ID save|restore DIRECTORY OUT.json

`save` writes steps 1 and 2, each parameter `arange(4096) + step` split over 2 x 2 CPU devices;
`restore` writes the step it resumed from and the first value of each of its local shards;
`refuse` restores with a check that refuses every checkpoint while process 1 cannot read step
2's meta, and writes the error each process raised; `stale` restores as `restore` does while
process 1's listing of the directory lacks step 2 (a network filesystem's stale cache).
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alignment_gap import checkpoint, sharding
from alignment_gap.checkpoint import Checkpointer
from alignment_gap.errors import IncompatibleCheckpoint
from alignment_gap.train.state import TrainState
from configs import meshes

SIZE = 4096


def main(coordinator, process_id, mode, directory, out_path):
    dist = meshes.distributed_config()
    dist.coordinator_address, dist.num_processes = coordinator, 2
    dist.process_id, dist.local_cpu_devices = int(process_id), 2
    dist.initialization_timeout_s, dist.heartbeat_timeout_s = 60, 10
    sharding.initialize_distributed(dist)
    mesh = jax.make_mesh((4,), ("x",), devices=jax.devices())
    split, whole = NamedSharding(mesh, P("x")), NamedSharding(mesh, P())

    def state(step):
        w = jax.make_array_from_callback(
            (SIZE,), split, lambda index: np.arange(SIZE, dtype=np.float32)[index] + step)
        return TrainState(step=jax.device_put(jnp.asarray(step, jnp.int32), whole),
                          params={"w": w}, opt_state={"m": w})

    checkpointer = Checkpointer(directory, max_to_keep=5)
    result = {}
    if mode == "save":
        for step in (1, 2):
            checkpointer.save(state(step), jax.random.key(0), {"kind": "test"})
            checkpointer.wait()
    elif mode == "refuse":
        if int(process_id) == 1:
            read = checkpoint._restore_meta

            def unreadable(manager, step):
                if step == 2:
                    raise OSError("meta of step 2: unreadable here")
                return read(manager, step)

            checkpoint._restore_meta = unreadable

        def refuse(meta):
            raise IncompatibleCheckpoint(f"a {meta['kind']!r} checkpoint does not fit")

        try:
            checkpointer.restore(state(0), TrainState(whole, {"w": split}, {"m": split}),
                                 check=refuse)
        except IncompatibleCheckpoint as e:
            result = {"refused": str(e)}
    else:
        if mode == "stale" and int(process_id) == 1:
            listed = checkpointer.manager.all_steps
            checkpointer.manager.all_steps = lambda: [s for s in listed() if s != 2]
        restored, _, _ = checkpointer.restore(state(0), TrainState(whole, {"w": split},
                                                                   {"m": split}))
        result = {"step": int(restored.step),
                  "firsts": sorted(float(np.asarray(s.data)[0])
                                   for s in restored.params["w"].addressable_shards)}
    checkpointer.close()
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
    jax.distributed.shutdown()
