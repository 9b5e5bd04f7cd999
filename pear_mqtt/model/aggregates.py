"""What the public bridge publishes (aggregates, receipts, ledger): the wire types nodes and
the bridge both read. Contracts: docs/BRIDGE.md.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AggregateBody",
    "BucketCount",
    "LedgerBody",
    "LedgerPeriod",
    "NoiseInfo",
    "PriceHistogram",
    "PublishedCell",
    "PublishedGroupBody",
    "PublishedStatistic",
    "ReceiptBody",
    "ReceiptCell",
]


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PublishedStatistic(_Out):
    """One field's statistics over the companies of a cell (see
    :class:`pear_mqtt.privacy.FieldStatistics`)."""

    count: int
    companies: int
    mean: float
    stddev: float | None = None
    sum: float | None = None


class PublishedGroupBody(_Out):
    """A group's published fields; ``currency`` for price statistics."""

    group: str
    currency: str | None = None
    fields: dict[str, PublishedStatistic]


class BucketCount(_Out):
    """One price bucket ``[lo, hi)`` (``None``: open end) and how many companies' latest
    bucket in the cell it is."""

    lo: float | None = None
    hi: float | None = None
    companies: int


class PriceHistogram(_Out):
    """The ``ranges_only`` buckets of one price field in one currency over a cell: each
    company counted once (its latest bucket), published only with at least k companies.
    ``median`` is the bucket holding the median company (the lower one for an even count)."""

    field: str
    currency: str | None = None
    companies: int
    buckets: list[BucketCount]
    median: BucketCount


class PublishedCell(_Out):
    """One region's statistics in an aggregate message; ``histograms`` (absent when there
    are none, so older readers still parse such messages) are the price bucket histograms."""

    region: str
    groups: list[PublishedGroupBody]
    histograms: list[PriceHistogram] | None = Field(default=None,
                                                    exclude_if=lambda v: v is None)


class NoiseInfo(_Out):
    mechanism: Literal["laplace", "gaussian"]
    epsilon_per_cell: float
    delta: float | None = None


class AggregateBody(_Out):
    """The body of a retained ``aggregates/<category>`` message (envelope kind
    ``aggregate``): the category's cells of one window that passed every test."""

    network: str
    category: str
    window_start: datetime
    window_end: datetime
    policy_version: str
    min_companies: int
    dominance_cap: float
    noise: NoiseInfo | None = None
    cells: list[PublishedCell]


class ReceiptCell(_Out):
    """What went into one published cell."""

    region: str
    contributors: int
    identity_domains: int
    inputs: int
    input_hash: str
    epsilon_spent: float
    delta_spent: float


class ReceiptBody(_Out):
    """A disclosure receipt (envelope kind ``receipt``), bound to its aggregate message by
    the SHA-256 of that message's exact bytes."""

    network: str
    category: str
    window_start: datetime
    window_end: datetime
    aggregate_topic: str
    aggregate_sha256: str
    policy_version: str
    min_companies: int
    dominance_cap: float
    mechanism: Literal["none", "laplace", "gaussian"]
    cells: list[ReceiptCell]
    issued_at: datetime


class LedgerPeriod(_Out):
    period_start: datetime
    period_end: datetime
    epsilon_spent: float
    epsilon_remaining: float
    delta_spent: float
    cells: int


class LedgerBody(_Out):
    """The retained ε ledger (envelope kind ``ledger``): the latest budget periods."""

    network: str
    mechanism: Literal["laplace", "gaussian"]
    epsilon_per_cell: float
    budget_per_period: float
    period_seconds: int
    policy_version: str
    periods: list[LedgerPeriod]
