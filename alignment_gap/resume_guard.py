"""A rerun in a workdir with checkpoints resumes that run: its config may differ from the one
the run started with only where the difference changes nothing already trained.

    check(workdir, config)   # before the trainer writes config.json; ConfigError naming fields
    check_inputs(workdir, {field: identity})   # the frozen runs it trains against (inputs.json)

May change: where things are (data, tokenizer and checkpoint paths: workdirs move), how the
work is laid out (mesh, processes, micro-batches, remat, the frozen models' dtype), how often it
logs and saves, and `num_steps` when the learning rate does not decay towards it
(`end_lr_fraction` 1: constant after warm-up).
Everything else (seed, loss, learning rate, data, sampling, evaluation and stop rules) would
make one run of two halves that no single config describes. Model fields are left to the
checkpoint's own check (`checkpoint.check_compatible`), which names them as it refuses.
"""

from __future__ import annotations

import json

from alignment_gap import checkpoint, run_dir
from alignment_gap.errors import ConfigError

_LAYOUT = ("distributed.", "mesh.", "model.")
_FREE = {"log_every", "checkpoint_every", "checkpoint_steps", "max_to_keep", "microbatches",
         "data.dir", "data.manual_dir", "data.num_threads", "data.tokenizer", "init_from",
         "replay.stream", "task"}
# The frozen models' configs: how they run (their dtype on another accelerator, remat) may
# change; their architecture is checked against their checkpoints as they load.
_FROZEN_MODELS = ("proxy_model.", "eval.golden_model.", "eval.opponent_model.")
# Fields a config may lack (`.get` defaults): one present on one side only is a change.
_OPTIONAL = ("eval.opponent_model.", "eval.first_prompt")


def _may_change(field: str) -> bool:
    if field == "model.dtype":  # the trained model computes in it: steps of two precisions
        return False
    if field.startswith(_FROZEN_MODELS):
        return field.rsplit(".", 1)[1] in checkpoint.NOT_ARCHITECTURE
    return (field in _FREE or field.startswith(_LAYOUT) or field.endswith("checkpoint")
            or field.endswith(".remat"))


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changes(started: dict, now: dict) -> list[tuple[str, object, object]]:
    """(field, value the run started with, value now) of every difference a resume refuses
    (None for a side that lacks the field). Fields only one side has are a change where the
    config may omit them (`_OPTIONAL`); elsewhere they come from another version of the
    code, and are not compared."""
    before, after = _flat(started), _flat(json.loads(json.dumps(now, default=str)))
    fields = (before.keys() & after.keys()) | {f for f in before.keys() ^ after.keys()
                                               if f.startswith(_OPTIONAL)}
    out = [(f, before.get(f), after.get(f)) for f in sorted(fields)
           if before.get(f) != after.get(f) and not _may_change(f)]
    steps_only = [c for c in out if c[0] == "num_steps"]
    if steps_only and after.get("end_lr_fraction", 0.0) == 1.0:
        out.remove(steps_only[0])  # no decay towards num_steps: the trained steps still hold
    return out


def _resuming(workdir: str) -> bool:
    return run_dir.has_checkpoints(workdir)


def check(workdir: str, config) -> None:
    """Refuse to resume a run in `workdir` under a config that changes what it trained."""
    started = run_dir.read_json(workdir, run_dir.CONFIG)
    if started is None or not _resuming(workdir):
        return
    found = changes(started, config.to_dict())
    if not found:
        return
    said = "; ".join(f"{field} {old!r} -> {new!r}" for field, old, new in found)
    why = (" (the learning rate decays towards num_steps: set end_lr_fraction=1.0 for a run "
           "that can be extended)" if any(f == "num_steps" for f, _, _ in found) else "")
    raise ConfigError(f"{workdir}: this run resumes from its checkpoints but the config changed "
                      f"what it trains: {said}{why}; set it back, or start in a new workdir")


INPUTS = "inputs.json"  # {config field: identity of the finished run it named}


def check_inputs(workdir: str, identities: dict) -> None:
    """Refuse to resume a run in `workdir` whose frozen inputs (SFT start, proxy, judge,
    opponent, replayed stream: `{field: identity}`, `common.run_identity`) are other runs
    than those it started with. Their paths may move; a run trained again in its place, or
    another run named, would train the rest of the steps against another model."""
    started = run_dir.read_json(workdir, INPUTS) if _resuming(workdir) else None
    changed = sorted(f for f in identities.keys() & (started or {}).keys()
                     if identities[f] != started[f])
    if changed:
        raise ConfigError(f"{workdir}: this run resumes from its checkpoints but "
                          f"{', '.join('config.' + f for f in changed)} now "
                          f"name{'s' * (len(changed) == 1)} another finished run than the one "
                          "it started with; point back to that run, or start in a new workdir")
    run_dir.write_json(workdir, INPUTS, {**(started or {}), **identities})
