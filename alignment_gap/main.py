"""Entry point: `python -m alignment_gap.main --config configs/X.py:variant --workdir DIR`.

Any field can be overridden with `--config.field=value` (e.g. `--config.model.num_layers=4`).
The config is validated before anything is built; a bad value exits with one line naming the
field and the fix.

The console shows our stage lines, progress and the verdict; library logging (orbax, tfds,
grain, jax) goes to `<workdir>/log.txt` (`alignment_gap/console.py`), and `--verbose` shows it
on the console too.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys

from alignment_gap import allocator

if __name__ == "__main__":
    # The same command again with a caching malloc (see there), before the heavy imports
    # (0.6-0.8 s of start-up, once: a preloaded process and its children skip it).
    allocator.reexec()

import jax
from absl import app, flags
from ml_collections import config_flags

from alignment_gap import config_checks, console, preemption, run_dir, sharding
from alignment_gap.errors import ONE_LINE, ConfigError, is_disk_full
from alignment_gap.study import sweep_members

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file path[:variant].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, outputs.")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show library logging (orbax, tfds, grain, jax) on the console as well as "
    "in <workdir>/log.txt.")
flags.mark_flags_as_required(["config", "workdir"])

BUCKET_PREFIXES = ("gs://", "s3://", "az://")
# config.task -> the module whose `run(config, workdir)` does it. Only the task's module is
# imported: a trainer process then skips the study's statistics and plotting imports (1.2 s of
# its start-up on 2 cores, paid by every process of a multi-host run).
TASKS = {"demo": "alignment_gap.demo", "sft": "alignment_gap.train.sft",
         "preference_model": "alignment_gap.train.preference",
         "policy": "alignment_gap.train.policy", "study": "alignment_gap.study.run"}


def use_compilation_cache(workdir: str, sweep_shard: int = 0):
    """Persist compiled programs under the workdir: a study's stages (and a resumed run) share
    the same shapes, so most of their compiles become cache reads. One directory per process
    (and sweep shard), so no process reads an entry another is still writing.
    $JAX_COMPILATION_CACHE_DIR, when set, wins."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir", os.path.join(
        os.path.abspath(workdir), "jax_cache",
        f"shard_{sweep_shard}_process_{jax.process_index()}"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, where a config file that does not load (a misspelt file or variant) or
    an override naming no field exits with one line naming the flag, not a traceback."""
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.keys()  # a file that failed to load raises here, not mid-run
        return rest
    except flags.Error as e:  # absl's own, with the config's traceback inside its text
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        problem = lines[0] if len(lines) == 1 else f"{lines[0].split(': ')[0]}: {lines[-1]}"
    except (AttributeError, KeyError) as e:  # an override of a field the config lacks
        unknown, *hint = str(e).strip("'\"").replace("\\'", "'").split("\\n")
        unknown = unknown.strip("'\"")
        flag = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                     and a.split("=")[0].rsplit(".", 1)[-1] == unknown), f"--config.{unknown}")
        problem = (f"{flag}: the config has no field {unknown!r}"
                   + (f" ({hint[0].strip()})" if hint else "") + "; check its spelling "
                   "(the config file lists its fields)")
    except OSError as e:  # no such config file
        problem = f"--config: {str(e).strip().splitlines()[-1].strip()}"
    print(f"error: {problem}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    del argv
    console.route(verbose=_VERBOSE.value)
    config = _CONFIG.value
    held = contextlib.ExitStack()
    try:
        if config.task not in TASKS:
            raise ConfigError(
                f"config.task: {config.task!r} is unknown; use one of {sorted(TASKS)}")
        if _WORKDIR.value.startswith(BUCKET_PREFIXES):
            raise ConfigError(
                f"--workdir: {_WORKDIR.value} is a bucket URL, but metrics, streams and reports "
                "are written as local files; mount the bucket (launch/tpu_vm.sh --bucket NAME "
                "mounts gs://NAME at /mnt/gcs/NAME on every worker) and pass that path")
        sharding.initialize_distributed(config.distributed)
        preemption.install()
        sweep = config.get("sweep", {})
        shard = sweep.get("shard", 0)
        if sweep.get("shards", 1) == 1:  # a sweep's hosts share the workdir by design
            held.enter_context(run_dir.lock(_WORKDIR.value))
        if "sweep" in config:  # every live shard must share the runs out alike
            held.enter_context(sweep_members.member(_WORKDIR.value, config))
        console.log_to(os.path.join(_WORKDIR.value, console.log_name(jax.process_index(), shard)))
        logging.info("alignment_gap.main %s", " ".join(sys.argv[1:]))
        config_checks.validate(config, jax.device_count())
        use_compilation_cache(_WORKDIR.value, shard)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        with held:
            importlib.import_module(TASKS[config.task]).run(config, _WORKDIR.value)
    except ONE_LINE as e:  # Bad input or a diverged run: one line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except preemption.Preempted as e:  # saved; the scheduler requeues on this status
        print(f"preempted: {e}", file=sys.stderr)
        preemption.record_saved()
        sys.exit(preemption.EXIT_REQUEUE)
    except Exception as e:
        if not is_disk_full(e):
            raise
        _last_line(f"error: no space left on the device of {_WORKDIR.value}; free space or "
                   "move --workdir, then run the same command: the last good checkpoint of every "
                   "run is intact and the run resumes from it")
        os._exit(1)


def _last_line(line: str):
    """Write `line` as stderr's last line. The checkpoint writer's threads report the same disk
    failure again, at any moment until the process ends (their files are temporary ones that a
    rerun ignores), so stderr is handed to /dev/null before the line goes out, on a line of its
    own: a thread may have stopped mid-line (one CI run ended on four spaces of a traceback)."""
    sys.stdout.flush()
    sys.stderr.flush()
    err = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    os.write(err, f"\n{line}\n".encode())


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
