"""An in-process MQTT broker (amqtt) with the identity and ACL semantics of the mosquitto setup.

Mutual TLS with the network CA and CRL; the certificate CN is the username; the ACL of
:func:`pear_mqtt.model.acl.acl_rules`; sessions bound to the member that created them; a
CRL reload also drops the retained messages of the revoked certificates. docs/ describes the
contract and what amqtt (3.1.1 only, in memory) cannot do.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, get_args

from amqtt.broker import Broker

from ...errors import BrokerError, ConfigError
from ..brokerconf import Mode
from .admission import Gatekeeper, read_crl, revoke_sessions
from .listeners import Listeners
from .plugin import plugin_config
from .policy import AccessPolicy
from .retained import OVERRIDDEN, PearBroker, RetainedSources

__all__ = ["EmbeddedBroker"]

log = logging.getLogger(__name__)

_MODES: Final = get_args(Mode)
_PLAIN: Final = "default"  # amqtt requires a listener named "default"
_TLS: Final = "tls"


@dataclass(frozen=True, slots=True)
class _Running:
    """What a started broker holds."""

    broker: PearBroker
    listeners: Listeners
    gatekeeper: Gatekeeper
    sources: RetainedSources
    port: int | None
    tls_port: int | None


class EmbeddedBroker:
    """An amqtt broker in this process that admits and confines clients like mosquitto would.

    Args:
        mode: ``private``, ``consortium`` or ``public`` (selects the ACL of
            :func:`pear_mqtt.model.acl.acl_rules`).
        network: the network id; client certificates must carry it in ``O``.
        host: address both listeners bind to (loopback by default).
        port: plain-listener port, used only with ``allow_plain``; 0 picks a free port.
        tls_port: mutual-TLS listener port; None or 0 picks a free port. The TLS listener is
            opened when ``ca_file``, ``cert_file`` and ``key_file`` are given.
        ca_file: the network CA certificate; client certificates must chain to it.
        cert_file: the broker certificate (role ``broker`` from :mod:`pear_mqtt.security.pki`).
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
        self._running: _Running | None = None

    # -- properties -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether the broker is started."""
        return self._running is not None

    @property
    def port(self) -> int | None:
        """The bound plain-listener port (None before start or without ``allow_plain``)."""
        return self._running.port if self._running is not None else None

    @property
    def tls_port(self) -> int | None:
        """The bound mutual-TLS port (None before start or without TLS material)."""
        return self._running.tls_port if self._running is not None else None

    @property
    def policy(self) -> AccessPolicy:
        """The ACL this broker enforces."""
        return self._policy

    # -- lifecycle --------------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext:
        assert self._ca_file and self._cert_file and self._key_file  # checked in __init__
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_cert_chain(str(self._cert_file), str(self._key_file))
            context.load_verify_locations(cafile=str(self._ca_file))
            if self._crl_file is not None:
                context.load_verify_locations(cafile=str(self._crl_file))
                context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(f"cannot set up TLS from CA {self._ca_file}, certificate "
                              f"{self._cert_file}, key {self._key_file}, CRL {self._crl_file}: "
                              f"{exc}") from exc
        return context

    def _amqtt_config(self, gatekeeper: Gatekeeper, sources: RetainedSources) -> dict[str, Any]:
        # "external" listeners: the sockets belong to Listeners, which screens each CONNECT
        # before amqtt sees it. amqtt insists on a listener named "default".
        listeners: dict[str, dict[str, Any]] = {_PLAIN: {"type": "external"}}
        if self._tls:
            listeners[_TLS] = {"type": "external"}
        return {"listeners": listeners,
                "plugins": plugin_config(gatekeeper=gatekeeper, sources=sources)}

    async def start(self) -> None:
        """Bind the listeners and start serving.

        Raises:
            BrokerError: already running, TLS material or CRL unreadable or invalid, a port in
                use, or anything else amqtt failed on (the cause is chained).
        """
        if self._running is not None:
            raise BrokerError("the embedded broker is already running")
        missing = [name for name in OVERRIDDEN if not hasattr(Broker, name)]
        if missing:
            raise BrokerError(f"this amqtt version lacks {missing}, which pear_mqtt hooks into; "
                              "install the amqtt version pear_mqtt was tested with (0.12)")
        revoked: frozenset[int] = frozenset()
        context: ssl.SSLContext | None = None
        if self._tls:
            if self._crl_file is not None:
                assert self._ca_file is not None
                revoked = read_crl(self._crl_file, self._ca_file)
            context = self._ssl_context()
        gatekeeper = Gatekeeper(network=self.network, allow_plain=self.allow_plain,
                                policy=self._policy, ssl_context=context, revoked=revoked)
        sources = RetainedSources()
        broker: PearBroker | None = None
        listeners: Listeners | None = None
        try:
            broker = PearBroker(self._amqtt_config(gatekeeper, sources), gatekeeper=gatekeeper,
                                sources=sources)
            await broker.start()
            listeners = Listeners(broker=broker, gatekeeper=gatekeeper)
            port = await listeners.open(name=_PLAIN, host=self.host, port=self._requested_port,
                                        context=None) if self.allow_plain else None
            tls_port = await listeners.open(name=_TLS, host=self.host,
                                            port=self._requested_tls_port,
                                            context=context) if self._tls else None
        except Exception as exc:
            if listeners is not None:
                await listeners.close()
            if broker is not None:
                with contextlib.suppress(Exception):
                    await broker.shutdown()
            cause = _root_cause(exc)
            raise BrokerError(f"embedded broker failed to start on {self.host}: "
                              f"{type(cause).__name__}: {cause}") from exc
        self._running = _Running(broker=broker, listeners=listeners, gatekeeper=gatekeeper,
                                 sources=sources, port=port, tls_port=tls_port)
        log.info("embedded %s broker for network %r listening on %s (TLS %s, plain %s)",
                 self.mode, self.network, self.host, tls_port, port)

    async def stop(self) -> None:
        """Disconnect every client and close the listeners (no-op when not running).

        Retained messages and sessions are discarded: amqtt keeps them in memory only.
        """
        running, self._running = self._running, None
        if running is None:
            return
        running.listeners.stop_listening()
        try:
            await running.broker.shutdown()
        except Exception as exc:
            raise BrokerError(f"embedded broker did not shut down cleanly: {exc}") from exc
        finally:
            await running.listeners.close()

    def reload_crl(self) -> int:
        """Re-read ``crl_file`` (after :func:`pear_mqtt.security.pki.revoke`); return the
        revoked count.

        New connections are checked against it at once. Retained messages published by a
        newly revoked certificate are dropped, so new subscribers no longer get them (the
        retained messages of the member's other nodes stay). Clients already connected stay
        connected until they reconnect, as with mosquitto, but one whose certificate is now
        revoked may no longer publish, subscribe or receive, and its last will is cancelled.

        Raises:
            BrokerError: not running, no CRL configured, or the CRL is unreadable or not
                signed by the CA (the previous CRL stays in force).
        """
        running = self._running
        context = running.gatekeeper.ssl_context if running is not None else None
        if running is None or context is None or self._crl_file is None:
            raise BrokerError("reload_crl needs a running broker with a crl_file")
        assert self._ca_file is not None
        revoked = read_crl(self._crl_file, self._ca_file)
        try:
            # OpenSSL uses the newest CRL of an issuer, so the handshake check follows too;
            # the serial check at CONNECT does not depend on that.
            context.load_verify_locations(cafile=str(self._crl_file))
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(f"cannot load CRL {self._crl_file}: {exc}") from exc
        running.gatekeeper.revoked = revoked
        broker = running.broker
        dropped = running.sources.drop(broker.retained_messages, revoked)
        revoke_sessions((session for session, _ in broker.sessions.values()), revoked)
        log.info("CRL reloaded from %s: %d revoked certificates; %d retained messages of "
                 "theirs dropped", self._crl_file, len(revoked), dropped)
        return len(revoked)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc
