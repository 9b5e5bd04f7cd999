"""The privacy filter: what one :class:`~pear_mqtt.types.MarketInsight` may disclose.

A node never serialises a ``MarketInsight``. It runs it through :class:`PrivacyFilter`, which
splits it by the effective :class:`~pear_mqtt.types.SharingLevel` of each field group:

``full``
    exact values, in :class:`SharedInsight`.
``ranges_only``
    each number replaced by the fixed :class:`ValueRange` (bucket) that holds it, in
    :class:`SharedInsight`; categorical strings (currency, direction) are kept. Bucket edges come
    from :class:`RangeScheme` and never depend on the data.
``aggregated``
    absent from :class:`SharedInsight`; the exact numbers go into a :class:`Contribution`, which
    the network layer seals to the aggregator's public key. Only :func:`aggregate` turns
    contributions into publishable statistics, and only over at least k distinct companies with
    no company above the dominance cap.
``none``
    never leaves the node; it reaches neither output.

``anonymize_data`` replaces the company and store identities with keyed pseudonyms
(:class:`Pseudonymizer`), or drops them when the network has no pseudonym secret.

Because everything a node publishes is built from :class:`SharedInsight` (and the sealed
:class:`Contribution`), filtering before serialising is a property of the types: a ``none`` or
``aggregated`` group has no field in :class:`SharedInsight` it could hide in, and a
``ranges_only`` group cannot hold a bare number (the model refuses one).
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import hmac
import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import to_json

from ..config.models import NetworkConfig, PrivacyConfig
from ..errors import ConfigError, PrivacyError, TopicError
from ..model.insight import (
    FIELD_GROUPS,
    AwareDatetime,
    Category,
    Finite,
    MarketInsight,
    NetworkMode,
    SharingLevel,
    identifier,
)
from ..model.topics import validate_category, validate_identifier

__all__ = [
    "ADDITIVE_FIELDS",
    "AggregateOutcome",
    "Contribution",
    "EncodedResult",
    "FieldStatistics",
    "FilterResult",
    "PrivacyFilter",
    "Pseudonymizer",
    "RangeScheme",
    "SharedInsight",
    "SuppressionCounter",
    "SuppressionReason",
    "ValueRange",
    "aggregate",
    "aggregate_cell",
]

ADDITIVE_FIELDS: frozenset[str] = frozenset({"units", "revenue", "transactions"})
"""Numeric fields that add up across stores of a company (sums); every other field is averaged."""

# Fields that qualify a group's numbers instead of observing anything: a group holding only
# these (e.g. a PriceData with just its default currency) carries no observation to share.
_UNIT_FIELDS: frozenset[str] = frozenset({"currency"})

# Price fields are the ones configured per-category edges are meant for: the edges are in a
# currency and tuned to a category's price band, which says nothing about unit counts,
# revenue totals or percentage changes. Those always use the geometric scheme.
_PRICE_FIELDS: frozenset[str] = frozenset({"price", "min_price", "max_price"})

SuppressionReason = Literal["below_k", "dominance"]
"""Why a statistic was withheld: fewer than k companies, or one company above the cap."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


_Identifier = Annotated[str, identifier("identifier")]


# -- pseudonyms ----------------------------------------------------------------------------

_PSEUDONYM_DOMAIN = b"pear_mqtt/pseudonym/v1"
_PSEUDONYM_CHARS = 24  # base32 characters: 120 bits of the HMAC


