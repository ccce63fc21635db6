"""Every trainer end to end on tiny configs, in real processes through the entry point.

SFT -> preference model (initialised from SFT) -> online policy (recording its stream) ->
offline tandem replay (must reproduce the online run) -> offline on the dataset; plus exact
resume, a diverging run, and frozen-checkpoint errors caught before any compile.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from alignment_gap.data.pipelines import BatchShape
from alignment_gap.metrics import read_jsonl
from alignment_gap.sources import replay_iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(config, workdir, *overrides, expect=0):
    done = subprocess.run([sys.executable, "-m", "alignment_gap.main", "--config",
                           os.path.join(ROOT, "configs", config), "--workdir", str(workdir),
                           *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == expect, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    data = f"--config.data.dir={root / 'data'}"
    main("sft.py:tiny", root / "sft", data)
    main("preference_model.py:tiny", root / "proxy", data, f"--config.init_from={root / 'sft'}")
    policy = [data, f"--config.sft_checkpoint={root / 'sft'}",
              f"--config.proxy_checkpoint={root / 'proxy'}"]
    return root, policy


def test_sft_and_preference_model_train_and_evaluate(runs):
    root, _ = runs
    sft = read_jsonl(root / "sft" / "metrics.jsonl")
    train = [r for r in sft if "loss" in r]
    assert train[-1]["loss"] < train[0]["loss"]  # it learns
    evals = [r["eval/loss"] for r in sft if "eval/loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0]
    proxy = read_jsonl(root / "proxy" / "metrics.jsonl")
    assert any("eval/accuracy" in r for r in proxy)
    done = json.loads((root / "proxy" / "DONE.json").read_text())
    assert done["step"] == 20
    again = main("sft.py:tiny", root / "sft", f"--config.data.dir={root / 'data'}")
    assert "already holds a finished run" in again.stdout


def train_rows(run):
    return [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


def test_online_run_is_reproduced_exactly_by_tandem_replay(runs):
    root, policy = runs
    main("policy.py:online_tiny", root / "online", *policy, "--config.record_stream=True")
    stream = root / "online" / "stream"
    assert sorted(os.listdir(stream)) == ["steps-00000001-00000003.array_record",
                                          "steps-00000004-00000006.array_record"]
    done = main("policy.py:offline_tiny", root / "tandem", *policy,
                f"--config.replay.stream={stream}")
    assert "not a retrace" not in done.stdout  # the online run's settings: a retrace
    online = train_rows(root / "online")
    tandem = train_rows(root / "tandem")
    assert [r["step"] for r in online] == [r["step"] for r in tandem] == [2, 4, 6]
    for a, b in zip(online, tandem, strict=True):
        for key in ("loss", "grad_norm", "h", "kl_sequence", "chosen_logratio"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
    assert online[-1]["kl_sequence"] > 0 and "sample_tokens_per_s" in online[-1]
    # A shuffled replay trains on the same examples in another order: different statistics.
    main("policy.py:offline_tiny", root / "shuffled", *policy, f"--config.replay.stream={stream}",
         "--config.replay.order=shuffle")
    shuffled = train_rows(root / "shuffled")
    assert [r["step"] for r in shuffled] == [2, 4, 6]
    # Step 1 has lr 0 (warm-up), so both start at h = 0; after that the orders tell apart.
    assert any(s["h"] != pytest.approx(o["h"], rel=1e-6)
               for s, o in zip(shuffled[1:], online[1:], strict=True))


def test_a_tandem_replay_under_other_settings_says_it_is_no_retrace():
    """The README's tandem command once paired online_mini (learning rate 2e-4) with
    offline_mini (5e-4): the replay ran the online run's pairs under another update."""
    from alignment_gap.train.policy import retrace_differences
    from configs import policy as presets

    online = json.loads(json.dumps(presets.get_config("online_mini").to_dict()))
    assert retrace_differences(presets.get_config("offline_mini"), online) == [
        "learning_rate 0.0005 (the online run's 0.0002)"]
    same = presets.get_config("offline_mini")
    same.learning_rate = 2e-4
    assert retrace_differences(same, online) == []


def test_offline_dataset_run_and_every_loss(runs):
    root, policy = runs
    for loss in ("dpo", "slic", "best_of_two"):
        main("policy.py:offline_tiny", root / f"offline_{loss}", *policy, f"--config.loss={loss}",
             "--config.num_steps=2", "--config.warmup_steps=1")
        rows = train_rows(root / f"offline_{loss}")
        assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["loss"])
    dpo = train_rows(root / "offline_dpo")
    assert dpo[0]["loss"] == pytest.approx(np.log(2), rel=1e-3)  # h = 0 at the start: -log(1/2)


