"""What a caller gives as an insight: a dict of its fields is accepted, anything invalid is
one InsightError line naming the field, and absurd values (units=1e308, a 1970 window) are
refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pear_mqtt import InsightError, MarketInsight, PearError
from pear_mqtt.model.insight import PriceData, SalesData, TrendData, as_insight

T0 = datetime(2026, 11, 2, tzinfo=UTC)


def fields(**kw: Any) -> dict[str, Any]:
    return {"category": "grocery/dairy", "window_start": T0,
            "window_end": T0 + timedelta(hours=1), "price_data": {"price": 2.5}, **kw}


def test_a_dict_of_fields_is_an_insight() -> None:
    got = as_insight(fields())
    assert isinstance(got, MarketInsight) and got.price_data is not None
    assert got.price_data.price == 2.5 and as_insight(got) is got


@pytest.mark.parametrize("bad, where", [
    (fields(sales_data={"units": 1e308}), "sales_data.units"),
    (fields(window_start=datetime(1970, 1, 1, tzinfo=UTC),
            window_end=datetime(1970, 1, 1, 1, tzinfo=UTC)), "before 2000"),
    (fields(window_end=datetime(2999, 1, 1, tzinfo=UTC)), "more than a year ahead"),
    (fields(price_data={"price": -1}), "price_data.price"),
    (fields(category="dairy/#"), "category"),
    (fields(window_end=T0), "an empty window observes nothing"),
    (fields(price_data=None), "the insight observes nothing"),
    (fields(price_data={"currency": "USD"}, trends={}), "the insight observes nothing"),
])
def test_invalid_input_is_one_line_naming_what_is_wrong(bad: dict[str, Any],
                                                        where: str) -> None:
    with pytest.raises(InsightError) as info:
        as_insight(bad)
    message = str(info.value)
    assert where in message and "\n" not in message
    assert isinstance(info.value, PearError) and isinstance(info.value, ValueError)


def test_something_else_is_refused_by_type() -> None:
    with pytest.raises(InsightError, match=r"expected a MarketInsight .* not list"):
        as_insight([1, 2])


@pytest.mark.parametrize("group, name", [
    (group, name)
    for group, model in (("price_data", PriceData), ("sales_data", SalesData),
                         ("trends", TrendData))
    for name in model.model_fields if name != "currency"])
def test_every_value_of_a_part_is_an_observation(group: str, name: str) -> None:
    # Any one value a part may hold, alone, makes an insight (currency only labels prices);
    # a field added to a part must be counted as an observation too.
    given = {**fields(price_data=None), group: {name: "up" if name == "direction" else 1.0}}
    got = as_insight(given)
    assert getattr(getattr(got, group), name) is not None
