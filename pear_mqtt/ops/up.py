"""``pear-mqtt up``: run the whole pear_mqtt topology on this machine, and watch or stop it.

One command gives a newcomer (``make up``) or an operator trying the system a working set of
networks, each with its own CA and broker, all on loopback::

    private     network "acme-private"  company acme, stores store-1 and store-2
    consortium  network "retail-eu"     acme, globex, initech, umbrella, hooli, wayne
    public      network "market"        the bridge identity, participants' certificates

Sub-commands (state lives in ``--dir``, default ``.pear`` in the current directory):

- ``start``: create the PKI (kept across runs), render the broker configurations, start the
  brokers detached, write a node configuration per simulated store and start the agents if
  :mod:`pear_mqtt.agent` is available, wait until every broker completes a mutual-TLS MQTT
  handshake with a node certificate and every agent reports healthy, then print the endpoints
  and write ``up.json``. Already up and healthy: says so, exits 0.
- ``status``: a table; exit 0 only when everything is alive and every broker admits a node.
- ``logs``: the tail of every log (``--follow`` to keep printing).
- ``stop``: SIGTERM, then SIGKILL after a grace period, everything ``start`` recorded; checks
  that no process and no listener is left on the recorded ports. Exit 0 when already down.

Backends (printed by ``start``; ``--backend`` or ``PEAR_BACKEND=local|embedded|docker``):

- ``docker``: ``deploy/compose.yaml`` through Docker Compose (v2 or Debian's 1.29), in the
  images ``deploy/images/build.sh`` builds offline: the same rendered configurations, the
  state directory mounted at its own path, host networking, every listener on 127.0.0.1.
  ``status`` reads the containers' state, ``logs`` is ``compose logs``, ``stop`` is
  ``compose down``. See :mod:`pear_mqtt.compose` and ``deploy/CONTAINERS.md``.
- ``local``: one ``mosquitto`` process per network, configured by :mod:`pear_mqtt.brokerconf`.
- ``embedded``: one ``pear-mqtt embedded`` (amqtt) process per network, for machines without
  mosquitto: the same identity and ACL rules, no persistence.

Layout of the state directory::

    up.json                 endpoints, certificate paths per node, backend, pids
    secrets.json            per-network pseudonym secrets and group keys (0600)
    pki/<network>/ca/       the network CA (ca.key stays here)
    pki/<network>/{broker,nodes,bridge,aggregator}/
    brokers/<mode>/         mosquitto.conf, acl, data/ (local and docker backends),
                            health.json (docker: what the container health check probes)
    compose.env             docker backend: the variables deploy/compose.yaml reads
    nodes/<agent>.toml      node configuration of each simulated store
    run/<agent>.status.json agent status files;  outbox/<agent>.db  agent outboxes
    logs/*.log              one log per broker and agent

In the networks that anonymise (consortium, public) a node certificate's CN is the company's
keyed pseudonym, not its name (see :mod:`pear_mqtt.identity`): the broker, the topics and the
other members only ever see the pseudonym.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import errno
import fcntl
import functools
import importlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, get_args

from cryptography import x509

from ..config.manager import NetworkConfigManager
from ..errors import BrokerError, ConfigError
from ..files import atomic_write
from ..privacy.pseudonyms import Pseudonymizer
from ..security import pki as pkimod
from .brokerconf import Mode, render
from .compose import Compose, docker_problem, engine_reachable

__all__ = [
    "DEFAULT_DIR",
    "DEFAULT_PORTS",
    "TOPOLOGY",
    "Backend",
    "NetworkSpec",
    "UpState",
    "choose_backend",
    "probe_broker",
    "register_cli",
    "start",
    "status",
    "stop",
]

Backend = Literal["local", "embedded", "docker"]

DEFAULT_DIR: Final = Path(".pear")
DEFAULT_PORTS: Final = (18883, 18884, 18885)
"""TLS ports of the private, consortium and public brokers (``--ports`` / ``PEAR_UP_PORTS``)."""

HOST: Final = "127.0.0.1"
STATE_FILE: Final = "up.json"
BRIDGE_USER: Final = "bridge"
BRIDGE_LINE: Final = "bridge: retail-eu -> market, k-anonymous aggregates (docs/BRIDGE.md)"
# The simulated stores report the last week, so the demo bridge publishes daily windows one
# day after they end; a real deployment keeps pear_mqtt.bridge's 90-day default lag.
_BRIDGE_WINDOW = 86400
_BRIDGE_LAG = 86400
_BRIDGE_SETTLE = 20.0

_STATE_VERSION = 1
_BROKER_HOSTS = ("localhost", "127.0.0.1", "::1")
_RENEW_BEFORE = dt.timedelta(days=30)  # re-issue certificates / re-sign CRLs this close to expiry
_PROBE_TIMEOUT = 2.0
_STOP_GRACE = 10.0
_TAIL_LINES = 20
# How often agents rewrite their status file, and when an unchanged file counts as stale
# (a hung agent would otherwise report its last "ok" forever).
_AGENT_STATUS_INTERVAL = 2.0
_AGENT_STATUS_STALE = 15.0
# An agent told to stop keeps delivering its outbox this long; shorter than `stop`'s grace
# so a healthy agent always exits on its own before SIGKILL.
_AGENT_DRAIN = 5.0
_FAILED_START_GRACE = 3.0


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    """One network of the local topology: its broker, CA, members and simulated stores."""

    mode: Mode
    network: str
    companies: tuple[str, ...]
    stores: tuple[str, ...]
    agents: bool  # start a simulated agent per (company, store)
    bridge: bool  # issue a bridge identity and grant it the bridge's ACL rights
    anonymise: bool  # certificate CNs are keyed pseudonyms of the companies


_CONSORTIUM = ("acme", "globex", "initech", "umbrella", "hooli", "wayne")

TOPOLOGY: Final = (
    NetworkSpec(mode="private", network="acme-private", companies=("acme",),
                stores=("store-1", "store-2"), agents=True, bridge=False, anonymise=False),
    # Six companies: one more than the default k (privacy.min_companies = 5), so aggregates
    # pass the threshold even while one member is offline.
    NetworkSpec(mode="consortium", network="retail-eu", companies=_CONSORTIUM,
                stores=("store-1",), agents=True, bridge=True, anonymise=True),
    # Public participants get certificates to try things with; they publish nothing useful
    # until the bridge aggregates, so no agents run there yet.
    NetworkSpec(mode="public", network="market", companies=_CONSORTIUM,
                stores=("store-1",), agents=False, bridge=True, anonymise=True),
)


# -- state file -----------------------------------------------------------------------------

@dataclass(slots=True)
class Proc:
    """A process ``start`` launched: its pid, and what tells it apart from a recycled pid."""

    pid: int | None
    start_ticks: int | None
    argv: list[str]
    log: str
    log_offset: int = 0  # size of the log when this process started: its own output follows
    # docker backend: the Compose service running it; pid is then the container's main
    # process as the host sees it, refreshed from the engine (a restart changes it).
    container: str | None = None


@dataclass(slots=True)
class BrokerEntry:
    """One broker: where it listens and the CA material clients need."""

    name: str
    mode: str
    network: str
    host: str
    port: int
    url: str
    ca_dir: str
    ca: str
    crl: str
    cert: str
    key: str
    conf: str | None
    probe_node: str
    proc: Proc


@dataclass(slots=True)
class NodeEntry:
    """A node certificate (and, for agent stores, its configuration file)."""

    name: str
    mode: str
    network: str
    company: str
    member: str
    node: str
    broker: str
    url: str
    ca: str
    cert: str
    key: str
    config: str | None


@dataclass(slots=True)
class AgentEntry:
    """A simulated store agent."""

    name: str
    node: str
    config: str
    status_file: str
    proc: Proc


@dataclass(slots=True)
class UpState:
    """The content of ``up.json``."""

    version: int
    state: str  # "up", "stopped" or "failed"
    backend: str
    dir: str
    started_at: str | None = None
    stopped_at: str | None = None
    startup_seconds: float | None = None
    brokers: list[BrokerEntry] = field(default_factory=list)
    nodes: list[NodeEntry] = field(default_factory=list)
    agents: list[AgentEntry] = field(default_factory=list)
    agents_note: str = ""
    bridge: dict[str, Any] = field(default_factory=dict)
    compose: dict[str, Any] = field(default_factory=dict)  # docker backend: Compose.to_json()
    bridges: list[AgentEntry] = field(default_factory=list)  # the public bridge process

    def processes(self) -> list[tuple[str, Proc]]:
        """Every recorded process, agents first, then the bridge (both are stopped before
        the brokers)."""
        return ([(f"agent {a.name}", a.proc) for a in self.agents]
                + [(f"bridge {b.name}", b.proc) for b in self.bridges]
                + [(f"broker {b.name}", b.proc) for b in self.brokers])

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UpState:
        def proc(d: dict[str, Any]) -> Proc:
            return Proc(**d)

        return cls(
            version=data["version"], state=data["state"], backend=data["backend"],
            dir=data["dir"], started_at=data.get("started_at"),
            stopped_at=data.get("stopped_at"), startup_seconds=data.get("startup_seconds"),
            brokers=[BrokerEntry(**{**b, "proc": proc(b["proc"])}) for b in data["brokers"]],
            nodes=[NodeEntry(**n) for n in data["nodes"]],
            agents=[AgentEntry(**{**a, "proc": proc(a["proc"])}) for a in data["agents"]],
            agents_note=data.get("agents_note", ""), bridge=dict(data.get("bridge", {})),
            compose=dict(data.get("compose", {})),
            bridges=[AgentEntry(**{**a, "proc": proc(a["proc"])})
                     for a in data.get("bridges", [])])


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()




def load_state(directory: Path) -> UpState | None:
    """The recorded topology in ``directory``, or None when ``start`` never wrote one."""
    path = directory / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the topology state: {exc}") from None
    try:
        if data.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown version {data.get('version')!r}")
        return UpState.from_json(data)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path} is not a pear-mqtt up state file ({exc}); remove it after "
                          "making sure nothing it started still runs") from None


def _save_state(directory: Path, state: UpState) -> None:
    atomic_write(directory / STATE_FILE, json.dumps(state.to_json(), indent=2) + "\n")


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    # Two `make up` in one directory would otherwise both spawn brokers on the same ports.
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BrokerError(f"another `pear-mqtt up` is working on {directory}; wait for it "
                              "to finish") from None
        yield
    finally:
        os.close(fd)


# -- processes ------------------------------------------------------------------------------

def _start_ticks(pid: int) -> int | None:
    """The process start time (clock ticks since boot) from /proc, or None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; fields after it do not.
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return int(fields[19])  # field 22 overall
    except (IndexError, ValueError):
        return None


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split(" ", 1)[0]


