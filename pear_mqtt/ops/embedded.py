"""An in-process MQTT broker (amqtt) with the identity and ACL semantics of the mosquitto setup.

A newcomer can run a whole pear_mqtt topology with nothing but ``pip``::

    async with EmbeddedBroker(mode="consortium", network="grocers", ca_file=ca,
                              cert_file=broker_crt, key_file=broker_key,
                              crl_file=crl, bridge_users=["bridge"]) as broker:
        ...  # clients connect to 127.0.0.1:broker.tls_port with their node certificates

or from the shell: ``pear-mqtt embedded --mode consortium --network grocers --pki DIR``.

What it enforces, as the mosquitto configuration rendered by :mod:`pear_mqtt.brokerconf` does:

- **Mutual TLS.** The TLS listener requires a client certificate signed by the network CA
  (``ssl.CERT_REQUIRED``); expired certificates and certificates of another CA fail the
  handshake. With a CRL, revoked certificates fail it too (``VERIFY_CRL_CHECK_LEAF``) and are
  checked again at CONNECT against the CRL last loaded (:meth:`EmbeddedBroker.reload_crl`).
- **Identity.** The certificate subject (see :mod:`pear_mqtt.identity`) must name this network
  in ``O``; its ``CN`` (the member) becomes the MQTT username, whatever username the client
  sends -- mosquitto's ``use_identity_as_username``.
- **ACL.** :func:`pear_mqtt.topics.acl_rules` with mosquitto's meaning: ``pattern`` rules for
  everyone with ``%u`` replaced by the username, ``topic`` rules for the named user, ``deny``
  winning over grants. Writes are checked on PUBLISH (a refused message is acknowledged and
  dropped, as mosquitto does for MQTT 3.1.1) and on the last will at CONNECT (refused with
  "not authorised"). Reads are checked when subscribing and again for every message delivered.

  A subscription is granted only if one read rule *covers* the whole filter (every topic the
  filter can match is readable); a broader wildcard gets SUBACK failure (0x80) instead of being
  silently narrowed. A client asking for too much learns it at once rather than waiting for
  messages that never come, and the per-message read check (which mosquitto also performs)
  stays in place for ``deny`` rules that cut holes into a granted filter.
- **Sessions are bound to their owner.** A persistent session can be resumed only by the
  member that created it, so a client of another company cannot take over its subscriptions or
  its queued messages by reusing a client id.
- **Revocation reaches retained state.** The broker remembers which certificate published
  each retained message. When :meth:`EmbeddedBroker.reload_crl` finds a certificate newly
  revoked, it drops the retained messages that certificate published (a node's state and
  presence), so new subscribers no longer get them; retained messages of the member's other
  nodes stay. A connection of that certificate that is still open may no longer publish,
  subscribe or receive, and its last will is cancelled, so it cannot put its state back.
  This is what the rendered mosquitto configuration achieves with ``check_retain_source``
  and per-node ``deny`` rules (:mod:`pear_mqtt.brokerconf`), only finer: mosquitto knows
  publishers by username (the member) and so denies the node's topics, whereas this broker
  knows the certificate, so a re-keyed node (new certificate, same node id) keeps what it
  published with its new key and never sees the old key's messages served again.

A plain (no TLS) listener is opened only with ``allow_plain``; its clients are anonymous and
unrestricted. It exists for development and tests, never for a network with real members.

amqtt limitations (amqtt 0.12), and what this module does about them:

- MQTT 3.1.1 only: no MQTT 5, hence no message expiry on retained state, no reason strings,
  no session expiry negotiated by the client. Retained state lives until overwritten/cleared.
- Nothing is persisted: retained messages and sessions are lost when the process stops.
- A QoS 1 message in flight to a subscriber that does not acknowledge within 5 s, or that
  disconnects before acknowledging, is dropped rather than redelivered on reconnect (amqtt
  drops it from the in-flight store when the wait ends). Messages published while a persistent
  session is offline are queued and delivered on reconnect.
- Messages are delivered at the subscription's QoS, not ``min(publish QoS, subscription QoS)``.
- A resumed persistent session gets the retained messages of its subscriptions again (QoS 0),
  where mosquitto sends retained messages only on SUBSCRIBE; it also keeps the will-retain flag
  of the connection that created it.
- Persistent sessions never expire (mosquitto's default too), so abandoned client ids cost
  memory until the broker stops.
- amqtt hooks nothing for TLS policy, session resumption or retained delivery, so this module
  subclasses :class:`amqtt.broker.Broker` and overrides four of its private methods and
  ``retain_message`` (checked at start, see ``_OVERRIDDEN``). It closes four amqtt gaps: a
  resumed session kept the TLS peer of the connection that created it (another member reusing
  the client id would have been authenticated as the original owner); a reconnecting client
  was sent the retained messages of every filter any client had subscribed to; retained
  messages bypassed read checks; a retained message does not record who published it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import logging
import signal
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import MQTTError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from ..errors import BrokerError, ConfigError, PearError
from ..model.topics import AclRule, acl_rules, filter_covers, topic_matches, validate_identifier
from ..security.identity import Identity, identity_of

__all__ = [
    "AccessPolicy",
    "EmbeddedBroker",
    "register_cli",
    "run_embedded",
]

log = logging.getLogger(__name__)

_MODES: Final = ("private", "consortium", "public")
_PLAIN: Final = "default"  # amqtt requires a listener named "default"
_TLS: Final = "tls"
_PRINCIPAL: Final = "pear_mqtt.principal"
_CONNECT_STATE: Final = "pear_mqtt.connect_state"
_OVERRIDDEN: Final = ("_create_ssl_context", "_initialize_client_session", "_delete_session",
                      "_publish_retained_messages_for_subscription", "retain_message")


# -- access policy ----------------------------------------------------------------------------

class AccessPolicy:
    """ACL rules evaluated with mosquitto's semantics for one authenticated username.

    ``pattern`` rules (``user`` None) apply to every user with ``%u`` replaced by the username;
    ``topic`` rules apply to their user only. A matching ``deny`` rule wins over any grant.
    """

    __slots__ = ("_by_user", "_rules")

    def __init__(self, rules: Iterable[AclRule]) -> None:
        self._rules = tuple(rules)
        self._by_user: dict[str, tuple[tuple[str, str], ...]] = {}

    @classmethod
    def for_network(cls, *, mode: str, network: str, bridge_users: Iterable[str] = (),
                    revoked: Iterable[tuple[str, str]] = ()) -> AccessPolicy:
        """The policy of a broker of ``mode`` (see :func:`pear_mqtt.topics.acl_rules`);
        ``revoked`` ``(member, node)`` pairs get the deny rules the mosquitto ACL has."""
        return cls(acl_rules(mode=mode, network=network, bridge_users=bridge_users,
                             revoked=revoked))

    @property
    def rules(self) -> tuple[AclRule, ...]:
        """The rules, before ``%u`` substitution."""
        return self._rules

    def rules_for(self, username: str) -> tuple[tuple[str, str], ...]:
        """``(access, filter)`` pairs that apply to ``username``, ``%u`` substituted."""
        cached = self._by_user.get(username)
        if cached is not None:
            return cached
        try:
            validate_identifier(username, what="username")
        except ValueError:
            # mosquitto refuses to substitute a username that would change the pattern's shape
            # (wildcards, separators); such a user gets no rights at all.
            resolved: tuple[tuple[str, str], ...] = ()
        else:
            resolved = tuple(
                (rule.access, rule.topic.replace("%u", username))
                for rule in self._rules
                if rule.user is None or rule.user == username
            )
        self._by_user[username] = resolved
        return resolved

    def _allowed(self, username: str, topic: str, grants: tuple[str, ...]) -> bool:
        rules = self.rules_for(username)
        if any(access == "deny" and topic_matches(f, topic) for access, f in rules):
            return False
        return any(access in grants and topic_matches(f, topic) for access, f in rules)

    def may_publish(self, *, username: str, topic: str) -> bool:
        """Whether ``username`` may publish to ``topic`` (a write or readwrite rule matches)."""
        return self._allowed(username, topic, ("write", "readwrite"))

    def may_read(self, *, username: str, topic: str) -> bool:
        """Whether a message on ``topic`` may be delivered to ``username``."""
        return self._allowed(username, topic, ("read", "readwrite"))

    def may_subscribe(self, *, username: str, topic_filter: str) -> bool:
        """Whether ``username`` may subscribe to ``topic_filter``.

        True when one read rule covers the whole filter and no deny rule covers all of it;
        a deny rule covering part of the filter is enforced per message by :meth:`may_read`.
        """
        rules = self.rules_for(username)
        if any(access == "deny" and filter_covers(f, topic_filter) for access, f in rules):
            return False
        return any(access in ("read", "readwrite") and filter_covers(f, topic_filter)
                   for access, f in rules)


# -- admission --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Principal:
    """Who a connection is: a certificate identity, or anonymous on the plain listener.

    ``serial`` is the client certificate's serial number; ``revoked`` is set on a connection
    that was admitted before a CRL reload revoked its certificate.
    """

    identity: Identity | None
    serial: int | None = None
    revoked: bool = False

    @property
    def username(self) -> str | None:
        return self.identity.member if self.identity is not None else None

    def __str__(self) -> str:
        if self.identity is None:
            return "anonymous (plain listener)"
        return f"{self.identity.member} (node {self.identity.node})"


@dataclass(frozen=True, slots=True)
class _Refusal:
    reason: str


@dataclass(frozen=True, slots=True)
class _SessionState:
    """CONNECT fields amqtt copies into a resumed session before anyone is authenticated."""

    will_flag: bool
    will_topic: str | None
    will_message: bytes | bytearray | None
    will_qos: int | None
    will_retain: bool | None
    keep_alive: int

    @classmethod
    def of(cls, session: Any) -> _SessionState:
        return cls(session.will_flag, session.will_topic, session.will_message,
                   session.will_qos, session.will_retain, session.keep_alive)

    def restore(self, session: Any) -> None:
        session.will_flag, session.will_topic = self.will_flag, self.will_topic
        session.will_message, session.will_qos = self.will_message, self.will_qos
        session.will_retain, session.keep_alive = self.will_retain, self.keep_alive


class _Refused(Exception):
    """Raised inside amqtt's session set-up to stop a connection before it touches a session."""


