"""What the bridge publishes, to the public and to the consortium's members (aggregates,
receipts, ledger): the wire types nodes and the bridge both read. Contracts: docs/BRIDGE.md.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

__all__ = [
    "AggregateBody",
    "BucketBody",
    "HistogramBucket",
    "LedgerBody",
    "LedgerPeriod",
    "NoiseInfo",
    "PublishedCell",
    "PublishedGroupBody",
    "PublishedHistogram",
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


class BucketBody(_Out):
    """A ``ranges_only`` bucket ``[lo, hi)`` as members publish it (None: an open end)."""

    lo: float | None = None
    hi: float | None = None


class HistogramBucket(BucketBody):
    """One bucket of a histogram and the number of companies whose latest value in the cell
    fell in it."""

    companies: int


class PublishedHistogram(_Out):
    """How many companies published each bucket of one ``ranges_only`` field in a cell (each
    company once, with its latest bucket), over at least k companies, and the bucket that
    holds the median company. Buckets ascend; only buckets holding a company are listed."""

    companies: int
    buckets: list[HistogramBucket]
    median: BucketBody


class PublishedGroupBody(_Out):
    """A group's published fields; ``currency`` for price statistics.

    ``histograms`` (per field, from the buckets members publish under ``ranges_only``) is
    left out of the message when there is none, so such a message reads as before.
    """

    group: str
    currency: str | None = None
    fields: dict[str, PublishedStatistic]
    histograms: dict[str, PublishedHistogram] | None = None


class PublishedCell(_Out):
    """One region's statistics in an aggregate message."""

    region: str
    groups: list[PublishedGroupBody]


class NoiseInfo(_Out):
    mechanism: Literal["laplace", "gaussian"]
    epsilon_per_cell: float
    delta: float | None = None


class AggregateBody(_Out):
    """The body of a retained ``aggregates/<category>`` message (envelope kind
    ``aggregate``): the category's cells of one window that passed every test. ``network``
    names the audience: the public network, or the consortium whose members it is for.

    :meth:`wire` is the JSON the bridge signs: unset optional parts (histograms) are left
    out, so an aggregate without them has the fields it always had."""

    network: str
    category: str
    window_start: datetime
    window_end: datetime
    policy_version: str
    min_companies: int
    dominance_cap: float
    noise: NoiseInfo | None = None
    cells: list[PublishedCell]

    def wire(self) -> dict[str, Any]:
        """The body as the envelope carries it (histograms only where there are some)."""
        data = self.model_dump(mode="json")
        for cell in data["cells"]:
            for group in cell["groups"]:
                if group["histograms"] is None:
                    del group["histograms"]
        return data


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
