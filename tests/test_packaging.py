"""The package as a user installs it: a wheel in a fresh environment, outside the repository.

Nothing named `configs` is installed (the repository's config files are passed by path), and
the smoke study runs from the wheel with `--config path/to/configs/study.py:smoke`. The fresh
environment borrows the test environment's dependencies through a `.pth` line (no downloads);
a `.pth` in a borrowed directory is not executed, so the repository's editable install stays out.
"""

import os
import site
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what is installed
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_wheel_installs_without_configs_and_runs_the_smoke_study(tmp_path):
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
    workdir = tmp_path / "study"
    done = _run(python, "-m", "alignment_gap.main", "--config",
                os.path.join(ROOT, "configs", "study.py:smoke"), "--workdir", workdir,
                f"--config.data.dir={tmp_path / 'data'}", cwd=tmp_path, timeout=900)
    assert (workdir / "report.md").exists() and "report:" in done.stdout
