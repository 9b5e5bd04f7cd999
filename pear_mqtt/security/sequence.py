"""Envelope sequence numbers (:class:`SequenceCounter`) and their reservation file: an upper
bound on the numbers a node has used, so that they keep growing across restarts even when
the clock steps back."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from ..errors import ConfigError
from ..files import atomic_write

__all__ = ["SEQUENCE_BLOCK", "SequenceCounter", "read_reservation", "record_reservation"]

log = logging.getLogger(__name__)

SEQUENCE_BLOCK = 100_000
"""Sequence numbers reserved per write of the reservation file."""


def read_reservation(path: Path) -> int:
    """The bound recorded in ``path`` (0 if there is no file); :class:`ConfigError` if it
    cannot be read."""
    try:
        text = path.read_text(encoding="ascii").strip()
        return int(text) if text else 0
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the sequence reservation ({exc})") from exc


def record_reservation(path: Path, upto: int) -> None:
    """Reserve the numbers up to ``upto`` (written whole and fsynced); :class:`ConfigError`
    if that fails, since without the record a restart could reuse numbers."""
    try:
        atomic_write(path, f"{upto}\n")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot record the sequence reservation ({exc})") from exc


class SequenceCounter:
    """The numbers of one node's envelopes, from ``start`` up; safe to share between threads.
    :meth:`persist` keeps them growing across restarts."""

    def __init__(self, *, start: int) -> None:
        self._seq = start
        self._file: Path | None = None
        self._reserved = 0
        self._lock = threading.Lock()

    @property
    def last(self) -> int:
        """The number given out last."""
        return self._seq

    def persist(self, path: Path) -> None:
        """Continue above the bound ``path`` records and record one block ahead of it; a
        block later, the next. :class:`ConfigError` if the file cannot be read or written."""
        floor = read_reservation(path)
        with self._lock:
            self._seq = max(self._seq, floor)
            self._file = path
            record_reservation(path, self._seq + SEQUENCE_BLOCK)
            self._reserved = self._seq + SEQUENCE_BLOCK

    def next(self) -> int:
        """The next number."""
        with self._lock:
            self._seq += 1
            seq = self._seq
            if self._file is not None and seq >= self._reserved:
                try:
                    record_reservation(self._file, seq + SEQUENCE_BLOCK)
                except ConfigError as exc:
                    # Sending goes on (a full disk must not stop it); only a restart after a
                    # backwards clock step could then reuse numbers. Retried next block.
                    log.error("%s", exc)
                self._reserved = seq + SEQUENCE_BLOCK
            return seq
