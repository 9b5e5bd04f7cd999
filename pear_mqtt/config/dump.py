"""Config models as plain TOML/JSON data: paths as strings, enums as their values, unset
fields and empty tables left out, secrets included, masked or omitted.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, SecretStr

__all__ = ["MASK", "SecretMode", "plain_data"]

SecretMode = Literal["include", "omit", "mask"]
MASK = "**********"
"""What a masked secret is written as."""


def plain_data(model: BaseModel, *, secrets: SecretMode) -> tuple[dict[str, Any], list[str]]:
    """``model`` as TOML/JSON-ready data, and the field paths of the secrets left out.

    ``secrets``: ``"include"`` writes their values, ``"mask"`` writes :data:`MASK`,
    ``"omit"`` leaves them out.
    """
    omitted: list[str] = []
    data: dict[str, Any] = _plain(model, "", secrets, omitted)
    return data, omitted


def _plain(value: Any, loc: str, secrets: SecretMode, omitted: list[str]) -> Any:
    """``value`` as TOML/JSON-ready data; ``None`` means "leave the key out"."""
    if isinstance(value, BaseModel):
        out: dict[str, Any] = {}
        for name in type(value).model_fields:
            item = _plain(getattr(value, name), f"{loc}.{name}" if loc else name, secrets,
                          omitted)
            if item is not None:
                out[name] = item
        return out
    if isinstance(value, SecretStr):
        if secrets == "include":
            return value.get_secret_value()
        if secrets == "mask":
            return MASK
        omitted.append(loc)
        return None
    if isinstance(value, Mapping):
        items = {str(k): _plain(v, f"{loc}.{k}", secrets, omitted) for k, v in value.items()}
        # An empty mapping is the models' default; leaving it out keeps files short.
        return {k: v for k, v in items.items() if v is not None} or None
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v, f"{loc}[{i}]", secrets, omitted) for i, v in enumerate(value)]
    return value