class Pseudonymizer:
    """Keyed pseudonyms for company and store identities, scoped to one network.

    ``pseudonym(kind, value)`` is ``"p"`` followed by 24 lowercase base32 characters of
    HMAC-SHA256(secret, domain || network_id || kind || value), each part length-prefixed so no
    two different (network, kind, value) triples frame to the same bytes. The result is a valid
    topic identifier.

    The same secret and network give the same pseudonym every time (stable inside a network);
    a different network id or secret gives an unrelated one (unlinkable across networks).
    Company ids are easy to guess, so unlinkability rests entirely on the secret: use at least
    32 random bytes and share it only inside the network.
    """

    __slots__ = ("_cache", "_key", "_network_id")

    def __init__(self, *, secret: bytes | str, network_id: str) -> None:
        key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        if not key:
            raise ConfigError("privacy.pseudonym_secret must not be empty")
        try:
            validate_identifier(network_id, what="network_id")
        except TopicError as exc:
            raise ConfigError(str(exc)) from None
        self._key = key
        self._network_id = network_id
        self._cache: dict[tuple[str, str], str] = {}

    def __repr__(self) -> str:
        # The secret stays out of logs and tracebacks.
        return f"Pseudonymizer(network_id={self._network_id!r}, secret=<hidden>)"

    @property
    def network_id(self) -> str:
        """The network these pseudonyms belong to."""
        return self._network_id

    def pseudonym(self, kind: Literal["company", "store"], value: str) -> str:
        """The pseudonym of ``value`` as a ``kind`` identity in this network."""
        cached = self._cache.get((kind, value))
        if cached is not None:
            return cached
        if kind not in ("company", "store"):
            raise PrivacyError(f"pseudonym kind must be 'company' or 'store', got {kind!r}")
        if not isinstance(value, str) or not value:
            raise PrivacyError(f"the {kind} identity to pseudonymise must be a non-empty string")
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (_PSEUDONYM_DOMAIN, self._network_id.encode(), kind.encode(),
                     value.encode("utf-8")):
            mac.update(len(part).to_bytes(4, "big"))
            mac.update(part)
        text = base64.b32encode(mac.digest()).decode("ascii").lower()
        result = "p" + text[:_PSEUDONYM_CHARS]
        # A node pseudonymises the same few identities for every insight it sends.
        if len(self._cache) < 4096:
            self._cache[(kind, value)] = result
        return result

    def store_pseudonym(self, company: str, store: str) -> str:
        """The pseudonym of ``store`` of ``company``.

        Store ids are often only unique inside a company ("store-1"), so the company is part
        of the input: two companies' "store-1" get different pseudonyms. ``/`` cannot occur in
        an identifier, which keeps the joined value unambiguous.
        """
        return self.pseudonym("store", f"{company}/{store}")

    @classmethod
    def from_config(cls, config: NetworkConfig) -> Pseudonymizer | None:
        """The pseudonymizer of ``config``'s network, or None when it has no secret."""
        secret = config.privacy.pseudonym_secret
        if secret is None:
            return None
        return cls(secret=secret.get_secret_value(), network_id=config.network_id)


# -- ranges --------------------------------------------------------------------------------

class ValueRange(_Frozen):
    """The bucket ``[lo, hi)`` that holds a number; ``None`` is an open end."""

    lo: Finite | None = None
    hi: Finite | None = None

    @model_validator(mode="after")
    def _ordered(self) -> ValueRange:
        if self.lo is None and self.hi is None:
            raise ValueError("a range needs at least one finite end")
        if self.lo is not None and self.hi is not None and not self.lo < self.hi:
            raise ValueError(f"lo ({self.lo}) must be below hi ({self.hi})")
        return self

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return False
        return ((self.lo is None or self.lo <= value)
                and (self.hi is None or value < self.hi))


_CACHE_LIMIT = 65_536


def _round_sig(x: float, digits: int) -> float:
    return float(f"{x:.{digits}g}")


