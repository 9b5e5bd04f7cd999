"""The data a node shares and reports: insights, sharing levels, status and the envelope model.

All models are frozen pydantic v2 models; validation errors name the field and the rule.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import InsightError, TopicError
from .topics import validate_category, validate_identifier

__all__ = [
    "FIELD_GROUPS",
    "CompanyId",
    "Frozen",
    "Health",
    "Histogram",
    "MarketInsight",
    "MessageKind",
    "NetworkId",
    "NetworkMessage",
    "NetworkMode",
    "NetworkStatus",
    "NodeId",
    "PriceData",
    "SalesData",
    "SharingLevel",
    "TrendData",
    "as_insight",
    "category_name",
    "identifier",
    "one_line",
]


class Frozen(BaseModel):
    """Base of every value model: immutable, no unknown fields, defaults validated."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            error = type(self).invalid_arguments(exc)
            if error is None:
                raise
            raise error from None

    # Like pydantic-settings' BaseSettings: validating a nested model does not go through
    # __init__, so only a direct constructor call maps its errors.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def invalid_arguments(cls, exc: ValidationError) -> Exception | None:
        """The :class:`~pear_mqtt.errors.PearError` a constructor call with invalid
        arguments raises instead of pydantic's ``exc`` (``None``: ``exc`` itself). Only the
        constructor maps: ``model_validate`` callers handle ``ValidationError`` themselves."""
        return None


def one_line(exc: ValidationError, what: str) -> str:
    """``exc`` as ``what field: rule`` on one line (the first error, and how many more)."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"])
    more = exc.error_count() - 1
    return (f"{what} {where}: " if where else f"{what}: ") + str(first["msg"]) + (
        f" (and {more} more)" if more else "")


class _InsightPart(Frozen):
    """An insight or one of its parts: invalid arguments are an :class:`InsightError`."""

    @classmethod
    def invalid_arguments(cls, exc: ValidationError) -> Exception | None:
        return InsightError(one_line(exc, cls.__name__))


def identifier(what: str) -> Any:
    """A pydantic validator: the value must be a valid topic level (errors name ``what``)."""

    def check(v: str) -> str:
        try:
            return validate_identifier(v, what=what)
        except TopicError as exc:
            raise ValueError(str(exc)) from None

    return AfterValidator(check)


def category_name(v: str) -> str:
    try:
        return validate_category(v)
    except TopicError as exc:
        raise ValueError(str(exc)) from None


CompanyId = Annotated[str, identifier("company_id")]
NodeId = Annotated[str, identifier("node_id")]
NetworkId = Annotated[str, identifier("network_id")]
Category = Annotated[str, AfterValidator(category_name)]


def _utc(v: datetime) -> datetime:
    if v.tzinfo is None:
        raise ValueError("must be timezone-aware (e.g. datetime.now(UTC))")
    return v.astimezone(UTC)


AwareDatetime = Annotated[datetime, AfterValidator(_utc)]


class NetworkMode(str, Enum):
    """Who may read what a node shares."""

    PRIVATE = "private"  # single company, multiple stores
    CONSORTIUM = "consortium"  # trusted group of companies
    PUBLIC = "public"  # open market participation


class SharingLevel(str, Enum):
    """How much of one field group leaves the node."""

    FULL = "full"  # exact values
    RANGES_ONLY = "ranges_only"  # only the fixed bucket that holds each number
    AGGREGATED = "aggregated"  # only statistics over >= k companies, computed by an aggregator
    NONE = "none"  # never leaves the node


FIELD_GROUPS: tuple[str, ...] = ("price_data", "sales_data", "trends")
"""The field groups of a :class:`MarketInsight` that a privacy policy governs."""


class Health(str, Enum):
    OK = "ok"
    DEGRADED = "degraded"
    DOWN = "down"


# -- insight payloads ---------------------------------------------------------------------

# Checked by pydantic-core itself ("Input should be a finite number"): a Python validator
# here would cost a call per number on every insight a receiver validates.
Finite = Annotated[float, AllowInfNan(False)]
NonNegative = Annotated[float, Field(ge=0), AllowInfNan(False)]
# Bounds no real store reaches: a value past them is a unit or parsing error (1e308 units).
Price = Annotated[float, Field(ge=0, le=1e9), AllowInfNan(False)]
Amount = Annotated[float, Field(ge=0, le=1e15), AllowInfNan(False)]
Percent = Annotated[float, Field(ge=-1e6, le=1e6), AllowInfNan(False)]
_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
_AHEAD = 366 * 86400  # s a window may end in the future (forecasts, clock skew)


class PriceData(_InsightPart):
    """Prices a store observed for the insight's window, in ``currency``."""

    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "EUR"
    price: Price | None = None
    min_price: Price | None = None
    max_price: Price | None = None

    @model_validator(mode="after")
    def _ordered(self) -> PriceData:
        if (self.min_price is not None and self.max_price is not None
                and self.min_price > self.max_price):
            raise ValueError("min_price must not exceed max_price")
        return self


