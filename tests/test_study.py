"""The study from one command: the smoke preset end to end, its caching, and the notebook."""

import json
import os
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from alignment_gap.study import pipeline, results
from configs import study as study_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    args = [sys.executable, "-m", "alignment_gap.main", "--config",
            os.path.join(ROOT, "configs", "study.py:smoke"), "--workdir", str(workdir),
            f"--config.data.dir={workdir / 'data'}"]
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return workdir, args, first


def test_smoke_study_writes_table_plot_and_report(smoke):
    workdir, _, first = smoke
    rows = json.loads((workdir / "results.json").read_text())
    methods = {r["method"] for r in rows}
    assert methods == {"online", "offline"}
    for method in methods:
        steps = sorted(r["step"] for r in rows if r["method"] == method)
        assert steps == [0, 6, 12]  # the starting point and every checkpoint
    start = [r for r in rows if r["step"] == 0]
    assert all(r["kl"] == pytest.approx(0.0, abs=1e-4) for r in start)  # SFT itself: no KL
    assert all(0.0 <= r["win_rate"] <= 1.0 and 0.0 <= r["oracle_win_rate"] <= 1.0 for r in rows)
    assert (workdir / "frontier.png").stat().st_size > 10_000
    report = (workdir / "report.md").read_text()
    assert results.verdict(rows) in report and "## Win rate at matched KL budgets" in report
    assert "online" in first.stdout.splitlines()[-2].lower()  # the verdict is printed
    timings = json.loads((workdir / "timings.json").read_text())
    assert {"sft", "golden", "relabel", "proxy"} <= set(timings)
    samples = json.loads((workdir / "samples.json").read_text())["samples"]
    assert {"prompt", "sft", "online", "offline"} <= set(samples[0])


def test_finished_study_is_not_rerun(smoke):
    workdir, args, _ = smoke
    stamp = (workdir / "timings.json").read_text()
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "every stage is already finished" in again.stdout
    assert (workdir / "timings.json").read_text() == stamp


def test_changing_a_stage_reruns_it_and_what_depends_on_it_only(tmp_path):
    base = study_configs.get_config("smoke")
    changed = study_configs.get_config("smoke")
    changed.proxy.steps = 41
    keys = lambda c: {s.name: s.key for s in pipeline.build_stages(c, str(tmp_path))}
    a, b = keys(base), keys(changed)
    assert a["sft"] == b["sft"] and a["golden"] == b["golden"] and a["relabel"] == b["relabel"]
    assert a["proxy"] != b["proxy"]
    online = [n for n in a if n.startswith("online")]
    offline = [n for n in a if n.startswith("offline")]
    assert online and all(a[n] != b[n] for n in online)  # reads the proxy
    assert offline and all(a[n] == b[n] for n in offline)  # does not


def test_notebook_runs_on_the_smoke_study(smoke):
    workdir, _, _ = smoke
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "inspect_results.ipynb"), as_version=4)
    os.environ["STUDY_WORKDIR"] = str(workdir)
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": ROOT}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "evaluated checkpoints" in outputs and "POST:" in outputs
