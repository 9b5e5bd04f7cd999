"""The package's public surface is curated: what __all__ lists, and nothing by accident."""

from __future__ import annotations

import pytest

import pear_mqtt
from pear_mqtt.errors import PearError

pytestmark = pytest.mark.unit

EXPECTED = {
    "NetworkMode", "SharingLevel", "PrivacyConfig", "NetworkConfig", "NetworkStatus",
    "NetworkMessage", "MarketInsight", "PriceData", "SalesData", "TrendData", "TLSConfig",
    "EncryptionConfig", "ReliabilityConfig", "Health", "NetworkConfigManager", "PearNetwork",
    "SyncPearNetwork", "Peer", "ReceivedAggregate", "ReceivedInsight", "SyncResult",
    "SharedInsight", "ValueRange", "MarketConfig", "MarketStore", "MarketRow", "GroupRow",
    "PricePosition", "MarketError", "InsightError",
    "PearError", "ConfigError", "TopicError", "PrivacyError", "EnvelopeError",
    "MalformedMessage", "OversizedMessage", "UnsupportedVersion", "SignatureError",
    "UnknownKeyError", "DecryptionError", "ReplayedMessage", "StaleMessage", "PKIError",
    "TransportError", "ConnectError", "NotConnectedError", "OutboxError", "BrokerError",
    "__version__",
}


def test_all_is_exactly_the_curated_api() -> None:
    assert set(pear_mqtt.__all__) == EXPECTED
    assert len(pear_mqtt.__all__) == len(set(pear_mqtt.__all__))


def test_every_public_name_resolves() -> None:
    for name in pear_mqtt.__all__:
        assert getattr(pear_mqtt, name) is not None, name


def test_every_exported_error_derives_from_pear_error() -> None:
    errors = [getattr(pear_mqtt, n) for n in pear_mqtt.__all__
              if isinstance(getattr(pear_mqtt, n), type) and n.endswith(("Error", "Message",
                                                                           "Version"))
              and n not in ("NetworkMessage",)]
    assert errors and all(issubclass(e, PearError) for e in errors)
