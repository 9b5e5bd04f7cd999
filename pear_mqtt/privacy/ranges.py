"""Data-independent buckets for ``ranges_only`` groups: :class:`ValueRange` (one bucket) and
:class:`RangeScheme` (configured edges per category, else a geometric scheme)."""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping, Sequence

from pydantic import model_validator

from ..config.models import PrivacyConfig
from ..errors import ConfigError, PrivacyError, TopicError
from ..model.insight import Finite, Frozen
from ..model.topics import validate_category

__all__ = ["RangeScheme", "ValueRange"]


class ValueRange(Frozen):
    """The bucket ``[lo, hi)`` that holds a number; ``None`` is an open end."""

    lo: Finite | None = None
    hi: Finite | None = None

    @model_validator(mode="after")
    def _ordered(self) -> ValueRange:
        if self.lo is None and self.hi is None:
            raise ValueError("a range needs at least one finite end")
        if self.lo is not None and self.hi is not None and not self.lo < self.hi:
            raise ValueError(f"lo ({self.lo}) must be below hi ({self.hi})")
        return self

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return False
        return ((self.lo is None or self.lo <= value)
                and (self.hi is None or value < self.hi))


_CACHE_LIMIT = 65_536
# Values whose bucket is remembered, a few thousand distinct prices: ~0.5 MB when full.
_BUCKET_LIMIT = 4_096
# The geometric edges from the tiny one up to here are kept in one ascending list that a
# value is bisected into; values beyond walk the exponents (as few as they are).
_TABLE_TOP = 1e15
_TABLE_MAX = 8_192


def _round_sig(x: float, digits: int) -> float:
    return float(f"{x:.{digits}g}")


