"""The privacy filter: splits a :class:`~pear_mqtt.model.insight.MarketInsight` by the effective
sharing level of each field (:mod:`.disclosure`: a derived field follows its source) into what
is published (:class:`SharedInsight`: ``full`` values and ``ranges_only`` buckets; None when
nothing is) and what is sealed to the aggregator (:class:`Contribution`: ``aggregated``
values); ``none`` groups are never read. The levels are specified in docs/DESIGN.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated

from pydantic import Discriminator, Field, Tag, model_validator
from pydantic_core import to_json

from ..config.models import NetworkConfig
from ..errors import PrivacyError, TopicError
from ..model.insight import (
    FIELD_GROUPS,
    AwareDatetime,
    Category,
    Finite,
    Frozen,
    MarketInsight,
    NetworkMode,
    SharingLevel,
    identifier,
)
from ..model.topics import validate_identifier
from ..security.identity import Identity
from .disclosure import (
    ADDITIVE_FIELDS,
    DERIVED_FROM,
    FIELDS,
    SAMPLE_SIZE_SOURCE,
    Action,
    check_contribution,
    check_shared,
    field_action,
    sample_size_level,
)
from .ranges import RangeScheme, ValueRange

__all__ = [
    "ADDITIVE_FIELDS",
    "Contribution",
    "EncodedResult",
    "FilterResult",
    "PrivacyFilter",
    "SharedInsight",
]

# Fields that qualify a group's numbers instead of observing anything: a group holding only
# these (e.g. a PriceData with just its default currency) carries no observation to share.
_UNIT_FIELDS: frozenset[str] = frozenset({"currency"})

# Price fields are the ones configured per-category edges are meant for: the edges are in a
# currency and tuned to a category's price band, which says nothing about unit counts,
# revenue totals or percentage changes. Those always use the geometric scheme.
_PRICE_FIELDS: frozenset[str] = frozenset({"price", "min_price", "max_price"})


_LEVEL_TEXT: dict[SharingLevel, str] = {level: level.value for level in SharingLevel}

_Identifier = Annotated[str, identifier("identifier")]
_Count = Annotated[int, Field(ge=1)]


# -- wire bodies ---------------------------------------------------------------------------

def _value_kind(value: object) -> str:
    """Which member of a group value's union to validate ``value`` as, chosen by its type:
    a union trying the members in turn failed once or twice for every range."""
    kind = type(value)  # exact types first: the wire's values, and no slow isinstance()
    if kind is str:
        return "text"
    if kind is dict or kind is ValueRange:
        return "range"
    if kind is float or kind is int:
        return "number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, Mapping | ValueRange):
        return "range"
    return "number"


GroupValues = dict[str, Annotated[
    Annotated[str, Tag("text")] | Annotated[Finite, Tag("number")]
    | Annotated[ValueRange, Tag("range")],
    Discriminator(_value_kind)]]


class SharedInsight(Frozen):
    """What a node publishes for one insight: the fields whose effective level is ``full`` or
    ``ranges_only`` (:mod:`.disclosure`), and nothing when there are none (no message).

    ``company`` and ``store`` are the member and node the sender's certificate names when the
    network anonymises (the pseudonyms its operator assigned, in an anonymising network), and
    the configured ids otherwise. ``levels`` names the level of each group in ``groups``: the
    groups with published fields and the sources of published derived fields (``aggregated``
    and ``none`` groups are not even named). ``sample_size`` follows ``sales_data``: exact at
    ``full``, a bucket at ``ranges_only``, absent otherwise. The model refuses anything the
    rules forbid (a bare number in a ``ranges_only`` group, a change whose source is not
    ``full``, an empty insight), so a receiver can rely on it too.
    """

    category: Category
    product_id: _Identifier | None = None
    region: _Identifier
    window_start: AwareDatetime
    window_end: AwareDatetime
    sample_size: Annotated[_Count | ValueRange | None,
                           Field(union_mode="left_to_right")] = None
    company: _Identifier | None = None
    store: _Identifier | None = None
    levels: dict[str, SharingLevel]
    groups: dict[str, GroupValues]

    @model_validator(mode="after")
    def _disclosure(self) -> SharedInsight:
        check_shared(self.levels, self.groups, self.sample_size)
        if not self.levels:
            raise ValueError("an insight that shares nothing is not published")
        return self


class Contribution(Frozen):
    """One insight's ``aggregated`` fields: exact values only an aggregator may open.

    ``company`` is the identity :func:`aggregate` counts distinct companies by: the member the
    sender's certificate names when the network anonymises (its pseudonym there), else the
    configured company id; the contribution is sealed to the aggregator. Pseudonyms are per
    network, so aggregate contributions of one network at a time or one company counts once
    per network. ``currency`` is the unit of ``price_data`` values. ``values`` maps group to
    numeric field to exact value (derived fields included where their effective level is
    ``aggregated``); ``sample_size`` is there when ``sales_data`` is ``aggregated``.
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
    sample_size: _Count | None = None

    @model_validator(mode="after")
    def _known(self) -> Contribution:
        check_contribution(self.values)
        return self


