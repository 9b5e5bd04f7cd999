"""Files written whole or not at all: the project's one atomic write.

A temp file in the target's directory gets its final permissions at creation (a key or a
secret is never readable by others, not even for an instant), is flushed and fsynced, then
renamed over the target; a crash leaves the old file or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: Path | str, data: bytes | str, *, mode: int = 0o644,
                 fsync: bool = True, make_parents: bool = False) -> None:
    """Replace ``path`` with ``data`` (``str`` is written as UTF-8) in one rename.

    ``fsync=False`` skips the flush to disk for files that are rewritten often and whose loss
    in a power cut costs nothing (status snapshots); ``OSError`` propagates to the caller,
    which knows what the file is and how to say so.
    """
    target = Path(path)
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
