"""Price statistics from the buckets members publish under ``ranges_only``: per cell and
currency, how many companies' latest bucket fell in each bucket, and the median company's
bucket — only over at least k companies, none above the dominance cap."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..model.insight import SharingLevel
from ..privacy.filter import SharedInsight
from ..privacy.ranges import ValueRange
from .state import Bucket, StoredContribution

__all__ = [
    "HISTOGRAM_GROUP",
    "Histogram",
    "bucket_histogram",
    "price_buckets",
    "shared_currency",
]

HISTOGRAM_GROUP = "price_data"
"""The group whose buckets are counted: a price is a company's own figure (one bucket per
company makes sense), where a store's units or revenue are not."""


def price_buckets(shared: SharedInsight | None) -> dict[str, Bucket]:
    """The buckets of ``shared``'s price group by field, when it is ``ranges_only``."""
    if shared is None or shared.levels.get(HISTOGRAM_GROUP) is not SharingLevel.RANGES_ONLY:
        return {}
    return {name: (value.lo, value.hi)
            for name, value in shared.groups[HISTOGRAM_GROUP].items()
            if isinstance(value, ValueRange)}


def shared_currency(shared: SharedInsight | None) -> str | None:
    """The currency ``shared``'s price group names, if any."""
    if shared is None:
        return None
    currency = shared.groups.get(HISTOGRAM_GROUP, {}).get("currency")
    return currency if isinstance(currency, str) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Histogram:
    """Companies per bucket (ascending, occupied buckets only) and the median's bucket."""

    companies: int
    buckets: list[tuple[Bucket, int]]
    median: Bucket


def _order(bucket: Bucket) -> tuple[float, float]:
    lo, hi = bucket
    return (-math.inf if lo is None else lo, math.inf if hi is None else hi)


def bucket_histogram(items: Sequence[StoredContribution], name: str, *,
                     identity: Callable[[StoredContribution], str],
                     domain_of: Mapping[str, str], min_companies: int,
                     dominance_cap: float) -> Histogram | str:
    """The histogram of field ``name`` over ``items`` (one cell, one currency), or why it is
    withheld (``below_k``, ``dominance``).

    Each company (``identity``) counts once, with the bucket of its latest observation
    (latest end; ties go to the later item in the store's stable order). As for any
    statistic, a cell mixing identity domains counts k on its largest domain alone, and
    the dominance test adds up each domain's largest share; within one domain every company
    holds 1 / companies of the histogram.
    """
    latest: dict[str, tuple[float, Bucket]] = {}
    for item in items:
        bucket = item.ranges.get(name)
        if bucket is None:
            continue
        key = identity(item)
        seen = latest.get(key)
        if seen is None or item.observed >= seen[0]:
            latest[key] = (item.observed, bucket)
    companies = len(latest)
    per_domain: dict[str, int] = {}
    for key in latest:
        per_domain[domain_of[key]] = per_domain.get(domain_of[key], 0) + 1
    if companies == 0 or max(per_domain.values()) < min_companies:
        return "below_k"
    if len(per_domain) / companies > dominance_cap:
        return "dominance"
    counts: dict[Bucket, int] = {}
    for _, bucket in latest.values():
        counts[bucket] = counts.get(bucket, 0) + 1
    ordered = sorted(counts.items(), key=lambda kv: _order(kv[0]))
    # The lower median: the bucket of the ceil(n/2)-th company in ascending order.
    rank, median = (companies + 1) // 2, ordered[-1][0]
    for bucket, n in ordered:
        rank -= n
        if rank <= 0:
            median = bucket
            break
    return Histogram(companies=companies, buckets=ordered, median=median)
