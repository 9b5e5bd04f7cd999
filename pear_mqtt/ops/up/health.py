"""Whether the topology is healthy: brokers admit a node, agents and the bridge report "ok"."""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from ...config.models import BrokerURL, TLSConfig
from ...errors import ConnectError
from ...transport import Connection
from .backend import Backend, Group
from .processes import alive
from .state import STATE_FILE, BrokerEntry, NodeEntry, Proc, UpState
from .topology import HOST

__all__ = [
    "AGENT_STATUS_STALE",
    "Check",
    "agent_health",
    "broker_side",
    "check",
    "failure_report",
    "free_port",
    "port_free",
    "probe_broker",
    "wait_healthy",
]

T = TypeVar("T")

_PROBE_TIMEOUT = 2.0
# An agent's status file unchanged this long counts as stale: a hung agent would otherwise
# report its last "ok" forever.
AGENT_STATUS_STALE: Final = 15.0
NOT_RUNNING: Final = "process not running"


# -- ports and probes ------------------------------------------------------------------------

def listening(port: int, host: str = HOST) -> bool:
    """Whether something accepts TCP connections on ``host:port`` now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


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


def free_port() -> int:
    """A port nothing listens on right now, below the range the kernel hands out as the
    local ports of outgoing connections: a port chosen now and bound by a process started a
    moment later must not be taken meanwhile by some client's connection."""
    low = _ephemeral_low()
    for _ in range(64):
        port = random.randint(max(1024, low - 20_000), low - 1)
        # Not one this process handed out already: its taker may not have bound it yet
        # (one `up start` picks a dozen metrics ports before any container listens).
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        return _hand_out(port)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return _hand_out(int(s.getsockname()[1]))


_handed_out: set[int] = set()


def _hand_out(port: int) -> int:
    if len(_handed_out) >= 4096:
        _handed_out.clear()
    _handed_out.add(port)
    return port


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text(encoding="ascii")
        return max(2048, int(text.split()[0]))
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; elsewhere just a range to try first


def probe_broker(*, host: str, port: int, ca: Path | str, cert: Path | str, key: Path | str,
                 timeout: float = _PROBE_TIMEOUT) -> float:
    """Connect with a node certificate over mutual TLS and complete an MQTT 3.1.1 CONNECT.

    Returns the round trip to CONNACK in milliseconds. Raises :class:`ConnectError` (refused,
    TLS failure, closed or refused at CONNACK, timeout) or ``OSError`` (unreadable CA) with
    the reason. A TLS handshake alone is not enough: with TLS 1.3 the broker judges the
    client certificate after the handshake, so only a CONNACK proves the node was admitted.
    """

    async def handshake() -> float:
        connection = Connection(
            broker=BrokerURL(scheme="mqtts", host=host, port=port),
            client_id=f"pear-up-{secrets.token_hex(6)}",
            tls=TLSConfig(ca_file=Path(ca), cert_file=Path(cert), key_file=Path(key)),
            keepalive=10, clean_start=True, protocol=4)  # 3.1.1: both mosquitto and amqtt
        began = time.perf_counter()
        await connection.connect(timeout=timeout)
        elapsed = (time.perf_counter() - began) * 1000
        await connection.close()  # DISCONNECT: no will, no "unexpected disconnect" log
        return elapsed

    return _run_alone(handshake())


def _run_alone(coro: Coroutine[Any, Any, float]) -> float:
    # asyncio.run() would wait for its executor, where paho's blocking connect runs: a broker
    # that hangs the TLS handshake holds it for paho's own 5 s, well past the probe's timeout.
    loop = asyncio.new_event_loop()
    loop.set_default_executor(_DaemonThreads())
    try:
        return loop.run_until_complete(coro)
    finally:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()


class _DaemonThreads(ThreadPoolExecutor):
    """Runs each call in a daemon thread of its own: neither the loop nor the interpreter
    waits for a call that outlives the probe (asyncio takes only a ThreadPoolExecutor)."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    future.set_exception(exc)

        threading.Thread(target=run, name="pear-up-probe", daemon=True).start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        return None  # nothing pooled to shut down


def _probe(broker: BrokerEntry, nodes: Sequence[NodeEntry]) -> tuple[bool, str]:
    """Every node the broker's URL names (a cluster has several) must admit the probe node;
    the detail says which did not."""
    node = next((n for n in nodes if n.name == broker.probe_node), None)
    if node is None:
        return False, f"probe node {broker.probe_node!r} missing from {STATE_FILE}"
    said: list[str] = []
    down = 0
    urls = BrokerURL.parse_list(broker.url)
    for url in urls:
        try:
            ms = probe_broker(host=url.host, port=url.port, ca=node.ca, cert=node.cert,
                              key=node.key)
        except ConnectError as exc:  # its message names the broker
            down += 1
            said.append(str(exc))
        except OSError as exc:
            down += 1
            said.append(f"{url}: {type(exc).__name__}: {exc}")
        else:
            said.append(f"{url} admits {node.member}/{node.node} ({ms:.0f} ms)")
    detail = "; ".join(said)
    if down and len(urls) > down:
        detail = f"{down} of {len(urls)} nodes down (clients use the others): {detail}"
    return not down, detail


def agent_health(status_file: Path | str) -> tuple[bool, str]:
    """Read an agent's status file: (healthy, what it says).

    The file is JSON: a :class:`pear_mqtt.model.insight.NetworkStatus` dump, optionally nested
    under ``"status"``. Healthy means ``health == "ok"``, or ``connected`` when it reports no
    health, and the file was rewritten within the last :data:`AGENT_STATUS_STALE` seconds.
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
                                                 "outbox_depth", "market_failing")
                       if data.get(k) is not None)
    if age > AGENT_STATUS_STALE:
        return False, f"status file not updated for {age:.0f}s ({detail})"
    if health is not None:
        return str(health).lower() in ("ok", "healthy"), detail or f"health {health}"
    return connected is True, detail or "no health reported"


# -- checks ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Check:
    """One line of the status table."""

    component: str
    pid: int | None
    ok: bool
    detail: str
    log: str | None
    log_offset: int = 0


def _check_one(component: str, proc: Proc, probe: Callable[[], tuple[bool, str]]) -> Check:
    if not alive(proc):
        return Check(component, proc.pid, False, NOT_RUNNING, proc.log, proc.log_offset)
    ok, detail = probe()
    return Check(component, proc.pid, ok, detail, proc.log, proc.log_offset)


def check(state: UpState, backend: Backend) -> list[Check]:
    """Check every recorded broker, agent and bridge (process alive, broker admits a node,
    agent and bridge healthy)."""
    backend.refresh(state)
    out: list[Check] = []
    for b in state.brokers:
        out.append(_check_one(f"broker {b.name}", b.proc,
                              functools.partial(_probe, b, state.nodes)))
    for a in state.agents:
        out.append(_check_one(f"agent {a.name}", a.proc,
                              functools.partial(agent_health, a.status_file)))
    for br in state.bridges:  # its status file has the agents' format (health, connected)
        out.append(_check_one(f"bridge {br.name}", br.proc,
                              functools.partial(agent_health, br.status_file)))
    return out


def wait_healthy(state: UpState, backend: Backend, *, deadline: float,
                 kind: Group) -> list[Check]:
    """Poll :func:`check` until the components of ``kind`` (``broker``, ``agent``,
    ``bridge``) pass, one dies, or the deadline; the failing checks (empty on success).

    A dead process fails at once: waiting for it would only delay the error.
    """
    delay = 0.02
    while True:
        results = [c for c in check(state, backend) if c.component.startswith(f"{kind} ")]
        failing = [c for c in results if not c.ok]
        if not failing:
            return []
        dead = [c for c in failing if c.detail == NOT_RUNNING]
        if dead or time.monotonic() >= deadline:
            return dead or failing
        time.sleep(delay)  # poll back-off while the processes come up
        delay = min(delay * 1.5, 0.25)


def failure_report(failing: Sequence[Check], *, state: UpState, backend: Backend,
                   detailed: int = 3, lines: int = 12) -> str:
    """What failed, with the log tails (this run's output only) of the first few."""
    parts = [f"{c.component}: {c.detail}" for c in failing]
    for c in failing[:detailed]:
        if c.log:
            text = backend.tail(state, c.log, lines, since=c.log_offset)
            parts.append(f"--- {c.component}: tail of {c.log} ---\n{text.rstrip()}")
    if len(failing) > detailed:
        parts.append(f"(logs of the other {len(failing) - detailed}: `pear-mqtt up logs`)")
    return "\n".join(parts)


def broker_side(failing: Sequence[Check], *, state: UpState, backend: Backend) -> str:
    """The recent log of the brokers failing agents use: a refused connection is explained
    there, not in the agent's log."""
    names = {c.component.removeprefix("agent ") for c in failing}
    wanted = {n.broker for n in state.nodes if n.name in names}
    return "".join(
        f"\n--- broker {b.name}: tail of {b.proc.log} ---\n"
        + backend.tail(state, b.proc.log, 6, since=b.proc.log_offset).rstrip()
        for b in state.brokers if b.name in wanted)