# (shared company, shared store, contribution company, contribution store)
_Identities = tuple[str | None, str | None, str, str | None]

@dataclass(frozen=True, slots=True, kw_only=True)
class FilterResult:
    """The two outputs of :meth:`PrivacyFilter.apply`; either may be None (nothing to
    publish, nothing to seal)."""

    shared: SharedInsight | None
    contribution: Contribution | None


@dataclass(frozen=True, slots=True, kw_only=True)
class EncodedResult:
    """:meth:`PrivacyFilter.encode`'s outputs: the JSON of :class:`SharedInsight` (None when
    nothing is published) and of :class:`Contribution` (None when nothing is sealed)."""

    shared: bytes | None
    contribution: bytes | None


@dataclass(slots=True)
class _Split:
    shared_company: str | None
    shared_store: str | None
    contrib_company: str
    contrib_store: str | None
    levels: dict[str, SharingLevel]
    groups: dict[str, GroupValues]
    sample_size: int | ValueRange | None
    aggregated: dict[str, dict[str, float]]
    sealed_sample_size: int | None
    currency: str | None


# -- the filter ----------------------------------------------------------------------------

def _classified(name: str, value: object) -> float | str:
    """A field value of a type other than float, int or str: a subclass of one of them as
    its plain value; anything else fails closed, and so does a bool (an int subclass that
    is no measurement)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PrivacyError(f"{name}: cannot classify a {type(value).__name__} value for "
                           "the privacy filter")
    return float(value) if isinstance(value, int | float) else str(value)


class PrivacyFilter:
    """Turns a :class:`MarketInsight` into exactly what ``config`` allows to leave the node.

    The level of each group is ``config.sharing_level(group)``. Public mode may share
    aggregates only: a configuration that would put a group into the published insight is
    refused with :class:`PrivacyError`, when the filter is built and again on every insight.

    With ``anonymize_data`` the identities published are those of ``identity``: the member
    and node the node's certificate names (:meth:`attach`, on every ``connect()``). Until one
    is attached no identity is published (the sealed contribution names the configured
    company id for the aggregator).
    """

    __slots__ = ("_actions", "_config", "_identity", "_levels", "_ranges", "_sample_size_level")

    def __init__(self, *, config: NetworkConfig, identity: Identity | None = None) -> None:
        self._config = config
        self._identity = identity
        self._levels = {group: SharingLevel(config.sharing_level(group))
                        for group in FIELD_GROUPS}
        # What happens to each field, and which group a published derived field names as
        # its source, decided once per config; None: the group is never read (every field
        # of it is left out).
        self._actions: dict[str, dict[str, tuple[Action, str | None]] | None] = {}
        for group in FIELD_GROUPS:
            actions = {name: field_action(self._levels, group, name) for name in FIELDS[group]}
            self._actions[group] = None if all(a == "drop" for a in actions.values()) else {
                name: (a, DERIVED_FROM.get((group, name)) if a != "seal" else None)
                for name, a in actions.items()}
        self._sample_size_level = sample_size_level(self._levels)
        self._ranges = RangeScheme.from_config(config.privacy)
        self._check_mode()

    def attach(self, identity: Identity) -> None:
        """Publish ``identity`` (the node certificate's) from now on (set on ``connect()``)."""
        self._identity = identity

    @property
    def identity(self) -> Identity | None:
        """The certificate identity published when the network anonymises, once attached."""
        return self._identity

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

    def _identities(self, store: str | None) -> _Identities:
        """(shared company, shared store, contribution company, contribution store)."""
        company = self._config.company_id
        if not self._config.privacy.anonymize_data:
            store = self._config.node_id if store is None else store
            return company, store, company, store
        me = self._identity
        if me is None:
            # Dropped from what is published; the sealed contribution still needs a stable
            # company identity so the aggregator can count distinct companies.
            return None, None, company, None
        if store is not None and store != me.node:
            # Only the operator can map a store to its pseudonym: publishing another store's
            # own id would undo the anonymity the certificate gives.
            raise PrivacyError(f"store {store!r} is not the node this certificate names "
                               f"({me.node!r}); an anonymising node publishes only that")
        return me.member, me.node, me.member, me.node

    def apply(self, insight: MarketInsight, *, store: str | None = None) -> FilterResult:
        """Split ``insight`` into the published :class:`SharedInsight` (None when no field is
        published) and the sealed :class:`Contribution` (None when no ``aggregated`` field
        holds data).

        ``store`` is the store identity; it defaults to the config's ``node_id`` (one node
        per store), and to the certificate's node when the network anonymises.
        """
        sp = self._split(insight, self._checked_identities(store))
        # Every field comes from a validated MarketInsight, the node's own config or the
        # scheme's cached buckets, and _split checked the disclosure rules: the models are
        # built without re-validating formats (which would dominate the filter's time).
        shared = None
        if sp.levels:
            shared = SharedInsight.model_construct(
                category=insight.category, product_id=insight.product_id,
                region=insight.region, window_start=insight.window_start,
                window_end=insight.window_end, sample_size=sp.sample_size,
                company=sp.shared_company, store=sp.shared_store, levels=sp.levels,
                groups=sp.groups)
        contribution = None
        if sp.aggregated:
            contribution = Contribution.model_construct(
                company=sp.contrib_company, store=sp.contrib_store, category=insight.category,
                product_id=insight.product_id, region=insight.region,
                window_start=insight.window_start, window_end=insight.window_end,
                currency=sp.currency, values=sp.aggregated,
                sample_size=sp.sealed_sample_size)
        return FilterResult(shared=shared, contribution=contribution)

    def encode(self, insight: MarketInsight, *, store: str | None = None) -> EncodedResult:
        """:meth:`apply`, serialised: the JSON a node sends, without building the models
        (pydantic's serialiser writes the plain values straight to bytes).

        The shared insight without its unset (None) members, parsed back by receivers with
        :class:`SharedInsight`; the contribution, parsed by the aggregator with
        :class:`Contribution`.
        """
        return self._encode_one(insight, self._checked_identities(store), None)

    def encode_many(self, insights: Sequence[MarketInsight], *,
                    store: str | None = None) -> list[EncodedResult]:
        """:meth:`encode` for a batch, in order: what depends only on the configuration and
        the identity (the mode check, the identities, each category's bucket edges) is
        worked out once per batch. Raises :class:`PrivacyError` at the first insight refused
        (its position in the message)."""
        ids = self._checked_identities(store)
        edges: dict[str, bool] = {}
        out: list[EncodedResult] = []
        for position, insight in enumerate(insights):
            try:
                out.append(self._encode_one(insight, ids, edges))
            except PrivacyError as exc:
                raise type(exc)(f"insight {position} of the batch: {exc}") from exc
        return out

    def _encode_one(self, insight: MarketInsight, ids: _Identities,
                    edges: dict[str, bool] | None) -> EncodedResult:
        sp = self._split(insight, ids, edges)
        shared_json = None
        if sp.levels:
            shared: dict[str, object] = {"category": insight.category}
            if insight.product_id is not None:
                shared["product_id"] = insight.product_id
            shared["region"] = insight.region
            shared["window_start"] = insight.window_start
            shared["window_end"] = insight.window_end
            if sp.sample_size is not None:
                shared["sample_size"] = sp.sample_size
            if sp.shared_company is not None:
                shared["company"] = sp.shared_company
            if sp.shared_store is not None:
                shared["store"] = sp.shared_store
            # Plain strings: pydantic_core serialises an Enum member through a Python fallback
            # (and an enum's .value is a Python property: looked up instead).
            shared["levels"] = {group: _LEVEL_TEXT[level] for group, level in sp.levels.items()}
            shared["groups"] = sp.groups
            shared_json = to_json(shared)
        contribution = None
        if sp.aggregated:
            contribution = to_json({
                "company": sp.contrib_company, "store": sp.contrib_store,
                "category": insight.category, "product_id": insight.product_id,
                "region": insight.region, "window_start": insight.window_start,
                "window_end": insight.window_end, "currency": sp.currency,
                "values": sp.aggregated, "sample_size": sp.sealed_sample_size})
        return EncodedResult(shared=shared_json, contribution=contribution)

    def _checked_identities(self, store: str | None) -> _Identities:
        """The mode check and :meth:`_identities` of ``store``, once per call or batch."""
        self._check_mode()
        if store is not None:
            try:
                validate_identifier(store, what="store")
            except TopicError as exc:
                raise PrivacyError(str(exc)) from None
        return self._identities(store)

    def _split(self, insight: MarketInsight, ids: _Identities,
               edges: dict[str, bool] | None = None) -> _Split:
        """``edges`` remembers, per category, whether the scheme has configured bucket edges
        for it (a category without uses the geometric scheme, as category None does)."""
        shared_company, shared_store, contrib_company, contrib_store = ids

        levels: dict[str, SharingLevel] = {}
        groups: dict[str, GroupValues] = {}
        aggregated: dict[str, dict[str, float]] = {}
        sources: set[str] = set()
        currency: str | None = None
        for group in FIELD_GROUPS:
            actions = self._actions[group]
            if actions is None:
                continue  # never read, so it cannot leak
            data = getattr(insight, group)
            if data is None:
                continue
            published: GroupValues = {}
            sealed: dict[str, float] = {}
            observed = False  # a part holding only units (a currency) observes nothing
            unit: float | str | None = None
            # A model's __dict__ holds exactly its fields; reading it avoids pydantic's
            # per-access machinery on this per-insight path. Exact type checks first:
            # isinstance() is the slow path, kept for subclasses (and to refuse bool).
            for name, value in vars(data).items():
                if value is None:
                    continue
                kind = type(value)
                if kind is int:
                    value = float(value)
                elif kind is not float and kind is not str:
                    value = _classified(name, value)
                if name in _UNIT_FIELDS:
                    unit = value
                else:
                    observed = True
                action, source = actions[name]
                if action == "exact" or action == "text":
                    published[name] = value
                elif action == "bucket":
                    published[name] = self._bucket(name, value, insight.category, edges)
                elif action == "seal" and isinstance(value, float):
                    sealed[name] = value
                else:
                    continue
                if source is not None:
                    sources.add(source)  # only derived fields have one: never a unit
            if not observed:
                continue
            if published:
                levels[group] = self._levels[group]
                groups[group] = published
            if sealed:
                aggregated[group] = sealed
                if group == "price_data":
                    currency = unit if isinstance(unit, str) else None

        sample_size: int | ValueRange | None = None
        sealed_sample_size: int | None = None
        level = self._sample_size_level
        if level is SharingLevel.FULL:
            sample_size = insight.sample_size
        elif level is SharingLevel.RANGES_ONLY:
            sample_size = self._ranges.bucket(float(insight.sample_size), category=None)
        elif level is SharingLevel.AGGREGATED and aggregated:
            # Sealed with the values it counts; on its own it is no contribution.
            sealed_sample_size = insight.sample_size
        if sample_size is not None:
            sources.add(SAMPLE_SIZE_SOURCE)
        for source in sources:
            if source not in levels:
                # Named for the derived fields it governs, so receivers can check them.
                levels[source] = self._levels[source]
                groups[source] = {}

        if self._config.mode is NetworkMode.PUBLIC and levels:
            raise PrivacyError(f"public mode must not publish insight groups, got "
                               f"{sorted(levels)}")
        try:
            if levels:
                check_shared(levels, groups, sample_size)
            check_contribution(aggregated)
        except ValueError as exc:
            raise PrivacyError(f"filtered insight violates the disclosure rules: {exc}") from None
        return _Split(shared_company, shared_store, contrib_company, contrib_store, levels,
                      groups, sample_size, aggregated, sealed_sample_size, currency)

    def _bucket(self, name: str, value: float | str, category: str,
                edges: dict[str, bool] | None) -> ValueRange | str:
        if isinstance(value, str):
            return value
        if name not in _PRICE_FIELDS:
            return self._ranges.bucket(value, category=None)
        if edges is None:
            return self._ranges.bucket(value, category=category)
        own = edges.get(category)
        if own is None:
            own = edges[category] = self._ranges.edges_for(category) is not None
        return self._ranges.bucket(value, category=category if own else None)

