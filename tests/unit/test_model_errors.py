"""A model built in code with invalid arguments raises a PearError in one line naming the
field (ConfigError for configuration, InsightError for insights), not pydantic's
multi-line ValidationError; nested values keep their full field path."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from pear_mqtt import (
    ConfigError,
    InsightError,
    MarketInsight,
    NetworkConfig,
    PearError,
    PriceData,
    PrivacyConfig,
    TLSConfig,
)

T0 = datetime(2026, 11, 2, tzinfo=UTC)
WINDOW: dict[str, Any] = {"window_start": T0, "window_end": T0 + timedelta(hours=1)}


@pytest.mark.parametrize("build, error, expected", [
    (lambda: NetworkConfig(mode="bogus", company_id="acme"), ConfigError,
     "NetworkConfig: mode: Input should be 'private', 'consortium' or 'public'"),
    (lambda: NetworkConfig(mode="private"),  # type: ignore[call-arg]
     ConfigError, "NetworkConfig: company_id: is required"),
    (lambda: NetworkConfig(mode="private", company_id="acme", privacy={"min_companies": 1}),
     ConfigError, "NetworkConfig: privacy.min_companies: "),
    (lambda: PrivacyConfig(data_sharing={"price_data": "lots"}), ConfigError,
     "PrivacyConfig: data_sharing.price_data: Input should be 'full', 'ranges_only'"),
    (lambda: TLSConfig(ca_file=3), ConfigError, "TLSConfig: ca_file"),
    (lambda: MarketInsight(category="dairy", **WINDOW, sales_data={"units": 1e308}),
     InsightError, "MarketInsight sales_data.units: Input should be less than or equal to"),
    (lambda: MarketInsight(category="dairy"), InsightError,  # type: ignore[call-arg]
     "MarketInsight window_start: Field required (and 1 more)"),
    (lambda: PriceData(price=-1), InsightError, "PriceData price: Input should be greater"),
])
def test_invalid_arguments_are_one_pear_error_line(build: Callable[[], object],
                                                    error: type[PearError],
                                                    expected: str) -> None:
    with pytest.raises(error) as info:
        build()
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message and "errors.pydantic.dev" not in message
    assert not isinstance(info.value, ValidationError)
    assert info.value.__cause__ is None  # the one line says it all; no pydantic dump below


def test_model_validate_still_raises_validation_error_for_callers_that_map_it() -> None:
    with pytest.raises(ValidationError):
        MarketInsight.model_validate({"category": "dairy"})
    with pytest.raises(ValidationError):
        NetworkConfig.model_validate({"mode": "private"})
