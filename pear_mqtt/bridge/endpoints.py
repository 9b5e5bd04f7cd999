"""How the bridge meets a broker: an envelope codec that signs with the bridge certificate
of that network, and an MQTT connection with a long persistent session and manual acks."""

from __future__ import annotations

from pathlib import Path

from ..config.models import BrokerURL, EncryptionConfig, ReliabilityConfig, TLSConfig
from ..errors import ConfigError
from ..security.envelope import EnvelopeCodec
from ..security.signing import Signer
from ..security.trust import TrustStore
from ..transport import Connection

__all__ = ["BRIDGE_NODE", "bridge_codec", "bridge_connection"]

BRIDGE_NODE = "bridge"
"""The OU of every bridge certificate (:mod:`pear_mqtt.security.pki`): receivers check it."""

_MIN_SESSION_EXPIRY = 7 * 86400


def bridge_codec(*, tls: TLSConfig, network: str, encryption: EncryptionConfig | None,
                 crl: Path | None, rel: ReliabilityConfig, what: str) -> EnvelopeCodec:
    """The codec for ``network``; :class:`ConfigError` (naming ``what``) unless ``tls`` holds
    a bridge certificate of that network. Signers are checked against the CRL ``crl`` (else
    ``tls.crl_file``), re-read when it changes (every ``tls.crl_check_interval`` s at most)."""
    missing = tls.missing()
    if missing:
        raise ConfigError(f"{what}: {', '.join(missing)} required")
    assert tls.ca_file and tls.cert_file and tls.key_file
    signer = Signer.from_files(key_file=tls.key_file, cert_file=tls.cert_file)
    me = signer.identity
    if me.network != network:
        raise ConfigError(f"{what}: certificate {tls.cert_file} is for network {me.network!r},"
                          f" not {network!r}")
    if me.node != BRIDGE_NODE:
        raise ConfigError(f"{what}: certificate {tls.cert_file} is a {me.node!r} certificate; "
                          "the bridge needs one issued with role 'bridge'")
    crl = crl if crl is not None else tls.crl_file
    trust = TrustStore.from_files(ca_files=[tls.ca_file], crl_files=[crl] if crl else [],
                                  network=network, crl_check_interval=tls.crl_check_interval)
    return EnvelopeCodec(signer=signer, trust=trust, encryption=encryption,
                         max_bytes=rel.max_message_bytes, max_clock_skew=rel.max_clock_skew,
                         max_age=rel.max_message_age, write_version=rel.envelope_version)


def bridge_connection(*, url: BrokerURL, tls: TLSConfig, rel: ReliabilityConfig,
                      client_id: str) -> Connection:
    """A connection (not yet connected) to the broker at ``url``."""
    protocol = {"auto": None, "5": 5, "3.1.1": 4}[rel.mqtt_version]
    # At least a week of session: what members send while the bridge is down (an upgrade, a
    # weekend outage) waits in the broker instead of being lost; a node's one-hour default is
    # meant for nodes, whose peers do not depend on them. Manual acks: an item is
    # acknowledged only once the state store has committed it, so a bridge killed in between
    # gets it again instead of losing it.
    return Connection(broker=url, client_id=client_id[:128], tls=tls,
                      keepalive=rel.keepalive, clean_start=False,
                      session_expiry=max(rel.session_expiry, _MIN_SESSION_EXPIRY),
                      protocol=protocol, manual_ack=True)