class RangeScheme:
    """Data-independent bucket edges for ``ranges_only`` groups.

    Two schemes, neither derived from any value it buckets:

    - **Configured edges** (``PrivacyConfig.range_edges``): ascending edges for a category path.
      A category without its own edges uses its nearest configured ancestor ("grocery" for
      "grocery/dairy/milk"). Values below the first edge fall in ``[None, first)``, values at
      or above the last in ``[last, None)``.
    - **Geometric scheme** otherwise: for positive values edges at ``ratio**i`` (integer
      ``i >= -20``), anchored at 1.0, with a "tiny" bucket ``[0, ratio**-20)`` that also holds
      0; negative values use the mirrored edges ``-ratio**i`` and ``[-ratio**-20, 0)``. Edges
      are rounded to ``significant_digits`` so float noise in ``ratio**i`` cannot make two
      nodes disagree on an edge. Buckets too large for a float are open above (or below).

    Every bucket is half-open: ``lo <= value < hi``.
    """

    __slots__ = ("_buckets", "_digits", "_edge_cache", "_edges", "_log_ratio", "_range_cache",
                 "_ratio", "_table", "_tiny")

    TINY_EXPONENT = -20

    def __init__(self, *, ratio: float = 1.25,
                 edges: Mapping[str, Sequence[float]] | None = None,
                 significant_digits: int = 6) -> None:
        if not 3 <= significant_digits <= 15:
            raise ConfigError("significant_digits must be between 3 and 15")
        # Rounding moves an edge by at most half a unit in the last digit; consecutive edges
        # must stay further apart than that or two of them could round to the same number.
        if not (math.isfinite(ratio) and ratio > 1 + 10.0 ** (1 - significant_digits)):
            raise ConfigError(f"range ratio must be a finite number above 1, got {ratio!r}")
        checked: dict[str, tuple[float, ...]] = {}
        for category, cat_edges in (edges or {}).items():
            try:
                validate_category(category)
            except TopicError as exc:
                raise ConfigError(f"range_edges: {exc}") from None
            values = tuple(float(e) for e in cat_edges)
            if len(values) < 2 or any(not math.isfinite(e) for e in values) or any(
                    b <= a for a, b in itertools.pairwise(values)):
                raise ConfigError(f"range_edges[{category!r}] must hold at least two finite, "
                                  "strictly ascending edges")
            checked[category] = values
        self._ratio = float(ratio)
        self._log_ratio = math.log(self._ratio)
        self._digits = significant_digits
        self._edges = checked
        # Edges and buckets are pure functions of the scheme: a node buckets the same few
        # thousand of them over and over, so they are computed (and validated) once.
        self._edge_cache: dict[int, float] = {}
        self._range_cache: dict[tuple[float | None, float | None], ValueRange] = {}
        # Each value's bucket too: a store's prices and counts repeat (1.99, 12.0, ...).
        self._buckets: dict[tuple[float, str | None], ValueRange] = {}
        self._tiny = self.geometric_edge(self.TINY_EXPONENT)
        self._table: list[float] = []

    @classmethod
    def from_config(cls, privacy: PrivacyConfig) -> RangeScheme:
        """The scheme ``privacy`` configures (``range_edges`` and ``range_ratio``)."""
        return cls(ratio=privacy.range_ratio, edges=privacy.range_edges)

    @property
    def ratio(self) -> float:
        """Ratio between consecutive geometric edges."""
        return self._ratio

    @property
    def tiny(self) -> float:
        """Upper edge of the tiny bucket ``[0, tiny)`` (``ratio**-20``, rounded)."""
        return self._tiny

    def geometric_edge(self, i: int) -> float:
        """The ``i``-th positive edge of the geometric scheme (``inf`` past float range)."""
        edge = self._edge_cache.get(i)
        if edge is None:
            try:
                edge = _round_sig(self._ratio ** i, self._digits)
            except OverflowError:
                edge = math.inf
            if len(self._edge_cache) < _CACHE_LIMIT:
                self._edge_cache[i] = edge
        return edge

    def _range(self, lo: float | None, hi: float | None) -> ValueRange:
        key = (lo, hi)
        found = self._range_cache.get(key)
        if found is None:
            found = ValueRange(lo=lo, hi=hi)
            if len(self._range_cache) < _CACHE_LIMIT:
                self._range_cache[key] = found
        return found

    def edges_for(self, category: str | None) -> tuple[float, ...] | None:
        """The configured edges for ``category`` or its nearest ancestor, else None."""
        if category is None:
            return None
        path = category
        while True:
            found = self._edges.get(path)
            if found is not None:
                return found
            if "/" not in path:
                return None
            path = path.rsplit("/", 1)[0]

    def bucket(self, value: float, *, category: str | None) -> ValueRange:
        """The bucket holding ``value``.

        ``category`` selects configured edges (its own or its nearest ancestor's); None, or a
        category without configured edges, uses the geometric scheme.
        """
        if type(value) is float:
            found = self._buckets.get((value, category))
            if found is not None:
                return found
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PrivacyError(f"only numbers can be bucketed, got {type(value).__name__}")
        v = float(value)
        if not math.isfinite(v):
            raise PrivacyError("cannot bucket a non-finite number")
        edges = self.edges_for(category)
        bucket = self._configured(v, edges) if edges is not None else self._geometric(v)
        if len(self._buckets) >= _BUCKET_LIMIT:
            self._buckets.clear()
        self._buckets[(v, category)] = bucket
        return bucket

    def _configured(self, v: float, edges: tuple[float, ...]) -> ValueRange:
        idx = bisect.bisect_right(edges, v)  # edges[idx-1] <= v < edges[idx]
        lo = edges[idx - 1] if idx > 0 else None
        hi = edges[idx] if idx < len(edges) else None
        return self._range(lo, hi)

    def _geometric(self, v: float) -> ValueRange:
        table = self._table or self._fill_table()
        if v >= 0:
            if v < self._tiny:
                return self._range(0.0, self._tiny)
            if v < table[-1]:
                at = bisect.bisect_right(table, v)  # table[at-1] <= v < table[at], at >= 1
                return self._range(table[at - 1], table[at])
            i = self._start(v)
            # log() only estimates the exponent; the rounded edges decide.
            while i > self.TINY_EXPONENT and v < self.geometric_edge(i):
                i -= 1
            while v >= self.geometric_edge(i + 1):
                i += 1
            hi = self.geometric_edge(i + 1)
            return self._range(self.geometric_edge(i), hi if math.isfinite(hi) else None)
        a = -v
        # Mirrored edges with the same half-open orientation: a negative value sits in
        # [-edge(i+1), -edge(i)), i.e. edge(i) < |v| <= edge(i+1).
        if a <= self._tiny:
            return self._range(-self._tiny, 0.0)
        if a <= table[-1]:
            at = bisect.bisect_left(table, a)  # table[at-1] < a <= table[at], at >= 1
            return self._range(-table[at], -table[at - 1])
        i = self._start(a)
        while i > self.TINY_EXPONENT and a <= self.geometric_edge(i):
            i -= 1
        while a > self.geometric_edge(i + 1):
            i += 1
        lo = self.geometric_edge(i + 1)
        return self._range(-lo if math.isfinite(lo) else None, -self.geometric_edge(i))

    def _fill_table(self) -> list[float]:
        table = self._table = [self._tiny]
        while table[-1] < _TABLE_TOP and len(table) < _TABLE_MAX:
            table.append(self.geometric_edge(self.TINY_EXPONENT + len(table)))
        return table

    def _start(self, a: float) -> int:
        return max(self.TINY_EXPONENT, math.floor(math.log(a) / self._log_ratio))

    def is_edge(self, value: float, *, category: str | None) -> bool:
        """Whether ``value`` is an edge of the scheme ``category`` uses (data-independent)."""
        if not math.isfinite(value):
            return False
        edges = self.edges_for(category)
        if edges is not None:
            return value in edges
        if value == 0:
            return True
        a = abs(value)
        i = self._start(a)
        return any(self.geometric_edge(j) == a for j in range(i - 1, i + 3)
                   if j >= self.TINY_EXPONENT)