class RangeScheme:
    """Data-independent bucket edges for ``ranges_only`` groups.

    Two schemes, neither derived from any value it buckets:

    - **Configured edges** (``PrivacyConfig.range_edges``): ascending edges for a category path.
      A category without its own edges uses its nearest configured ancestor ("grocery" for
      "grocery/dairy/milk"). Values below the first edge fall in ``[None, first)``, values at
      or above the last in ``[last, None)``.
    - **Geometric scheme** otherwise: for positive values edges at ``ratio**i`` (integer
      ``i >= -20``), anchored at 1.0, with a "tiny" bucket ``[0, ratio**-20)`` that also holds
      0; negative values use the mirrored edges ``-ratio**i`` and ``[-ratio**-20, 0)``. Edges
      are rounded to ``significant_digits`` so float noise in ``ratio**i`` cannot make two
      nodes disagree on an edge. Buckets too large for a float are open above (or below).

    Every bucket is half-open: ``lo <= value < hi``.
    """

    __slots__ = ("_digits", "_edge_cache", "_edges", "_log_ratio", "_range_cache", "_ratio",
                 "_tiny")

    TINY_EXPONENT = -20

    def __init__(self, *, ratio: float = 1.25,
                 edges: Mapping[str, Sequence[float]] | None = None,
                 significant_digits: int = 6) -> None:
        if not 3 <= significant_digits <= 15:
            raise ConfigError("significant_digits must be between 3 and 15")
        # Rounding moves an edge by at most half a unit in the last digit; consecutive edges
        # must stay further apart than that or two of them could round to the same number.
        if not (math.isfinite(ratio) and ratio > 1 + 10.0 ** (1 - significant_digits)):
            raise ConfigError(f"range ratio must be a finite number above 1, got {ratio!r}")
        checked: dict[str, tuple[float, ...]] = {}
        for category, cat_edges in (edges or {}).items():
            try:
                validate_category(category)
            except TopicError as exc:
                raise ConfigError(f"range_edges: {exc}") from None
            values = tuple(float(e) for e in cat_edges)
            if len(values) < 2 or any(not math.isfinite(e) for e in values) or any(
                    b <= a for a, b in itertools.pairwise(values)):
                raise ConfigError(f"range_edges[{category!r}] must hold at least two finite, "
                                  "strictly ascending edges")
            checked[category] = values
        self._ratio = float(ratio)
        self._log_ratio = math.log(self._ratio)
        self._digits = significant_digits
        self._edges = checked
        # Edges and buckets are pure functions of the scheme: a node buckets the same few
        # thousand of them over and over, so they are computed (and validated) once.
        self._edge_cache: dict[int, float] = {}
        self._range_cache: dict[tuple[float | None, float | None], ValueRange] = {}
        self._tiny = self.geometric_edge(self.TINY_EXPONENT)

    @classmethod
    def from_config(cls, privacy: PrivacyConfig) -> RangeScheme:
        """The scheme ``privacy`` configures (``range_edges`` and ``range_ratio``)."""
        return cls(ratio=privacy.range_ratio, edges=privacy.range_edges)

    @property
    def ratio(self) -> float:
        """Ratio between consecutive geometric edges."""
        return self._ratio

    @property
    def tiny(self) -> float:
        """Upper edge of the tiny bucket ``[0, tiny)`` (``ratio**-20``, rounded)."""
        return self._tiny

    def geometric_edge(self, i: int) -> float:
        """The ``i``-th positive edge of the geometric scheme (``inf`` past float range)."""
        edge = self._edge_cache.get(i)
        if edge is None:
            try:
                edge = _round_sig(self._ratio ** i, self._digits)
            except OverflowError:
                edge = math.inf
            if len(self._edge_cache) < _CACHE_LIMIT:
                self._edge_cache[i] = edge
        return edge

    def _range(self, lo: float | None, hi: float | None) -> ValueRange:
        key = (lo, hi)
        found = self._range_cache.get(key)
        if found is None:
            found = ValueRange(lo=lo, hi=hi)
            if len(self._range_cache) < _CACHE_LIMIT:
                self._range_cache[key] = found
        return found

    def edges_for(self, category: str | None) -> tuple[float, ...] | None:
        """The configured edges for ``category`` or its nearest ancestor, else None."""
        if category is None:
            return None
        path = category
        while True:
            found = self._edges.get(path)
            if found is not None:
                return found
            if "/" not in path:
                return None
            path = path.rsplit("/", 1)[0]

    def bucket(self, value: float, *, category: str | None) -> ValueRange:
        """The bucket holding ``value``.

        ``category`` selects configured edges (its own or its nearest ancestor's); None, or a
        category without configured edges, uses the geometric scheme.
        """
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PrivacyError(f"only numbers can be bucketed, got {type(value).__name__}")
        v = float(value)
        if not math.isfinite(v):
            raise PrivacyError("cannot bucket a non-finite number")
        edges = self.edges_for(category)
        if edges is not None:
            return self._configured(v, edges)
        return self._geometric(v)

    def _configured(self, v: float, edges: tuple[float, ...]) -> ValueRange:
        idx = bisect.bisect_right(edges, v)  # edges[idx-1] <= v < edges[idx]
        lo = edges[idx - 1] if idx > 0 else None
        hi = edges[idx] if idx < len(edges) else None
        return self._range(lo, hi)

    def _geometric(self, v: float) -> ValueRange:
        if v >= 0:
            if v < self._tiny:
                return self._range(0.0, self._tiny)
            i = self._start(v)
            # log() only estimates the exponent; the rounded edges decide.
            while i > self.TINY_EXPONENT and v < self.geometric_edge(i):
                i -= 1
            while v >= self.geometric_edge(i + 1):
                i += 1
            hi = self.geometric_edge(i + 1)
            return self._range(self.geometric_edge(i), hi if math.isfinite(hi) else None)
        a = -v
        # Mirrored edges with the same half-open orientation: a negative value sits in
        # [-edge(i+1), -edge(i)), i.e. edge(i) < |v| <= edge(i+1).
        if a <= self._tiny:
            return self._range(-self._tiny, 0.0)
        i = self._start(a)
        while i > self.TINY_EXPONENT and a <= self.geometric_edge(i):
            i -= 1
        while a > self.geometric_edge(i + 1):
            i += 1
        lo = self.geometric_edge(i + 1)
        return self._range(-lo if math.isfinite(lo) else None, -self.geometric_edge(i))

    def _start(self, a: float) -> int:
        return max(self.TINY_EXPONENT, math.floor(math.log(a) / self._log_ratio))

    def is_edge(self, value: float, *, category: str | None) -> bool:
        """Whether ``value`` is an edge of the scheme ``category`` uses (data-independent)."""
        if not math.isfinite(value):
            return False
        edges = self.edges_for(category)
        if edges is not None:
            return value in edges
        if value == 0:
            return True
        a = abs(value)
        i = self._start(a)
        return any(self.geometric_edge(j) == a for j in range(i - 1, i + 3)
                   if j >= self.TINY_EXPONENT)


