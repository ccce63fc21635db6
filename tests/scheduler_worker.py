"""One of two processes running a study's stages together (the scheduler's multi-process test).

    python tests/scheduler_worker.py COORDINATOR PROCESS_ID WORKDIR OUT.json

Three stages in a chain. As in a trainer, every process runs each stage and process 0 alone
writes its finished record, after a moment; process 1 never sees those records (a network
filesystem's stale cache, at its worst). Both must run every stage once, in order, and return.
"""

import json
import sys
import time

import jax
import ml_collections

from alignment_gap import run_dir, sharding
from alignment_gap.study import scheduler
from configs import meshes


def main(coordinator, process_id, workdir, out_path):
    dist = meshes.distributed_config()
    dist.coordinator_address, dist.num_processes = coordinator, 2
    dist.process_id, dist.local_cpu_devices = int(process_id), 1
    dist.initialization_timeout_s, dist.heartbeat_timeout_s = 60, 10
    sharding.initialize_distributed(dist)
    ran = []

    def run(config, out):
        ran.append(config.label)
        if jax.process_index() == 0:
            time.sleep(0.5)
            run_dir.finish(out, 1)

    if jax.process_index() == 1:
        scheduler.run_dir.is_finished = lambda directory, steps: False
    stages = []
    for label in ("a", "b", "c"):
        config = ml_collections.ConfigDict({"label": label})
        stages.append(scheduler.Stage(label, config, run, tuple(stages[-1:])))
    scheduler.run_stages(stages, workdir, poll_s=0.1, timeout_s=30)
    with open(out_path, "w") as f:
        json.dump({"ran": ran}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
    jax.distributed.shutdown()
