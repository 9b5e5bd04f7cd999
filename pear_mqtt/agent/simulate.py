"""Simulated store data for demos and load tests: :class:`SimulatedSource` yields plausible,
seeded hourly insights for one store.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import ValidationError

from ..errors import ConfigError, TopicError
from ..model.insight import MarketInsight
from ..model.topics import validate_identifier
from .records import RejectCallback, describe_invalid

__all__ = ["DEFAULT_CATEGORIES", "DEFAULT_RATE", "MAX_CATEGORIES", "SimulatedSource",
           "seconds_per_day"]

@dataclass(frozen=True, slots=True)
class _CategoryModel:
    category: str
    base_price: float  # regular shelf price, mean over the category's products
    peak_units: float  # units per hour at the busiest hour of a weekday
    spread: float  # how far the category's product prices lie around the mean (fraction)
    elasticity: float  # units respond to a price cut as (regular / actual) ** elasticity
    basket: float  # units of the category per transaction


_CATALOGUE: tuple[_CategoryModel, ...] = (
    _CategoryModel("grocery/dairy", 1.89, 60.0, 0.35, 1.6, 1.8),
    _CategoryModel("grocery/bakery", 2.49, 45.0, 0.40, 1.4, 1.5),
    _CategoryModel("household/cleaning", 4.79, 12.0, 0.45, 2.0, 1.3),
    _CategoryModel("electronics/audio", 59.90, 1.2, 0.70, 2.5, 1.0),
    _CategoryModel("grocery/produce", 2.99, 80.0, 0.50, 1.3, 2.5),
    _CategoryModel("beverages/soft-drinks", 1.59, 70.0, 0.30, 2.2, 3.0),
    _CategoryModel("personal-care/hygiene", 3.99, 10.0, 0.50, 1.8, 1.4),
    _CategoryModel("electronics/accessories", 14.99, 3.5, 0.60, 2.0, 1.1),
    _CategoryModel("apparel/basics", 12.99, 4.0, 0.45, 1.9, 1.6),
    _CategoryModel("pet/food", 8.49, 8.0, 0.40, 1.2, 1.7),
    _CategoryModel("toys/games", 24.99, 1.8, 0.55, 2.3, 1.1),
    _CategoryModel("garden/tools", 19.99, 1.5, 0.50, 1.7, 1.0),
)

MAX_CATEGORIES = len(_CATALOGUE)
"""How many categories a simulation can have."""
DEFAULT_CATEGORIES = 8
DEFAULT_RATE = 1.0  # insights per second

_OPEN_HOUR, _CLOSE_HOUR = 7, 22  # a store reports only the hours it is open
_WEEKDAY_FACTOR = (0.95, 0.9, 0.95, 1.0, 1.15, 1.3, 0.7)  # Monday .. Sunday
_PROMO_CHANCE = 0.06  # per category and opening day
_FLAT_PCT = 0.5  # price moves smaller than this (percent) count as "flat"


def seconds_per_day(*, rate: float = DEFAULT_RATE,
                    categories: int = DEFAULT_CATEGORIES) -> float | None:
    """How long a simulated store takes to report one day of its history (one insight per
    category and opening hour, ``rate`` per second); None when it does not pace."""
    if rate <= 0:
        return None
    return (_CLOSE_HOUR - _OPEN_HOUR) * categories / rate


@dataclass(slots=True)
class _CategoryState:
    walk: float = 0.0  # log deviation of the regular price from the base price
    promo_until: datetime | None = None
    discount: float = 0.0
    last_price: float | None = None
    last_units: float | None = None


def _hour_profile(hour: int) -> float:
    """Share of the peak hourly demand: a lunch peak and a larger after-work peak."""
    mid = hour + 0.5
    lunch = 0.8 * math.exp(-((mid - 12.5) ** 2) / (2 * 1.5**2))
    evening = math.exp(-((mid - 17.5) ** 2) / (2 * 2.0**2))
    return 0.2 + 0.8 * max(lunch, evening)


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 50:  # Knuth's method needs O(lam) draws; the normal approximation is fine here
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


class SimulatedSource:
    """Plausible hourly insights from one simulated store.

    ``categories`` (1 to 12) picks categories such as ``grocery/dairy``, ``grocery/bakery``,
    ``household/cleaning`` and ``electronics/audio``. Each open hour (07:00 to 22:00 UTC, from
    ``start``; by default far enough back that the ``count`` insights' windows end by today,
    or a week back for an endless run) gives one insight per category: the regular price
    follows a slow mean-reverting random walk around the category's base price; promotions
    (a few per category and month, one to three days, 10 to 30 % off) lower the price and
    raise the units; units follow a lunch and an after-work peak and the day of the week;
    min/max prices span the category's products; trends compare with the previous hour.

    The same ``seed`` and ``start`` give the same insights; without a seed one is drawn and
    kept in :attr:`seed` so a run can be replayed. ``rate`` paces :meth:`insights` (per
    second; 0 means as fast as possible); ``count`` ends it (None: never).
    """

    def __init__(self, *, seed: int | None = None, rate: float = DEFAULT_RATE,
                 count: int | None = None, categories: int = DEFAULT_CATEGORIES,
                 region: str = "global", currency: str = "EUR",
                 start: datetime | None = None) -> None:
        if not (rate >= 0 and math.isfinite(rate)):
            raise ConfigError(f"--rate must be a finite number >= 0, got {rate}")
        if count is not None and count < 0:
            raise ConfigError(f"--count must be >= 0, got {count}")
        if not 1 <= categories <= MAX_CATEGORIES:
            raise ConfigError(f"--categories must be between 1 and {MAX_CATEGORIES}, "
                              f"got {categories}")
        if start is not None and start.tzinfo is None:
            raise ConfigError("the simulation start must be timezone-aware")
        try:
            validate_identifier(region, what="region")
        except TopicError as exc:
            raise ConfigError(f"--region: {exc}") from None
        if re.fullmatch(r"[A-Z]{3}", currency) is None:
            raise ConfigError(f"currency must be a three-letter ISO code, got {currency!r}")
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**32)
        self.rate = rate
        self.count = count
        self.categories = tuple(m.category for m in _CATALOGUE[:categories])
        self.region = region
        self.currency = currency
        if start is None:
            # Far enough back that the windows lie in the past, as a store reporting its
            # history would have them, rather than running ahead of the clock.
            open_hours = _CLOSE_HOUR - _OPEN_HOUR
            days = (7 if count is None else
                    max(1, -(-count // (categories * open_hours))))
            start = datetime.now(UTC).replace(hour=0) - timedelta(days=days)
        self.start = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)

    def generate(self) -> Iterator[MarketInsight]:
        """The insights in order, without pacing: ``count`` of them, or endless."""
        rng = random.Random(self.seed)
        models = _CATALOGUE[:len(self.categories)]
        states = [_CategoryState() for _ in models]
        produced = 0
        hour = self.start
        while True:
            if _OPEN_HOUR <= hour.hour < _CLOSE_HOUR:
                # What every category of this hour shares, worked out once for the hour.
                end = hour + timedelta(hours=1)
                demand = (_hour_profile(hour.hour), _WEEKDAY_FACTOR[hour.weekday()])
                for model, state in zip(models, states, strict=True):
                    if self.count is not None and produced >= self.count:
                        return
                    yield self._observe(rng, model, state, hour, end, demand)
                    produced += 1
            elif self.count is not None and produced >= self.count:
                return
            hour += timedelta(hours=1)

    def _observe(self, rng: random.Random, model: _CategoryModel, state: _CategoryState,
                 hour: datetime, end: datetime, demand: tuple[float, float]) -> MarketInsight:
        """One category's insight for ``[hour, end)``; ``demand`` is the hour's and the
        weekday's factors of the peak."""
        if state.promo_until is not None and hour >= state.promo_until:
            state.promo_until, state.discount = None, 0.0
        if state.promo_until is None and hour.hour == _OPEN_HOUR \
                and rng.random() < _PROMO_CHANCE:
            days = rng.randint(1, 3)
            state.promo_until = hour.replace(hour=_CLOSE_HOUR) + timedelta(days=days - 1)
            state.discount = rng.uniform(0.10, 0.30)
        state.walk = 0.97 * state.walk + rng.gauss(0.0, 0.004)
        regular = model.base_price * math.exp(state.walk)
        price = round(regular * (1.0 - state.discount), 2)
        lam = (model.peak_units * demand[0] * demand[1] * (regular / price) ** model.elasticity
               * math.exp(rng.gauss(0.0, 0.15)))
        units = _poisson(rng, lam)
        transactions = min(units, round(units / (model.basket * rng.uniform(0.8, 1.2))))
        if units and not transactions:
            transactions = 1
        low = price * (1.0 - model.spread * rng.uniform(0.6, 1.0))
        high = regular * (1.0 + model.spread * rng.uniform(0.6, 1.0))
        min_price = min(price, math.floor(low * 100) / 100)
        max_price = max(price, math.ceil(high * 100) / 100)
        price_change = demand_change = None
        direction: Literal["up", "down", "flat"] | None = None
        if state.last_price is not None:
            price_change = round((price / state.last_price - 1.0) * 100.0, 2)
            direction = ("up" if price_change > _FLAT_PCT else
                         "down" if price_change < -_FLAT_PCT else "flat")
        if state.last_units:
            demand_change = round((units / state.last_units - 1.0) * 100.0, 2)
        state.last_price, state.last_units = price, float(units)
        data: dict[str, Any] = {
            "category": model.category, "region": self.region,
            "window_start": hour, "window_end": end,
            "price_data": {"currency": self.currency, "price": price,
                           "min_price": max(0.01, min_price), "max_price": max_price},
            "sales_data": {"units": float(units), "revenue": round(units * price, 2),
                           "transactions": float(transactions)},
            "trends": {"price_change_pct": price_change, "demand_change_pct": demand_change,
                       "direction": direction},
            "sample_size": max(1, transactions),
        }
        try:
            return MarketInsight.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"simulation: {describe_invalid(exc)}") from None

    async def batches(self, *, stop: asyncio.Event, reject: RejectCallback,
                      max_items: int) -> AsyncIterator[list[MarketInsight]]:
        """Yield :meth:`generate`'s insights at ``rate`` per second until done or stopped:
        each batch holds what fell due since the previous one (``max_items`` at most)."""
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.rate if self.rate > 0 else 0.0
        due = loop.time()
        batch: list[MarketInsight] = []
        for insight in self.generate():
            delay = due - loop.time()
            if delay > 0 or len(batch) >= max_items:
                if batch:
                    yield batch
                    batch = []
                    delay = due - loop.time()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                break
            batch.append(insight)
            # After a stall (a slow disk, a suspended laptop) carry on at the rate rather
            # than bursting out everything that fell due meanwhile.
            due = max(due + interval, loop.time() - interval)
        if batch:
            yield batch
