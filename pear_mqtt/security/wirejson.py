"""Reading JSON from the wire: strict UTF-8, no NaN or Infinity, and (for envelope members)
no duplicate keys; every failure is a :class:`~pear_mqtt.errors.MalformedMessage`."""

from __future__ import annotations

import json
from typing import Any

from pydantic_core import from_json

from ..errors import MalformedMessage

__all__ = ["parse_json"]


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise MalformedMessage(f"duplicate key {key!r} in a JSON object")
            seen.add(key)
    return obj


def _no_constants(name: str) -> Any:
    raise MalformedMessage(f"{name} is not valid JSON")


_strict_decoder = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constants)


def parse_json(data: bytes, what: str, *, unique_keys: bool = True) -> Any:
    """Strict UTF-8 and JSON (no NaN/Infinity; duplicate keys rejected if ``unique_keys``).

    Without ``unique_keys`` (authenticated bodies: the bulk of every batch and page) the
    parser is pydantic-core's (jiter), about twice the standard library's speed: a repeated
    key keeps its last value, as with ``json``; it refuses escaped lone surrogates and
    nesting deeper than 200, which ``json`` would take."""
    if not unique_keys:
        try:
            return from_json(data, allow_inf_nan=False)
        except ValueError as exc:
            raise MalformedMessage(f"{what} is not valid JSON: {exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedMessage(f"{what} is not valid UTF-8") from None
    try:
        return _strict_decoder.decode(text)
    except MalformedMessage:
        raise
    except RecursionError:
        raise MalformedMessage(f"{what} nests too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and ints longer than Python's digit limit
        raise MalformedMessage(f"{what} is not valid JSON: {exc}") from None
