"""The training loop every trainer runs.

    for step in start+1 .. num_steps:
        batch = next_batch(state, key)          # offline: the next dataset batch;
                                                # online: sample with the current policy
        state, metrics = update(state, batch, key)   # one jitted, donated update step
        read the previous step's metrics          # one step late: the next step is in flight
        every checkpoint_every steps, at the steps in checkpoint_steps (if the config has
        them) and at the end: verify, evaluate, checkpoint
        preempted (SIGTERM / SIGINT, `preemption.py`): checkpoint this step, record, stop

A non-finite metric stops the run with its step and the last good checkpoint named; the bad
state is never checkpointed. Each checkpoint holds the loop's record at its step (last
metrics, the stop rule's decision, the steps not yet logged). A resumed run first drops the
metrics logged after the step it resumes from (an interrupted attempt logged them; they are
logged again) and averages in the steps that record left unlogged, so `metrics.jsonl` reads as
one uninterrupted run; a run killed after its last save, or after the save of a step where its
stop rule fired, finishes from that record without training on. A run directory holds
`config.json`, `checkpoints/`, `metrics.jsonl`, `tensorboard/` and, once finished, the record
`run_dir.finish` writes (last step and metrics); re-running a finished run says so and exits
(`run_dir.already_finished`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax

from alignment_gap import metrics as metrics_lib
from alignment_gap import preemption, run_dir
from alignment_gap.checkpoint import Checkpointer
from alignment_gap.errors import NonFiniteLoss
from alignment_gap.preemption import Preempted


@dataclasses.dataclass
class Loop:
    """What a trainer hands the loop. `update(state, batch, key) -> (state, metrics)`."""

    config: object
    workdir: str
    update: Callable
    next_batch: Callable  # (state, key) -> batch
    checkpointer: Checkpointer
    meta: dict
    data_iterator: object = None
    evaluate: Callable | None = None  # state -> (metrics, why to stop: "" / False to go on)
    on_checkpoint: Callable | None = None  # step -> None (e.g. seal the recorded stream)
    progress_keys: tuple = ("loss",)
    evaluate_at_start: bool = False  # Also evaluate the starting point (step 0) of a fresh run.

    def run(self, state, rng) -> tuple[object, dict]:
        log = RunLog(self.config, self.workdir, self.checkpointer,
                     int(jax.device_get(state.step)))
        try:
            return self._run(state, rng, log)
        finally:
            log.close()

    def _run(self, state, rng, log: RunLog):
        c, start, writer = self.config, log.start, log.writer
        pending, last, stop = None, log.saved.get("metrics", {}), log.saved.get("stop", "")
        saves = save_steps(c)
        if self.evaluate is not None and self.evaluate_at_start and start == 0:
            writer.write(0, self.evaluate(state)[0], prefix="eval/")
        if stop and jax.process_index() == 0:
            print(f"step {start}: had stopped early ({stop})", flush=True)
        for step in range(start + 1, (start if stop else c.num_steps) + 1):
            rng, key = jax.random.split(rng)
            batch = self.next_batch(state, key)
            state, step_metrics = self.update(state, batch, key)
            if pending is not None:
                last = log.record(*pending, self.progress_keys)
            pending = (step, step_metrics)
            preempted = preemption.reached() and step < c.num_steps
            scheduled = step in saves
            if scheduled or preempted:
                last = log.record(*pending, self.progress_keys)
                pending = None
                if self.evaluate is not None and scheduled:
                    scores, stop = self.evaluate(state)
                    writer.write(step, scores, prefix="eval/")
                    last.update({f"eval/{k}": v for k, v in scores.items()})
                    if stop:  # the steps since the last line would never be logged
                        log.write_window(step, self.progress_keys)
                if self.on_checkpoint is not None:  # before saving: a crash in between then
                    self.on_checkpoint(step)         # leaves a chunk a resume will drop
                self.checkpointer.save(state, rng, self.meta, self.data_iterator,
                                       log=log.saved_record(last, stop))
                self.checkpointer.wait()
                self.checkpointer.prune(saves)
                log.last_good = step
                if stop:
                    if jax.process_index() == 0:
                        print(f"step {step}: stopping early ({stop})", flush=True)
                    break
                if preempted:
                    signal = preemption.requested() or "SIGTERM (to one of the processes)"
                    run_dir.preempted(self.workdir, step, signal, log.window.added)
                    raise Preempted(f"{signal} at step {step} of {c.num_steps}: saved "
                                    f"{self.checkpointer.path(step)}; run the same command "
                                    "again to resume")
        final_step = int(jax.device_get(state.step))
        run_dir.finish(self.workdir, final_step, metrics=last, stopped_early=bool(stop))
        return state, last


def save_steps(config) -> set[int]:
    """The steps a run checkpoints (and evaluates) at: every `checkpoint_every`, the last, and
    any extra `checkpoint_steps` (a curve's low-KL start; set only where used, so the configs
    and stage keys of runs without them do not change)."""
    return {*range(config.checkpoint_every, config.num_steps + 1, config.checkpoint_every),
            config.num_steps, *config.get("checkpoint_steps", ())}


class RunLog:
    """One run directory's log: per-step metrics averaged over `log_every` steps into
    `metrics.jsonl` (and TensorBoard), a non-finite metric stopped with the last good
    checkpoint named, and a resumed run's log continued as one uninterrupted run's."""

    def __init__(self, config, workdir: str, checkpointer: Checkpointer, start: int):
        self.config, self.workdir, self.checkpointer, self.start = (config, workdir,
                                                                    checkpointer, start)
        metrics_lib.drop_after(workdir, start)
        # As `drop_after` keeps metrics.jsonl's records up to `start` (none for a fresh start).
        self.writer = metrics_lib.Writer(workdir, purge_step=start + 1 if start else 0)
        self.window = metrics_lib.Window()
        record = checkpointer.log_record(start) if start else None
        self.saved = record or {}  # the loop's record at `start` (`saved_record`)
        unlogged = (record["unlogged"] if record is not None  # else saved before checkpoints
                    else run_dir.unlogged_at(workdir, start))  # held it: a preemption's record
        for step_metrics in unlogged:
            self.window.add(step_metrics)
        run_dir.clear_preempted(workdir)
        self.progress = metrics_lib.Progress(config.num_steps, start)
        self.last_good = checkpointer.latest_step()

    def saved_record(self, metrics: dict, stop) -> dict:
        """What a checkpoint keeps of the loop: its last metrics, why it stops ("" to go on)
        and the steps this log has not yet averaged into a line."""
        return {"metrics": metrics, "stop": stop or "", "unlogged": self.window.added}

    def record(self, step, step_metrics, progress_keys=("loss",), label: str = "") -> dict:
        """Add one step's metrics (device or host scalars); returns them on the host."""
        host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        bad = {k: v for k, v in host.items() if not math.isfinite(v)}
        if bad:
            where = (self.checkpointer.path(self.last_good) if self.last_good is not None
                     else "none (no checkpoint was written yet)")
            raise NonFiniteLoss(f"step {step}{f' ({label})' if label else ''}: non-finite "
                                f"{bad}; stopped without checkpointing this state; last good "
                                f"checkpoint: {where}; lower config.learning_rate (or check the "
                                "data) and run in a new workdir (a rerun here resumes from that "
                                "checkpoint under this run's config)")
        self.window.add(host)
        if step % self.config.log_every == 0 or step == self.config.num_steps:
            self.write_window(step, progress_keys, label)
        return host

    def write_window(self, step: int, progress_keys=("loss",), label: str = ""):
        """Average the steps added since the last line into one line at `step`."""
        if not self.window.added:
            return
        averaged = self.window.compute()
        self.window.reset()
        averaged["steps_per_s"] = self.progress.window_rate(step)
        if "tokens" in averaged:  # tokens through the update per step -> tokens/s
            averaged["update_tokens_per_s"] = averaged["tokens"] * averaged["steps_per_s"]
        self.writer.write(step, averaged)
        line = self.progress.line(step, averaged, progress_keys)
        if jax.process_index() == 0:
            print(f"{line}  {label}" if label else line, flush=True)

    def close(self):
        self.writer.close()