def alive(proc: Proc) -> bool:
    """Whether the recorded process still runs (and is the same process, not a reused pid)."""
    pid = proc.pid
    if pid is None:
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        # Our own child (when start and status run in one interpreter) is a zombie until
        # reaped; reaping it here makes it count as gone.
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else: the ticks check below decides
    if _proc_state(pid) in ("Z", "X"):
        return False
    ticks = _start_ticks(pid)
    return proc.start_ticks is None or ticks is None or ticks == proc.start_ticks


def _signal(proc: Proc, sig: signal.Signals) -> None:
    if proc.pid is None or not alive(proc):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        # `start` made each process the leader of its own session, so its group holds it and
        # anything it forked, and nothing else.
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)


def _package_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Children run `python -m pear_mqtt.cli`: make it this very pear_mqtt, installed or not.
    root = str(_package_root())
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _spawn(argv: Sequence[str], *, log: Path, cwd: Path) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        offset = out.tell()
        out.write(f"--- {_now_iso()} pear-mqtt up: {' '.join(argv)}\n".encode())
        out.flush()
        try:
            child = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=cwd, env=_child_env(),
                # Detached: outlives this command, and a Ctrl-C in the terminal that ran
                # `make up` does not reach it.
                start_new_session=True)
        except OSError as exc:
            raise BrokerError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    _CHILDREN.append(child)
    return Proc(pid=child.pid, start_ticks=_start_ticks(child.pid), argv=list(argv),
                log=str(log), log_offset=offset)


# Popen objects of the detached children, kept referenced so the interpreter neither warns
# about them nor reaps them behind `alive`'s back while this command runs.
_CHILDREN: list[subprocess.Popen[bytes]] = []


def _tail(path: Path | str, lines: int = _TAIL_LINES, *, since: int = 0) -> str:
    """The last ``lines`` lines of the log at ``path``, ignoring the first ``since`` bytes."""
    try:
        with Path(path).open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(since if since <= size else 0, size - 64 * 1024))
            data = fh.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(no log: {exc.strerror or exc})\n"
    text = "\n".join(data.splitlines()[-lines:])
    return text + "\n" if text else "(empty)\n"


# -- ports and probes ------------------------------------------------------------------------

