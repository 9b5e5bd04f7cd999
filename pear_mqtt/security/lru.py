"""A bounded least-recently-used mapping for the per-message caches of the security layer
(certificate verdicts, replay windows, sealer sessions).

Not ``functools.lru_cache``: these caches are filled by the caller (only after a certificate
validated or a token opened), peeked without computing, and hold mutable per-key state.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["LRU"]

_K = TypeVar("_K")
_V = TypeVar("_V")


class LRU(Generic[_K, _V]):
    """At most ``max_entries`` entries; the least recently used one goes first. O(1) per
    operation; not thread-safe (callers hold their own lock)."""

    __slots__ = ("_data", "_max")

    def __init__(self, max_entries: int) -> None:
        self._data: OrderedDict[_K, _V] = OrderedDict()
        self._max = max_entries

    def get(self, key: _K) -> _V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: _K, value: _V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def discard_where(self, predicate: Callable[[_V], bool]) -> None:
        """Remove every entry whose value satisfies ``predicate`` (O(n))."""
        for key in [k for k, v in self._data.items() if predicate(v)]:
            del self._data[key]

    def __len__(self) -> int:
        return len(self._data)
