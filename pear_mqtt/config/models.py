"""Configuration models: TLS, encryption, reliability, privacy, the broker URL and the node's
NetworkConfig, with each mode's default sharing levels.
"""

from __future__ import annotations

import math
import re
import socket
from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import ConfigError, TopicError
from ..model.insight import (
    FIELD_GROUPS,
    CompanyId,
    Frozen,
    NetworkId,
    NetworkMode,
    NodeId,
    SharingLevel,
    category_name,
    identifier,
)
from ..model.topics import validate_identifier
from ..security.revocation import CRL_CHECK_INTERVAL
from .env import ENV_PREFIX
from .problems import ProblemWriter

__all__ = [
    "RETIRED_PSEUDONYM_SECRET",
    "BrokerURL",
    "EncryptionConfig",
    "MarketConfig",
    "NetworkConfig",
    "PrivacyConfig",
    "ReliabilityConfig",
    "TLSConfig",
    "default_sharing",
    "retired_setting",
]

_DEFAULT_SHARING: dict[NetworkMode, dict[str, SharingLevel]] = {
    NetworkMode.PRIVATE: {
        "price_data": SharingLevel.FULL,
        "sales_data": SharingLevel.FULL,
        "trends": SharingLevel.FULL,
    },
    NetworkMode.CONSORTIUM: {
        "price_data": SharingLevel.RANGES_ONLY,
        "sales_data": SharingLevel.AGGREGATED,
        "trends": SharingLevel.FULL,
    },
    NetworkMode.PUBLIC: {
        "price_data": SharingLevel.AGGREGATED,
        "sales_data": SharingLevel.AGGREGATED,
        "trends": SharingLevel.AGGREGATED,
    },
}


def default_sharing(mode: NetworkMode) -> dict[str, SharingLevel]:
    """The sharing level of every field group in ``mode`` when the config names none."""
    return dict(_DEFAULT_SHARING[NetworkMode(mode)])


_PSEUDONYM_SECRET = "pseudonym_secret"
RETIRED_PSEUDONYM_SECRET = (
    "is no longer used: pseudonyms now come from the node's certificate, assigned by the "
    "network's operator (CN = company, OU = store); delete the setting, have the operator "
    "enrol this store (`pear-mqtt pki enrol`) and set node_id to the new certificate's OU")
"""What a config that still sets ``privacy.pseudonym_secret`` is told (after the key's name)."""


def retired_setting(privacy: object, *, where: str = "privacy.pseudonym_secret") -> str | None:
    """The one-line refusal of a retired setting in ``privacy`` (a config's privacy table),
    or None when it holds none."""
    if isinstance(privacy, Mapping) and _PSEUDONYM_SECRET in privacy:
        return f"{where} {RETIRED_PSEUDONYM_SECRET}"
    return None


# -- configuration ------------------------------------------------------------------------

class _ConfigPart(Frozen):
    """A configuration model: invalid constructor arguments are one :class:`ConfigError` line
    naming the field and the rule (as :meth:`NetworkConfigManager.load` names them)."""

    @classmethod
    def invalid_arguments(cls, exc: ValidationError) -> Exception | None:
        problems = ProblemWriter(root=cls, env_prefix=ENV_PREFIX)
        first = exc.errors(include_url=False)[0]
        more = exc.error_count() - 1
        return ConfigError(f"{cls.__name__}: {problems.describe(first)}"
                           + (f" (and {more} more)" if more else ""))


