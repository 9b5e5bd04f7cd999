"""What the market store answers with: typed rows, grouped rows, price positions, pages.

Frozen dataclasses rather than pydantic models: a query may return many thousands of rows
and each is built from values the store already checked on the way in.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from ..privacy.ranges import ValueRange

__all__ = ["METRICS", "AggregateRow", "GroupRow", "HistogramRow", "MarketRow", "Page",
           "PricePosition", "StoreStatus", "Value"]

METRICS: tuple[str, ...] = ("price", "min_price", "max_price", "units", "revenue",
                            "transactions", "price_change_pct", "demand_change_pct",
                            "sample_size")
"""The numeric fields an insight can disclose, in every field group (docs/MARKET.md)."""

Value = float | ValueRange
"""A disclosed figure: exact (private mode, ``full``) or the bucket that holds it."""


@dataclass(frozen=True, slots=True)
class MarketRow:
    """One insight as this node received it, with the disclosure of its mode: exact values
    where the sender shared them, buckets where it shared ranges, pseudonyms where the
    network anonymises. ``id`` orders rows by arrival and is the paging cursor."""

    id: int
    member: str
    node: str
    item_id: str
    category: str
    region: str
    product_id: str | None
    window_start: datetime
    window_end: datetime
    received_at: datetime
    currency: str | None
    direction: str | None
    values: dict[str, Value]
    log_ref: str | None


@dataclass(frozen=True, slots=True)
class GroupRow:
    """One metric of one category over one period (a day or an ISO week, UTC).

    ``mean`` and ``stddev`` are over the exact values and the middles of the buckets;
    ``low``/``high`` are the smallest and largest value or bucket end seen; ``exact`` says
    whether every value in it was exact. ``companies`` counts distinct members (pseudonyms
    where the network anonymises)."""

    period: datetime
    category: str
    region: str | None
    metric: str
    count: int
    companies: int
    mean: float | None
    stddev: float | None
    low: float | None
    high: float | None
    exact: bool


@dataclass(frozen=True, slots=True)
class AggregateRow:
    """One field of one cell of a bridge aggregate (public, or the consortium's own)."""

    id: int
    category: str
    region: str
    window_start: datetime
    window_end: datetime
    group: str
    field: str
    currency: str | None
    count: int
    companies: int
    mean: float
    stddev: float | None
    received_at: datetime


@dataclass(frozen=True, slots=True)
class HistogramRow:
    """The bucket histogram of one price field in one cell of a bridge aggregate: how many
    companies' latest price fell in each ``(lo, hi, companies)`` bucket (ascending)."""

    category: str
    region: str
    window_start: datetime
    window_end: datetime
    field: str
    currency: str | None
    companies: int
    buckets: tuple[tuple[float | None, float | None, int], ...]


@dataclass(frozen=True, slots=True)
class PricePosition:
    """Where a price stands against what this node's mode lets it see.

    ``basis`` is what the answer rests on: ``exact`` (the latest exact prices of each
    sender: private mode), ``ranges`` (the buckets of the latest prices: consortium mode) or
    ``aggregate`` (the bridge's latest aggregate: mean and standard deviation, and its
    bucket histogram when published). The percentile is a band
    ``[percentile_low, percentile_high]`` (equal when the data is exact); ``companies`` and
    ``observations`` say how much the figure rests on."""

    category: str
    price: float
    region: str | None
    basis: Literal["exact", "ranges", "aggregate"]
    companies: int
    observations: int
    percentile_low: float
    percentile_high: float
    mean: float | None
    stddev: float | None
    distance_from_mean: float | None
    z_score: float | None
    currency: str | None
    as_of: datetime


@dataclass(frozen=True, slots=True)
class Page:
    """Rows of a query and the cursor of the next page (None: this was the last)."""

    rows: list[MarketRow]
    next_cursor: int | None


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """How big the store is: rows of each kind, bytes on disk, the oldest window kept."""

    path: str
    insights: int
    aggregates: int
    bytes: int
    oldest: datetime | None
    refused: int
