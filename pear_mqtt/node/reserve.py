"""The outbox's answer to a full disk: a reserve file of :data:`RESERVE_BYTES` next to it,
released when a write fails for lack of room, so that acknowledgements and a checkpoint can
still go through; new items are refused until the reserve can be made again."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from ..errors import OutboxError

__all__ = ["RECOVER_INTERVAL", "RESERVE_BYTES", "DiskReserve"]

log = logging.getLogger(__name__)

RESERVE_BYTES = 8 * 1024 * 1024
"""Size of the reserve file (``<path>-reserve``) released when the disk fills up, so that
acks and a checkpoint still have room: twice the WAL's checkpoint interval (4 MiB), as both
the WAL and the database file can grow by that much."""

RECOVER_INTERVAL = 5.0
"""Seconds between attempts to re-create the reserve while new items are refused."""


class DiskReserve:
    """The reserve of the outbox at ``path``; :attr:`full` while the disk has no room."""

    def __init__(self, *, path: Path, monotonic: Callable[[], float]) -> None:
        self._path = path
        self._file = path.with_name(path.name + "-reserve")
        self._monotonic = monotonic
        self.full = not self._make(strict=True)
        self._next_recover = monotonic() + RECOVER_INTERVAL
        if self.full:
            log.warning("outbox %s: no room for the %d-byte reserve; new items are refused "
                        "until the disk has room", path, RESERVE_BYTES)

    def _make(self, *, strict: bool) -> bool:
        """Ensure the reserve file exists at full size; False when the disk has no room.

        With ``strict``, other failures raise; otherwise they are logged and give False.
        """
        try:
            if self._file.is_file() and self._file.stat().st_size >= RESERVE_BYTES:
                return True
            fd = os.open(self._file, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                if hasattr(os, "posix_fallocate"):
                    # Allocates real blocks (a sparse file would reserve nothing).
                    os.posix_fallocate(fd, 0, RESERVE_BYTES)
                else:  # pragma: no cover - macOS
                    os.write(fd, bytes(RESERVE_BYTES))
            finally:
                os.close(fd)
            return True
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._file.unlink(missing_ok=True)
                return False
            if strict:
                raise OutboxError(f"outbox {self._path}: cannot create its reserve file "
                                  f"{self._file}: {exc.strerror or exc}") from exc
            log.warning("outbox %s: cannot create reserve file %s: %s", self._path,
                        self._file, exc)
            return False

    def release(self, conn: sqlite3.Connection | None) -> None:
        """A write failed with SQLITE_FULL: give acks and a checkpoint room."""
        if not self.full:
            log.warning("outbox %s: disk full; releasing the reserve and refusing new items "
                        "until there is room again", self._path)
        self.full = True
        self._next_recover = self._monotonic() + RECOVER_INTERVAL
        try:
            self._file.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("outbox %s: cannot remove reserve file: %s", self._path, exc)
        # Moves WAL frames into the database file and empties the WAL, so that the space the
        # WAL held is free for the deletes of acks.
        self._checkpoint(conn)

    def _checkpoint(self, conn: sqlite3.Connection | None) -> None:
        if conn is None:
            return
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            log.warning("outbox %s: checkpoint failed: %s", self._path, exc)

    def check_room(self, conn: sqlite3.Connection) -> None:
        """Refuse new items while the disk is full (:class:`OutboxError`); retry the reserve
        now and then."""
        if not self.full:
            return
        if self._monotonic() >= self._next_recover:
            self._next_recover = self._monotonic() + RECOVER_INTERVAL
            try:
                # Hand pages freed by acks back to the file system before re-creating the
                # reserve; without this, a file that filled the disk never shrinks. Through
                # executescript, which steps it to the end (execute() frees one page).
                conn.executescript("PRAGMA incremental_vacuum;")
            except sqlite3.Error as exc:
                log.info("outbox %s: incremental vacuum failed: %s", self._path, exc)
            self._checkpoint(conn)
            if self._make(strict=False):
                log.warning("outbox %s: disk has room again; accepting new items", self._path)
                self.full = False
                return
        raise OutboxError(
            f"outbox {self._path}: disk full; new items are refused until {RESERVE_BYTES} "
            f"bytes are free next to it (pending items are kept; reads and acks still work; "
            f"retried every {RECOVER_INTERVAL:g}s)")
