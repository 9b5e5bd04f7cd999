"""One window's counted items into cells (category, region): k-anonymity and dominance per
field with :func:`pear_mqtt.privacy.aggregate.aggregate`, bucket histograms of published
price ranges (:mod:`.histograms`), the conservative test for cells that mix identity domains,
the differencing test against an earlier release of the window, and noise against the
period's budget."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..errors import ConfigError
from ..model.insight import FIELD_GROUPS
from ..privacy.aggregate import FieldStatistics, SuppressionCounter, aggregate
from ..privacy.filter import ADDITIVE_FIELDS, Contribution
from .admission import input_hash
from .config import DPConfig
from .histograms import HISTOGRAM_GROUP, Histogram, bucket_histogram
from .noise import NoiseMechanism, NoisyField, add_noise
from .state import StoredContribution

__all__ = ["CellResult", "PublishedGroup", "WindowResult", "aggregate_window"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishedGroup:
    """The statistics of one group (price statistics per currency) that passed every test,
    and the histograms of its published buckets (price ranges)."""

    group: str
    currency: str | None
    fields: dict[str, FieldStatistics]
    histograms: dict[str, Histogram] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class CellResult:
    """One (category, region) cell of a window: what may be published, and its receipt data.

    ``groups`` is empty when everything was suppressed; ``suppressed`` counts suppressed
    statistics per reason (metrics only). ``contributors`` counts distinct identities,
    ``domains`` the identity domains they came from.
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

    @property
    def published(self) -> bool:
        return bool(self.groups)


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
                     released: Callable[[StoredContribution], bool] | None = None
                     ) -> WindowResult:
    """Aggregate one window's counted items into cells (category, region).

    ``contributions`` are the counted items of the window
    (:class:`pear_mqtt.bridge.state.StoredContribution`).
    Each group is aggregated with :func:`pear_mqtt.privacy.aggregate.aggregate` (price
    statistics per currency), counting companies by identity within their domain; the
    buckets of ``ranges_only`` prices become histograms (:func:`.histograms.bucket_histogram`;
    not while noise is on: the open-ended buckets would show exactly which are occupied, so
    they are suppressed as ``noise``). Identities of different networks are unlinkable, so
    a cell that mixes identity domains assumes the same company may appear once per domain:
    k counts the largest domain alone and the dominance test adds up each domain's largest
    share. With noise on, each cell whose statistics survive spends ``dp.epsilon_per_cell``
    from the budget of its period (``budget_spent`` already gone), or is suppressed as
    ``budget``.

    ``released`` marks the items an earlier release of this window covered (the consortium's
    aggregate). Whoever read both releases could subtract one from the other, so a statistic
    or histogram the earlier items alone would have passed, and that now adds other items,
    is published only if those other items pass k and dominance on their own (else
    ``differencing``).
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
        earlier: list[bool] | None = [] if released is not None else None
        for c in items:
            key = _identity_key(c.domain, c.company)
            domain_of[key] = c.domain
            if not c.values:
                continue  # buckets only: for the histograms
            converted.append(Contribution(company=key, category=category, region=region,
                                          window_start=ws, window_end=we, currency=c.currency,
                                          values=c.values))
            if earlier is not None and released is not None:
                earlier.append(released(c))
        suppressed: Counter[str] = Counter()
        candidates = _candidates(converted, domain_of, suppressed, min_companies=min_companies,
                                 dominance_cap=dominance_cap, dp=dp, counter=counter,
                                 earlier=earlier)
        histograms = _histograms(items, domain_of, suppressed, min_companies=min_companies,
                                 dominance_cap=dominance_cap, noise_on=dp.enabled,
                                 released=released)
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
        groups: dict[tuple[str, str | None], PublishedGroup] = {}
        for cand in candidates:
            groups.setdefault((cand.group, cand.currency), PublishedGroup(
                group=cand.group, currency=cand.currency, fields={})
            ).fields[cand.name] = cand.stats
        for (currency, name), hist in histograms.items():
            groups.setdefault((HISTOGRAM_GROUP, currency), PublishedGroup(
                group=HISTOGRAM_GROUP, currency=currency, fields={})
            ).histograms[name] = hist
        cells.append(CellResult(
            category=category, region=region,
            groups=list(groups.values()),
            contributors=len(domain_of), domains=len(set(domain_of.values())),
            inputs=len(items), input_hash=input_hash(c.digest for c in items),
            epsilon=eps, delta=dlt, suppressed=dict(suppressed)))
    return WindowResult(window_start=window_start, window_end=window_end, cells=cells,
                        epsilon=epsilon_total, delta=delta_total,
                        period_start=dp.period_of(window_start))


def _histograms(items: Sequence[StoredContribution], domain_of: Mapping[str, str],
                suppressed: Counter[str], *, min_companies: int, dominance_cap: float,
                noise_on: bool, released: Callable[[StoredContribution], bool] | None
                ) -> dict[tuple[str | None, str], Histogram]:
    """The bucket histograms of one cell that pass every test, by (currency, field)."""
    by_part: dict[tuple[str | None, str], list[StoredContribution]] = {}
    for c in items:
        for name in c.ranges:
            by_part.setdefault((c.currency, name), []).append(c)
    out: dict[tuple[str | None, str], Histogram] = {}

    def histogram(part: Sequence[StoredContribution], name: str) -> Histogram | str:
        return bucket_histogram(part, name, identity=lambda c: _identity_key(c.domain,
                                                                            c.company),
                                domain_of=domain_of, min_companies=min_companies,
                                dominance_cap=dominance_cap)

    for (currency, name), part in sorted(by_part.items(), key=lambda kv: (kv[0][0] or "",
                                                                         kv[0][1])):
        result = histogram(part, name)
        if isinstance(result, str):
            suppressed[result] += 1
            continue
        if released is not None:
            before = [c for c in part if released(c)]
            others = [c for c in part if not released(c)]
            if before and others and not isinstance(histogram(before, name), str) \
                    and isinstance(histogram(others, name), str):
                suppressed["differencing"] += 1
                continue
        if noise_on:
            suppressed["noise"] += 1
            continue
        out[(currency, name)] = result
    return out


def _passes(part: Sequence[Contribution], group: str, name: str,
            domain_of: Mapping[str, str], *, min_companies: int, dominance_cap: float) -> bool:
    """Whether field ``group.name`` over ``part`` alone passes k, dominance and the
    cross-domain test."""
    outcome = aggregate(part, group=group, min_companies=min_companies,
                        dominance_cap=dominance_cap)
    if name not in outcome.statistics:
        return False
    per_company: dict[str, list[float]] = {}
    for conv in part:
        value = conv.values[group].get(name)
        if value is not None:
            per_company.setdefault(conv.company, []).append(value)
    return _cross_domain(name, per_company, domain_of, min_companies=min_companies,
                         dominance_cap=dominance_cap) is None


def _differencing(part: Sequence[Contribution], earlier: Mapping[int, bool], group: str,
                  name: str, domain_of: Mapping[str, str], *, min_companies: int,
                  dominance_cap: float) -> bool:
    """Whether publishing ``group.name`` over ``part`` would let a reader of the earlier
    release subtract it and learn about the items it adds."""
    holding = [conv for conv in part if conv.values[group].get(name) is not None]
    before = [conv for conv in holding if earlier[id(conv)]]
    others = [conv for conv in holding if not earlier[id(conv)]]
    if not (before and others):
        return False
    return _passes(before, group, name, domain_of, min_companies=min_companies,
                   dominance_cap=dominance_cap) and not _passes(
        others, group, name, domain_of, min_companies=min_companies,
        dominance_cap=dominance_cap)


def _candidates(converted: Sequence[Contribution], domain_of: Mapping[str, str],
                suppressed: Counter[str], *, min_companies: int, dominance_cap: float,
                dp: DPConfig, counter: SuppressionCounter | None,
                earlier: Sequence[bool] | None = None) -> list[_Candidate]:
    """The statistics of one cell that pass k, dominance, the differencing test (against
    the items ``earlier`` marks) and (with noise) the bounds test; everything else is
    counted in ``suppressed``."""
    candidates: list[_Candidate] = []
    was_released = ({id(conv): flag for conv, flag in zip(converted, earlier, strict=True)}
                    if earlier is not None else None)
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
                if reason is None and was_released is not None and _differencing(
                        part, was_released, group, name, domain_of,
                        min_companies=min_companies, dominance_cap=dominance_cap):
                    reason = "differencing"
                if reason is None and dp.enabled and f"{group}.{name}" not in dp.bounds:
                    reason = "unbounded"
                if reason is not None:
                    suppressed[reason] += 1
                    continue
                candidates.append(_Candidate(group=group, currency=currency, name=name,
                                             stats=stats, per_company=per_company))
    return candidates


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