# -- wire bodies ---------------------------------------------------------------------------

# Left to right (str, then number, then range): the first match is the only possible one, and
# pydantic's default "smart" union would try every member for every value.
GroupValues = dict[str, Annotated[str | Finite | ValueRange, Field(union_mode="left_to_right")]]


class SharedInsight(_Frozen):
    """What a node publishes for one insight: ``full`` and ``ranges_only`` groups only.

    ``company`` and ``store`` are pseudonyms when the network anonymises and has a pseudonym
    secret, None when it anonymises without one, and the real ids otherwise. ``levels`` names
    the level of each group in ``groups`` (and nothing else: ``aggregated`` and ``none`` groups
    are not even named). A ``ranges_only`` group holds no bare number; the model refuses one,
    so a receiver can rely on it too.
    """

    category: Category
    product_id: _Identifier | None = None
    region: _Identifier
    window_start: AwareDatetime
    window_end: AwareDatetime
    sample_size: int
    company: _Identifier | None = None
    store: _Identifier | None = None
    levels: dict[str, SharingLevel]
    groups: dict[str, GroupValues]

    @model_validator(mode="after")
    def _disclosure(self) -> SharedInsight:
        _check_disclosure(self.levels, self.groups)
        return self


def _check_disclosure(levels: Mapping[str, SharingLevel],
                      groups: Mapping[str, Mapping[str, object]]) -> None:
    """The disclosure rules of a shared insight (ValueError naming the offending field)."""
    if set(levels) != set(groups):
        raise ValueError("levels must name exactly the groups present")
    for group, level in levels.items():
        if group not in FIELD_GROUPS:
            raise ValueError(f"unknown field group {group!r}")
        if level is not SharingLevel.FULL and level is not SharingLevel.RANGES_ONLY:
            raise ValueError(f"group {group!r} at level {SharingLevel(level).value!r} cannot "
                             "be shared in an insight")
        for name, value in groups[group].items():
            kind = type(value)
            # Fast path for the allowed cases (isinstance on a pydantic model is slow).
            if kind is str or (kind is float if level is SharingLevel.FULL
                               else kind is ValueRange):
                continue
            if isinstance(value, ValueRange) and level is SharingLevel.FULL:
                raise ValueError(f"{group}.{name}: a full group holds exact values")
            if isinstance(value, int | float) and level is SharingLevel.RANGES_ONLY:
                raise ValueError(f"{group}.{name}: a ranges_only group holds no exact "
                                 "numbers")


def _check_contribution(values: Mapping[str, Mapping[str, float]]) -> None:
    for group, fields in values.items():
        if group not in FIELD_GROUPS:
            raise ValueError(f"unknown field group {group!r}")
        for name, value in fields.items():
            if name in ADDITIVE_FIELDS and value < 0:
                raise ValueError(f"{group}.{name}: an additive metric cannot be negative")


class Contribution(_Frozen):
    """One insight's ``aggregated`` groups: exact values only an aggregator may open.

    ``company`` is the identity :func:`aggregate` counts distinct companies by (the pseudonym,
    or the real id when the network has no pseudonym secret: the contribution is sealed to the
    aggregator). Pseudonyms are per network, so aggregate contributions of one network at a
    time or one company counts once per network. ``currency`` is the unit of ``price_data``
    values. ``values`` maps group to numeric field to exact value.
    """

    company: _Identifier
    store: _Identifier | None = None
    category: Category
    product_id: _Identifier | None = None
    region: _Identifier
    window_start: AwareDatetime
    window_end: AwareDatetime
    currency: str | None = None
    values: dict[str, dict[str, Finite]]

    @model_validator(mode="after")
    def _known(self) -> Contribution:
        _check_contribution(self.values)
        return self


