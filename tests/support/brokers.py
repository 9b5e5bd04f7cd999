"""Test harness: a throw-away PKI and real mosquitto processes on free loopback ports.

Used by ``tests/integration/conftest.py`` (fixtures ``pki``, ``mosquitto``,
``mosquitto_factory``, ``unique_id``) and importable by any integration test::

    from brokers import MosquittoBroker, NetworkPKI, MqttProbe

A broker renders its configuration with :func:`pear_mqtt.ops.brokerconf.render`, so the tests
exercise the same mosquitto.conf and ACL an operator deploys. Each broker has two listeners:

- ``port``: plaintext, anonymous, no ACL: for tests that do not care about identity;
- ``tls_port``: mutual TLS with the network CA, CRL, ``use_identity_as_username`` and the
  generated ACL for the private, consortium and public subtrees of ``pki.network``.

Nothing here sleeps to synchronise: start-up polls the log and the port with a deadline, and
:class:`MqttProbe` waits on queues and events with timeouts.

Backends (``PEAR_TEST_BACKEND``): ``process`` (the default) runs mosquitto as a child process;
``container`` runs the same rendered configuration in the broker image through testcontainers
(:mod:`container_backend`: host networking, same ports, same files). :func:`make_broker`
builds a broker of the selected backend; the test bodies do not change.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import os
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from pear_mqtt.config.models import TLSConfig
from pear_mqtt.errors import BrokerError
from pear_mqtt.ops.brokerconf import Mode, render
from pear_mqtt.ops.up.health import listening
from pear_mqtt.security import pki as pkimod
from pear_mqtt.security.pki import CertPaths

#: The test networks' group key "k1" (AES-256, fixed so failures are reproducible).
GROUP_KEY = base64.b64encode(bytes(range(32))).decode()

__all__ = [
    "BACKEND",
    "COMPANIES",
    "MOSQUITTO",
    "MosquittoBroker",
    "MqttProbe",
    "NetworkPKI",
    "Received",
    "backend_problem",
    "build_pki",
    "free_port",
    "make_broker",
    "new_unique_id",
    "probe",
]

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
"""Path of the mosquitto binary, or None when it is not installed."""

BACKEND = os.environ.get("PEAR_TEST_BACKEND", "process").strip().lower() or "process"
"""Where brokers run: ``process`` (local mosquitto) or ``container`` (the broker image)."""

COMPANIES = ("acme", "globex", "initech", "umbrella", "hooli")
"""Members with a ready node certificate (node id ``store-1``) in every :class:`NetworkPKI`."""

DEFAULT_NODE = "store-1"


def new_unique_id(prefix: str = "t") -> str:
    """A fresh identifier that is valid as a topic level, network id or company id."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- PKI ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class NetworkPKI:
    """Certificates for one test network, all minted by :mod:`pear_mqtt.security.pki`.

    ``nodes[c]`` is the ``store-1`` certificate of company ``c`` for every ``c`` in
    :data:`COMPANIES`; :meth:`node` mints more on demand (any member, any node), named as
    given. :meth:`enrolled` mints a store's certificate under the random pseudonyms the CA
    assigns, as in an anonymising consortium (the CA keeps the names). ``expired``,
    ``not_yet_valid`` and ``revoked`` are acme node certificates that the broker must refuse;
    ``foreign`` carries the very same subject (acme / store-1 / network) but comes from
    another CA (``foreign_ca``).
    """

    root: Path
    network: str
    ca_dir: Path
    broker: CertPaths
    bridge: CertPaths
    bridge_user: str
    nodes: dict[str, CertPaths]
    expired: CertPaths
    not_yet_valid: CertPaths
    revoked: CertPaths
    foreign: CertPaths
    foreign_ca: Path
    key_type: pkimod.KeyType
    enrolments: dict[tuple[str, str], tuple[CertPaths, pkimod.Enrolment]] = field(
        default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def ca(self) -> Path:
        """The network CA certificate."""
        return self.ca_dir / pkimod.CA_CERT

    @property
    def crl(self) -> Path:
        """The network CRL (``revoked`` is on it)."""
        return self.ca_dir / pkimod.CA_CRL

    def node(self, member: str, node: str = DEFAULT_NODE) -> CertPaths:
        """The certificate of ``member``'s ``node``, minted on first use (thread-safe).

        New certificates need no broker restart: the broker trusts the CA, not a list.
        """
        key = member if node == DEFAULT_NODE else f"{member}/{node}"
        with self._lock:
            if key not in self.nodes:
                self.nodes[key] = pkimod.issue(
                    ca_dir=self.ca_dir, out_dir=self.root / "nodes", role="node",
                    member=member, node=node, key_type=self.key_type)
            return self.nodes[key]

    def enrolled(self, company: str, store: str = DEFAULT_NODE
                 ) -> tuple[CertPaths, pkimod.Enrolment]:
        """The certificate of ``company``'s ``store`` under the pseudonyms the CA assigns
        (CN = the company's, OU = the store's), and that enrolment; minted on first use."""
        with self._lock:
            if (company, store) not in self.enrolments:
                self.enrolments[(company, store)] = pkimod.enrol(
                    ca_dir=self.ca_dir, out_dir=self.root / "enrolled", company=company,
                    store=store, key_type=self.key_type)
            return self.enrolments[(company, store)]

    def tls(self, paths: CertPaths | str, *, check_hostname: bool = True) -> TLSConfig:
        """A :class:`TLSConfig` for ``paths`` or for member ``paths``'s ``store-1``."""
        certs = self.node(paths) if isinstance(paths, str) else paths
        return TLSConfig(ca_file=certs.ca, cert_file=certs.cert, key_file=certs.key,
                         check_hostname=check_hostname)


def build_pki(root: Path, *, network: str = "testnet",
              key_type: pkimod.KeyType = pkimod.DEFAULT_KEY_TYPE,
              bridge_user: str = "bridge") -> NetworkPKI:
    """Create a CA for ``network`` under ``root`` and every certificate the tests need.

    The CA assigns pseudonyms (:meth:`NetworkPKI.enrolled`) and issues certificates under
    given names (:meth:`NetworkPKI.node`) alike: one test network serves every mode.
    """
    ca_dir = root / "ca"
    pkimod.create_ca(directory=ca_dir, network=network, key_type=key_type, pseudonyms=True)
    out = root / "nodes"
    broker = pkimod.issue(ca_dir=ca_dir, out_dir=root / "broker", role="broker",
                          member="testbroker", hosts=("localhost", "127.0.0.1", "::1"),
                          key_type=key_type)
    bridge = pkimod.issue(ca_dir=ca_dir, out_dir=out, role="bridge", member=bridge_user,
                          key_type=key_type)
    nodes = {c: pkimod.issue(ca_dir=ca_dir, out_dir=out, role="node", member=c,
                             node=DEFAULT_NODE, key_type=key_type) for c in COMPANIES}
    now = dt.datetime.now(dt.UTC)
    expired = pkimod.issue(ca_dir=ca_dir, out_dir=root / "bad", role="node", member="acme",
                           node="store-expired", key_type=key_type,
                           not_before=now - dt.timedelta(days=30),
                           not_after=now - dt.timedelta(days=1))
    future = pkimod.issue(ca_dir=ca_dir, out_dir=root / "bad", role="node", member="acme",
                          node="store-future", key_type=key_type,
                          not_before=now + dt.timedelta(days=1),
                          not_after=now + dt.timedelta(days=30))
    revoked = pkimod.issue(ca_dir=ca_dir, out_dir=root / "bad", role="node", member="acme",
                           node="store-revoked", key_type=key_type)
    pkimod.revoke(ca_dir=ca_dir, cert=revoked.cert)
    foreign_dir = root / "foreign-ca"
    pkimod.create_ca(directory=foreign_dir, network=network, key_type=key_type)
    foreign = pkimod.issue(ca_dir=foreign_dir, out_dir=root / "foreign", role="node",
                           member="acme", node=DEFAULT_NODE, key_type=key_type)
    return NetworkPKI(root=root, network=network, ca_dir=ca_dir, broker=broker, bridge=bridge,
                      bridge_user=bridge_user, nodes=nodes, expired=expired,
                      not_yet_valid=future, revoked=revoked, foreign=foreign,
                      foreign_ca=foreign_dir / pkimod.CA_CERT, key_type=key_type)


# -- broker -------------------------------------------------------------------------------

class MosquittoBroker:
    """One mosquitto process with a plaintext and a mutual-TLS listener on loopback.

    Ports are picked on the first :meth:`start` and kept by :meth:`restart` (and by
    :meth:`start` after :meth:`stop`/:meth:`kill`), as is the persistence directory, so
    clients reconnect to the same address and find what the broker saved.

    ``persistence=False`` (the default) keeps nothing across restarts and costs nothing;
    with ``persistence=True`` mosquitto saves on SIGTERM and every ``autosave_interval``
    seconds, and loses what arrived since the last save on :meth:`kill`.
    """

    host = "127.0.0.1"

    def __init__(self, *, workdir: Path, pki: NetworkPKI | None = None,
                 mode: Mode = "consortium",
                 acl_modes: Sequence[Mode] = ("private", "consortium", "public"),
                 network: str | None = None, bridge_users: Sequence[str] | None = None,
                 persistence: bool = False, autosave_interval: int = 30,
                 plain: bool = True,
                 log_types: Sequence[str] = ("error", "warning", "notice", "information",
                                             "subscribe", "unsubscribe"),
                 max_message_bytes: int = 1024 * 1024, start_timeout: float = 10.0,
                 **render_kwargs: Any) -> None:
        self._check_available()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.mode = mode
        self.acl_modes = tuple(acl_modes)
        self.network = network or (pki.network if pki else "testnet")
        self.bridge_users = tuple(bridge_users if bridge_users is not None
                                  else ((pki.bridge_user,) if pki else ()))
        self.persistence = persistence
        self.autosave_interval = autosave_interval
        self.plain = plain
        self.log_types = tuple(log_types)
        self.max_message_bytes = max_message_bytes
        self.start_timeout = start_timeout
        self.render_kwargs = render_kwargs
        self.persistence_dir = self.workdir / "data"
        self.log_path = self.workdir / "mosquitto.log"
        self.output_path = self.workdir / "mosquitto.out"  # stdout/stderr: pre-log errors
        self.conf_path = self.workdir / "mosquitto.conf"
        self.acl_path = self.workdir / "acl"
        self._port: int | None = None
        self._tls_port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None
        """How long the last :meth:`start` took (process spawn to accepting connections)."""

    # -- addresses --------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The plaintext listener's port."""
        if self._port is None:
            raise BrokerError("broker not started (or started without a plain listener)")
        return self._port

    @property
    def tls_port(self) -> int:
        """The mutual-TLS listener's port."""
        if self._tls_port is None:
            raise BrokerError("broker not started (or started without a PKI)")
        return self._tls_port

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:<port>`` for :class:`pear_mqtt.types.NetworkConfig`."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str:
        """``mqtts://localhost:<tls_port>`` (the broker certificate names localhost and
        127.0.0.1)."""
        return f"mqtts://localhost:{self.tls_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._exit_status() is None

    # -- backend hooks (the container backend overrides these) --------------------------------
    backend = "process"

    def _check_available(self) -> None:
        if MOSQUITTO is None:
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")

    def _exit_status(self) -> int | None:
        """The exit status of the started broker, None while it runs."""
        assert self._proc is not None
        return self._proc.poll()

    def close(self) -> None:
        """Release what the broker holds beyond its process (nothing, for a process)."""

    def log_text(self) -> str:
        """Everything mosquitto logged, across restarts."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def output_text(self) -> str:
        """mosquitto's stdout/stderr: what it printed before its log was open."""
        try:
            return self.output_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _diagnostics(self, log_offset: int, out_offset: int) -> str:
        return (f"config {self.conf_path}\n--- output ---\n"
                f"{self.output_text()[out_offset:]}--- log ---\n"
                f"{self.log_text()[log_offset:]}")

    # -- lifecycle --------------------------------------------------------------------------
    def render(self) -> None:
        """(Re)write the broker's configuration and ACL from its PKI (after a revocation)."""
        if self.pki is None:
            self._render_plain_only()
            return
        render(mode=self.mode, acl_modes=self.acl_modes, network=self.network,
               out_dir=self.workdir, ca_file=self.pki.ca, cert_file=self.pki.broker.cert,
               key_file=self.pki.broker.key, crl_file=self.pki.crl, tls_port=self.tls_port,
               plain_port=self._port, bridge_users=self.bridge_users,
               persistence=self.persistence, persistence_dir=self.persistence_dir,
               bind_address=self.host,
               # Started as root, mosquitto switches user before reading the 0600 key file.
               run_as="root" if os.geteuid() == 0 else None,
               log_file=self.log_path, log_types=self.log_types,
               max_message_bytes=self.max_message_bytes,
               autosave_interval=self.autosave_interval, **self.render_kwargs)

    def _render_plain_only(self) -> None:
        self.persistence_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            "per_listener_settings true",
            "user root" if os.geteuid() == 0 else "",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.persistence_dir}/",
            f"autosave_interval {self.autosave_interval}",
            "max_queued_messages 1000000",
            "max_inflight_messages 0",
            f"max_packet_size {self.max_message_bytes + 64 * 1024}",
            "set_tcp_nodelay true",
            f"log_dest file {self.log_path}",
            *(f"log_type {t}" for t in self.log_types),
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
        ]
        self.conf_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _spawn(self) -> None:
        assert MOSQUITTO is not None
        with self.output_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf_path)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                start_new_session=True)  # a Ctrl-C in pytest must not kill it half-way

    def _wait_ready(self, log_offset: int, out_offset: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        probe_port = self._port if self._port is not None else self._tls_port
        assert probe_port is not None
        delay = 0.001
        while True:
            status = self._exit_status()
            if status is not None:
                raise BrokerError(
                    f"mosquitto exited with status {status} while starting; "
                    + self._diagnostics(log_offset, out_offset))
            # mosquitto logs "running" after every listener is bound; the connect proves it.
            if " running" in self.log_text()[log_offset:] and listening(probe_port, self.host):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(
                    f"mosquitto did not accept connections on {self.host}:{probe_port} within "
                    f"{self.start_timeout}s; " + self._diagnostics(log_offset, out_offset))
            time.sleep(delay)  # poll back-off, not synchronisation
            delay = min(delay * 2, 0.02)

    def start(self) -> MosquittoBroker:
        """Render the configuration and start mosquitto; return once it accepts connections.

        Raises :class:`BrokerError` with the broker log if it exits or does not come up.
        """
        if self.running:
            return self
        first = self._tls_port is None and self._port is None
        attempts = 3 if first else 1
        for attempt in range(attempts):
            if first:
                # Ports are picked by binding port 0 and releasing it; another process may
                # grab one in between, so a first start retries with fresh ports.
                self._port = free_port() if self.plain or self.pki is None else None
                self._tls_port = free_port() if self.pki is not None else None
                while self._tls_port is not None and self._tls_port == self._port:
                    self._tls_port = free_port()  # the kernel may hand the same port out twice
            self.render()
            offsets = len(self.log_text()), len(self.output_text())
            began = time.perf_counter()
            self._spawn()
            try:
                self._wait_ready(*offsets)
            except BrokerError as exc:
                if first and attempt + 1 < attempts and "in use" in str(exc):
                    continue
                raise
            self.start_seconds = time.perf_counter() - began
            return self
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait: mosquitto saves its persistence file on the way out."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGCONT)  # in case it was paused
                self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise BrokerError(f"mosquitto did not stop within {timeout}s; killed") \
                    from None
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: what arrived since the last autosave is lost, like a crash."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            self._proc.wait()
        self._proc = None

    def restart(self, *, kill: bool = False) -> MosquittoBroker:
        """Stop (or kill) and start again on the same ports with the same persistence dir."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the broker holds its sockets but answers nothing (a hung broker)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its configuration (and the ACL file)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGHUP)

    def reload_and_wait(self, timeout: float = 5.0) -> None:
        """SIGHUP, and return once mosquitto has taken the reload in hand.

        mosquitto logs "Reloading config." and then, in the same pass of its single-threaded
        loop, re-reads configuration, CRL and ACL file before it touches another packet: once
        the line is logged, every packet sent afterwards meets the new CRL and ACL. The log
        is a file with no event to wait on: polled (bounded), not the clock.
        """
        before = self.log_text().count("Reloading config.")
        self.reload()
        deadline = time.monotonic() + timeout
        while self.log_text().count("Reloading config.") == before:
            assert time.monotonic() < deadline, "mosquitto did not reload on SIGHUP"
            time.sleep(0.005)  # poll back-off on the log file

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(port={self._port}, tls_port={self._tls_port}, "
                f"pid={self.pid}, workdir={self.workdir})")


def backend_problem() -> str | None:
    """Why brokers of :data:`BACKEND` cannot run here (with the fix), or None if they can."""
    if BACKEND == "process":
        if MOSQUITTO is None:
            return ("mosquitto is not installed: apt-get install mosquitto mosquitto-clients "
                    "(.ci/run does)")
        return None
    if BACKEND == "container":
        from container_backend import engine_problem

        return engine_problem()
    return f"PEAR_TEST_BACKEND={BACKEND!r} is unknown: use process or container"


def make_broker(**kwargs: Any) -> MosquittoBroker:
    """A (not yet started) broker of the selected :data:`BACKEND`; arguments as
    :class:`MosquittoBroker`."""
    if BACKEND == "container":
        from container_backend import ContainerMosquittoBroker

        return ContainerMosquittoBroker(**kwargs)
    return MosquittoBroker(**kwargs)


# -- a small synchronous paho client for tests ---------------------------------------------

@dataclass(frozen=True, slots=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class MqttProbe:
    """A paho-mqtt 2.x client run on paho's network thread, for black-box broker tests.

    Every callback feeds a queue or an event, so tests wait with timeouts instead of sleeping.
    ``connect()`` returns the CONNACK reason code, or raises the socket / TLS error.
    """

    def __init__(self, *, host: str, port: int, certs: CertPaths | None = None,
                 ca: Path | None = None, client_id: str | None = None,
                 protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
                 server_hostname_check: bool = True) -> None:
        self.host, self.port = host, port
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=client_id or new_unique_id("probe-"),
                                  protocol=protocol,
                                  # A refused connection must end the network thread, not
                                  # retry after a one-second back-off.
                                  reconnect_on_failure=False)
        if certs is not None or ca is not None:
            ctx = ssl.create_default_context(
                cafile=str(ca if ca is not None else certs.ca if certs else None))
            ctx.check_hostname = server_hostname_check
            if certs is not None:
                ctx.load_cert_chain(str(certs.cert), str(certs.key))
            self.client.tls_set_context(ctx)
        self.messages: queue.Queue[Received] = queue.Queue()
        self._connected = threading.Event()
        self._disconnected = threading.Event()
        self._connack: ReasonCode | None = None
        self._acks: dict[int, threading.Event] = {}
        self._ack_codes: dict[int, ReasonCode] = {}
        self._subacks: dict[int, tuple[threading.Event, list[ReasonCode]]] = {}
        self._lock = threading.Lock()
        c = self.client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe

    # paho callbacks (network thread)
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode,
                    props: Any) -> None:
        self._connack = rc
        self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode,
                       props: Any) -> None:
        self._disconnected.set()
        self._connected.set()  # wake a connect() waiting on a broker that hung up

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: ReasonCode,
                    props: Any) -> None:
        with self._lock:
            self._ack_codes[mid] = rc
            self._acks.setdefault(mid, threading.Event()).set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      rcs: list[ReasonCode], props: Any) -> None:
        with self._lock:
            ev, codes = self._subacks.setdefault(mid, (threading.Event(), []))
        codes.extend(rcs)
        ev.set()

    # API
    def connect(self, timeout: float = 5.0) -> ReasonCode:
        """Connect and wait for CONNACK; raises OSError/ssl.SSLError, ConnectionError (closed
        before CONNACK) or TimeoutError."""
        self.client.connect(self.host, self.port, keepalive=30)
        # paho's own thread: publish() from the test thread then only queues, never writes
        # to the TLS socket concurrently with the network thread.
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise TimeoutError(f"no CONNACK from {self.host}:{self.port} within {timeout}s")
        if self._connack is None:
            self.close()
            raise ConnectionError("the broker closed the connection before CONNACK")
        return self._connack

    @property
    def is_connected(self) -> bool:
        return self.client.is_connected()

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> list[ReasonCode]:
        """Subscribe and wait for SUBACK; returns the granted reason codes."""
        with self._lock:
            result, mid = self.client.subscribe(topic, qos)
            if result != mqtt.MQTT_ERR_SUCCESS:
                raise ConnectionError(f"subscribe failed: {mqtt.error_string(result)}")
            assert mid is not None
            ev, codes = self._subacks.setdefault(mid, (threading.Event(), []))
        if not ev.wait(timeout):
            raise TimeoutError(f"no SUBACK for {topic!r} within {timeout}s")
        return codes

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False,
                timeout: float = 5.0) -> ReasonCode | None:
        """Publish; for QoS 1 wait for the PUBACK and return its reason code (MQTT 5: "Not
        authorized" when the ACL denied the message)."""
        with self._lock:
            info = self.client.publish(topic, payload, qos=qos, retain=retain)
            ev = self._acks.setdefault(info.mid, threading.Event())
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"publish failed: {mqtt.error_string(info.rc)}")
        if qos == 0:
            return None
        if not ev.wait(timeout):
            raise TimeoutError(f"no PUBACK for {topic!r} within {timeout}s")
        with self._lock:
            return self._ack_codes.pop(info.mid, None)

    def expect(self, match: Callable[[Received], bool] | str, timeout: float = 5.0
               ) -> tuple[Received, list[Received]]:
        """Wait for the first message that ``match``es (a predicate or an exact topic).

        Returns it and every other message received before it, in order.
        """
        pred = match if callable(match) else (lambda m: m.topic == match)
        before: list[Received] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching message within {timeout}s; got "
                                   f"{[m.topic for m in before]}")
            try:
                msg = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            if pred(msg):
                return msg, before
            before.append(msg)

    def wait_disconnected(self, timeout: float = 5.0) -> bool:
        """True once the broker dropped (or we closed) the connection."""
        return self._disconnected.wait(timeout)

    def close(self) -> None:
        """Disconnect (sending DISCONNECT if connected) and stop the network thread."""
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:  # refused or dropped: paho leaves the socket to us
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> MqttProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def probe(broker: MosquittoBroker, certs: CertPaths | None = None, *,
          tls: bool | None = None, subscribe: Sequence[str] = (),
          ca: Path | None = None) -> Iterator[MqttProbe]:
    """A connected :class:`MqttProbe` on ``broker`` (TLS if ``certs`` or ``tls``)."""
    use_tls = tls if tls is not None else certs is not None
    p = MqttProbe(host="localhost" if use_tls else broker.host,
                  port=broker.tls_port if use_tls else broker.port, certs=certs,
                  ca=ca if ca is not None else (broker.pki.ca if use_tls and broker.pki
                                                else None))
    try:
        rc = p.connect()
        if rc.is_failure:
            raise ConnectionError(f"CONNACK refused: {rc}")
        for topic in subscribe:
            p.subscribe(topic)
        yield p
    finally:
        p.close()
