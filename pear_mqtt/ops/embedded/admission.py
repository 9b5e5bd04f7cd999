"""Who a connection of the embedded broker is, and whether it may have the session it asks for."""

from __future__ import annotations

import contextvars
import logging
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from ...errors import BrokerError, PearError
from ...security.identity import Identity, identity_of
from .policy import AccessPolicy

__all__ = [
    "CONNECTING",
    "Admission",
    "Gatekeeper",
    "Principal",
    "Refusal",
    "principal_of",
    "read_crl",
    "revoke_sessions",
]

log = logging.getLogger(__name__)

# Key of a session's principal in amqtt's ``Session.attributes`` (the plugin-owned dict).
_PRINCIPAL: Final = "pear_mqtt.principal"


@dataclass(frozen=True, slots=True)
class Principal:
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

    def revoked_by(self, serials: frozenset[int]) -> bool:
        """Whether this principal may no longer act under the revoked ``serials``."""
        return self.revoked or (self.serial is not None and self.serial in serials)

    def __str__(self) -> str:
        if self.identity is None:
            return "anonymous (plain listener)"
        return f"{self.identity.member} (node {self.identity.node})"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a connection is refused (sent back as CONNACK "not authorised", and logged)."""

    reason: str


@dataclass(slots=True)
class Admission:
    """What the front door decided about the connection whose CONNECT amqtt is processing.

    ``release`` lets the next CONNECT with the same client id be screened; the plugin calls it
    once amqtt has registered the session (the listener again when the connection ends).
    """

    principal: Principal
    ssl_object: Any
    remote: tuple[str, int] | None
    release: Callable[[], None] = field(default=lambda: None)


# The admission of the connection running in this task: amqtt calls the auth plugin from tasks
# it creates inside the connection's task, and a task starts with a copy of the context.
CONNECTING: contextvars.ContextVar[Admission | None] = \
    contextvars.ContextVar("pear_mqtt_connecting", default=None)


def principal_of(session: Any) -> Principal | None:
    """The principal admission attached to an amqtt session (None: never admitted)."""
    found = session.attributes.get(_PRINCIPAL) if session is not None else None
    return found if isinstance(found, Principal) else None


def attach(session: Any, admission: Admission) -> None:
    """Bind an admitted connection's identity to the (new or resumed) amqtt session."""
    session.attributes[_PRINCIPAL] = admission.principal
    # amqtt keeps the TLS object and address of the connection that created a session; refresh
    # them so nothing downstream reads a stale peer.
    session.ssl_object = admission.ssl_object
    if admission.remote is not None:
        session.remote_address, session.remote_port = admission.remote
    session.username, session.password = admission.principal.username, None


class Gatekeeper:
    """Decides who a connection is and whether it may have the session it asks for."""

    def __init__(self, *, network: str, allow_plain: bool, policy: AccessPolicy,
                 ssl_context: ssl.SSLContext | None, revoked: frozenset[int]) -> None:
        self.network = network
        self.allow_plain = allow_plain
        self.policy = policy
        self.ssl_context = ssl_context
        self.revoked = revoked

    def identify(self, ssl_object: Any) -> Principal | Refusal:
        """The principal behind a connection's TLS session (None: the plain listener)."""
        if ssl_object is None:
            if self.allow_plain:
                return Principal(None)
            return Refusal("plain connections are not allowed")
        der = ssl_object.getpeercert(binary_form=True)
        if not der:  # unreachable with CERT_REQUIRED; kept so a config slip cannot open the door
            return Refusal("no client certificate")
        try:
            cert = x509.load_der_x509_certificate(der)
            identity = identity_of(cert)
        except (ValueError, x509.InvalidVersion, PearError) as exc:
            return Refusal(f"client certificate does not fit the identity scheme: {exc}")
        if identity.network != self.network:
            return Refusal(f"certificate is for network {identity.network!r}, "
                           f"this broker serves {self.network!r}")
        if cert.serial_number in self.revoked:
            return Refusal(f"certificate {cert.serial_number:x} is revoked")
        return Principal(identity, serial=cert.serial_number)

    def admit(self, verdict: Principal | Refusal, *, client_id: str, owner: Principal | None,
              will_topic: str | None) -> Principal | Refusal:
        """Check ``verdict`` against the session it would get (``owner``: who created the
        session of ``client_id``, if one exists) and the last will it brings."""
        if isinstance(verdict, Refusal):
            return verdict
        if owner is not None and owner.username != verdict.username:
            return Refusal(f"client id {client_id!r} belongs to a session of {owner}")
        if will_topic is not None and verdict.username is not None \
                and not self._will_writable(verdict.username, will_topic):
            return Refusal(f"last will on {will_topic!r} is not writable by {verdict}")
        return verdict

    def _will_writable(self, username: str, topic: str) -> bool:
        return bool(topic) and "+" not in topic and "#" not in topic \
            and not topic.startswith("$") \
            and self.policy.may_publish(username=username, topic=topic)


def revoke_sessions(sessions: Iterable[Any], revoked: frozenset[int]) -> None:
    """Mark the open sessions of newly revoked certificates: they may no longer publish,
    subscribe or receive, and their last will is cancelled."""
    for session in sessions:
        principal = principal_of(session)
        if principal is None or principal.revoked or principal.serial not in revoked:
            continue
        session.attributes[_PRINCIPAL] = Principal(principal.identity, serial=principal.serial,
                                                   revoked=True)
        session.will_flag = False
        log.warning("session %r of %s: certificate %x revoked; it may no longer publish, "
                    "subscribe or receive", session.client_id, principal, principal.serial)


def read_crl(crl_file: Path, ca_file: Path) -> frozenset[int]:
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