class TLSConfig(_ConfigPart):
    """Certificate material: the network CA, and this node's certificate and key.

    The node's key also signs every envelope it sends; receivers verify against ``ca_file``.
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # Check the broker's certificate against its host name; turned off only for brokers
    # reached by an address their certificate does not name.
    check_hostname: bool = True
    # The network CA's CRL (PEM or DER): receivers drop what a revoked certificate signed,
    # and look at the file's modification time every crl_check_interval seconds at most,
    # re-reading it when it changed.
    crl_file: Path | None = None
    crl_check_interval: Annotated[float, Field(ge=0, le=86400)] = CRL_CHECK_INTERVAL

    def missing(self) -> list[str]:
        """Names of the unset paths, e.g. ``['tls.cert_file']``."""
        return [f"tls.{name}" for name in ("ca_file", "cert_file", "key_file")
                if getattr(self, name) is None]


class EncryptionConfig(_ConfigPart):
    """Group keys for body encryption (consortium "multi-layer encryption").

    ``keys`` maps a key id to a base64 (standard or url-safe) 32-byte AES-256 key; ``active``
    is the id new messages use. Old ids stay so receivers can read across a rotation.
    """

    keys: dict[Annotated[str, identifier("key id")], SecretStr] = Field(default_factory=dict)
    active: str | None = None

    @model_validator(mode="after")
    def _active_known(self) -> EncryptionConfig:
        if self.active is not None and self.active not in self.keys:
            raise ValueError(f"active key id {self.active!r} is not among keys "
                             f"{sorted(self.keys)}")
        return self


class ReliabilityConfig(_ConfigPart):
    """Delivery, session and outbox settings."""

    qos: Literal[0, 1] = 1
    # "auto": MQTT 5 first, 3.1.1 when the broker refuses or ignores it.
    mqtt_version: Literal["auto", "5", "3.1.1"] = "auto"
    keepalive: Annotated[int, Field(ge=5, le=65535)] = 30
    session_expiry: Annotated[int, Field(ge=0)] = 3600
    message_expiry: Annotated[int, Field(ge=0)] = 7 * 86400  # retained state lifetime (s)
    max_message_bytes: Annotated[int, Field(ge=1024, le=256 * 1024 * 1024)] = 1024 * 1024
    max_clock_skew: Annotated[float, Field(gt=0)] = 300.0  # s a timestamp may lie ahead
    max_message_age: Annotated[float, Field(gt=0)] = 30 * 86400.0  # s before "stale"
    # The envelope version this node writes (it reads both): 1 while a network upgrades from
    # a release that reads only version 1 (docs/DESIGN.md, Envelope).
    envelope_version: Literal[1, 2] = 2
    outbox_path: Path | None = None
    outbox_max_bytes: Annotated[int, Field(ge=4096)] = 64 * 1024 * 1024
    outbox_max_age: Annotated[float, Field(gt=0)] = 7 * 86400.0
    reconnect_min_delay: Annotated[float, Field(gt=0)] = 0.5
    reconnect_max_delay: Annotated[float, Field(gt=0)] = 60.0
    # Window (s) a node spreads its first reconnect over after losing the broker: a restarted
    # broker sees its whole fleet come back at once otherwise. None: 10 x reconnect_min_delay
    # (5 s by default: 1,000 nodes then arrive ~10 per 50 ms).
    reconnect_jitter: Annotated[float, Field(ge=0, le=600)] | None = None
    batch_max_items: Annotated[int, Field(ge=1, le=10000)] = 256
    # When insights come faster than they go out one by one, the sender waits this long for
    # more before signing a batch, and longer (up to 10x) while they keep coming; an insight
    # arriving alone goes at once. 0: never wait.
    batch_linger: Annotated[float, Field(ge=0, le=5)] = 0.002
    # Also keep one retained message per category on the node's state/ topics (the form
    # mosquitto_sub and other plain MQTT clients read), besides the checkpoint pages that
    # sync() reads. Off: a state costs its live insight and its share of a page
    # (docs/DESIGN.md, Sync and presence). Private and consortium modes only.
    state_topics: bool = False
    # Verified history (docs/HISTORY.md): every envelope the node publishes is kept in an
    # append-only Merkle log on disk, at history_path (default: next to outbox_path as
    # "<outbox>.history"; a node with neither keeps no log). Retention bounds what it keeps.
    history: bool = True
    history_path: Path | None = None
    history_max_age: Annotated[float, Field(gt=0)] | None = None
    history_max_bytes: Annotated[int, Field(gt=0)] | None = None
    # The network's archive node, "<member>/<node>", asked for history a sender cannot give
    # (offline, or dropped by its retention); archive_path makes this node an archive that
    # keeps every other node's verified log there and answers for them.
    archive: str | None = None
    archive_path: Path | None = None

    @field_validator("archive")
    @classmethod
    def _archive(cls, v: str | None) -> str | None:
        if v is None:
            return v
        member, sep, node = v.partition("/")
        if not sep or not member or not node:
            raise ValueError(f"{v!r} is not '<member>/<node>' (e.g. 'operator/archive')")
        try:
            validate_identifier(member, what="archive member")
            validate_identifier(node, what="archive node")
        except TopicError as exc:
            raise ValueError(str(exc)) from None
        return v

    @property
    def history_dir(self) -> Path | None:
        """Where this node's history log lives, or None when it keeps none."""
        if not self.history:
            return None
        if self.history_path is not None:
            return self.history_path
        if self.outbox_path is not None:
            return self.outbox_path.with_name(self.outbox_path.name + ".history")
        return None