def test_resume_continues_exactly_as_if_never_stopped(runs):
    root, policy = runs
    straight, stopped = root / "straight", root / "stopped"
    flags = [*policy, "--config.record_stream=True", "--config.log_every=1"]
    main("policy.py:online_tiny", straight, *flags)
    main("policy.py:online_tiny", stopped, *flags, "--config.num_steps=3")
    assert json.loads((stopped / "DONE.json").read_text())["step"] == 3
    main("policy.py:online_tiny", stopped, *flags)  # resume from the step-3 checkpoint
    a, b = train_rows(straight), train_rows(stopped)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a[3:], b[3:], strict=True):
        for key in ("loss", "grad_norm", "kl_sequence", "h"):
            assert y[key] == pytest.approx(x[key], rel=1e-6), (x["step"], key)
    # The resumed run's stream holds each step exactly once, identical to the straight run's.
    names = lambda run: sorted(p.name for p in (run / "stream").iterdir())
    assert names(stopped) == names(straight) == ["steps-00000001-00000003.array_record",
                                                 "steps-00000004-00000006.array_record"]
    shape = BatchShape(8, 64, 24)
    pairs = zip(replay_iterator(str(straight / "stream"), shape),
                replay_iterator(str(stopped / "stream"), shape), strict=True)
    for _, (x, y) in zip(range(6), pairs, strict=False):
        np.testing.assert_array_equal(x.prompt, y.prompt)
        np.testing.assert_array_equal(x.chosen, y.chosen)
        np.testing.assert_array_equal(x.rejected, y.rejected)
    # Its last checkpoint damaged: the run resumes from step 3 and records steps 4-6 anew, once.
    damaged = root / "damaged"
    shutil.copytree(straight, damaged)
    (damaged / "DONE.json").unlink()
    for chunk in (damaged / "checkpoints" / "6" / "params").rglob("d/*"):
        chunk.write_bytes(chunk.read_bytes()[:chunk.stat().st_size // 2])
    main("policy.py:online_tiny", damaged, *flags)
    assert names(damaged) == names(straight)
    pairs = zip(replay_iterator(str(straight / "stream"), shape),
                replay_iterator(str(damaged / "stream"), shape), strict=True)
    for _, (x, y) in zip(range(6), pairs, strict=False):
        np.testing.assert_array_equal(x.chosen, y.chosen)


def test_diverging_run_stops_naming_the_step_and_last_good_checkpoint(runs):
    root, _ = runs
    run = root / "diverge"
    done = main("sft.py:tiny", run, f"--config.data.dir={root / 'data'}",
                "--config.learning_rate=1e30", "--config.grad_clip=0", "--config.warmup_steps=1",
                "--config.checkpoint_every=1", "--config.log_every=1", expect=1)
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("error: step ") and "non-finite" in message
    bad_step = int(message.split()[2].rstrip(":"))
    assert f"last good checkpoint: {run / 'checkpoints' / str(bad_step - 1)}" in message
    saved = sorted(int(p) for p in os.listdir(run / "checkpoints") if p.isdigit())
    assert saved and max(saved) == bad_step - 1  # the bad state was never checkpointed
    assert not (run / "DONE.json").exists()
    # Its advice holds: a lower rate here would make a run of two rates, which is refused.
    assert "lower config.learning_rate (or check the data) and run in a new workdir" in message
    lowered = main("sft.py:tiny", run, f"--config.data.dir={root / 'data'}",
                   "--config.learning_rate=1e-3", "--config.grad_clip=0",
                   "--config.warmup_steps=1", "--config.checkpoint_every=1",
                   "--config.log_every=1", expect=1)
    assert "learning_rate 1e+30 -> 0.001" in lowered.stderr


def test_missing_or_incompatible_frozen_checkpoints_fail_before_compiling(runs, tmp_path):
    root, policy = runs
    data = policy[0]
    missing = main("policy.py:offline_tiny", tmp_path / "a", data,
                   f"--config.sft_checkpoint={tmp_path / 'nowhere'}", expect=1)
    assert "error: config.sft_checkpoint:" in missing.stderr and "does not exist" in missing.stderr
    wrong = main("policy.py:offline_tiny", tmp_path / "b", data,
                 f"--config.sft_checkpoint={root / 'sft'}", "--config.model.num_layers=3",
                 expect=1)
    assert "num_layers=2 (configured 3)" in wrong.stderr
    not_lm = main("policy.py:offline_tiny", tmp_path / "c", data,
                  f"--config.sft_checkpoint={root / 'proxy'}", expect=1)
    assert "holds a 'preference' model, not a 'lm' one" in not_lm.stderr
    # A run still going (or stopped) would lend whatever step it had saved last.
    unfinished = tmp_path / "unfinished_sft"
    shutil.copytree(root / "sft", unfinished)
    (unfinished / "DONE.json").unlink()
    going = main("policy.py:offline_tiny", tmp_path / "d", data,
                 f"--config.sft_checkpoint={unfinished}", expect=1)
    assert going.stderr.strip().splitlines()[-1].startswith(
        f"error: config.sft_checkpoint: {unfinished} has not finished (no DONE.json; its latest "
        "checkpoint is step ")


def test_resuming_with_another_model_stops_naming_the_field_and_keeps_the_checkpoints(runs,
                                                                                      tmp_path):
    root, _ = runs
    run = tmp_path / "sft"
    shutil.copytree(root / "sft", run)
    steps = json.loads((run / "DONE.json").read_text())["step"]
    (run / "DONE.json").unlink()  # as if killed after its last save
    before = sorted(os.listdir(run / "checkpoints"))
    done = main("sft.py:tiny", run, f"--config.data.dir={root / 'data'}",
                "--config.model.num_layers=3", expect=1)
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: resuming {run}: ") and "Traceback" not in done.stderr
    assert "was trained with num_layers=2 (configured 3); set the model config" in message
    assert sorted(os.listdir(run / "checkpoints")) == before  # nothing set aside as damaged
    main("sft.py:tiny", run, f"--config.data.dir={root / 'data'}")  # the right model resumes
    assert json.loads((run / "DONE.json").read_text())["step"] == steps


def test_resuming_under_a_config_that_changes_what_was_trained_stops_naming_the_fields(
        runs, tmp_path):
    """A moved data directory resumes; another learning rate, or more steps of a schedule
    that decays towards num_steps, would make a run of two halves: refused, nothing touched."""
    root, _ = runs
    run = tmp_path / "sft"
    shutil.copytree(root / "sft", run)
    shutil.copytree(root / "data", tmp_path / "moved_data")
    steps = json.loads((run / "DONE.json").read_text())["step"]
    (run / "DONE.json").unlink()
    started = (run / "config.json").read_text()
    for change, says in ((["--config.learning_rate=0.5", "--config.seed=7"],
                          "learning_rate 0.003 -> 0.5; seed 0 -> 7; set it back, or start in a "
                          "new workdir"),
                         ([f"--config.num_steps={steps + 5}"],
                          f"num_steps {steps} -> {steps + 5} (the learning rate decays towards "
                          "num_steps: set end_lr_fraction=1.0 for a run that can be extended)")):
        done = main("sft.py:tiny", run, f"--config.data.dir={tmp_path / 'moved_data'}", *change,
                    expect=1)
        message = done.stderr.strip().splitlines()[-1]
        assert message.startswith(f"error: {run}: this run resumes from its checkpoints but the "
                                  "config changed what it trains: ") and says in message, message
        assert (run / "config.json").read_text() == started
    main("sft.py:tiny", run, f"--config.data.dir={tmp_path / 'moved_data'}")
    assert json.loads((run / "DONE.json").read_text())["step"] == steps
    # Finished, it is "nothing to do" under its own config only: another one is refused, not
    # taken for a finished run of it.
    done = main("sft.py:tiny", run, f"--config.data.dir={tmp_path / 'moved_data'}",
                "--config.model.dtype=bfloat16", expect=1)
    assert "config changed what it trains: model.dtype 'float32' -> 'bfloat16'" in done.stderr


def test_online_run_stops_once_its_kl_passes_the_cap(runs):
    root, policy = runs
    run = root / "capped"
    done = main("policy.py:online_tiny", run, *policy,
                f"--config.eval.golden_checkpoint={root / 'proxy'}", "--config.eval.kl_cap=1e-9")
    assert "stopping early (KL" in done.stdout
    record = json.loads((run / "DONE.json").read_text())
    assert record["stopped_early"] and record["step"] == 3  # the first evaluation after step 0
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "eval/kl" in r]
    assert [r["step"] for r in evals] == [0, 3] and evals[-1]["eval/kl"] > 1e-9
    again = main("policy.py:online_tiny", run, *policy,
                 f"--config.eval.golden_checkpoint={root / 'proxy'}", "--config.eval.kl_cap=1e-9")
    assert "already holds a finished run" in again.stdout
