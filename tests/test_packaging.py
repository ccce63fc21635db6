"""The package as a user installs it: a wheel in a fresh environment, outside the repository.

Nothing named `configs` is installed (the repository's config files are passed by path). The
wheel's environment then runs `notebooks/inspect_results.ipynb` as a Colab runtime given a wheel
and a copy of the repository would: with no study given, the notebook runs the smoke study with
the kernel's Python (`--config path/to/configs/study.py:smoke`) and inspects it. The fresh
environment borrows the test environment's dependencies through a `.pth` line (no downloads); a
`.pth` in a borrowed directory is not executed, so the repository's editable install stays out.
"""

import json
import os
import re
import site
import subprocess
import sys

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what is installed
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _kernel(jupyter_path, python):
    """A Jupyter kernel named `wheel` that runs on `python`."""
    spec = jupyter_path / "kernels" / "wheel"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "wheel", "language": "python"}))


def test_wheel_installs_without_configs_and_its_notebook_runs_the_smoke_study(tmp_path,
                                                                              monkeypatch):
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", ROOT,
         cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("alignment_gap-*.whl")
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    target = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                  cwd=tmp_path).stdout.strip()
    with open(os.path.join(target, "borrowed_dependencies.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel,
         cwd=tmp_path)
    where = _run(python, "-c", "import importlib.util, alignment_gap; "
                 "print(alignment_gap.__file__, importlib.util.find_spec('configs'))",
                 cwd=tmp_path).stdout.split()
    assert where[0].startswith(target) and where[1] == "None", where
    assert not os.path.exists(os.path.join(target, "configs"))

    _kernel(tmp_path / "jupyter", python)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.delenv("PYTHONPATH", raising=False)  # the kernel sees what the wheel installed
    monkeypatch.delenv("STUDY_WORKDIR", raising=False)
    monkeypatch.setenv("ALIGNMENT_GAP_SOURCE", ROOT)  # a copy of the repository, for configs/
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # its study's temporary workdir: removed with it
    runtime = tmp_path / "content"  # no workdir/study here
    runtime.mkdir()
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "inspect_results.ipynb"), as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("print('library:', alignment_gap.__file__)"))
    NotebookClient(nb, timeout=900, kernel_name="wheel",
                   resources={"metadata": {"path": str(runtime)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert f"library: {target}" in outputs  # the kernel ran the wheel, and so did its study
    assert "no study given: running" in outputs and "== stage sft " in outputs
    assert list(tmp_path.glob("smoke_study_*/report.md"))  # in the test's folder, not /tmp
    assert "evaluated checkpoints" in outputs and "POST:" in outputs
    assert "| KL budget (nats) | golden: online |" in outputs  # the budget table
    images = [c for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1 and "frontier_plot" in images[0].source  # shown, not just drawn
    assert not re.search(r"^[IWE]\d{4} ", outputs, re.M)  # library logs went to its log.txt