@dataclass(frozen=True, slots=True, kw_only=True)
class FilterResult:
    """The two outputs of :meth:`PrivacyFilter.apply`."""

    shared: SharedInsight
    contribution: Contribution | None


@dataclass(frozen=True, slots=True, kw_only=True)
class EncodedResult:
    """:meth:`PrivacyFilter.encode`'s outputs: the JSON of :class:`SharedInsight` and of
    :class:`Contribution` (None when no ``aggregated`` group holds data)."""

    shared: bytes
    contribution: bytes | None


@dataclass(slots=True)
class _Split:
    shared_company: str | None
    shared_store: str | None
    contrib_company: str
    contrib_store: str | None
    levels: dict[str, SharingLevel]
    groups: dict[str, GroupValues]
    aggregated: dict[str, dict[str, float]]
    currency: str | None




# -- the filter ----------------------------------------------------------------------------

def _observations(data: BaseModel) -> dict[str, float | str]:
    """Set fields of a group model, numbers as floats; unknown value types fail closed."""
    out: dict[str, float | str] = {}
    units_only = True
    # A model's __dict__ holds exactly its fields; reading it avoids pydantic's per-access
    # machinery on this per-insight path. Exact type checks first: isinstance() is the slow
    # path, kept for subclasses (and to refuse bool, which is an int).
    for name, value in vars(data).items():
        if value is None:
            continue
        kind = type(value)
        if kind is float or kind is str:
            out[name] = value
        elif kind is int:
            out[name] = float(value)
        elif isinstance(value, bool) or not isinstance(value, int | float | str):
            raise PrivacyError(f"{name}: cannot classify a {kind.__name__} value for "
                               "the privacy filter")
        else:
            out[name] = float(value) if isinstance(value, int | float) else value
        if units_only and name not in _UNIT_FIELDS:
            units_only = False
    return {} if units_only else out