# The verdict on the connection whose CONNECT is being processed, for _delete_session, which
# amqtt calls from inside its own session set-up (each connection runs in its own task).
_CONNECTING: contextvars.ContextVar[_Principal | _Refusal | None] = \
    contextvars.ContextVar("pear_mqtt_connecting", default=None)


class _Gatekeeper:
    """Decides who a connection is and whether it may have the session it asks for."""

    def __init__(self, *, network: str, allow_plain: bool, policy: AccessPolicy,
                 ssl_context: ssl.SSLContext | None, revoked: frozenset[int]) -> None:
        self.network = network
        self.allow_plain = allow_plain
        self.policy = policy
        self.ssl_context = ssl_context
        self.revoked = revoked

    def principal_of(self, writer: Any) -> _Principal | _Refusal:
        ssl_object = writer.get_ssl_info()
        if ssl_object is None:
            if self.allow_plain:
                return _Principal(None)
            return _Refusal("plain connections are not allowed")
        der = ssl_object.getpeercert(binary_form=True)
        if not der:  # unreachable with CERT_REQUIRED; kept so a config slip cannot open the door
            return _Refusal("no client certificate")
        try:
            cert = x509.load_der_x509_certificate(der)
            identity = identity_of(cert)
        except (ValueError, x509.InvalidVersion, PearError) as exc:
            return _Refusal(f"client certificate does not fit the identity scheme: {exc}")
        if identity.network != self.network:
            return _Refusal(f"certificate is for network {identity.network!r}, "
                            f"this broker serves {self.network!r}")
        if cert.serial_number in self.revoked:
            return _Refusal(f"certificate {cert.serial_number:x} is revoked")
        return _Principal(identity, serial=cert.serial_number)

    def admit(self, session: Any, verdict: _Principal | _Refusal) -> _Principal | _Refusal:
        """Check ``verdict`` against the (possibly resumed) ``session`` amqtt prepared."""
        if isinstance(verdict, _Refusal):
            return verdict
        owner = session.attributes.get(_PRINCIPAL)
        if isinstance(owner, _Principal) and owner.username != verdict.username:
            return _Refusal(f"client id {session.client_id!r} belongs to a session of {owner}")
        if session.will_flag and verdict.username is not None:
            topic = session.will_topic or ""
            if (not topic or "+" in topic or "#" in topic or topic.startswith("$")
                    or not self.policy.may_publish(username=verdict.username, topic=topic)):
                return _Refusal(f"last will on {topic!r} is not writable by {verdict}")
        return verdict


class _PearBroker(Broker):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's broker with the hooks amqtt lacks for pear_mqtt's admission and ACL."""

    def __init__(self, config: dict[str, Any], *, gatekeeper: _Gatekeeper) -> None:
        super().__init__(config)
        self.pear_gatekeeper = gatekeeper
        # Who published each retained message, captured when it was stored: a session's
        # principal changes when another node of the same member resumes it.
        self.pear_retained_sources: dict[str, _Principal | None] = {}

    async def retain_message(self, source_session: Any, topic_name: str | None,
                             data: bytes | bytearray | None, qos: int | None = None) -> None:
        source = source_session.attributes.get(_PRINCIPAL) if source_session is not None \
            else None
        principal = source if isinstance(source, _Principal) else None
        if principal is not None and (principal.revoked
                                      or principal.serial in self.pear_gatekeeper.revoked):
            # E.g. the last will of a connection whose certificate was revoked meanwhile.
            log.info("not retaining %r from %s: its certificate is revoked", topic_name,
                     principal)
            return
        if topic_name is None:
            return
        # Recorded before amqtt stores the message (synchronously, before its first await),
        # so a CRL reload in between never sees a retained message without its source.
        self.pear_retained_sources[topic_name] = principal
        await super().retain_message(source_session, topic_name, data, qos)
        if topic_name not in self._retained_messages:  # cleared by an empty payload
            self.pear_retained_sources.pop(topic_name, None)

    def pear_revoke(self, revoked: frozenset[int]) -> int:
        """Apply a new set of revoked serials; return how many retained messages were dropped.

        Drops the retained messages those certificates published, marks their open sessions
        revoked (the ACL plugin then refuses them everything) and cancels their last wills.
        """
        gone = [topic for topic, source in self.pear_retained_sources.items()
                if source is not None and source.serial in revoked]
        for topic in gone:
            del self.pear_retained_sources[topic]
            self._retained_messages.pop(topic, None)
        for session, _handler in list(self._sessions.values()):
            principal = session.attributes.get(_PRINCIPAL)
            if isinstance(principal, _Principal) and not principal.revoked \
                    and principal.serial in revoked:
                session.attributes[_PRINCIPAL] = _Principal(principal.identity,
                                                            serial=principal.serial,
                                                            revoked=True)
                session.will_flag = False
                session.attributes[_CONNECT_STATE] = _SessionState.of(session)
                log.warning("session %r of %s: certificate %x revoked; it may no longer "
                            "publish, subscribe or receive", session.client_id, principal,
                            principal.serial)
        return len(gone)

    def _create_ssl_context(self, listener: Any) -> ssl.SSLContext:
        # amqtt builds a CERT_OPTIONAL context from the listener config; ours is built and
        # checked before start so that CA, CRL and verification mode are exactly ours.
        context = self.pear_gatekeeper.ssl_context
        if context is None:
            raise BrokerError("TLS listener configured without TLS material")
        return context

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str,
                                         remote_port: int) -> tuple[Any, Any]:
        gate = self.pear_gatekeeper
        verdict = gate.principal_of(writer)
        token = _CONNECTING.set(verdict)
        try:
            try:
                handler, session = await super()._initialize_client_session(
                    reader, writer, remote_address, remote_port)
            except _Refused as exc:
                await self._refuse(writer, remote_address, str(exc))
                raise MQTTError(str(exc)) from None
            decision = gate.admit(session, verdict)
            if isinstance(decision, _Refusal):
                previous = session.attributes.get(_CONNECT_STATE)
                if session.parent and isinstance(previous, _SessionState):
                    # amqtt already copied this CONNECT's will into the owner's session.
                    previous.restore(session)
                await self._refuse(writer, remote_address, decision.reason)
                raise MQTTError(decision.reason)
        finally:
            _CONNECTING.reset(token)
        session.attributes[_PRINCIPAL] = decision
        session.attributes[_CONNECT_STATE] = _SessionState.of(session)
        # amqtt keeps the TLS object of the connection that created a session; refresh it so
        # nothing downstream ever reads a stale peer certificate.
        session.ssl_object = writer.get_ssl_info()
        session.remote_address, session.remote_port = remote_address, remote_port
        session.username, session.password = decision.username, None
        return handler, session

    async def _delete_session(self, client_id: str) -> None:
        verdict = _CONNECTING.get()
        if isinstance(verdict, _Refusal):
            raise _Refused(verdict.reason)
        existing = self._sessions.get(client_id, (None, None))[0]
        if verdict is not None and existing is not None:
            owner = existing.attributes.get(_PRINCIPAL)
            if isinstance(owner, _Principal) and owner.username != verdict.username:
                # A clean-session CONNECT would otherwise wipe another member's session.
                raise _Refused(f"client id {client_id!r} belongs to a session of {owner}")
        await super()._delete_session(client_id)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Any) -> None:
        topic_filter, qos = subscription
        # amqtt replays every filter any client subscribed to when a session resumes; only the
        # session's own subscriptions may bring it retained messages.
        subscribers = self._subscriptions.get(topic_filter, ())
        if not any(s.client_id == session.client_id for s, _ in subscribers):
            return
        handler = self._get_handler(session)
        principal = session.attributes.get(_PRINCIPAL)
        if handler is None or not isinstance(principal, _Principal) or principal.revoked:
            return
        username = principal.username
        policy = self.pear_gatekeeper.policy
        revoked = self.pear_gatekeeper.revoked
        sources = self.pear_retained_sources
        sends = [
            asyncio.ensure_future(handler.mqtt_publish(
                message.topic, message.data, min(qos, message.qos or qos), retain=True))
            for topic, message in list(self._retained_messages.items())
            if topic_matches(topic_filter, topic)
            and (username is None or policy.may_read(username=username, topic=topic))
            # reload_crl already dropped these; checking again costs one set lookup.
            and not _revoked_source(sources.get(topic), revoked)
        ]
        if sends:
            await asyncio.wait(sends)

    async def _refuse(self, writer: Any, remote_address: str, reason: str) -> None:
        log.warning("refused MQTT connection from %s: %s", remote_address, reason)
        with contextlib.suppress(Exception):  # the peer may already be gone
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
        with contextlib.suppress(Exception):
            await writer.close()


def _revoked_source(source: _Principal | None, revoked: frozenset[int]) -> bool:
    return source is not None and (source.revoked or source.serial in revoked)


class _PearAclPlugin(BaseAuthPlugin, BaseTopicPlugin):  # type: ignore[misc]  # amqtt is untyped
    """amqtt plugin: authentication and topic ACL from the principal admission attached."""

    @dataclass
    class Config:
        """Plugin configuration (from the broker config dict; see EmbeddedBroker.start)."""

        mode: str
        network: str
        bridge_users: list[str]

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._policy = AccessPolicy.for_network(mode=self.config.mode,
                                                network=self.config.network,
                                                bridge_users=self.config.bridge_users)

    async def authenticate(self, *, session: Any) -> bool:
        # Admission already ran in _PearBroker._initialize_client_session; a session without
        # a principal did not go through it (e.g. one created offline) and gets nothing.
        return isinstance(session.attributes.get(_PRINCIPAL), _Principal)

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None,
                              action: Any = None) -> bool:
        principal = session.attributes.get(_PRINCIPAL) if session is not None else None
        if not isinstance(principal, _Principal) or not topic:
            return False
        if principal.revoked:  # connected before reload_crl revoked its certificate
            log.debug("refused %s on %r for %s: its certificate is revoked",
                      getattr(action, "value", action), topic, principal)
            return False
        username = principal.username
        if username is None:
            return True  # anonymous plain-listener client: development mode, no ACL
        if action == Action.PUBLISH:
            return self._policy.may_publish(username=username, topic=topic)
        if action == Action.SUBSCRIBE:
            return self._policy.may_subscribe(username=username, topic_filter=topic)
        if action == Action.RECEIVE:
            return self._policy.may_read(username=username, topic=topic)
        return False


# -- the broker ---------------------------------------------------------------------------------

def _read_crl(crl_file: Path, ca_file: Path) -> frozenset[int]:
    """Serial numbers revoked by ``crl_file``, after checking the CA signed it."""
    try:
        crl = x509.load_pem_x509_crl(crl_file.read_bytes())
        ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise BrokerError(f"cannot load CRL {crl_file} or CA {ca_file}: {exc}") from exc
    try:
        valid = crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, InvalidSignature):
        valid = False
    if not valid:
        raise BrokerError(f"CRL {crl_file} is not signed by the CA in {ca_file}")
    return frozenset(entry.serial_number for entry in crl)


def _bind(host: str, port: int) -> str:
    # amqtt splits host and port at the last colon and passes brackets on to the resolver,
    # so an IPv6 literal must stay unbracketed.
    return f"{host}:{port}"


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


class EmbeddedBroker:
    """An amqtt broker in this process that admits and confines clients like mosquitto would.

    Args:
        mode: ``private``, ``consortium`` or ``public`` (selects the ACL of
            :func:`pear_mqtt.topics.acl_rules`).
        network: the network id; client certificates must carry it in ``O``.
        host: address both listeners bind to (loopback by default).
        port: plain-listener port, used only with ``allow_plain``; 0 picks a free port.
        tls_port: mutual-TLS listener port; None or 0 picks a free port. The TLS listener is
            opened when ``ca_file``, ``cert_file`` and ``key_file`` are given.
        ca_file: the network CA certificate; client certificates must chain to it.
        cert_file: the broker certificate (role ``broker`` from :mod:`pear_mqtt.pki`).
        key_file: the broker private key.
        crl_file: a CRL signed by the CA; revoked client certificates are refused.
        bridge_users: usernames (certificate CNs) with bridge rights in the ACL.
        allow_plain: also open a plain listener whose clients are anonymous and unrestricted
            (development and tests only).

    Raises:
        ConfigError: inconsistent arguments (unknown mode, partial TLS material, no listener).

    Use as ``async with EmbeddedBroker(...) as broker`` or ``await start()`` / ``await stop()``;
    :attr:`tls_port` and :attr:`port` give the bound ports once started.
    """

    def __init__(self, *, mode: str, network: str, host: str = "127.0.0.1", port: int = 0,
                 tls_port: int | None = None, ca_file: Path | None = None,
                 cert_file: Path | None = None, key_file: Path | None = None,
                 crl_file: Path | None = None, bridge_users: Sequence[str] = (),
                 allow_plain: bool = False) -> None:
        if mode not in _MODES:
            raise ConfigError(f"mode must be one of {_MODES}, got {mode!r}")
        try:
            self._policy = AccessPolicy.for_network(mode=mode, network=network,
                                                    bridge_users=bridge_users)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        tls_material = (ca_file, cert_file, key_file)
        if any(p is not None for p in tls_material) and any(p is None for p in tls_material):
            raise ConfigError("the TLS listener needs ca_file, cert_file and key_file together")
        self._tls = all(p is not None for p in tls_material)
        if crl_file is not None and not self._tls:
            raise ConfigError("crl_file needs the TLS listener (ca_file, cert_file, key_file)")
        if not self._tls and not allow_plain:
            raise ConfigError("nothing to listen on: give ca_file/cert_file/key_file for the "
                              "TLS listener, or allow_plain=True for a plain one")
        for label, value in (("port", port), ("tls_port", tls_port or 0)):
            if not 0 <= value <= 65535:
                raise ConfigError(f"{label} must be between 0 and 65535, got {value}")
        self.mode: Final = mode
        self.network: Final = network
        self.host: Final = host
        self.bridge_users: Final = tuple(bridge_users)
        self.allow_plain: Final = allow_plain
        self._requested_port = port
        self._requested_tls_port = tls_port or 0
        self._ca_file = Path(ca_file) if ca_file is not None else None
        self._cert_file = Path(cert_file) if cert_file is not None else None
        self._key_file = Path(key_file) if key_file is not None else None
        self._crl_file = Path(crl_file) if crl_file is not None else None
        self._broker: _PearBroker | None = None
        self._gatekeeper: _Gatekeeper | None = None
        self._port: int | None = None
        self._tls_port: int | None = None

    # -- properties -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether the broker is started."""
        return self._broker is not None

    @property
    def port(self) -> int | None:
        """The bound plain-listener port (None before start or without ``allow_plain``)."""
        return self._port

    @property
    def tls_port(self) -> int | None:
        """The bound mutual-TLS port (None before start or without TLS material)."""
        return self._tls_port

    @property
    def policy(self) -> AccessPolicy:
        """The ACL this broker enforces."""
        return self._policy

    # -- lifecycle --------------------------------------------------------------------------
    def _ssl_context(self, revoked_check: bool) -> ssl.SSLContext:
        assert self._ca_file and self._cert_file and self._key_file  # checked in __init__
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_cert_chain(str(self._cert_file), str(self._key_file))
            context.load_verify_locations(cafile=str(self._ca_file))
            if revoked_check and self._crl_file is not None:
                context.load_verify_locations(cafile=str(self._crl_file))
                context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(f"cannot set up TLS from CA {self._ca_file}, certificate "
                              f"{self._cert_file}, key {self._key_file}, CRL {self._crl_file}: "
                              f"{exc}") from exc
        return context

    def _amqtt_config(self) -> dict[str, Any]:
        listeners: dict[str, dict[str, Any]] = {
            # amqtt insists on a "default" listener and copies its settings into the others'
            # unset fields, so the plain one takes that name (unbound unless allowed).
            _PLAIN: {"type": "tcp",
                     "bind": _bind(self.host, self._requested_port) if self.allow_plain else None},
        }
        if self._tls:
            listeners[_TLS] = {
                "type": "tcp", "bind": _bind(self.host, self._requested_tls_port), "ssl": True,
                "cafile": str(self._ca_file), "certfile": str(self._cert_file),
                "keyfile": str(self._key_file),
            }
        return {
            "listeners": listeners,
            "plugins": {
                f"{__name__}.{_PearAclPlugin.__name__}": {
                    "mode": self.mode, "network": self.network,
                    "bridge_users": list(self.bridge_users),
                },
            },
        }

    async def start(self) -> None:
        """Bind the listeners and start serving.

        Raises:
            BrokerError: already running, TLS material or CRL unreadable or invalid, a port in
                use, or anything else amqtt failed on (the cause is chained).
        """
        if self._broker is not None:
            raise BrokerError("the embedded broker is already running")
        missing = [name for name in _OVERRIDDEN if not hasattr(Broker, name)]
        if missing:
            raise BrokerError(f"this amqtt version lacks {missing}, which pear_mqtt hooks into; "
                              "install the amqtt version pear_mqtt was tested with (0.12)")
        revoked: frozenset[int] = frozenset()
        context: ssl.SSLContext | None = None
        if self._tls:
            if self._crl_file is not None:
                assert self._ca_file is not None
                revoked = _read_crl(self._crl_file, self._ca_file)
            context = self._ssl_context(revoked_check=True)
        gatekeeper = _Gatekeeper(network=self.network, allow_plain=self.allow_plain,
                                 policy=self._policy, ssl_context=context, revoked=revoked)
        broker: _PearBroker | None = None
        try:
            broker = _PearBroker(self._amqtt_config(), gatekeeper=gatekeeper)
            await broker.start()
        except Exception as exc:
            if broker is not None:
                # amqtt leaves listeners that did bind open when a later one fails.
                for server in list(broker._servers.values()):
                    with contextlib.suppress(Exception):
                        await server.close_instance()
            cause = _root_cause(exc)
            raise BrokerError(f"embedded broker failed to start on {self.host}: "
                              f"{type(cause).__name__}: {cause}") from exc
        servers = broker._servers
        self._port = servers[_PLAIN].instance.sockets[0].getsockname()[1] \
            if _PLAIN in servers else None
        self._tls_port = servers[_TLS].instance.sockets[0].getsockname()[1] \
            if _TLS in servers else None
        self._broker, self._gatekeeper = broker, gatekeeper
        log.info("embedded %s broker for network %r listening on %s (TLS %s, plain %s)",
                 self.mode, self.network, self.host, self._tls_port, self._port)

    async def stop(self) -> None:
        """Disconnect every client and close the listeners (no-op when not running).

        Retained messages and sessions are discarded: amqtt keeps them in memory only.
        """
        broker, self._broker, self._gatekeeper = self._broker, None, None
        self._port = self._tls_port = None
        if broker is None:
            return
        try:
            await broker.shutdown()
        except Exception as exc:
            raise BrokerError(f"embedded broker did not shut down cleanly: {exc}") from exc

    def reload_crl(self) -> int:
        """Re-read ``crl_file`` (after :func:`pear_mqtt.pki.revoke`); return the revoked count.

        New connections are checked against it at once. Retained messages published by a
        newly revoked certificate are dropped, so new subscribers no longer get them (the
        retained messages of the member's other nodes stay). Clients already connected stay
        connected until they reconnect, as with mosquitto, but one whose certificate is now
        revoked may no longer publish, subscribe or receive, and its last will is cancelled.

        Raises:
            BrokerError: not running, no CRL configured, or the CRL is unreadable or not
                signed by the CA (the previous CRL stays in force).
        """
        gatekeeper = self._gatekeeper
        if gatekeeper is None or gatekeeper.ssl_context is None or self._crl_file is None:
            raise BrokerError("reload_crl needs a running broker with a crl_file")
        assert self._ca_file is not None
        revoked = _read_crl(self._crl_file, self._ca_file)
        try:
            # OpenSSL uses the newest CRL of an issuer, so the handshake check follows too;
            # the serial check at CONNECT does not depend on that.
            gatekeeper.ssl_context.load_verify_locations(cafile=str(self._crl_file))
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(f"cannot load CRL {self._crl_file}: {exc}") from exc
        gatekeeper.revoked = revoked
        dropped = self._broker.pear_revoke(revoked) if self._broker is not None else 0
        log.info("CRL reloaded from %s: %d revoked certificates; %d retained messages of "
                 "theirs dropped", self._crl_file, len(revoked), dropped)
        return len(revoked)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()