class MarketConfig(_ConfigPart):
    """The market store (docs/MARKET.md): what this node received and verified, kept and
    queryable. ``path`` defaults to ``<outbox>.market.db`` next to the reliability outbox;
    a node with neither keeps it in a temporary file for as long as it is connected."""

    enabled: bool = True
    path: Path | None = None
    max_age: Annotated[float, Field(gt=0)] | None = None  # s of window end kept
    max_bytes: Annotated[int, Field(ge=1024 * 1024)] | None = 1024 ** 3

    def store_path(self, outbox_path: Path | None) -> Path | None:
        """Where the store lives, or None for a temporary one."""
        if self.path is not None:
            return self.path
        if outbox_path is not None:
            return outbox_path.with_name(outbox_path.name + ".market.db")
        return None


class PrivacyConfig(_ConfigPart):
    """What each field group may disclose, and how identities are protected.

    ``data_sharing`` maps a field group (``price_data``, ``sales_data``, ``trends``) to a
    :class:`SharingLevel`; strings such as ``"ranges_only"`` are accepted. Groups left out take
    the network mode's default (see :class:`pear_mqtt.config.manager.NetworkConfigManager`).
    """

    anonymize_data: bool = True
    encrypt_connection: bool = True
    data_sharing: dict[str, SharingLevel] = Field(default_factory=dict)
    # Aggregation thresholds: at least k distinct companies, none above the dominance cap.
    min_companies: Annotated[int, Field(ge=2, le=100_000)] = 5
    dominance_cap: Annotated[float, Field(gt=0, le=1)] = 0.25
    # Data-independent bucket edges per category (ascending); others use the relative scheme.
    range_edges: dict[str, tuple[float, ...]] = Field(default_factory=dict)
    # Ratio between consecutive edges of the fixed relative (geometric) bucket scheme.
    range_ratio: Annotated[float, Field(gt=1.01, le=10)] = 1.25
    # X25519 public key (PEM file) of the aggregator that may open ``aggregated`` groups.
    aggregator_key_file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data: Any) -> Any:
        problem = retired_setting(data)
        if problem is not None:
            raise ValueError(problem)
        return data

    @field_validator("data_sharing")
    @classmethod
    def _known_groups(cls, v: dict[str, SharingLevel]) -> dict[str, SharingLevel]:
        unknown = sorted(set(v) - set(FIELD_GROUPS))
        if unknown:
            raise ValueError(f"unknown field group(s) {unknown}; known: {list(FIELD_GROUPS)}")
        return v

    @field_validator("range_edges")
    @classmethod
    def _ascending(cls, v: dict[str, tuple[float, ...]]) -> dict[str, tuple[float, ...]]:
        for cat, edges in v.items():
            category_name(cat)
            if len(edges) < 2 or any(not math.isfinite(e) for e in edges) or any(
                    b <= a for a, b in pairwise(edges)):
                raise ValueError(f"range_edges[{cat!r}] must hold at least two finite, "
                                 "strictly ascending edges")
        return v