class PrivacyFilter:
    """Turns a :class:`MarketInsight` into exactly what ``config`` allows to leave the node.

    The level of each group is ``config.sharing_level(group)``. Public mode may share
    aggregates only: a configuration that would put a group into the published insight is
    refused with :class:`PrivacyError`, when the filter is built and again on every insight.
    """

    __slots__ = ("_config", "_levels", "_pseudonymizer", "_ranges")

    def __init__(self, *, config: NetworkConfig) -> None:
        self._config = config
        self._levels = {group: SharingLevel(config.sharing_level(group))
                        for group in FIELD_GROUPS}
        self._pseudonymizer = Pseudonymizer.from_config(config)
        self._ranges = RangeScheme.from_config(config.privacy)
        self._check_mode()

    @property
    def levels(self) -> dict[str, SharingLevel]:
        """The effective level of every field group."""
        return dict(self._levels)

    @property
    def ranges(self) -> RangeScheme:
        """The bucket scheme ``ranges_only`` groups use."""
        return self._ranges

    def _check_mode(self) -> None:
        if self._config.mode is NetworkMode.PUBLIC:
            shared = sorted(g for g, level in self._levels.items()
                            if level in (SharingLevel.FULL, SharingLevel.RANGES_ONLY))
            if shared:
                raise PrivacyError(f"public mode shares aggregates only, but {shared} would be "
                                   "published per insight")

    def _identities(self, store: str) -> tuple[str | None, str | None, str, str | None]:
        """(shared company, shared store, contribution company, contribution store)."""
        company = self._config.company_id
        if not self._config.privacy.anonymize_data:
            return company, store, company, store
        p = self._pseudonymizer
        if p is None:
            # Dropped from what is published; the sealed contribution still needs a stable
            # company identity so the aggregator can count distinct companies.
            return None, None, company, None
        company_p = p.pseudonym("company", company)
        store_p = p.store_pseudonym(company, store)
        return company_p, store_p, company_p, store_p

    def apply(self, insight: MarketInsight, *, store: str | None = None) -> FilterResult:
        """Split ``insight`` into the published :class:`SharedInsight` and the sealed
        :class:`Contribution` (None when no ``aggregated`` group holds data).

        ``store`` is the store identity; it defaults to the config's ``node_id`` (one node
        per store).
        """
        sp = self._split(insight, store)
        # Every field comes from a validated MarketInsight, the node's own config or the
        # scheme's cached buckets, and _split checked the disclosure rules: the models are
        # built without re-validating formats (two thirds of the filter's time otherwise).
        shared = SharedInsight.model_construct(
            category=insight.category, product_id=insight.product_id,
            region=insight.region, window_start=insight.window_start,
            window_end=insight.window_end, sample_size=insight.sample_size,
            company=sp.shared_company, store=sp.shared_store, levels=sp.levels,
            groups=sp.groups)
        contribution = None
        if sp.aggregated:
            contribution = Contribution.model_construct(
                company=sp.contrib_company, store=sp.contrib_store, category=insight.category,
                product_id=insight.product_id, region=insight.region,
                window_start=insight.window_start, window_end=insight.window_end,
                currency=sp.currency, values=sp.aggregated)
        return FilterResult(shared=shared, contribution=contribution)

    def encode(self, insight: MarketInsight, *, store: str | None = None) -> EncodedResult:
        """:meth:`apply`, serialised: the JSON a node sends, without building the models
        (pydantic's serialiser writes the plain values straight to bytes).

        The shared insight without its unset (None) members, parsed back by receivers with
        :class:`SharedInsight`; the contribution, parsed by the aggregator with
        :class:`Contribution`.
        """
        sp = self._split(insight, store)
        shared: dict[str, object] = {"category": insight.category}
        if insight.product_id is not None:
            shared["product_id"] = insight.product_id
        shared["region"] = insight.region
        shared["window_start"] = insight.window_start
        shared["window_end"] = insight.window_end
        shared["sample_size"] = insight.sample_size
        if sp.shared_company is not None:
            shared["company"] = sp.shared_company
        if sp.shared_store is not None:
            shared["store"] = sp.shared_store
        # Plain strings: pydantic_core serialises an Enum member through a Python fallback.
        shared["levels"] = {group: level.value for group, level in sp.levels.items()}
        shared["groups"] = sp.groups
        contribution = None
        if sp.aggregated:
            contribution = to_json({
                "company": sp.contrib_company, "store": sp.contrib_store,
                "category": insight.category, "product_id": insight.product_id,
                "region": insight.region, "window_start": insight.window_start,
                "window_end": insight.window_end, "currency": sp.currency,
                "values": sp.aggregated})
        return EncodedResult(shared=to_json(shared), contribution=contribution)

    def _split(self, insight: MarketInsight, store: str | None) -> _Split:
        self._check_mode()
        if store is None:
            store = self._config.node_id
        else:
            try:
                validate_identifier(store, what="store")
            except TopicError as exc:
                raise PrivacyError(str(exc)) from None
        shared_company, shared_store, contrib_company, contrib_store = self._identities(store)

        levels: dict[str, SharingLevel] = {}
        groups: dict[str, GroupValues] = {}
        aggregated: dict[str, dict[str, float]] = {}
        currency: str | None = None
        for group in FIELD_GROUPS:
            level = self._levels[group]
            if level is SharingLevel.NONE:
                continue  # never read, so it cannot leak
            data = getattr(insight, group)
            if data is None:
                continue
            fields = _observations(data)
            if not fields:
                continue
            if level is SharingLevel.FULL:
                groups[group] = dict(fields)
            elif level is SharingLevel.RANGES_ONLY:
                groups[group] = {name: self._bucket(name, v, insight.category)
                                 for name, v in fields.items()}
            else:
                numbers = {n: v for n, v in fields.items() if isinstance(v, float)}
                if numbers:
                    aggregated[group] = numbers
                    if group == "price_data":
                        c = fields.get("currency")
                        currency = c if isinstance(c, str) else None
                continue
            levels[group] = level

        if self._config.mode is NetworkMode.PUBLIC and groups:
            raise PrivacyError(f"public mode must not publish insight groups, got "
                               f"{sorted(groups)}")
        try:
            _check_disclosure(levels, groups)
            _check_contribution(aggregated)
        except ValueError as exc:
            raise PrivacyError(f"filtered insight violates the disclosure rules: {exc}") from None
        return _Split(shared_company, shared_store, contrib_company, contrib_store, levels,
                      groups, aggregated, currency)

    def _bucket(self, name: str, value: float | str, category: str) -> ValueRange | str:
        if isinstance(value, str):
            return value
        return self._ranges.bucket(value, category=category if name in _PRICE_FIELDS else None)


# -- aggregation ---------------------------------------------------------------------------

class FieldStatistics(_Frozen):
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


class AggregateOutcome(_Frozen):
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
