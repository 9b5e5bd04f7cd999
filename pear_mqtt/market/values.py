"""The stored form of an insight's disclosed figures in the market store: one small JSON
object per row, metric to an exact number or a bucket's ``[lo, hi]`` (null for an open end),
so that SQLite itself can sum the daily roll-up (docs/MARKET.md, "Layout and engine").
Schema 1 packed the same figures as doubles behind a bit mask; :func:`from_packed` reads
that form once, when a store is upgraded."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from functools import lru_cache
from math import isfinite

from .rows import METRICS

__all__ = ["Ends", "from_packed", "pack", "unpack"]

Ends = dict[str, tuple[float | None, float | None]]
"""Per metric, its (lo, hi): equal for an exact value, a bucket's ends, None for an open end."""

_METRICS = frozenset(METRICS)
_decode = json.JSONDecoder().decode


def pack(figures: Iterable[tuple[str, float | None, float | None]]) -> str:
    """The stored form of (metric, lo, hi) figures, in the order given; ValueError for a
    metric outside :data:`METRICS` or a figure that is not finite."""
    # Written out rather than by json.dumps, which costs several times as much for a few
    # numbers; float's repr is the JSON number that reads back as the same double.
    parts = []
    for metric, lo, hi in figures:
        if metric not in _METRICS:
            raise ValueError(f"not a market metric: {metric!r}")
        if lo is not None and lo == hi:
            parts.append(f'"{metric}":{_number(lo)}')
        else:
            parts.append(f'"{metric}":[{_number(lo)},{_number(hi)}]')
    return "{" + ",".join(parts) + "}"


def _number(value: float | None) -> str:
    if value is None:
        return "null"
    if not isfinite(value):
        raise ValueError(f"not a finite figure: {value!r}")
    return repr(float(value))


def unpack(text: str) -> Ends:
    out: Ends = {}
    for metric, value in _decode(text).items():
        if value.__class__ is list:
            out[metric] = (value[0], value[1])
        else:
            out[metric] = (value, value)
    return out


# -- schema 1 ----------------------------------------------------------------------------
_MASK = struct.Struct("<I")
_SLOTS = [(m, end) for m in METRICS for end in (0, 1)]


@lru_cache(maxsize=1024)
def _layout(mask: int) -> tuple[struct.Struct, tuple[tuple[str, int], ...]]:
    slots = tuple(s for i, s in enumerate(_SLOTS) if mask >> i & 1)
    return struct.Struct(f"<I{len(slots)}d"), slots


def from_packed(blob: bytes) -> str:
    """Schema 1's packed figures (a 32-bit mask of the bounds that follow, as doubles) in
    today's form."""
    (mask,) = _MASK.unpack_from(blob)
    layout, slots = _layout(mask)
    ends: dict[str, list[float | None]] = {}
    for (metric, end), value in zip(slots, layout.unpack_from(blob)[1:], strict=True):
        ends.setdefault(metric, [None, None])[end] = value
    return pack((m, p[0], p[1]) for m, p in ends.items())