# -- command line -------------------------------------------------------------------------------

def _pki_files(pki_dir: Path, cert_file: Path | None,
               key_file: Path | None) -> tuple[Path, Path, Path]:
    ca = pki_dir / "ca.crt"
    if not ca.is_file():
        raise ConfigError(f"{ca} not found; create the CA with `pear-mqtt pki init --dir "
                          f"{pki_dir}`")
    if cert_file is None:
        found = sorted(pki_dir.glob("broker-*.crt"))
        if len(found) != 1:
            listing = ", ".join(p.name for p in found) or "none"
            raise ConfigError(f"expected one broker certificate (broker-*.crt) in {pki_dir}, "
                              f"found {listing}; issue one with `pear-mqtt pki issue --role "
                              "broker` or pass --cert/--key")
        cert_file = found[0]
    if key_file is None:
        key_file = cert_file.with_suffix(".key")
    return ca, cert_file, key_file


def run_embedded(*, mode: str, network: str, pki_dir: Path, port: int = 8883,
                 plain_port: int | None = None, host: str = "127.0.0.1",
                 bridge_users: Sequence[str] = (), cert_file: Path | None = None,
                 key_file: Path | None = None, crl_file: Path | None = None,
                 announce: Callable[[str], None] | None = None) -> int:
    """Run an :class:`EmbeddedBroker` until SIGINT or SIGTERM; SIGHUP reloads the CRL.

    ``pki_dir`` holds ``ca.crt``, one ``broker-*.crt`` with its ``.key`` (unless
    ``cert_file``/``key_file`` are given) and, if present, ``ca.crl`` (unless ``crl_file``).
    A ``plain_port`` opens the anonymous plain listener too. ``announce`` receives the line
    naming the bound addresses (default: printed to stdout). Returns the exit status.
    """
    ca, cert, key = _pki_files(pki_dir, cert_file, key_file)
    if crl_file is None and (pki_dir / "ca.crl").is_file():
        crl_file = pki_dir / "ca.crl"
    broker = EmbeddedBroker(mode=mode, network=network, host=host, tls_port=port,
                            port=plain_port or 0, ca_file=ca, cert_file=cert, key_file=key,
                            crl_file=crl_file, bridge_users=bridge_users,
                            allow_plain=plain_port is not None)
    say = announce or (lambda line: print(line, flush=True))

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()

        def reload() -> None:
            try:
                count = broker.reload_crl()
            except BrokerError as exc:
                log.error("CRL not reloaded: %s", exc)
            else:
                say(f"CRL reloaded: {count} revoked certificate(s)")

        handled: list[signal.Signals] = []
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows loops
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stopping.set)
                handled.append(sig)
            if crl_file is not None:
                loop.add_signal_handler(signal.SIGHUP, reload)
                handled.append(signal.SIGHUP)
        try:
            async with broker:
                where = f"mqtts://{host}:{broker.tls_port}"
                if broker.port is not None:
                    where += f" and mqtt://{host}:{broker.port} (plain, anonymous)"
                say(f"pear-mqtt embedded {mode} broker for network {network!r} "
                    f"listening on {where}")
                await stopping.wait()
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    asyncio.run(serve())
    return 0


