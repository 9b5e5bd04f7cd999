"""pear_mqtt: privacy-preserving market-insight sharing between retailers over MQTT.

::

    from pear_mqtt import NetworkConfig, NetworkMode, PearNetwork, PrivacyConfig

    async with PearNetwork(config) as network:
        await network.broadcast_market_insight(insight)
        state = await network.sync()
        network.market.price_position("grocery/dairy", 2.49)
"""

from .config.manager import NetworkConfigManager
from .config.models import (
    EncryptionConfig,
    MarketConfig,
    NetworkConfig,
    PrivacyConfig,
    ReliabilityConfig,
    TLSConfig,
)
from .errors import (
    BrokerError,
    ConfigError,
    ConnectError,
    DecryptionError,
    EnvelopeError,
    InsightError,
    MalformedMessage,
    MarketError,
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
from .market.rows import GroupRow, MarketRow, PricePosition
from .market.store import MarketStore
from .model.insight import (
    Health,
    MarketInsight,
    NetworkMessage,
    NetworkMode,
    NetworkStatus,
    PriceData,
    SalesData,
    SharingLevel,
    TrendData,
)
from .node.network import PearNetwork
from .node.records import Peer, ReceivedAggregate, ReceivedInsight, SyncResult
from .node.sync import SyncPearNetwork
from .privacy.filter import SharedInsight
from .privacy.ranges import ValueRange

__version__ = "0.1.0"

__all__ = [
    "BrokerError",
    "ConfigError",
    "ConnectError",
    "DecryptionError",
    "EncryptionConfig",
    "EnvelopeError",
    "GroupRow",
    "Health",
    "InsightError",
    "MalformedMessage",
    "MarketConfig",
    "MarketError",
    "MarketInsight",
    "MarketRow",
    "MarketStore",
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
    "PricePosition",
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
