"""k-anonymous aggregation of sealed contributions: statistics a cell may publish, and what
was suppressed and why (:func:`aggregate`, :func:`aggregate_cell`)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

from ..errors import PrivacyError
from ..model.insight import FIELD_GROUPS, Frozen
from .filter import ADDITIVE_FIELDS, Contribution

__all__ = [
    "AggregateOutcome",
    "FieldStatistics",
    "SuppressionCounter",
    "SuppressionReason",
    "aggregate",
    "aggregate_cell",
]

SuppressionReason = Literal["below_k", "dominance"]
"""Why a statistic was withheld: fewer than k companies, or one company above the cap."""


class FieldStatistics(Frozen):
    """Published statistics of one numeric field over the companies of a cell.

    ``mean`` and ``stddev`` are over per-company values (each company counted once);
    ``stddev`` is the population standard deviation and is None below three companies.
    ``sum`` is set for additive fields only.
    """

    count: int
    companies: int
    mean: float
    stddev: float | None = None
    sum: float | None = None


class AggregateOutcome(Frozen):
    """The result of aggregating one group: published statistics and suppressed fields."""

    group: str
    currency: str | None = None
    statistics: dict[str, FieldStatistics]
    suppressed: dict[str, SuppressionReason]

    def suppression_counts(self) -> dict[str, int]:
        """Number of suppressed fields per reason."""
        return dict(Counter(self.suppressed.values()))


class SuppressionCounter:
    """Running count of suppressed statistics per reason, across outcomes."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def record(self, outcome: AggregateOutcome) -> None:
        """Add the suppressions of ``outcome``."""
        self._counts.update(outcome.suppressed.values())

    def __getitem__(self, reason: str) -> int:
        return self._counts[reason]

    @property
    def counts(self) -> dict[str, int]:
        """Suppressions per reason so far."""
        return dict(self._counts)

    @property
    def total(self) -> int:
        """All suppressions so far."""
        return sum(self._counts.values())


def _check_thresholds(min_companies: int, dominance_cap: float) -> None:
    if isinstance(min_companies, bool) or not isinstance(min_companies, int) \
            or min_companies < 2:
        raise PrivacyError(f"min_companies must be an integer >= 2 (one company's aggregate "
                           f"is its own value), got {min_companies!r}")
    if not (isinstance(dominance_cap, int | float) and 0 < dominance_cap <= 1):
        raise PrivacyError(f"dominance_cap must be in (0, 1], got {dominance_cap!r}")


def aggregate(contributions: Sequence[Contribution], *, group: str, min_companies: int,
              dominance_cap: float) -> AggregateOutcome:
    """Statistics of ``group`` over ``contributions`` that one cell may publish.

    Contributions are first combined per company: additive fields (:data:`ADDITIVE_FIELDS`:
    units, revenue, transactions) are summed, all others (prices, percentage changes) are
    averaged. So k counts distinct companies, never stores, and a company with many stores
    weighs as one company in ``mean`` and ``stddev``.

    A field is published only when

    - at least ``min_companies`` distinct companies report it (else ``"below_k"``), and
    - no company's share of the field's weight exceeds ``dominance_cap`` (else
      ``"dominance"``). For additive fields the weight is the company's sum (its share of the
      published total); for the others it is the company's number of contributions (its share
      of the observations), since a self-reported sample size could be inflated at will. A
      total weight of 0 counts as equal shares.

    The k test comes first, so a cell that fails both is reported as ``below_k``.

    Emitted per field: ``count`` (contributions), ``companies``, ``mean`` and population
    ``stddev`` of the per-company values, and ``sum`` for additive fields. ``stddev`` is left
    out below three companies, where mean and stddev together would give both values away.
    min, max and median are deliberately never emitted: each of them *is* one company's own
    value. Thresholds do not stop differencing across overlapping cells or cells where every
    company reports the same value; the publisher must keep cells fixed and coarse.

    Raises :class:`PrivacyError` for thresholds that protect nothing (k < 2, cap outside
    (0, 1]) and for ``price_data`` contributions in more than one currency.
    """
    _check_thresholds(min_companies, dominance_cap)
    holding = [c for c in contributions if c.values.get(group)]
    currency: str | None = None
    if group == "price_data":
        currencies = {c.currency for c in holding}
        if len(currencies) > 1:
            raise PrivacyError("price contributions mix currencies "
                               f"{sorted(str(c) for c in currencies)}; aggregate each "
                               "currency as its own cell")
        currency = next(iter(currencies), None)

    per_field: dict[str, dict[str, list[float]]] = {}
    for c in holding:
        for name, value in c.values[group].items():
            per_field.setdefault(name, {}).setdefault(c.company, []).append(value)

    statistics: dict[str, FieldStatistics] = {}
    suppressed: dict[str, SuppressionReason] = {}
    for name in sorted(per_field):
        by_company = per_field[name]
        additive = name in ADDITIVE_FIELDS
        combined = [math.fsum(vs) if additive else math.fsum(vs) / len(vs)
                    for vs in by_company.values()]
        companies = len(combined)
        if companies < min_companies:
            suppressed[name] = "below_k"
            continue
        weights = combined if additive else [float(len(vs)) for vs in by_company.values()]
        total = math.fsum(weights)
        top_share = max(weights) / total if total > 0 else 1 / companies
        if top_share > dominance_cap:
            suppressed[name] = "dominance"
            continue
        mean = math.fsum(combined) / companies
        variance = math.fsum((x - mean) ** 2 for x in combined) / companies
        statistics[name] = FieldStatistics(
            count=sum(len(vs) for vs in by_company.values()),
            companies=companies,
            mean=mean,
            stddev=math.sqrt(variance) if companies >= 3 else None,
            sum=math.fsum(combined) if additive else None,
        )
    return AggregateOutcome(group=group, currency=currency, statistics=statistics,
                            suppressed=suppressed)


def aggregate_cell(contributions: Iterable[Contribution], *, min_companies: int,
                   dominance_cap: float,
                   counter: SuppressionCounter | None = None) -> dict[str, AggregateOutcome]:
    """:func:`aggregate` every group any of ``contributions`` holds, keyed by group.

    The caller groups contributions into cells (category, product, region, window, network);
    ``counter``, if given, records every suppression.
    """
    _check_thresholds(min_companies, dominance_cap)
    items = list(contributions)
    present = {g for c in items for g, fields in c.values.items() if fields}
    outcomes: dict[str, AggregateOutcome] = {}
    for group in (g for g in FIELD_GROUPS if g in present):
        outcome = aggregate(items, group=group, min_companies=min_companies,
                            dominance_cap=dominance_cap)
        if counter is not None:
            counter.record(outcome)
        outcomes[group] = outcome
    return outcomes
