"""One window's counted items into cells (category, region): k-anonymity and dominance per
field with :func:`pear_mqtt.privacy.filter.aggregate`, the conservative test for cells that
mix identity domains, noise against the period's budget, and the price bucket histograms
(:mod:`.histogram`) under the same k and dominance tests."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..errors import ConfigError
from ..model.aggregates import PriceHistogram
from ..model.insight import FIELD_GROUPS
from ..privacy.aggregate import FieldStatistics, SuppressionCounter, aggregate
from ..privacy.filter import ADDITIVE_FIELDS, Contribution
from .admission import input_hash
from .config import DPConfig
from .histogram import BUCKETS, BucketSet, bucket_histograms
from .noise import NoiseMechanism, NoisyField, add_noise
from .state import StoredContribution

__all__ = ["CellResult", "PublishedGroup", "WindowResult", "aggregate_window"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishedGroup:
    """The statistics of one group (price statistics per currency) that passed every test."""

    group: str
    currency: str | None
    fields: dict[str, FieldStatistics]


@dataclass(frozen=True, slots=True, kw_only=True)
class CellResult:
    """One (category, region) cell of a window: what may be published, and its receipt data.

    ``groups`` (and ``histograms``) are empty when everything was suppressed;
    ``suppressed`` counts suppressed statistics per reason (metrics only). ``contributors``
    counts distinct identities, ``domains`` the identity domains they came from.
    """

    category: str
    region: str
    groups: list[PublishedGroup]
    contributors: int
    domains: int
    inputs: int
    input_hash: str
    epsilon: float = 0.0
    delta: float = 0.0
    suppressed: dict[str, int] = field(default_factory=dict)
    histograms: list[PriceHistogram] = field(default_factory=list)

    @property
    def published(self) -> bool:
        return bool(self.groups) or bool(self.histograms)


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowResult:
    """Every cell of one window, and the budget it spent."""

    window_start: int
    window_end: int
    cells: list[CellResult]
    epsilon: float
    delta: float
    period_start: int | None

    @property
    def suppressed(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for c in self.cells:
            total.update(c.suppressed)
        return dict(total)


@dataclass(slots=True)
class _Candidate:
    group: str
    currency: str | None
    name: str
    stats: FieldStatistics
    per_company: dict[str, list[float]]


def _identity_key(domain: str, company: str) -> str:
    # A valid identifier for privacy.aggregate that cannot collide across domains.
    return "c" + hashlib.sha256(f"{domain}\x00{company}".encode()).hexdigest()[:32]


def _weight(name: str, values: Sequence[float]) -> float:
    # privacy.aggregate's dominance weights: the company's total for additive fields, its
    # number of observations otherwise.
    return math.fsum(values) if name in ADDITIVE_FIELDS else float(len(values))


def aggregate_window(window_start: int, contributions: Sequence[StoredContribution], *,
                     window_seconds: int,
                     min_companies: int, dominance_cap: float, dp: DPConfig,
                     noise: NoiseMechanism | None = None, budget_spent: float = 0.0,
                     counter: SuppressionCounter | None = None,
                     statistics: bool = True) -> WindowResult:
    """Aggregate one window's counted items into cells (category, region).

    ``contributions`` are the counted items of the window
    (:class:`pear_mqtt.bridge.state.StoredContribution`).
    Each group is aggregated with :func:`pear_mqtt.privacy.filter.aggregate` (price
    statistics per currency), counting companies by identity within their domain. Identities
    of different networks are unlinkable, so a cell that mixes identity domains assumes the
    same company may appear once per domain: k counts the largest domain alone and the
    dominance test adds up each domain's largest share. With noise on, each cell whose
    statistics survive spends ``dp.epsilon_per_cell`` from the budget of its period
    (``budget_spent`` already gone), or is suppressed as ``budget``. Price bucket histograms
    (one latest bucket per company) pass the same k and dominance tests and carry no noise.
    ``statistics=False`` leaves out everything but the histograms.
    """
    if dp.enabled and noise is None:
        raise ConfigError("noise is on (dp.mechanism) but no NoiseMechanism was given")
    window_end = window_start + window_seconds
    spent = budget_spent
    epsilon_total = delta_total = 0.0
    by_cell: dict[tuple[str, str], list[StoredContribution]] = {}
    for c in contributions:
        by_cell.setdefault((c.category, c.region), []).append(c)
    ws = datetime.fromtimestamp(window_start, UTC)
    we = datetime.fromtimestamp(window_end, UTC)
    cells: list[CellResult] = []
    for (category, region), items in sorted(by_cell.items()):
        domain_of: dict[str, str] = {}
        converted: list[Contribution] = []
        buckets: list[tuple[str, str, str | None, Mapping[str, float]]] = []
        for c in items:
            key = _identity_key(c.domain, c.company)
            domain_of[key] = c.domain
            values = c.values
            if BUCKETS in values:
                buckets.append((key, c.item_id, c.currency, values[BUCKETS]))
                values = {g: fs for g, fs in values.items() if g != BUCKETS}
            if values and statistics:
                converted.append(Contribution(company=key, category=category, region=region,
                                              window_start=ws, window_end=we,
                                              currency=c.currency, values=values))
        suppressed: Counter[str] = Counter()
        candidates = _candidates(converted, domain_of, suppressed, min_companies=min_companies,
                                 dominance_cap=dominance_cap, dp=dp, counter=counter)
        histograms = _histograms(bucket_histograms(buckets), domain_of, suppressed,
                                 min_companies=min_companies, dominance_cap=dominance_cap)
        eps = dlt = 0.0
        if candidates and dp.enabled:
            assert noise is not None
            if spent + dp.epsilon_per_cell > dp.budget_per_period * (1 + 1e-9):
                suppressed["budget"] += len(candidates)
                candidates = []
            else:
                noisy = add_noise([NoisyField(name=c.name, bounds=dp.bounds[f"{c.group}.{c.name}"],
                                              stats=c.stats, per_company=c.per_company.values())
                                   for c in candidates], dp=dp, noise=noise)
                for cand, stats in zip(candidates, noisy, strict=True):
                    cand.stats = stats
                eps = dp.epsilon_per_cell
                dlt = dp.delta if dp.mechanism == "gaussian" else 0.0
                spent += eps
                epsilon_total += eps
                delta_total += dlt
        groups: dict[tuple[str, str | None], dict[str, FieldStatistics]] = {}
        for cand in candidates:
            groups.setdefault((cand.group, cand.currency), {})[cand.name] = cand.stats
        cells.append(CellResult(
            category=category, region=region,
            groups=[PublishedGroup(group=g, currency=cur, fields=fs)
                    for (g, cur), fs in groups.items()],
            contributors=len(domain_of), domains=len(set(domain_of.values())),
            inputs=len(items), input_hash=input_hash(c.digest for c in items),
            epsilon=eps, delta=dlt, suppressed=dict(suppressed), histograms=histograms))
    return WindowResult(window_start=window_start, window_end=window_end, cells=cells,
                        epsilon=epsilon_total, delta=delta_total,
                        period_start=dp.period_of(window_start))


def _candidates(converted: Sequence[Contribution], domain_of: Mapping[str, str],
                suppressed: Counter[str], *, min_companies: int, dominance_cap: float,
                dp: DPConfig, counter: SuppressionCounter | None) -> list[_Candidate]:
    """The statistics of one cell that pass k, dominance and (with noise) the bounds test;
    everything else is counted in ``suppressed``."""
    candidates: list[_Candidate] = []
    present = {g for conv in converted for g, fs in conv.values.items() if fs}
    for group in (g for g in FIELD_GROUPS if g in present):
        holding = [conv for conv in converted if conv.values.get(group)]
        if group == "price_data":
            parts: dict[str | None, list[Contribution]] = {}
            for conv in holding:
                parts.setdefault(conv.currency, []).append(conv)
        else:
            parts = {None: holding}
        for currency, part in sorted(parts.items(), key=lambda kv: kv[0] or ""):
            outcome = aggregate(part, group=group, min_companies=min_companies,
                                dominance_cap=dominance_cap)
            if counter is not None:
                counter.record(outcome)
            suppressed.update(outcome.suppressed.values())
            for name, stats in outcome.statistics.items():
                per_company: dict[str, list[float]] = {}
                for conv in part:
                    value = conv.values[group].get(name)
                    if value is not None:
                        per_company.setdefault(conv.company, []).append(value)
                reason = _cross_domain(name, per_company, domain_of,
                                       min_companies=min_companies,
                                       dominance_cap=dominance_cap)
                if reason is None and dp.enabled and f"{group}.{name}" not in dp.bounds:
                    reason = "unbounded"
                if reason is not None:
                    suppressed[reason] += 1
                    continue
                candidates.append(_Candidate(group=group, currency=currency, name=name,
                                             stats=stats, per_company=per_company))
    return candidates


def _histograms(sets: Sequence[BucketSet], domain_of: Mapping[str, str],
                suppressed: Counter[str], *, min_companies: int,
                dominance_cap: float) -> list[PriceHistogram]:
    """The histograms of one cell that pass k and the dominance cap (each company weighs
    one: its latest bucket), with the same conservative test for mixed identity domains."""
    out: list[PriceHistogram] = []
    for hs in sets:
        n = len(hs.per_company)
        if n < min_companies:
            reason: str | None = "below_k"
        elif 1 / n > dominance_cap:
            reason = "dominance"
        else:
            reason = _cross_domain(hs.field, {c: [1.0] for c in hs.per_company}, domain_of,
                                   min_companies=min_companies, dominance_cap=dominance_cap)
        if reason is not None:
            suppressed[reason] += 1
            continue
        out.append(PriceHistogram(field=hs.field, currency=hs.currency, companies=n,
                                  buckets=hs.buckets(), median=hs.median()))
    return out


def _cross_domain(name: str, per_company: Mapping[str, Sequence[float]],
                  domain_of: Mapping[str, str], *, min_companies: int,
                  dominance_cap: float) -> str | None:
    """The conservative k and dominance test for a field whose companies span domains."""
    domains: dict[str, list[str]] = {}
    for company in per_company:
        domains.setdefault(domain_of[company], []).append(company)
    if len(domains) <= 1:
        return None
    if max(len(ids) for ids in domains.values()) < min_companies:
        return "below_k"
    weights = {c: _weight(name, vs) for c, vs in per_company.items()}
    total = math.fsum(weights.values())
    if total > 0:
        share = math.fsum(max(weights[c] for c in ids) for ids in domains.values()) / total
    else:
        share = len(domains) / len(per_company)
    return "dominance" if share > dominance_cap else None
