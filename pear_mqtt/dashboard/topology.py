"""The topology a dashboard shows: ``up.json`` read as ``pear-mqtt up`` wrote it."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..ops.up.state import UpState

__all__ = ["Topology", "TopologyFile", "load_topology"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Topology:
    """``up.json`` parsed (``state``) and as plain JSON (``raw``: fields other helpers add,
    such as ``metrics_url``, are read from there)."""

    path: Path
    state: UpState
    raw: dict[str, Any]


def load_topology(path: Path) -> Topology:
    """Read ``path`` (an ``up.json``); :class:`ConfigError` names what is wrong."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; run `make up` (or pass --up-file)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the topology state: {exc}") from None
    try:
        state = UpState.from_json(raw)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path} is not a pear-mqtt up state file ({exc})") from None
    return Topology(path=Path(path), state=state, raw=raw)


class TopologyFile:
    """``up.json``, read again whenever it changed (``up start`` / ``stop`` rewrite it while
    the dashboard runs); the last good read while a rewrite cannot be read."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._topology = load_topology(self.path)

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = self.path.stat()
        except OSError:
            return (0, 0, 0)
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def current(self) -> Topology:
        with self._lock:
            stamp = self._stat()
            if stamp != self._stamp:
                try:
                    self._topology = load_topology(self.path)
                    self._stamp = stamp
                except ConfigError:
                    pass  # removed or unreadable for now: keep showing the last good one
            return self._topology
