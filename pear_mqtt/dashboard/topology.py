"""The topology a dashboard shows: ``up.json`` read as ``pear-mqtt up`` wrote it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..ops.up.state import UpState

__all__ = ["Topology", "load_topology"]


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
