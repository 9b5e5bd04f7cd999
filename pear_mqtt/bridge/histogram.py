"""Price signals from ``ranges_only`` buckets: the bucket a member published for each price
field (kept with the item, :func:`bucket_values`), and per cell and currency the histogram of
each company's latest bucket (:func:`bucket_histograms`) that aggregation then holds to k and
the dominance cap. The contract is in docs/BRIDGE.md ("Price histograms")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..model.aggregates import BucketCount
from ..model.insight import SharingLevel
from ..privacy.filter import SharedInsight
from ..privacy.ranges import ValueRange

__all__ = ["BUCKETS", "BucketSet", "bucket_histograms", "bucket_values"]

BUCKETS = "price_buckets"
"""The key under which an item's stored values keep its price buckets (never a field group,
so the statistics never see it): ``{"at": <window start>, "<field>.lo": x, "<field>.hi": y}``,
an open end left out, and ``"<field>.set": 1`` for each field that has a bucket."""

_PRICE_FIELDS = ("price", "min_price", "max_price")
_AT = "at"


def bucket_values(shared: SharedInsight) -> tuple[dict[str, float], str | None] | None:
    """The price buckets ``shared`` publishes under ``ranges_only`` (stored form) and their
    currency, or None when it has none."""
    if shared.levels.get("price_data") is not SharingLevel.RANGES_ONLY:
        return None
    fields = shared.groups.get("price_data", {})
    out: dict[str, float] = {}
    for name in _PRICE_FIELDS:
        bucket = fields.get(name)
        if isinstance(bucket, ValueRange):
            if bucket.lo is not None:
                out[f"{name}.lo"] = float(bucket.lo)
            if bucket.hi is not None:
                out[f"{name}.hi"] = float(bucket.hi)
            out[f"{name}.set"] = 1.0
    if not out:
        return None
    out[_AT] = shared.window_start.timestamp()
    currency = fields.get("currency")
    return out, currency if isinstance(currency, str) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class BucketSet:
    """One price field's histogram in one currency over a cell, before the k and dominance
    tests: ``per_company`` maps each company key to its latest bucket."""

    field: str
    currency: str | None
    per_company: dict[str, tuple[float | None, float | None]]

    def buckets(self) -> list[BucketCount]:
        """Bucket -> companies, lowest bucket first."""
        counts: dict[tuple[float | None, float | None], int] = {}
        for bucket in self.per_company.values():
            counts[bucket] = counts.get(bucket, 0) + 1
        return [BucketCount(lo=lo, hi=hi, companies=n)
                for (lo, hi), n in sorted(counts.items(), key=_order)]

    def median(self) -> BucketCount:
        """The bucket of the median company (the lower median for an even count)."""
        ordered = self.buckets()
        target = (len(self.per_company) + 1) // 2
        seen = 0
        for b in ordered:
            seen += b.companies
            if seen >= target:
                return b
        raise ValueError("an empty histogram has no median")


def _order(item: tuple[tuple[float | None, float | None], int]) -> tuple[float, float]:
    (lo, hi), _ = item
    return (float("-inf") if lo is None else lo, float("inf") if hi is None else hi)


def bucket_histograms(entries: Sequence[tuple[str, str, str | None, Mapping[str, float]]]
                      ) -> list[BucketSet]:
    """The histograms of one cell from ``entries`` (company key, item id, currency, stored
    buckets): each company counts once per currency, with the buckets of its latest
    observation (latest window start, then highest item id)."""
    latest: dict[tuple[str | None, str], tuple[float, str, Mapping[str, float]]] = {}
    for company, item_id, currency, stored in entries:
        key = (currency, company)
        mark = (stored.get(_AT, 0.0), item_id)
        old = latest.get(key)
        if old is None or mark > (old[0], old[1]):
            latest[key] = (mark[0], mark[1], stored)
    sets: dict[tuple[str, str | None], dict[str, tuple[float | None, float | None]]] = {}
    for (currency, company), (_, _, stored) in latest.items():
        for name in _PRICE_FIELDS:
            if f"{name}.set" in stored:
                sets.setdefault((name, currency), {})[company] = (
                    stored.get(f"{name}.lo"), stored.get(f"{name}.hi"))
    return [BucketSet(field=name, currency=currency, per_company=per)
            for (name, currency), per in sorted(sets.items(),
                                                key=lambda kv: (kv[0][1] or "", kv[0][0]))]
