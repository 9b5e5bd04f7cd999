"""The market view: a node's local, indexed, queryable store of the market data it
received and verified (docs/MARKET.md)."""

from .feed import MarketFeed
from .rows import (
    METRICS,
    AggregateRow,
    GroupRow,
    HistogramRow,
    MarketRow,
    Page,
    PricePosition,
    StoreStatus,
    Value,
)
from .store import MarketStore, Retention

__all__ = ["METRICS", "AggregateRow", "GroupRow", "HistogramRow", "MarketFeed", "MarketRow",
           "MarketStore", "Page", "PricePosition", "Retention", "StoreStatus", "Value"]
