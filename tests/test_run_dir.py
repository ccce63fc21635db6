"""Run-directory records: finished, stopped early, failed, and the record's format on disk
(existing workdirs must keep reading as finished)."""

import json

from alignment_gap import run_dir


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