def _cmd_embedded(args: argparse.Namespace) -> int:
    return run_embedded(mode=args.mode, network=args.network, pki_dir=args.pki,
                        port=args.port, plain_port=args.plain_port, host=args.host,
                        bridge_users=args.bridge_users, cert_file=args.cert,
                        key_file=args.key, crl_file=args.crl)


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pear-mqtt embedded``."""
    parser = subparsers.add_parser(
        "embedded", help="run the in-process amqtt broker with pear_mqtt's TLS identity and ACL",
        description="Run an amqtt broker in this process with the same mutual-TLS identity and "
                    "ACL rules as the mosquitto deployment, until SIGINT/SIGTERM "
                    "(SIGHUP reloads the CRL).")
    parser.add_argument("--mode", choices=_MODES, required=True)
    parser.add_argument("--network", required=True,
                        help="network id (the O of every client certificate)")
    parser.add_argument("--pki", type=Path, required=True,
                        help="directory with ca.crt, broker-*.crt/.key and optionally ca.crl")
    parser.add_argument("--cert", type=Path, help="broker certificate (default: the one "
                                                  "broker-*.crt in --pki)")
    parser.add_argument("--key", type=Path, help="broker key (default: beside --cert)")
    parser.add_argument("--crl", type=Path, help="CRL (default: <pki>/ca.crl if present)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8883,
                        help="mutual-TLS port (default 8883; 0 picks a free port)")
    parser.add_argument("--plain-port", type=int,
                        help="also listen without TLS: anonymous, no ACL (development only)")
    parser.add_argument("--bridge-user", dest="bridge_users", action="append", default=[],
                        metavar="USER", help="certificate CN with bridge rights (repeatable)")
    parser.set_defaults(handler=_cmd_embedded)
