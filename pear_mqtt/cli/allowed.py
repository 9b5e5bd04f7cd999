"""The allowed values of the model's enumerated fields, as ``--help`` text, read from the
models so help and validation cannot disagree."""

from __future__ import annotations

from enum import Enum
from typing import Any, get_args

from ..model.insight import FIELD_GROUPS, NetworkMode, SharingLevel, TrendData

__all__ = ["config_values", "insight_values"]


def _values(kind: type[Enum] | Any) -> str:
    if isinstance(kind, type) and issubclass(kind, Enum):
        return ", ".join(str(m.value) for m in kind)
    return ", ".join(str(v) for v in get_args(kind) if v is not type(None))


def _direction() -> str:
    annotation = TrendData.model_fields["direction"].annotation
    literal = next(a for a in get_args(annotation) if a is not type(None))
    return _values(literal)


def insight_values() -> str:
    """What an insight's enumerated fields accept (JSONL ``trends.direction``, CSV
    ``direction``)."""
    return f"allowed values: direction (trends.direction): {_direction()}"


def config_values() -> str:
    """What the configuration's enumerated fields accept."""
    groups = ", ".join(f"privacy.data_sharing.{g}" for g in FIELD_GROUPS)
    return (f"allowed values: mode (PEAR_MODE): {_values(NetworkMode)}; {groups}: "
            f"{_values(SharingLevel)}")
