"""pear_mqtt: privacy-preserving market-insight sharing between retailers over MQTT.

::

    from pear_mqtt import NetworkConfig, NetworkMode, PearNetwork, PrivacyConfig

    async with PearNetwork(config) as network:
        await network.broadcast_market_insight(insight)
        state = await network.sync()
"""

from .config import NetworkConfigManager
from .errors import (
    BrokerError,
    ConfigError,
    ConnectError,
    DecryptionError,
    EnvelopeError,
    MalformedMessage,
    NotConnectedError,
    OutboxError,
    OversizedMessage,
    PearError,
    PKIError,
    PrivacyError,
    ReplayedMessage,
    SignatureError,
    StaleMessage,
    TopicError,
    TransportError,
    UnknownKeyError,
    UnsupportedVersion,
)
from .network import PearNetwork, Peer, ReceivedAggregate, ReceivedInsight, SyncResult
from .privacy import SharedInsight, ValueRange
from .sync import SyncPearNetwork
from .types import (
    EncryptionConfig,
    Health,
    MarketInsight,
    NetworkConfig,
    NetworkMessage,
    NetworkMode,
    NetworkStatus,
    PriceData,
    PrivacyConfig,
    ReliabilityConfig,
    SalesData,
    SharingLevel,
    TLSConfig,
    TrendData,
)

__version__ = "0.1.0"

__all__ = [
    "BrokerError",
    "ConfigError",
    "ConnectError",
    "DecryptionError",
    "EncryptionConfig",
    "EnvelopeError",
    "Health",
    "MalformedMessage",
    "MarketInsight",
    "NetworkConfig",
    "NetworkConfigManager",
    "NetworkMessage",
    "NetworkMode",
    "NetworkStatus",
    "NotConnectedError",
    "OutboxError",
    "OversizedMessage",
    "PKIError",
    "PearError",
    "PearNetwork",
    "Peer",
    "PriceData",
    "PrivacyConfig",
    "PrivacyError",
    "ReceivedAggregate",
    "ReceivedInsight",
    "ReliabilityConfig",
    "ReplayedMessage",
    "SalesData",
    "SharedInsight",
    "SharingLevel",
    "SignatureError",
    "StaleMessage",
    "SyncPearNetwork",
    "SyncResult",
    "TLSConfig",
    "TopicError",
    "TransportError",
    "TrendData",
    "UnknownKeyError",
    "UnsupportedVersion",
    "ValueRange",
    "__version__",
]
