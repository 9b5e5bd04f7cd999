"""The sequence reservation file: an upper bound on the sequence numbers a node has used, so
that they keep growing across restarts even when the clock steps back."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ..files import atomic_write

__all__ = ["SEQUENCE_BLOCK", "read_reservation", "record_reservation"]

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
