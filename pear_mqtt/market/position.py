"""Where a price stands against what a node may see: the latest exact prices of each sender
(private mode), their buckets (consortium mode), or the bridge's latest aggregate (public
mode, and any node without prices of its own to compare with). Method: docs/MARKET.md."""

from __future__ import annotations

import json
import math
import sqlite3
import statistics
from datetime import UTC, datetime

from ..errors import MarketError
from .queries import Filter
from .rows import METRICS, PricePosition
from .values import unpack

__all__ = ["price_position"]


def _pct(part: float, whole: int) -> float:
    return round(100.0 * part / whole, 2)


def price_position(conn: sqlite3.Connection, *, category: str, price: float,
                   region: str | None = None, field: str = "price") -> PricePosition:
    if not math.isfinite(price) or price < 0:
        raise MarketError(f"price must be a finite number >= 0, not {price!r}")
    if field not in METRICS:
        raise MarketError(f"unknown field {field!r}: one of {', '.join(METRICS)}")
    flt = Filter(category=category, region=region)
    where, args = flt.where(prefix="l.")  # latest holds the columns filtered on: its index
    got = []
    for member, vals, currency, end in conn.execute(
            "SELECT i.member, i.vals, i.currency, i.window_end FROM latest l "
            f"JOIN insights i ON i.id = l.insight WHERE {where}", args):
        pair = unpack(vals).get(field)
        if pair is not None:
            got.append((member, pair[0], pair[1], currency, end))
    if got:
        return _from_rows(got, category=category, price=price, region=region)
    return _from_aggregate(conn, flt, category=category, price=price, region=region,
                           field=field)


def _from_rows(got: list[tuple[str, float | None, float | None, str | None, float]], *,
               category: str, price: float, region: str | None) -> PricePosition:
    below = equal = inside = 0
    mids: list[float] = []
    exact = True
    for _, lo, hi, _, _ in got:
        if lo is not None and lo == hi:
            below += lo < price
            equal += lo == price
            mids.append(lo)
            continue
        exact = False
        if hi is not None and hi <= price:
            below += 1
        elif lo is None or lo <= price:
            inside += 1  # the bucket holds the price: this sender may be either side
        mids.append((lo + hi) / 2 if lo is not None and hi is not None else
                    (lo if hi is None else hi))  # type: ignore[arg-type]
    n = len(got)
    mean = statistics.fmean(mids)
    std = statistics.stdev(mids) if n > 1 else None
    currencies = {r[3] for r in got if r[3] is not None}
    return PricePosition(
        category=category, price=price, region=region,
        basis="exact" if exact else "ranges", companies=len({r[0] for r in got}),
        observations=n, percentile_low=_pct(below, n),
        percentile_high=_pct(below + equal + inside, n), mean=mean, stddev=std,
        distance_from_mean=price - mean, z_score=(price - mean) / std if std else None,
        currency=currencies.pop() if len(currencies) == 1 else None,
        as_of=datetime.fromtimestamp(max(r[4] for r in got), UTC))


def _from_aggregate(conn: sqlite3.Connection, flt: Filter, *, category: str, price: float,
                    region: str | None, field: str) -> PricePosition:
    where, args = flt.where()
    # The newest window of the category (all its regions, or the one asked for).
    newest = conn.execute(f"SELECT max(window_end) FROM aggregates WHERE {where} AND field = ?",
                          [*args, field]).fetchone()[0]
    if newest is None:
        raise MarketError(f"no prices for {category!r}"
                          f"{'' if region is None else f' in region {region!r}'} in this "
                          "store yet: nothing to compare with (query() shows what it holds)")
    cells = conn.execute(f"SELECT count, companies, mean, stddev, currency FROM aggregates "
                         f"WHERE {where} AND field = ? AND window_end = ?",
                         [*args, field, newest]).fetchall()
    total = sum(c[0] for c in cells)
    mean = sum(c[0] * c[2] for c in cells) / total
    # Pooled: the within-cell variances plus the spread of the cell means.
    var = sum(c[0] * ((c[3] or 0.0) ** 2 + (c[2] - mean) ** 2) for c in cells) / total
    std = math.sqrt(var) if any(c[3] is not None for c in cells) else None
    companies = sum(c[1] for c in cells)
    low = high = None
    hist_where, hist_args = flt.where()
    hists = conn.execute(f"SELECT buckets FROM histograms WHERE {hist_where} AND "
                         "window_end = ?", [*hist_args, newest]).fetchall()
    if hists:
        below = inside = n = 0
        for (buckets,) in hists:
            for lo, hi, count in json.loads(buckets):
                n += count
                if hi is not None and hi <= price:
                    below += count
                elif lo is None or lo <= price:
                    inside += count
        if n:
            low, high = _pct(below, n), _pct(below + inside, n)
    z = (price - mean) / std if std else None
    if low is None:
        # Without a histogram: where a normal distribution of that mean and deviation puts
        # it (an estimate, stated as one point).
        est = 50.0 if z is None else round(50.0 * (1 + math.erf(z / math.sqrt(2))), 2)
        low = high = est
    currencies = {c[4] for c in cells if c[4] is not None}
    return PricePosition(
        category=category, price=price, region=region, basis="aggregate",
        companies=companies, observations=total, percentile_low=low,
        percentile_high=high if high is not None else low, mean=mean, stddev=std,
        distance_from_mean=price - mean, z_score=z,
        currency=currencies.pop() if len(currencies) == 1 else None,
        as_of=datetime.fromtimestamp(newest, UTC))
