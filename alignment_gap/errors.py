"""The errors a user sees as one line (`main` prints them without a traceback).

Each message names the field, file or record, the problem and the fix. They live here, below
every other module, so that any module can raise them without importing the one that checks.
"""

import errno


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line: field, problem, fix."""


class DataError(ValueError):
    """A malformed source record: the message names the file, the record index and the field."""


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: one line naming the tensor or field and why."""


class IncompatibleCheckpoint(ValueError):
    """A frozen model's checkpoint is missing or does not match the configuration."""


class CheckpointDamaged(ValueError):
    """No checkpoint of a run can be read: names the directory and what to do."""


class NonFiniteLoss(FloatingPointError):
    """Raised with the failing step and the last good checkpoint named."""


class StageFailed(RuntimeError):
    """A stage this host needs failed (here or on another host of a sweep)."""


ONE_LINE = (ConfigError, DataError, CheckpointError, CheckpointDamaged, IncompatibleCheckpoint,
            NonFiniteLoss, StageFailed)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or one it was raised from) is ENOSPC; orbax's tensorstore writes report
    it as a ValueError that quotes the OS error."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False
