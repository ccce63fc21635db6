"""ArrayRecord files checked before a run reads them: a file cut short or overwritten (a crash
while it was copied, a full disk) stops with one line naming it and the fix, instead of a
Riegeli error in the middle of training."""

from __future__ import annotations

from array_record.python import array_record_module

from alignment_gap.errors import DataError


def check_readable(paths: list[str], fix: str) -> None:
    """Open each file and read its first and last record; DataError naming the first that fails."""
    for path in paths:
        try:
            _read_ends(path)
        except (RuntimeError, OSError, ValueError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise DataError(f"{path}: the file is damaged ({why}); {fix}") from None


def _read_ends(path: str) -> None:
    reader = array_record_module.ArrayRecordReader(path)
    try:
        count = reader.num_records()
        if count:
            reader.read([0, count - 1])
    finally:
        reader.close()
