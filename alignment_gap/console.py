"""What a run prints, and where library logging goes.

The console shows the run: our own lines (stage headers, progress with an ETA, the verdict,
`error: ...`), warnings logged or raised from alignment_gap or from a config file, and errors
logged from anywhere. Everything else logged through Python's `logging` (absl's logging included:
orbax, tfds, grain, jax) and the Python warnings libraries raise go to a log file in the workdir,
`log.txt` (`log.shard1.process2.txt` for other sweep shards and processes). `verbose` shows it
all on the console as well.

`route` starts at once, keeping records in memory; `log_to` names the file when the process
index is known (after `jax.distributed` starts) and writes what was kept. When the process exits
before `log_to` (start-up failed), the kept library warnings go to stderr rather than nowhere.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import os
import site
import sys
import sysconfig
import warnings

from absl import logging as absl_logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_LIBRARY_DIRS = tuple(sorted({
    os.path.abspath(d) for d in (
        *site.getsitepackages(), site.getusersitepackages(),
        *(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")))}))
_KEPT = 1 << 30  # MemoryHandler capacity: keep every record until `log_to`.


def is_ours(path: str) -> bool:
    """Code in alignment_gap, or outside every installed library (config files, scripts)."""
    path = os.path.abspath(path)
    inside = lambda d: path == d or path.startswith(d + os.sep)
    return inside(_PACKAGE_DIR) or not any(inside(d) for d in _LIBRARY_DIRS)


class _ForTheUser(logging.Filter):
    """Warnings from our code, errors from anywhere."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        return record.levelno >= logging.WARNING and is_ours(record.pathname)


class _Plain(logging.Formatter):
    """`warning: message` (the `error: ...` lines of main have the same shape)."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _State:
    handlers: list[logging.Handler] = []
    kept: logging.handlers.MemoryHandler | None = None
    verbose = False
    showwarning = warnings.showwarning


def log_name(process_index: int = 0, shard: int = 0) -> str:
    """`log.txt` for process 0 of shard 0 (a single-process run); one file per writer."""
    parts = ["log"] + [f"shard{shard}"] * bool(shard) + [f"process{process_index}"] * bool(
        process_index)
    return ".".join(parts) + ".txt"


def _log_warning(message, category, filename, lineno, file=None, line=None):
    """`warnings.showwarning`: a warning becomes a log record located where it was raised."""
    if file is not None:  # Someone asked for a particular stream.
        return _State.showwarning(message, category, filename, lineno, file, line)
    logger = logging.getLogger("py.warnings")
    logger.handle(logger.makeRecord(logger.name, logging.WARNING, filename, lineno, "%s: %s",
                                    (category.__name__, message), None))


def _attach(handler: logging.Handler) -> None:
    logging.getLogger().addHandler(handler)
    _State.handlers.append(handler)


def route(verbose: bool = False) -> None:
    """Replace absl's stderr handler: the console handler, and a store for the log file."""
    root = logging.getLogger()
    for handler in [absl_logging.get_absl_handler(), *_State.handlers]:
        root.removeHandler(handler)
    _State.handlers, _State.verbose = [], verbose
    console = logging.StreamHandler(sys.stderr)
    if verbose:
        console.setFormatter(absl_logging.PythonFormatter())
    else:
        console.setFormatter(_Plain())
        console.addFilter(_ForTheUser())
    _attach(console)
    _State.kept = logging.handlers.MemoryHandler(_KEPT, flushLevel=logging.CRITICAL + 1)
    _attach(_State.kept)
    warnings.showwarning = _log_warning
    # A log file that cannot be written (a full disk) must not print a handler traceback per
    # record over the one line that says so (`--verbose` keeps them).
    logging.raiseExceptions = verbose


def log_to(path: str) -> str:
    """Write the kept records and every later one to `path` (appended); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(absl_logging.PythonFormatter())
    kept = _State.kept
    if kept is not None:
        kept.setTarget(handler)
        kept.flush()
        logging.getLogger().removeHandler(kept)
        _State.handlers.remove(kept)
        _State.kept = None
    _attach(handler)
    return path


@atexit.register
def _write_unwritten() -> None:
    """Start-up failed before `log_to`: the libraries' warnings go to stderr, not nowhere."""
    kept = _State.kept
    if kept is not None and kept.buffer and not _State.verbose:  # Verbose: shown already.
        target = logging.StreamHandler(sys.stderr)
        target.setFormatter(absl_logging.PythonFormatter())
        shown = _ForTheUser().filter  # The console has shown these already.
        target.addFilter(lambda r: r.levelno >= logging.WARNING and not shown(r))
        kept.setTarget(target)
        kept.flush()
