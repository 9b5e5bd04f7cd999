"""The packed form of an insight's disclosed figures in the market store: one small blob per
row instead of two columns per metric (SQLite writes a row with 18 sparse columns at about
half the rate of one with a blob). A 32-bit mask says which bounds follow, as doubles."""

from __future__ import annotations

import struct
from functools import lru_cache

from .rows import METRICS

__all__ = ["Ends", "pack", "unpack"]

Ends = dict[str, tuple[float | None, float | None]]
"""Per metric, its (lo, hi): equal for an exact value, a bucket's ends, None for an open end."""

_MASK = struct.Struct("<I")
_SLOTS = [(m, end) for m in METRICS for end in (0, 1)]


@lru_cache(maxsize=1024)
def _layout(mask: int) -> tuple[struct.Struct, tuple[tuple[str, int], ...]]:
    """The packed form of a mask: the mask, then its bounds (one struct, one call)."""
    slots = tuple(s for i, s in enumerate(_SLOTS) if mask >> i & 1)
    return struct.Struct(f"<I{len(slots)}d"), slots


_INDEX = {m: 2 * i for i, m in enumerate(METRICS)}


def pack(ends: Ends) -> bytes:
    mask = 0
    values: list[float] = []
    # The bounds in slot order (most rows disclose one or two figures).
    for metric in ends if len(ends) == 1 else sorted(ends, key=_INDEX.__getitem__):
        i = _INDEX[metric]
        lo, hi = ends[metric]
        if lo is not None:
            mask |= 1 << i
            values.append(lo)
        if hi is not None:
            mask |= 2 << i
            values.append(hi)
    return _layout(mask)[0].pack(mask, *values)


def unpack(blob: bytes) -> Ends:
    (mask,) = _MASK.unpack_from(blob)
    layout, slots = _layout(mask)
    out: dict[str, list[float | None]] = {}
    for (metric, end), value in zip(slots, layout.unpack_from(blob)[1:], strict=True):
        out.setdefault(metric, [None, None])[end] = value
    return {m: (p[0], p[1]) for m, p in out.items()}