class BrokerURL(_ConfigPart):
    """A parsed ``mqtt://host:port`` or ``mqtts://host:port`` URL."""

    scheme: Literal["mqtt", "mqtts"]
    host: str
    port: Annotated[int, Field(ge=1, le=65535)]

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"broker URL {url!r} must start with mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError(f"broker URL {url!r} has no host")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"broker URL {url!r} has an invalid port") from None
        return cls(scheme=parts.scheme,
                   host=parts.hostname, port=port or (8883 if parts.scheme == "mqtts" else 1883))

    @classmethod
    def parse_list(cls, text: str) -> tuple[BrokerURL, ...]:
        """The brokers ``text`` names: one URL, or several separated by commas (the nodes of
        one clustered broker, tried in turn); all with TLS or all without."""
        urls = tuple(cls.parse(part.strip()) for part in text.split(","))
        if len({u.tls for u in urls}) > 1:
            raise ValueError(f"broker URLs {text!r} mix mqtt:// and mqtts://; the nodes of one "
                             "broker all use the same")
        if len(set(urls)) < len(urls):
            raise ValueError(f"broker URLs {text!r} name one broker twice")
        return urls


def _default_node_id() -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40].strip("-.")
    return f"node-{host or 'local'}"


class NetworkConfig(_ConfigPart):
    """Everything a node needs to join one network.

    Construction checks each field and the privacy rules of the mode (public mode shares
    aggregates only). Whether the config can connect (certificate paths present and readable)
    is checked by :meth:`pear_mqtt.config.manager.NetworkConfigManager.validate` and on
    ``connect()``.
    """

    mode: NetworkMode
    company_id: CompanyId
    network_id: NetworkId = "default"
    node_id: NodeId = Field(default_factory=_default_node_id)
    broker_url: str = "mqtts://localhost:8883"
    tls: TLSConfig = Field(default_factory=TLSConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    encryption: EncryptionConfig = Field(default_factory=EncryptionConfig)
    reliability: ReliabilityConfig = Field(default_factory=ReliabilityConfig)
    market: MarketConfig = Field(default_factory=MarketConfig)
    # Escape hatch for local development and tests: allows a plain-TCP broker in private or
    # consortium mode. Never set it in production.
    allow_insecure_transport: bool = False

    @field_validator("broker_url")
    @classmethod
    def _url(cls, v: str) -> str:
        BrokerURL.parse_list(v)
        return v

    @property
    def brokers(self) -> tuple[BrokerURL, ...]:
        """Every broker ``broker_url`` names (several: a clustered broker's nodes)."""
        return BrokerURL.parse_list(self.broker_url)

    @property
    def broker(self) -> BrokerURL:
        """The first of :attr:`brokers`."""
        return self.brokers[0]

    @model_validator(mode="after")
    def _mode_rules(self) -> NetworkConfig:
        if self.mode is NetworkMode.PUBLIC:
            for group, level in self.privacy.data_sharing.items():
                if level not in (SharingLevel.AGGREGATED, SharingLevel.NONE):
                    raise ValueError(
                        f"privacy.data_sharing.{group}: {level.value!r} is not allowed in public "
                        "mode, which shares aggregates only (use 'aggregated' or 'none')")
        if self.mode is not NetworkMode.PUBLIC and not self.allow_insecure_transport:
            if not self.privacy.encrypt_connection:
                raise ValueError(
                    f"privacy.encrypt_connection: {self.mode.value} networks require TLS "
                    "(set allow_insecure_transport only for local development)")
            if not self.broker.tls:
                raise ValueError(
                    f"broker_url: {self.mode.value} networks require mqtts:// (got "
                    f"{self.broker_url!r}; set allow_insecure_transport only for local "
                    "development)")
        if self.privacy.encrypt_connection and not self.broker.tls \
                and not self.allow_insecure_transport:
            raise ValueError(f"broker_url: encrypt_connection is on but {self.broker_url!r} "
                             "is not mqtts://")
        return self

    def sharing_level(self, group: str) -> SharingLevel:
        """The effective level of ``group``: configured, else the mode's default."""
        if group not in FIELD_GROUPS:
            raise ValueError(f"unknown field group {group!r}; known: {list(FIELD_GROUPS)}")
        return self.privacy.data_sharing.get(group, default_sharing(self.mode)[group])

