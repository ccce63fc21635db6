"""Run-directory records: finished, stopped early, failed, and the record's format on disk
(existing workdirs must keep reading as finished)."""

import json

import pytest

from alignment_gap import metrics, run_dir
from alignment_gap.errors import DataError


def test_a_run_is_finished_at_its_steps_or_when_it_stopped_early(tmp_path):
    d = str(tmp_path / "run")
    assert not run_dir.is_finished(d, 1) and run_dir.result(d) == {}
    assert run_dir.finished_step(d) is None and run_dir.final_metrics(d) == {}
    run_dir.finish(d, 5, metrics={"eval/accuracy": 0.75}, stopped_early=False)
    assert run_dir.is_finished(d, 5) and not run_dir.is_finished(d, 6)
    assert run_dir.finished_step(d) == 5
    assert run_dir.final_metrics(d) == {"eval/accuracy": 0.75}
    run_dir.finish(d, 3, stopped_early=True)  # a validation plateau finishes the run early
    assert run_dir.is_finished(d, 6) and run_dir.already_finished(d, 6)


def test_a_stage_result_travels_in_the_record(tmp_path):
    d = str(tmp_path / "stage")
    run_dir.finish(d, datasets={"d": {"pairs": 32}})
    assert run_dir.is_finished(d) and run_dir.result(d) == {"step": 1, "datasets": {"d": {
        "pairs": 32}}}
    assert [p.name for p in tmp_path.joinpath("stage").iterdir()] == ["DONE.json"]  # no tmp


def test_records_written_before_this_module_still_read(tmp_path):
    (tmp_path / "DONE.json").write_text(json.dumps({"metrics": {}, "step": 40,
                                                     "stopped_early": False}))
    (tmp_path / "FAILED.json").write_text(json.dumps({"error": "RuntimeError: broke"}))
    assert run_dir.is_finished(str(tmp_path), 40)
    assert run_dir.failure(str(tmp_path)) == "RuntimeError: broke"


def test_a_failure_is_recorded_by_its_first_line_and_cleared_on_retry(tmp_path):
    d = str(tmp_path)
    assert run_dir.failure(d) is None
    run_dir.fail(d, ValueError("bad value\nmore detail"))
    assert json.loads((tmp_path / "FAILED.json").read_text()) == {"error": "ValueError: bad value"}
    run_dir.clear_failure(d)
    assert run_dir.failure(d) is None and not (tmp_path / "FAILED.json").exists()


def test_a_damaged_record_is_one_line_naming_the_file_and_what_to_delete(tmp_path):
    d = tmp_path / "stages" / "proxy-abc"
    d.mkdir(parents=True)
    (d / "DONE.json").write_text('{"step": 4')  # a write cut short
    with pytest.raises(DataError) as e:
        run_dir.is_finished(str(d), 4)
    message = str(e.value)
    assert message == (f"{d / 'DONE.json'} is damaged (not JSON); delete it and rerun to redo "
                       "proxy-abc")


def test_a_resumed_run_drops_metrics_logged_after_its_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": float(s)} for s in (0, 1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    metrics.drop_after(str(tmp_path), 2)  # the half line a killed process left goes too
    assert [r["step"] for r in metrics.read_jsonl(str(path))] == [0, 1, 2]
    metrics.drop_after(str(tmp_path), 0)  # a fresh start logs even step 0 again
    assert metrics.read_jsonl(str(path)) == []
    path.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl: line 2 is not JSON; delete the file"):
        metrics.drop_after(str(tmp_path), 2)


def test_steps_a_preemption_left_unlogged_average_into_the_resumed_runs_next_line(tmp_path):
    d = str(tmp_path / "run")
    steps = [{"loss": 1.0 / 3.0 + i, "grad_norm": 0.1 * i} for i in range(6)]
    straight = metrics.Window()
    for m in steps:
        straight.add(m)
    before = metrics.Window()
    for m in steps[:4]:
        before.add(m)
    run_dir.preempted(d, 4, "SIGTERM", before.added)  # through JSON, as a real stop
    assert run_dir.unlogged_at(d, 3) == [] and run_dir.unlogged_at(d, 5) == []
    resumed = metrics.Window()
    for m in run_dir.unlogged_at(d, 4) + steps[4:]:
        resumed.add(m)
    assert resumed.compute() == straight.compute()  # to the last bit
    assert run_dir.unlogged_at(str(tmp_path / "fresh"), 0) == []


def test_per_prompt_outcomes_round_trip_by_step_and_a_damaged_file_is_named(tmp_path):
    import numpy as np

    run_dir.write_outcomes(str(tmp_path), 12, {"win": [1.0, 0.5, 0.0], "kl": [0.1, 0.2]})
    run_dir.write_outcomes(str(tmp_path), 6, {"win": [0.0, 0.0, 1.0], "kl": [0.3, 0.4]})
    (tmp_path / "outcomes" / ".step_18.npz.tmp").write_bytes(b"half")  # a write cut short
    read = run_dir.read_outcomes(str(tmp_path))
    assert list(read) == [6, 12]
    np.testing.assert_array_equal(read[12]["win"], [1.0, 0.5, 0.0])
    np.testing.assert_array_equal(read[6]["kl"], [0.3, 0.4])
    (tmp_path / "outcomes" / "step_6.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"step_6.npz is damaged .*; delete .*outcomes and the "
                                        "run's DONE.json"):
        run_dir.read_outcomes(str(tmp_path))
