"""The console shows the run and what a user must act on; library logging goes to the log file."""

import os
import subprocess
import sys

from alignment_gap import console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Records and warnings located in an installed library and in alignment_gap, before and after
# the log file is named.
SCRIPT = """
import logging, site, sys, warnings
from alignment_gap import console
LIBRARY = site.getsitepackages()[0] + "/orbax/checkpoint/x.py"
def log(name, level, path, msg):
    logger = logging.getLogger(name)
    logger.handle(logger.makeRecord(name, level, path, 1, msg, (), None))
logging.getLogger().setLevel(logging.INFO)
console.route(verbose=sys.argv[1] == "verbose")
log("orbax", logging.INFO, LIBRARY, "library info before the file")
log("orbax", logging.WARNING, LIBRARY, "library warning before the file")
if sys.argv[2] != "-":
    console.log_to(sys.argv[2])
log("orbax", logging.WARNING, LIBRARY, "library warning")
log("orbax", logging.ERROR, LIBRARY, "library error")
log("alignment_gap", logging.WARNING, console.__file__, "our warning")
warnings.warn_explicit("library raised", UserWarning, LIBRARY, 1)
warnings.warn_explicit("we raised", UserWarning, console.__file__, 1)
print("== stage sft")
"""
LIBRARY_LINES = ("library info before the file", "library warning before the file",
                 "library warning\n", "library raised")
OUR_LINES = ("warning: our warning", "error: library error", "warning: UserWarning: we raised")


def run(*args):
    done = subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def test_library_logging_goes_to_the_file_and_what_needs_the_user_to_the_console(tmp_path):
    path = tmp_path / "run" / "log.txt"
    done = run("quiet", str(path))
    assert done.stdout == "== stage sft\n"
    for line in OUR_LINES:
        assert line in done.stderr
    for line in LIBRARY_LINES:
        assert line not in done.stderr
    log = path.read_text()
    for line in LIBRARY_LINES + ("our warning", "library error", "we raised"):
        assert line in log


def test_verbose_shows_library_logging_on_the_console_too(tmp_path):
    path = tmp_path / "log.txt"
    done = run("verbose", str(path))
    for line in LIBRARY_LINES:
        assert line in done.stderr and line in path.read_text()


def test_library_warnings_kept_before_a_failed_start_reach_stderr():
    done = run("quiet", "-")
    assert "library warning before the file" in done.stderr
    assert "library info" not in done.stderr
    assert done.stderr.count("library error") == 1  # shown once, not again at exit


def test_one_log_file_per_writer():
    assert console.log_name() == "log.txt"
    assert console.log_name(process_index=2, shard=1) == "log.shard1.process2.txt"
    assert console.log_name(process_index=1) == "log.process1.txt"


def test_main_writes_its_log_in_the_workdir_and_prints_no_library_lines(tmp_path):
    done = subprocess.run([sys.executable, "-m", "alignment_gap.main", "--config",
                           "configs/demo.py:mini", "--workdir", str(tmp_path),
                           "--config.mesh.data=3"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith("error: ") and len(done.stderr.splitlines()) == 1
    assert "alignment_gap.main --config configs/demo.py:mini" in (tmp_path / "log.txt").read_text()


def test_main_verbose_shows_library_logging_on_the_console(tmp_path):
    done = subprocess.run([sys.executable, "-m", "alignment_gap.main", "--config",
                           "configs/demo.py:mini", "--workdir", str(tmp_path), "--verbose",
                           "--config.mesh.data=3"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert "] alignment_gap.main --config configs/demo.py:mini" in done.stderr