def port_free(port: int, host: str = HOST) -> bool:
    """Whether nothing listens on ``host:port`` (a bind with SO_REUSEADDR succeeds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: connections in TIME_WAIT from the last run must not count as a
        # listener; on Linux only a LISTEN socket then makes the bind fail.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _mqtt_connect_packet(client_id: str, keepalive: int = 10) -> bytes:
    cid = client_id.encode()
    # MQTT 3.1.1 CONNECT, clean session: the smallest thing both mosquitto and amqtt accept.
    body = (b"\x00\x04MQTT\x04\x02" + keepalive.to_bytes(2, "big")
            + len(cid).to_bytes(2, "big") + cid)
    assert len(body) < 128  # one-byte remaining length
    return bytes([0x10, len(body)]) + body


def _recv_exact(sock: ssl.SSLSocket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("the broker closed the connection before CONNACK "
                                  "(certificate refused?)")
        data += chunk
    return data


_CONNACK_CODES = {1: "unacceptable protocol version", 2: "client id rejected",
                  3: "server unavailable", 4: "bad user name or password",
                  5: "not authorised"}


def probe_broker(*, host: str, port: int, ca: Path | str, cert: Path | str, key: Path | str,
                 timeout: float = _PROBE_TIMEOUT) -> float:
    """Connect with a node certificate over mutual TLS and complete an MQTT CONNECT.

    Returns the round trip in milliseconds. Raises ``OSError`` (refused, TLS failure,
    timeout) or ``ConnectionError`` (closed or refused at CONNACK) with the reason.
    A TLS handshake alone is not enough: with TLS 1.3 the broker judges the client
    certificate after the handshake, so only a CONNACK proves the node was admitted.
    """
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    began = time.perf_counter()
    client_id = f"pear-up-{secrets.token_hex(6)}"
    with socket.create_connection((host, port), timeout=timeout) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(_mqtt_connect_packet(client_id))
        connack = _recv_exact(tls, 4)
        if connack[0] != 0x20 or connack[1] != 2:
            raise ConnectionError(f"unexpected reply to CONNECT: {connack.hex()}")
        if connack[3] != 0:
            why = _CONNACK_CODES.get(connack[3], f"code {connack[3]}")
            raise ConnectionError(f"CONNACK refused: {why}")
        with contextlib.suppress(OSError):
            tls.sendall(b"\xe0\x00")  # DISCONNECT: no will, no "unexpected disconnect" log
    return (time.perf_counter() - began) * 1000


def _probe_broker_entry(broker: BrokerEntry, nodes: Sequence[NodeEntry]) -> tuple[bool, str]:
    node = next((n for n in nodes if n.name == broker.probe_node), None)
    if node is None:
        return False, f"probe node {broker.probe_node!r} missing from {STATE_FILE}"
    try:
        ms = probe_broker(host=broker.host, port=broker.port, ca=node.ca, cert=node.cert,
                          key=node.key)
    except (OSError, ConnectionError, ssl.SSLError) as exc:
        return False, f"{broker.url}: {type(exc).__name__}: {exc}"
    return True, f"{broker.url} admits {node.member}/{node.node} ({ms:.0f} ms)"


# -- agents ---------------------------------------------------------------------------------

def agents_available() -> tuple[bool, str]:
    """Whether :mod:`pear_mqtt.agent` can run, and the line ``start`` prints about it."""
    try:
        module = importlib.import_module("pear_mqtt.cli.agent")
    except ModuleNotFoundError as exc:
        if exc.name == "pear_mqtt.cli.agent":
            return False, "agents: not built yet (pear_mqtt.agent is missing); brokers only"
        return False, f"agents: pear_mqtt.agent cannot be imported ({exc}); brokers only"
    except Exception as exc:  # a half-written module must not take the brokers down
        return False, (f"agents: pear_mqtt.agent cannot be imported ({type(exc).__name__}: "
                       f"{exc}); brokers only")
    if getattr(module, "register_cli", None) is None:
        return False, "agents: pear_mqtt.agent has no command line yet; brokers only"
    return True, "agents: simulated stores"


def agent_health(status_file: Path | str) -> tuple[bool, str]:
    """Read an agent's status file: (healthy, what it says).

    The file is JSON: a :class:`pear_mqtt.types.NetworkStatus` dump, optionally nested under
    ``"status"``. Healthy means ``health == "ok"``, or ``connected`` when it reports no health,
    and the file was rewritten within the last ``_AGENT_STATUS_STALE`` seconds.
    """
    path = Path(status_file)
    try:
        age = time.time() - path.stat().st_mtime
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False, "no status file yet"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return False, f"status file unreadable ({exc})"
    if isinstance(data, dict) and isinstance(data.get("status"), dict):
        data = data["status"]
    if not isinstance(data, dict):
        return False, "status file holds no JSON object"
    health, connected = data.get("health"), data.get("connected")
    detail = ", ".join(f"{k} {data[k]}" for k in ("health", "connected", "messages_out",
                                                 "outbox_depth") if k in data)
    if age > _AGENT_STATUS_STALE:
        return False, f"status file not updated for {age:.0f}s ({detail})"
    if health is not None:
        return str(health).lower() in ("ok", "healthy"), detail or f"health {health}"
    return connected is True, detail or "no health reported"


# -- PKI and configuration ------------------------------------------------------------------

def _cert_current(path: Path) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    return cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + _RENEW_BEFORE


def _ensure_cert(*, ca_dir: Path, out_dir: Path, role: pkimod.Role, member: str,
                 node: str | None = None) -> pkimod.CertPaths:
    """The certificate of (role, member, node): reused while valid, issued otherwise."""
    stem = f"{role}-{member}" if role != "node" else f"node-{member}-{node}"
    paths = pkimod.CertPaths(cert=out_dir / f"{stem}.crt", key=out_dir / f"{stem}.key",
                             ca=out_dir / pkimod.CA_CERT)
    if paths.key.is_file() and paths.ca.is_file() and _cert_current(paths.cert):
        return paths
    return pkimod.issue(ca_dir=ca_dir, out_dir=out_dir, role=role, member=member, node=node,
                        hosts=_BROKER_HOSTS, force=True)


def _ensure_ca(ca_dir: Path, network: str) -> None:
    if not (ca_dir / pkimod.CA_CERT).is_file():
        pkimod.create_ca(directory=ca_dir, network=network)
        return
    try:
        crl = x509.load_pem_x509_crl((ca_dir / pkimod.CA_CRL).read_bytes())
        fresh = crl.next_update_utc is not None and \
            crl.next_update_utc > dt.datetime.now(dt.UTC) + _RENEW_BEFORE
    except (OSError, ValueError):
        fresh = False
    if not fresh:
        # Past nextUpdate OpenSSL refuses every client, so a topology left alone for a year
        # would come up locked.
        pkimod.refresh_crl(ca_dir=ca_dir)


def _network_secrets(directory: Path) -> dict[str, dict[str, str]]:
    """Pseudonym secret and group key per network, made once and kept (0600)."""
    path = directory / "secrets.json"
    try:
        data: dict[str, dict[str, str]] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        data = {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read network secrets ({exc})") from None
    changed = False
    for spec in TOPOLOGY:
        entry = data.setdefault(spec.network, {})
        if "pseudonym_secret" not in entry:
            entry["pseudonym_secret"] = secrets.token_urlsafe(32)
            changed = True
        if "group_key" not in entry:
            entry["group_key"] = base64.b64encode(secrets.token_bytes(32)).decode()
            changed = True
    if changed:
        atomic_write(path, json.dumps(data, indent=2) + "\n", mode=0o600)
    return data


def _aggregator_key(directory: Path) -> Path:
    """The X25519 public key nodes seal ``aggregated`` groups to (the bridge holds the
    private half)."""
    from ..security.seal import (
        generate_x25519_key,
        save_x25519_private_key,
        save_x25519_public_key,
    )

    pub = directory / "aggregator.pub.pem"
    priv = directory / "aggregator.key"
    if pub.is_file() and priv.is_file():
        return pub
    directory.mkdir(parents=True, exist_ok=True)
    key = generate_x25519_key()
    save_x25519_private_key(key, priv, overwrite=True)
    save_x25519_public_key(key.public_key(), pub, overwrite=True)
    return pub


@dataclass(slots=True)
class _Plan:
    """Everything ``start`` prepared before launching a process."""

    brokers: list[BrokerEntry]
    nodes: list[NodeEntry]
    agent_nodes: list[NodeEntry]
    bridge: dict[str, Any]


def _prepare(directory: Path, ports: Sequence[int], backend: Backend) -> _Plan:
    """Create or reuse the PKI, render broker configurations and write node configs.

    Node configurations are written even when no agent will run: they are what a developer
    points their own code (or a later ``pear-mqtt agent``) at.
    """
    pki_root = directory / "pki"
    net_secrets = _network_secrets(directory)
    brokers: list[BrokerEntry] = []
    nodes: list[NodeEntry] = []
    agent_nodes: list[NodeEntry] = []  # nodes a simulated agent runs for
    bridge: dict[str, Any] = {"status": BRIDGE_LINE.split(": ", 1)[1], "user": BRIDGE_USER,
                              "identities": {}}
    for spec, port in zip(TOPOLOGY, ports, strict=True):
        root = pki_root / spec.network
        ca_dir = root / "ca"
        _ensure_ca(ca_dir, spec.network)
        url = f"mqtts://{HOST}:{port}"
        broker_certs = _ensure_cert(ca_dir=ca_dir, out_dir=root / "broker", role="broker",
                                    member=f"{spec.network}-broker")
        sec = net_secrets[spec.network]
        pseudo = Pseudonymizer(secret=sec["pseudonym_secret"], network_id=spec.network)
        aggregator = _aggregator_key(root / "aggregator") if spec.anonymise else None
        if spec.bridge:
            b = _ensure_cert(ca_dir=ca_dir, out_dir=root / "bridge", role="bridge",
                             member=BRIDGE_USER)
            bridge["identities"][spec.network] = {
                "broker": spec.mode, "url": url, "ca": str(b.ca), "cert": str(b.cert),
                "key": str(b.key),
                "aggregator_key": str(root / "aggregator" / "aggregator.key")
                if aggregator else None}
        for company in spec.companies:
            member = pseudo.pseudonym("company", company) if spec.anonymise else company
            for store in spec.stores:
                certs = _ensure_cert(ca_dir=ca_dir, out_dir=root / "nodes", role="node",
                                     member=member, node=store)
                name = f"{spec.mode}-{company}-{store}"
                config_path: Path | None = None
                if spec.agents:
                    config_path = directory / "nodes" / f"{name}.toml"
                    _write_node_config(path=config_path, spec=spec, company=company,
                                       store=store, url=url, certs=certs,
                                       outbox=directory / "outbox" / f"{name}.db",
                                       secret=sec, aggregator=aggregator)
                entry = NodeEntry(name=name, mode=spec.mode, network=spec.network,
                                  company=company, member=member, node=store,
                                  broker=spec.mode, url=url, ca=str(certs.ca),
                                  cert=str(certs.cert), key=str(certs.key),
                                  config=str(config_path) if config_path else None)
                nodes.append(entry)
                if config_path is not None:
                    agent_nodes.append(entry)
        probe = next(n for n in nodes if n.network == spec.network)
        conf: Path | None = None
        log = directory / "logs" / f"broker-{spec.mode}.log"
        if backend in ("local", "docker"):
            out_dir = directory / "brokers" / spec.mode
            conf = render(
                mode=spec.mode, network=spec.network, out_dir=out_dir,
                ca_file=ca_dir / pkimod.CA_CERT, cert_file=broker_certs.cert,
                key_file=broker_certs.key, crl_file=ca_dir / pkimod.CA_CRL, tls_port=port,
                # The CA registry names revoked nodes: their retained messages are denied.
                ca_dir=ca_dir,
                bridge_users=(BRIDGE_USER,) if spec.bridge else (), bind_address=HOST,
                # As the test harness does: started as root, mosquitto would switch to the
                # `mosquitto` user before reading the 0600 key it cannot read as that user.
                # (Containers run as the invoking user, so the same holds there.)
                run_as="root" if os.geteuid() == 0 else None,
                # A container logs to stderr: `docker logs` / `compose logs` collect it.
                log_file=log if backend == "local" else None).conf_path
            if backend == "docker":
                # The container's health check makes the same mutual-TLS CONNECT as `status`.
                atomic_write(out_dir / "health.json", json.dumps(
                    {"host": HOST, "port": port, "ca": probe.ca, "cert": probe.cert,
                     "key": probe.key}, indent=2) + "\n")
                log = Path(f"docker:broker-{spec.mode}")
        brokers.append(BrokerEntry(
            name=spec.mode, mode=spec.mode, network=spec.network, host=HOST, port=port,
            url=url, ca_dir=str(ca_dir), ca=str(ca_dir / pkimod.CA_CERT),
            crl=str(ca_dir / pkimod.CA_CRL), cert=str(broker_certs.cert),
            key=str(broker_certs.key), conf=str(conf) if conf else None,
            probe_node=probe.name, proc=Proc(pid=None, start_ticks=None, argv=[],
                                             log=str(log))))
    config = _write_bridge_config(directory, bridge, net_secrets)
    if config is not None:
        bridge["config"] = str(config)
    return _Plan(brokers=brokers, nodes=nodes, agent_nodes=agent_nodes, bridge=bridge)


def _write_bridge_config(directory: Path, bridge: dict[str, Any],
                         net_secrets: dict[str, dict[str, str]]) -> Path | None:
    """``bridge/bridge.toml``: the consortium's insights in, the public network's aggregates
    out, with the identities ``_prepare`` issued (None when pear_mqtt.bridge is missing)."""
    try:
        from ..bridge.config import BridgeConfig, BridgeConfigManager
    except Exception:  # a half-written bridge must not take the brokers down
        return None
    ids = bridge["identities"]
    consortium = next(s for s in TOPOLOGY if s.mode == "consortium" and s.bridge)
    public = next(s for s in TOPOLOGY if s.mode == "public" and s.bridge)
    c, p = ids[consortium.network], ids[public.network]
    config = BridgeConfig.model_validate({
        "consortium": {"network_id": consortium.network, "broker_url": c["url"],
                       "tls": {"ca_file": c["ca"], "cert_file": c["cert"], "key_file": c["key"]},
                       "aggregator_key_file": c["aggregator_key"],
                       "encryption": {"keys": {
                           "k1": net_secrets[consortium.network]["group_key"]}}},
        "public": {"network_id": public.network, "broker_url": p["url"],
                   "tls": {"ca_file": p["ca"], "cert_file": p["cert"], "key_file": p["key"]},
                   "aggregator_key_file": p["aggregator_key"]},
        "window_seconds": _BRIDGE_WINDOW, "publication_lag_seconds": _BRIDGE_LAG,
        "settle_seconds": _BRIDGE_SETTLE,
        "state_path": str(directory / "bridge" / "state.sqlite")})
    path = directory / "bridge" / "bridge.toml"
    BridgeConfigManager.save(config, path, include_secrets=True)  # holds the group key: 0600
    return path


def _bridge_argv(config: str, status_file: Path) -> list[str]:
    return [sys.executable, "-m", "pear_mqtt.cli", "bridge", "--config", config,
            "--status-file", str(status_file), "--status-interval", "2"]


def _write_node_config(*, path: Path, spec: NetworkSpec, company: str, store: str, url: str,
                       certs: pkimod.CertPaths, outbox: Path, secret: dict[str, str],
                       aggregator: Path | None) -> None:
    overrides: dict[str, Any] = {
        "network_id": spec.network, "node_id": store, "broker_url": url,
        "tls": {"ca_file": certs.ca.resolve(), "cert_file": certs.cert.resolve(),
                "key_file": certs.key.resolve()},
        "reliability": {"outbox_path": outbox.resolve()},
    }
    if spec.anonymise:
        overrides["privacy"] = {"pseudonym_secret": secret["pseudonym_secret"],
                                "aggregator_key_file": aggregator.resolve() if aggregator
                                else None}
        overrides["encryption"] = {"keys": {"k1": secret["group_key"]}, "active": "k1"}
    config = NetworkConfigManager.default_config(spec.mode, company_id=company, **overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    outbox.parent.mkdir(parents=True, exist_ok=True)
    # The pseudonym secret and group key belong in the file: the agent runs from it alone.
    NetworkConfigManager.save(config, path, include_secrets=True)


# -- backends -------------------------------------------------------------------------------

def _mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def choose_backend(requested: str | None = None) -> tuple[Backend, list[str]]:
    """The backend to use and the lines explaining the choice.

    ``requested`` (``--backend``) wins over ``PEAR_BACKEND``; ``auto`` or neither picks
    docker if an engine answers and the images and Compose are there, else local mosquitto,
    else the embedded amqtt broker.
    """
    choice = (requested or os.environ.get("PEAR_BACKEND") or "auto").strip().lower()
    if choice not in ("auto", *get_args(Backend)):
        raise ConfigError(f"backend {choice!r} is unknown; use local, embedded, docker or "
                          "auto (--backend / PEAR_BACKEND)")
    mosquitto = _mosquitto()
    if choice == "docker":
        problem = docker_problem()
        if problem is not None:
            raise BrokerError(f"docker backend: {problem}; or use PEAR_BACKEND=local "
                              "(mosquitto) or PEAR_BACKEND=embedded")
        return "docker", ["backend: docker (deploy/compose.yaml, host network)"]
    if choice == "local":
        if mosquitto is None:
            raise BrokerError("local backend needs mosquitto (apt-get install mosquitto), or "
                              "use PEAR_BACKEND=embedded")
        return "local", [f"backend: local (mosquitto {mosquitto})"]
    if choice == "embedded":
        return "embedded", ["backend: embedded (amqtt, `pear-mqtt embedded` processes)"]
    notes: list[str] = []
    if engine_reachable():
        problem = docker_problem()
        if problem is None:
            return "docker", ["backend: docker (deploy/compose.yaml, host network; a Docker "
                              "engine answers)"]
        notes.append(f"docker backend not usable ({problem}); using "
                     f"{'local' if mosquitto else 'embedded'}")
    if mosquitto is not None:
        return "local", [*notes, f"backend: local (mosquitto {mosquitto})"]
    return "embedded", [*notes, "backend: embedded (mosquitto not found; amqtt "
                                "`pear-mqtt embedded` processes)"]


def _broker_argv(backend: Backend, broker: BrokerEntry) -> list[str]:
    if backend == "local":
        mosquitto = _mosquitto()
        assert mosquitto is not None and broker.conf is not None  # checked by choose_backend
        return [mosquitto, "-c", broker.conf]
    spec = next(s for s in TOPOLOGY if s.mode == broker.mode)
    argv = [sys.executable, "-m", "pear_mqtt.cli", "embedded", "--mode", broker.mode,
            "--network", broker.network, "--pki", broker.ca_dir, "--cert", broker.cert,
            "--key", broker.key, "--crl", broker.crl, "--host", broker.host,
            "--port", str(broker.port)]
    if spec.bridge:
        argv += ["--bridge-user", BRIDGE_USER]
    return argv


def _agent_argv(node: NodeEntry, status_file: Path, rate: float | None) -> list[str]:
    assert node.config is not None
    argv = [sys.executable, "-m", "pear_mqtt.cli", "agent", "--config", node.config,
            "--simulate", "--status-file", str(status_file),
            "--status-interval", f"{_AGENT_STATUS_INTERVAL:g}",
            "--drain-timeout", f"{_AGENT_DRAIN:g}"]
    if rate is not None:
        argv += ["--rate", str(rate)]
    return argv


# -- health ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Check:
    """One line of the status table."""

    component: str
    pid: int | None
    ok: bool
    detail: str
    log: str | None
    log_offset: int = 0


_NOT_RUNNING = "process not running"


def _check_one(component: str, proc: Proc, probe: Callable[[], tuple[bool, str]]) -> Check:
    if not alive(proc):
        return Check(component, proc.pid, False, _NOT_RUNNING, proc.log, proc.log_offset)
    ok, detail = probe()
    return Check(component, proc.pid, ok, detail, proc.log, proc.log_offset)


# -- docker backend ---------------------------------------------------------------------------

def _compose(state: UpState) -> Compose | None:
    """The Compose project a docker-backend state recorded, None if it recorded none."""
    return Compose.from_json(state.compose) if state.compose else None


def _refresh_containers(state: UpState) -> None:
    """Point each container's recorded pid at its current main process (none if stopped).

    Containers restart (``restart: unless-stopped``) and Compose recreates them, so the pid
    recorded at start may be stale; from then on the usual pid checks apply unchanged.
    """
    compose = _compose(state)
    if compose is None:
        return
    try:
        found = compose.containers()
    except BrokerError:
        return  # engine gone: every pid check will say "not running", which is the truth
    for _, proc in state.processes():
        if proc.container is None:
            continue
        c = found.get(proc.container)
        pid = c.pid if c is not None and c.running else None
        if pid != proc.pid:
            proc.pid = pid
            proc.start_ticks = _start_ticks(pid) if pid is not None else None


def _container_tail(compose: Compose | None, log: str | None, lines: int) -> str | None:
    """The output of the container behind a ``docker:<service>`` log, None for a file."""
    if not log or not log.startswith("docker:"):
        return None
    service = log.removeprefix("docker:")
    if compose is None:
        return "(no Compose project recorded)\n"
    try:
        container = compose.containers().get(service)
        return compose.tail(container.name, lines) if container else \
            f"(no container for {service})\n"
    except BrokerError as exc:
        return f"(no logs: {exc})\n"


def _start_docker(directory: Path, state: UpState, plan: _Plan, *, with_agents: bool,
                  rate: float | None, deadline: float, out: Callable[[str], None]) -> None:
    """Bring the topology up with Compose; raise :class:`BrokerError` when it is not healthy.

    The brokers first, checked from the host with the same mutual-TLS CONNECT as ``status``;
    then the agents (``--no-deps``: their brokers are already known healthy, and Compose's
    own ``service_healthy`` wait would add a health-check interval).
    """
    extra = {"PEAR_AGENT_RATE": f"{rate:g}" if rate is not None else "1"}
    bridge_config = _docker_bridge_config(directory)
    if bridge_config is not None:
        extra["COMPOSE_PROFILES"] = "bridge"  # recorded, so `stop` takes the bridge down too
    compose = Compose.for_directory(directory, extra_env=extra)
    compose.write_env_file(directory)
    state.compose = compose.to_json()
    services = set(compose.run("config", "--services").stdout.split())
    wanted = [f"broker-{b.name}" for b in state.brokers] + \
        ([f"agent-{n.name}" for n in plan.agent_nodes] if with_agents else [])
    missing = [s for s in wanted if s not in services]
    if missing:
        raise BrokerError(f"{compose.file} defines no service {', '.join(missing)}: it has "
                          "fallen behind pear_mqtt.up.TOPOLOGY")
    for b in state.brokers:
        service = f"broker-{b.name}"
        b.proc = Proc(pid=None, start_ticks=None, argv=compose.argv("up", "-d", service),
                      log=f"docker:{service}", container=service)
    # Record the project before starting anything: should this command die, `stop` finds it.
    _save_state(directory, state)
    compose.up([f"broker-{b.name}" for b in state.brokers])
    _refresh_containers(state)
    _save_state(directory, state)
    failing = _wait_healthy(state, deadline=deadline,
                            components=lambda c: c.component.startswith("broker "))
    if failing:
        raise BrokerError("brokers did not come up:\n"
                          + _failure_report(failing, compose=compose))
    if bridge_config is not None:
        out(f"bridge: starting the bridge container ({bridge_config})")
        # The path deploy/compose.yaml gives the bridge's --status-file: `status` checks it.
        status_file = directory / "run" / "bridge.status.json"
        status_file.parent.mkdir(parents=True, exist_ok=True)
        status_file.unlink(missing_ok=True)  # a stale "ok" must not count
        state.bridges.append(AgentEntry(
            name="public", node=BRIDGE_USER, config=str(bridge_config),
            status_file=str(status_file),
            proc=Proc(pid=None, start_ticks=None, argv=compose.argv("up", "-d", "bridge"),
                      log="docker:bridge", container="bridge")))
        _save_state(directory, state)
        compose.up(["bridge"], no_deps=True)
        _refresh_containers(state)
        failing = _wait_healthy(state, deadline=deadline,
                                components=lambda c: c.component.startswith("bridge "))
        if failing:
            raise BrokerError("the bridge did not become healthy:\n"
                              + _failure_report(failing, compose=compose))
    if not with_agents:
        return
    out(f"brokers up; starting {len(plan.agent_nodes)} simulated agents (containers)")
    for node in plan.agent_nodes:
        service = f"agent-{node.name}"
        # The same path the compose file gives the agent's --status-file.
        status_file = directory / "run" / f"{node.name}.status.json"
        status_file.parent.mkdir(parents=True, exist_ok=True)
        status_file.unlink(missing_ok=True)  # a stale "ok" must not count
        assert node.config is not None
        state.agents.append(AgentEntry(
            name=node.name, node=node.name, config=node.config, status_file=str(status_file),
            proc=Proc(pid=None, start_ticks=None, argv=compose.argv("up", "-d", service),
                      log=f"docker:{service}", container=service)))
    _save_state(directory, state)
    compose.up([f"agent-{n.name}" for n in plan.agent_nodes], no_deps=True)
    _refresh_containers(state)
    _save_state(directory, state)
    failing = _wait_healthy(state, deadline=deadline,
                            components=lambda c: c.component.startswith("agent "))
    if failing:
        raise BrokerError("agents did not become healthy:\n"
                          + _failure_report(failing, compose=compose)
                          + _broker_side(state, failing, compose=compose))


def _docker_bridge_config(directory: Path) -> Path | None:
    """The bridge configuration the Compose ``bridge`` service runs, when there is a bridge
    to run: :mod:`pear_mqtt.bridge` with a command line, and ``bridge/bridge.toml`` in the
    state directory (whoever prepares the bridge for ``up`` writes it there)."""
    path = directory / "bridge" / "bridge.toml"
    if not path.is_file():
        return None
    try:
        module = importlib.import_module("pear_mqtt.bridge.service")
    except Exception:  # a half-written bridge must not take the brokers down
        return None
    return path if getattr(module, "register_cli", None) is not None else None


def _stop_docker(state: UpState, *, grace: float, out: Callable[[str], None]) -> list[str]:
    """``compose down`` the recorded project; returns the components still running."""
    compose = _compose(state)
    if compose is None:
        return []
    _refresh_containers(state)
    running = [name for name, p in state.processes() if alive(p)]
    stuck: list[str] = []
    try:
        compose.down(grace=grace)
    except BrokerError as exc:
        out(f"compose down failed: {exc}")
    _refresh_containers(state)
    for name, p in state.processes():
        if alive(p):
            stuck.append(f"{name} (container {p.container}, pid {p.pid})")
        elif name in running:
            out(f"stopped {name} (container {p.container})")
    return stuck


def check(state: UpState) -> list[Check]:
    """Check every recorded broker and agent (process alive, broker admits a node, agent
    healthy)."""
    if state.backend == "docker":
        _refresh_containers(state)
    out: list[Check] = []
    for b in state.brokers:
        out.append(_check_one(f"broker {b.name}", b.proc,
                              functools.partial(_probe_broker_entry, b, state.nodes)))
    for a in state.agents:
        out.append(_check_one(f"agent {a.name}", a.proc,
                              functools.partial(agent_health, a.status_file)))
    for br in state.bridges:  # its status file has the agents' format (health, connected)
        out.append(_check_one(f"bridge {br.name}", br.proc,
                              functools.partial(agent_health, br.status_file)))
    return out


def _wait_healthy(state: UpState, *, deadline: float,
                  components: Callable[[Check], bool]) -> list[Check]:
    """Poll :func:`check` until the selected components pass, one dies, or the deadline.

    Returns the failing checks (empty on success). A dead process fails at once: waiting
    for it would only delay the error.
    """
    delay = 0.02
    while True:
        results = [c for c in check(state) if components(c)]
        failing = [c for c in results if not c.ok]
        if not failing:
            return []
        dead = [c for c in failing if c.detail == _NOT_RUNNING]
        if dead or time.monotonic() >= deadline:
            return dead or failing
        time.sleep(delay)  # poll back-off while the processes come up
        delay = min(delay * 1.5, 0.25)


# -- start ----------------------------------------------------------------------------------

def _parse_ports(text: str | None) -> tuple[int, ...] | None:
    """``--ports`` or ``PEAR_UP_PORTS`` as three ports (0 replaced by a free one); None
    when neither is given."""
    raw = text if text is not None else os.environ.get("PEAR_UP_PORTS")
    if raw is None or not raw.strip():
        return None
    parts = [p.strip() for p in raw.split(",")]
    if len(parts) != len(TOPOLOGY):
        raise ConfigError(f"ports {raw!r}: give {len(TOPOLOGY)} comma-separated ports "
                          f"(private,consortium,public), 0 for any free port")
    try:
        ports = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"ports {raw!r}: not all numbers") from None
    for p in ports:
        if not 0 <= p <= 65535:
            raise ConfigError(f"port {p} is outside 0..65535")
    taken: set[int] = {p for p in ports if p}
    if len(taken) != len([p for p in ports if p]):
        raise ConfigError(f"ports {raw!r}: the three brokers need different ports")
    resolved: list[int] = []
    for p in ports:
        if p == 0:
            p = _free_port()
            while p in taken:
                p = _free_port()
            taken.add(p)
        resolved.append(p)
    return tuple(resolved)


def _print_endpoints(state: UpState, out: Callable[[str], None]) -> None:
    for b in state.brokers:
        pid = b.proc.pid if b.proc.pid is not None else "-"
        out(f"  broker {b.name:<11} {b.network:<13} {b.url:<24} pid {pid}")
    bridge_pid = next((b.proc.pid for b in state.bridges), None)
    out(f"  {BRIDGE_LINE}" + (f", pid {bridge_pid}" if bridge_pid is not None else
                              ", running" if state.bridges else
                              " (not started)"))
    out(f"  {state.agents_note}" + (f" ({len(state.agents)} running)" if state.agents else ""))
    consortium = next((n for n in state.nodes if n.mode == "consortium"), None)
    if consortium is not None:
        b = next(b for b in state.brokers if b.name == consortium.broker)
        n = consortium
        out(f"try: mosquitto_sub -h {b.host} -p {b.port} --cafile {n.ca} --cert {n.cert} "
            f"--key {n.key} -t 'pear/v1/consortium/{n.network}/#' -v")


def _failure_report(failing: Sequence[Check], *, detailed: int = 3, lines: int = 12,
                    compose: Compose | None = None) -> str:
    """What failed, with the log tails (this run's output only) of the first few."""
    parts = [f"{c.component}: {c.detail}" for c in failing]
    for c in failing[:detailed]:
        if c.log:
            text = _container_tail(compose, c.log, lines) or \
                _tail(c.log, lines, since=c.log_offset)
            parts.append(f"--- {c.component}: tail of {c.log} ---\n{text.rstrip()}")
    if len(failing) > detailed:
        parts.append(f"(logs of the other {len(failing) - detailed}: `pear-mqtt up logs`)")
    return "\n".join(parts)


def _broker_side(state: UpState, failing: Sequence[Check], *,
                 compose: Compose | None = None) -> str:
    """The recent log of the brokers failing agents use: a refused connection is explained
    there, not in the agent's log."""
    names = {c.component.removeprefix("agent ") for c in failing}
    wanted = {n.broker for n in state.nodes if n.name in names}
    parts = [f"\n--- broker {b.name}: tail of {b.proc.log} ---\n"
             + (_container_tail(compose, b.proc.log, 6)
                or _tail(b.proc.log, 6, since=b.proc.log_offset)).rstrip()
             for b in state.brokers if b.name in wanted]
    return "".join(parts)


def start(*, directory: Path, ports: Sequence[int] | None = None,
          backend: str | None = None, with_agents: bool = True, rate: float | None = None,
          timeout: float = 60.0, out: Callable[[str], None] = print) -> UpState:
    """Bring the topology up in ``directory`` and return its recorded state once healthy.

    ``ports``: the TLS ports of the private, consortium and public brokers; by default the
    ports of the last run (if free), else :data:`DEFAULT_PORTS`. ``backend``: see
    :func:`choose_backend`. ``rate`` is passed to the agents; ``timeout`` bounds the wait.

    Already up and healthy: returns the recorded state unchanged. Partly up (a process
    died): stops what remains and starts afresh. Raises :class:`BrokerError` with the log
    tails of what failed; everything this call started is stopped again before that.
    """
    directory = Path(directory).resolve()
    began = time.monotonic()
    with _locked(directory):
        previous = load_state(directory)
        if previous is not None and previous.state == "up":
            checks = check(previous)
            if all(c.ok for c in checks):
                out(f"already up ({previous.backend} backend, since {previous.started_at}); "
                    f"state in {directory / STATE_FILE}")
                recorded = [b.port for b in previous.brokers]
                if ports is not None and list(ports) != recorded:
                    out(f"note: running on ports {recorded}, not the requested {list(ports)}; "
                        "`pear-mqtt up stop` first to move it")
                _print_endpoints(previous, out)
                return previous
            if any(alive(p) for _, p in previous.processes()):  # check() refreshed them
                out("partly up; stopping the rest and starting afresh:")
                for c in checks:
                    if not c.ok:
                        out(f"  {c.component}: {c.detail}")
            _stop_processes(previous, grace=_STOP_GRACE, out=out)

        chosen, notes = choose_backend(backend)
        for line in notes:
            out(line)
        if ports is not None:
            port_list = tuple(ports)
        elif previous is not None and len(previous.brokers) == len(TOPOLOGY) \
                and all(port_free(b.port) for b in previous.brokers):
            # Same endpoints as last time: code and configs pointed at them keep working.
            port_list = tuple(b.port for b in previous.brokers)
        else:
            port_list = DEFAULT_PORTS
        if len(port_list) != len(TOPOLOGY):
            raise ConfigError(f"need {len(TOPOLOGY)} ports, got {list(port_list)}")
        busy = [p for p in port_list if not port_free(p)]
        if busy:
            raise BrokerError(f"port(s) {busy} on {HOST} already have a listener that "
                              "`pear-mqtt up` did not start; pass other ports with --ports "
                              "(or PEAR_UP_PORTS)")
        can_agents, agents_note = agents_available() if with_agents else \
            (False, "agents: not started (--no-agents)")

        plan = _prepare(directory, port_list, chosen)
        out(f"pki: {len(TOPOLOGY)} CAs ({', '.join(s.network for s in TOPOLOGY)}), "
            f"{len(plan.nodes)} node certificates, under {directory / 'pki'}")
        state = UpState(version=_STATE_VERSION, state="up", backend=chosen,
                        dir=str(directory), started_at=_now_iso(), brokers=plan.brokers,
                        nodes=plan.nodes, agents_note=agents_note, bridge=plan.bridge)
        deadline = time.monotonic() + timeout
        try:
            if chosen == "docker":
                _start_docker(directory, state, plan, with_agents=can_agents, rate=rate,
                              deadline=deadline, out=out)
            for b in state.brokers if chosen != "docker" else ():
                b.proc = _spawn(_broker_argv(chosen, b), log=Path(b.proc.log), cwd=directory)
            # Record pids at once: should this command die now, `stop` still finds them.
            _save_state(directory, state)
            failing = _wait_healthy(state, deadline=deadline,
                                    components=lambda c: c.component.startswith("broker "))
            if failing:
                raise BrokerError("brokers did not come up:\n" + _failure_report(failing))
            config = plan.bridge.get("config")
            if can_agents and chosen != "docker" and config:
                # Before the agents: its persistent sessions must exist before they publish,
                # or the broker has no queue to keep their first insights in.
                status_file = directory / "run" / "bridge.status.json"
                status_file.parent.mkdir(parents=True, exist_ok=True)
                status_file.unlink(missing_ok=True)  # a stale "ok" must not count
                state.bridges.append(AgentEntry(
                    name="public", node=BRIDGE_USER, config=config,
                    status_file=str(status_file),
                    proc=_spawn(_bridge_argv(config, status_file),
                                log=directory / "logs" / "bridge.log", cwd=directory)))
                _save_state(directory, state)
                failing = _wait_healthy(state, deadline=deadline,
                                        components=lambda c: c.component.startswith("bridge "))
                if failing:
                    raise BrokerError("the bridge did not become healthy:\n"
                                      + _failure_report(failing))
            if can_agents and chosen != "docker":
                out(f"brokers up; starting {len(plan.agent_nodes)} simulated agents")
                # After the brokers: agents then connect at once instead of backing off.
                for node in plan.agent_nodes:
                    status_file = directory / "run" / f"{node.name}.status.json"
                    status_file.parent.mkdir(parents=True, exist_ok=True)
                    status_file.unlink(missing_ok=True)  # a stale "ok" must not count
                    proc = _spawn(_agent_argv(node, status_file, rate),
                                  log=directory / "logs" / f"agent-{node.name}.log",
                                  cwd=directory)
                    assert node.config is not None
                    state.agents.append(AgentEntry(name=node.name, node=node.name,
                                                   config=node.config,
                                                   status_file=str(status_file), proc=proc))
                _save_state(directory, state)
                failing = _wait_healthy(state, deadline=deadline,
                                        components=lambda c: c.component.startswith("agent "))
                if failing:
                    raise BrokerError("agents did not become healthy:\n"
                                      + _failure_report(failing)
                                      + _broker_side(state, failing))
        except BaseException:
            # Nothing worth draining on a failed start: do not make the user wait for it.
            _stop_processes(state, grace=_FAILED_START_GRACE, out=lambda _line: None)
            state.state = "failed"
            state.stopped_at = _now_iso()
            _save_state(directory, state)
            raise
        state.startup_seconds = round(time.monotonic() - began, 3)
        _save_state(directory, state)
    out(f"up and healthy in {state.startup_seconds:.1f}s:")
    _print_endpoints(state, out)
    out(f"endpoints, CA and node certificates: {directory / STATE_FILE}")
    return state


# -- stop -----------------------------------------------------------------------------------

def _stop_processes(state: UpState, *, grace: float, out: Callable[[str], None]) -> list[str]:
    """SIGTERM every recorded process (agents first), SIGKILL what outlives ``grace``;
    ``compose down`` for the docker backend.

    Returns the components that could not be stopped.
    """
    if state.backend == "docker":
        return _stop_docker(state, grace=grace, out=out)
    stuck: list[str] = []
    # Agents first so they disconnect (and flush their outboxes) while the brokers still run.
    groups = [[(f"agent {a.name}", a.proc) for a in state.agents],
              [(f"bridge {b.name}", b.proc) for b in state.bridges],
              [(f"broker {b.name}", b.proc) for b in state.brokers]]
    for group in groups:
        running = [(name, p) for name, p in group if alive(p)]
        for _, p in running:
            _signal(p, signal.SIGTERM)
        end = time.monotonic() + grace
        while any(alive(p) for _, p in running) and time.monotonic() < end:
            time.sleep(0.02)  # poll for exit
        for name, p in running:
            if alive(p):
                out(f"{name} (pid {p.pid}) ignored SIGTERM for {grace:.0f}s; SIGKILL")
                _signal(p, signal.SIGKILL)
        end = time.monotonic() + 5
        while any(alive(p) for _, p in running) and time.monotonic() < end:
            time.sleep(0.02)
        for name, p in running:
            if alive(p):
                stuck.append(f"{name} (pid {p.pid})")
            else:
                out(f"stopped {name} (pid {p.pid})")
        for _, p in group:
            if not alive(p):  # a process that would not die stays recorded for the next try
                p.pid = None
                p.start_ticks = None
    return stuck


def stop(*, directory: Path, grace: float = _STOP_GRACE,
         out: Callable[[str], None] = print) -> bool:
    """Stop everything recorded in ``directory``; True when nothing is left running.

    Already down (or never started): True. Checks that no listener remains on the recorded
    ports, waiting briefly for sockets to close.
    """
    directory = Path(directory).resolve()
    with _locked(directory):
        state = load_state(directory)
        if state is None:
            out(f"already down (no {STATE_FILE} in {directory})")
            return True
        if state.backend == "docker":
            _refresh_containers(state)
        was_up = any(alive(p) for _, p in state.processes())
        stuck = _stop_processes(state, grace=grace, out=out)
        end = time.monotonic() + 3
        busy = [b for b in state.brokers if not port_free(b.port, b.host)]
        while busy and was_up and time.monotonic() < end:
            time.sleep(0.05)  # a listener closes just after its process is reaped
            busy = [b for b in busy if not port_free(b.port, b.host)]
        if state.state == "up" and not stuck:
            state.state = "stopped"
            state.stopped_at = _now_iso()
        _save_state(directory, state)
    for b in busy:
        whose = "a broker `pear-mqtt up` could not stop, or another program" if was_up \
            else "not one `pear-mqtt up` started (nothing of this topology was running)"
        out(f"port {b.host}:{b.port} ({b.name} broker) still has a listener: {whose}")
    for s in stuck:
        out(f"could not stop {s}")
    # Already down is success; a listener that outlived what this call stopped is not.
    failed = bool(stuck) or (was_up and bool(busy))
    if not failed:
        out("stopped; no process or listener left" if was_up and not busy else "already down")
    return not failed


# -- status and logs -------------------------------------------------------------------------

def status(*, directory: Path, out: Callable[[str], None] = print,
           as_json: bool = False) -> bool:
    """Print the status table; True when every broker and agent is healthy."""
    directory = Path(directory).resolve()
    state = load_state(directory)
    if state is None:
        out(f"not up: no {STATE_FILE} in {directory} (run `pear-mqtt up start`)")
        return False
    if state.state != "up":
        if as_json:
            out(json.dumps({"healthy": False, "state": state.state, "checks": []}, indent=2))
        else:
            out(f"not up: the topology in {directory} is {state.state}"
                f"{f' since {state.stopped_at}' if state.stopped_at else ''} "
                "(run `pear-mqtt up start`)")
        return False
    checks = check(state)
    healthy = all(c.ok for c in checks)
    if as_json:
        out(json.dumps({"healthy": healthy, "state": state.state, "backend": state.backend,
                        "checks": [asdict(c) for c in checks]}, indent=2))
        return healthy
    width = max(len(c.component) for c in [*checks, Check("COMPONENT", None, True, "", None)])
    out(f"{'COMPONENT':<{width}}  {'PID':>7}  {'STATE':<9}  DETAIL")
    for c in checks:
        pid = str(c.pid) if c.pid is not None else "-"
        out(f"{c.component:<{width}}  {pid:>7}  {'healthy' if c.ok else 'FAILING':<9}  "
            f"{c.detail}")
    if not state.bridges:
        out(f"{'bridge':<{width}}  {'-':>7}  {'-':<9}  not started (--no-agents, or "
            "pear_mqtt.bridge unavailable)")
    if not state.agents:
        note = state.agents_note.removeprefix("agents: ")
        out(f"{'agents':<{width}}  {'-':>7}  {'-':<9}  {note}")
    where = f" (compose project {state.compose.get('project')})" if state.compose else ""
    out(f"backend {state.backend}{where}, up since {state.started_at}: "
        + ("healthy" if healthy else f"{sum(not c.ok for c in checks)} component(s) failing"))
    return healthy


def _log_files(directory: Path) -> list[Path]:
    """The logs of the recorded topology (older runs may have left others), else all."""
    try:
        state = load_state(directory)
    except ConfigError:
        state = None
    if state is not None:
        recorded = sorted({Path(p.log) for _, p in state.processes()})
        if any(path.is_file() for path in recorded):
            return [path for path in recorded if path.is_file()]
    return sorted((directory / "logs").glob("*.log"))


def logs(*, directory: Path, lines: int = _TAIL_LINES, follow: bool = False,
         out: Callable[[str], None] = print) -> bool:
    """Print the tail of every log; with ``follow`` keep printing new lines until Ctrl-C.

    False when there is no log at all.
    """
    directory = Path(directory).resolve()
    with contextlib.suppress(ConfigError):
        state = load_state(directory)
        compose = _compose(state) if state is not None and state.backend == "docker" else None
        if compose is not None:
            # Containers log to stderr; Compose prints every service's, prefixed by its name.
            return compose.logs(lines=lines, follow=follow) == 0
    files = _log_files(directory)
    if not files:
        out(f"no logs in {directory / 'logs'} (run `pear-mqtt up start`)")
        return False
    offsets: dict[Path, int] = {}
    for path in files:
        out(f"==> {path} <==")
        out(_tail(path, lines).rstrip("\n"))
        offsets[path] = path.stat().st_size
    if not follow:
        return True
    try:
        while True:
            time.sleep(0.5)  # tail -f: poll the files for growth
            for path in _log_files(directory):
                size = path.stat().st_size
                start_at = offsets.get(path, 0)
                if size < start_at:
                    start_at = 0  # truncated or replaced
                if size > start_at:
                    with path.open("rb") as fh:
                        fh.seek(start_at)
                        chunk = fh.read(size - start_at).decode("utf-8", errors="replace")
                    for line in chunk.splitlines():
                        out(f"{path.stem}: {line}")
                offsets[path] = size
    except KeyboardInterrupt:
        return True


# -- command line -----------------------------------------------------------------------------

def _say(line: str) -> None:
    print(line, flush=True)


def _cmd_start(args: argparse.Namespace) -> int:
    try:
        start(directory=args.dir, ports=_parse_ports(args.ports), backend=args.backend,
              with_agents=not args.no_agents, rate=args.rate, timeout=args.timeout, out=_say)
    except BrokerError as exc:
        print(f"pear-mqtt up: start failed; everything it started is stopped again\n{exc}",
              file=sys.stderr)
        return 1
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    return 0 if status(directory=args.dir, as_json=args.json, out=_say) else 1


def _cmd_logs(args: argparse.Namespace) -> int:
    try:
        return 0 if logs(directory=args.dir, lines=args.lines, follow=args.follow,
                         out=_say) else 1
    except BrokenPipeError:
        # `pear-mqtt up logs | head`: the reader has all it wanted. Point stdout at /dev/null
        # so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    return 0 if stop(directory=args.dir, grace=args.grace, out=_say) else 1


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pear-mqtt up {start,status,logs,stop}``."""
    up = subparsers.add_parser(
        "up", help="run the whole topology locally (brokers, PKI, simulated agents)",
        description="Run the pear_mqtt topology on loopback: a private, a consortium and a "
                    "public network, each with its CA and broker, plus simulated store agents.")
    sub = up.add_subparsers(dest="up_command", metavar="ACTION", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                       help="state directory (default .pear in the current directory)")
        return p

    p = add("start", "start everything; returns once healthy")
    p.add_argument("--ports", default=None,
                   help="TLS ports of the private,consortium,public brokers on 127.0.0.1 "
                        "(default $PEAR_UP_PORTS, else the last run's ports if free, else "
                        "18883,18884,18885; 0 = any free port)")
    p.add_argument("--backend", choices=("auto", *get_args(Backend)), default=None,
                   help="broker backend (default $PEAR_BACKEND or auto: docker if reachable, "
                        "else local mosquitto, else embedded amqtt)")
    p.add_argument("--no-agents", action="store_true", help="brokers and PKI only")
    p.add_argument("--rate", type=float, default=None,
                   help="insights per second per simulated agent (agent's default if unset)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for everything to be healthy (default 60)")
    p.set_defaults(handler=_cmd_start)

    p = add("status", "health table; exit 0 only when everything is healthy")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_cmd_status)

    p = add("logs", "print the tail of every log")
    p.add_argument("-n", "--lines", type=int, default=_TAIL_LINES,
                   help=f"lines per log (default {_TAIL_LINES})")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.set_defaults(handler=_cmd_logs)

    p = add("stop", "stop everything `start` started")
    p.add_argument("--grace", type=float, default=_STOP_GRACE,
                   help=f"seconds between SIGTERM and SIGKILL (default {_STOP_GRACE:.0f})")
    p.set_defaults(handler=_cmd_stop)