class SalesData(_InsightPart):
    """What a store sold in the insight's window."""

    units: Amount | None = None
    revenue: Amount | None = None
    transactions: Amount | None = None


class TrendData(_InsightPart):
    """Changes over the previous window, in percent, and the price's direction.

    Derived from prices and sales, so never shared beyond them: the price change and the
    direction follow ``price_data``'s level, the demand change ``sales_data``'s, and a change
    is not shared at all under ``ranges_only`` (:mod:`pear_mqtt.privacy.disclosure`).
    """

    price_change_pct: Percent | None = None
    demand_change_pct: Percent | None = None
    direction: Literal["up", "down", "flat"] | None = None


class MarketInsight(_InsightPart):
    """One store's observation of one category (optionally one product) over a window.

    This is what a node holds; what leaves it is decided by :mod:`pear_mqtt.privacy`.
    ``sample_size`` is the window's transaction count: it is shared as ``sales_data`` is.
    Category, product, region and window identify the observation (its item id).
    """

    category: Category
    product_id: Annotated[str, identifier("product_id")] | None = None
    region: Annotated[str, identifier("region")] = "global"
    window_start: datetime
    window_end: datetime
    price_data: PriceData | None = None
    sales_data: SalesData | None = None
    trends: TrendData | None = None
    sample_size: Annotated[int, Field(ge=1, le=10**9)] = 1

    @field_validator("window_start", "window_end")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("must be timezone-aware (e.g. datetime.now(UTC))")
        return v.astimezone(UTC)

    @model_validator(mode="after")
    def _window(self) -> MarketInsight:
        if self.window_end <= self.window_start:
            raise ValueError("window_end must not be before window_start, nor equal to it "
                             "(an empty window observes nothing)")
        if self.window_start < _EARLIEST:
            raise ValueError(f"window_start {self.window_start:%Y-%m-%d} is before 2000: a "
                             "clock or unit error (give an aware datetime of the window)")
        if self.window_end.timestamp() > time.time() + _AHEAD:
            raise ValueError(f"window_end {self.window_end:%Y-%m-%d} is more than a year "
                             "ahead: a clock or unit error")
        # Each part's observations named (currency only labels prices): plain attribute
        # reads, as a walk over the parts' fields would cost a third of this validator.
        p, s, t = self.price_data, self.sales_data, self.trends
        observed = (
            (p is not None and (p.price is not None or p.min_price is not None
                                or p.max_price is not None))
            or (s is not None and (s.units is not None or s.revenue is not None
                                   or s.transactions is not None))
            or (t is not None and (t.price_change_pct is not None
                                   or t.demand_change_pct is not None
                                   or t.direction is not None)))
        # The transaction count is an observation too (shared as sales_data is), when given.
        if not observed and "sample_size" not in self.model_fields_set:
            raise ValueError("the insight observes nothing: give at least one value of "
                             "price_data, sales_data or trends, or its sample_size")
        return self



def as_insight(value: Any) -> MarketInsight:
    """``value`` as a :class:`MarketInsight` (a mapping of its fields is validated into one);
    :class:`InsightError` in one line naming the field and the rule otherwise."""
    if isinstance(value, MarketInsight):
        return value
    if not isinstance(value, dict):
        raise InsightError(f"expected a MarketInsight (or a dict of its fields), not "
                           f"{type(value).__name__}")
    try:
        return MarketInsight.model_validate(value)
    except ValidationError as exc:
        raise InsightError(one_line(exc, "insight")) from None


# -- status and messages -------------------------------------------------------------------

class Histogram(Frozen):
    """Observations in buckets: ``counts[i]`` fell at or below ``bounds[i]`` and above the
    bound before it; the last count is above every bound. ``total`` is their sum."""

    bounds: tuple[float, ...] = ()
    counts: tuple[int, ...] = (0,)
    total: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)


class NetworkStatus(Frozen):
    """A snapshot of a node's connection and counters."""

    connected: bool
    broker: str | None = None
    peers: int = 0
    last_sync: datetime | None = None
    messages_in: int = 0
    messages_out: int = 0
    insights_in: int = 0  # distinct insights delivered here (live, synced or repaired)
    # Insights this node broadcast since it was created, and how many of them the broker
    # acknowledged (the rest wait in the outbox).
    insights_out: int = 0
    insights_acknowledged: int = 0
    dropped: dict[str, int] = Field(default_factory=dict)
    duplicates: int = 0
    # Retained states read from nodes' checkpoint pages (see PearNetwork.sync).
    states_from_checkpoints: int = 0
    latency_ms: float | None = None
    outbox_depth: int = 0
    outbox_oldest: datetime | None = None  # when the oldest of them was stored
    reconnects: int = 0
    health: Health = Health.DOWN
    connected_since: datetime | None = None
    last_error: str | None = None  # why the last connection attempt failed, while it matters
    # Verified history: gaps seen in other nodes' logs, entries repaired, entries no holder
    # could supply (with the sender in the log), senders caught rewriting their history.
    log_gaps: int = 0
    log_repaired: int = 0
    log_unrepairable: int = 0
    log_forks: int = 0
    # Hostile log traffic refused, by reason (docs/HISTORY.md, "What a receiver refuses").
    log_refused: dict[str, int] = Field(default_factory=dict)
    # The market store (docs/MARKET.md): insight rows and aggregate cells it holds, its size
    # on disk, the oldest window end it keeps.
    market_rows: int = 0
    market_bytes: int = 0
    market_oldest: datetime | None = None
    # Why the store refuses writes while it does (a full disk: the node is degraded), the
    # items waiting in memory to be written, and those left out (over the backlog's bound).
    market_failing: str | None = None
    market_backlog: int = 0
    market_dropped: int = 0
    # Seconds from a live message's signing to its delivery here (the sender's clock against
    # ours), and how long each sync() took.
    delivery_latency: Histogram = Field(default_factory=Histogram)
    sync_duration: Histogram = Field(default_factory=Histogram)


MessageKind = Literal["insights", "state", "presence", "aggregate", "receipt", "ledger", "ack",
                      "checkpoint", "loghead", "logreq", "logrange", "partial"]


class NetworkMessage(Frozen):
    """The envelope every payload travels in (see :mod:`pear_mqtt.envelope`).

    ``sender`` is the node's identity as its certificate states it (pseudonymous where the mode
    anonymises); ``sequence`` grows by one per message from that sender; ``timestamp`` is
    seconds since the epoch (UTC). ``body`` is plain JSON after decryption.
    """

    version: Literal[1] = 1
    kind: MessageKind
    message_id: Annotated[str, Field(min_length=8, max_length=64)]
    sender: Annotated[str, Field(min_length=1, max_length=200)]
    sequence: Annotated[int, Field(ge=0)]
    timestamp: Annotated[float, Field(ge=0)]
    body: Any
    key_id: str | None = None
    log_ref: str | None = None  # "<log id>:<index>" in the sender's history log
