"""The pear_mqtt exception hierarchy.

Every error this package raises on purpose derives from :class:`PearError`, so callers can
catch one type at the boundary of their own code. Library errors (paho, cryptography,
pydantic, sqlite3) are mapped to these at the module that talks to the library; a
configuration or insight model built in code with invalid arguments raises ``ConfigError`` or
``InsightError`` in one line naming the field (``model_validate`` keeps pydantic's
``ValidationError`` for the callers that map it themselves).

::

    PearError
    ├── ConfigError                 invalid or inconsistent configuration (NetworkConfig(...) too)
    ├── TopicError                  an identifier or topic string outside the topic scheme
    ├── PrivacyError                a policy that would disclose more than the mode allows
    ├── InsightError                an insight that is not one, e.g. MarketInsight(...) with
    │                               a bad field (also a ValueError)
    ├── EnvelopeError               a message a receiver must drop (each one is counted)
    │   ├── MalformedMessage        not an envelope: bad JSON, missing or mistyped fields
    │   ├── OversizedMessage        larger than the configured limit
    │   ├── UnsupportedVersion      an envelope schema version this build does not read
    │   ├── SignatureError          unsigned, bad signature, or signer not trusted
    │   │   └── RevokedCertificate  the signer's certificate is on a CRL the receiver holds
    │   ├── UnknownKeyError         encrypted with a group key id this node does not hold
    │   ├── DecryptionError         the ciphertext failed authentication
    │   ├── ReplayedMessage         a message id or sequence number already seen
    │   └── StaleMessage            timestamp outside the accepted window
    ├── PKIError                    certificate or key material missing, invalid or refused
    ├── TransportError              the broker connection failed or was refused
    │   ├── ConnectError            could not connect (network, TLS, or CONNACK refusal)
    │   ├── NotConnectedError       an operation needs a connection that is not up
    │   └── PublishRefused          the broker answered a publish with a failure reason code
    │                               (e.g. 0x87 not authorized): sending it again cannot help
    ├── OutboxError                 the on-disk outbox failed (full disk, corrupt file)
    ├── BrokerError                 a broker could not be rendered, started or reached
    ├── HistoryError                a verified-history log failed or did not verify
    │   ├── LogTruncated            entries asked for lie before what retention kept
    │   ├── ProofFailed             entries, a proof or a tree head did not verify
    │   └── ForkDetected            two signed heads of one log that cannot both be true
    └── MarketError                 the market store failed, or a query it cannot answer

``EnvelopeError.reason`` is a short stable string used as the key of the drop counters in
:class:`pear_mqtt.types.NetworkStatus`.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "ConfigError",
    "ConnectError",
    "DecryptionError",
    "EnvelopeError",
    "ForkDetected",
    "HistoryError",
    "InsightError",
    "LogTruncated",
    "MalformedMessage",
    "MarketError",
    "NotConnectedError",
    "OutboxError",
    "OversizedMessage",
    "PKIError",
    "PearError",
    "PrivacyError",
    "ProofFailed",
    "ReplayedMessage",
    "RevokedCertificate",
    "SignatureError",
    "StaleMessage",
    "TopicError",
    "TransportError",
    "UnknownKeyError",
    "UnsupportedVersion",
]


class PearError(Exception):
    """Root of every error pear_mqtt raises on purpose."""


class ConfigError(PearError):
    """Configuration is invalid, inconsistent, or unreadable."""


class TopicError(PearError, ValueError):
    """An identifier or topic string does not fit the topic scheme."""


class PrivacyError(PearError):
    """A privacy policy would disclose more than its network mode allows."""


class EnvelopeError(PearError):
    """A received message that must be dropped. ``reason`` names the counter it feeds."""

    reason: str = "invalid"


class MalformedMessage(EnvelopeError):
    reason = "malformed"


class OversizedMessage(EnvelopeError):
    reason = "oversized"


class UnsupportedVersion(EnvelopeError):
    reason = "unsupported_version"


class SignatureError(EnvelopeError):
    reason = "bad_signature"


class RevokedCertificate(SignatureError):
    reason = "revoked"


class UnknownKeyError(EnvelopeError):
    reason = "unknown_key"


class DecryptionError(EnvelopeError):
    reason = "decryption_failed"


class ReplayedMessage(EnvelopeError):
    reason = "replayed"


class StaleMessage(EnvelopeError):
    reason = "stale"


class PKIError(PearError):
    """Certificate or key material is missing, invalid, or would be overwritten."""


class TransportError(PearError):
    """The broker connection failed."""


class ConnectError(TransportError):
    """A connection attempt failed: network, TLS handshake, or CONNACK refusal."""


class NotConnectedError(TransportError):
    """The operation needs a broker connection that is not up."""


class PublishRefused(TransportError):
    """The broker refused one publish (a negative PUBACK); ``reason`` is its reason code's
    name. The connection stays up."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class OutboxError(PearError):
    """The on-disk outbox could not store or read messages."""


class BrokerError(PearError):
    """A broker could not be rendered, started, or reached."""


class HistoryError(PearError):
    """A verified-history log could not be read or written, or did not verify."""


class LogTruncated(HistoryError):
    """The entries asked for lie before the first one the log still holds (retention)."""


class ProofFailed(HistoryError):
    """Entries, a Merkle proof or a signed tree head did not verify."""


class ForkDetected(HistoryError):
    """Two signed tree heads of one log that cannot both be true: the log was rewritten."""


class MarketError(PearError):
    """The market store could not be opened or written, or a query is invalid."""


class InsightError(PearError, ValueError):
    """What was given as an insight is not a valid :class:`~pear_mqtt.MarketInsight`."""
