"""``up.json``: what ``pear-mqtt up start`` recorded, read and written under a directory lock."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from ...errors import BrokerError, ConfigError
from ...files import atomic_write

__all__ = [
    "STATE_FILE",
    "STATE_VERSION",
    "AgentEntry",
    "BrokerEntry",
    "NodeEntry",
    "Proc",
    "UpState",
    "load_state",
    "locked",
    "now_iso",
    "save_state",
]

STATE_FILE: Final = "up.json"
STATE_VERSION: Final = 1


def now_iso() -> str:
    """The current UTC time, to the second, as ISO 8601."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


@dataclass(slots=True)
class Proc:
    """A process ``start`` launched: its pid, and what tells it apart from a recycled pid."""

    pid: int | None
    start_time: float | None  # seconds after boot it started: a recycled pid has another
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
    # The monitor certificate that may read the broker's $SYS figures, and where the
    # dashboard serves them as Prometheus metrics (mosquitto backends).
    monitor_cert: str | None = None
    monitor_key: str | None = None
    metrics_url: str | None = None


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
    role: str = "store"  # "store" (a simulated agent), or "archive" (pear-mqtt archive)


@dataclass(slots=True)
class AgentEntry:
    """A simulated store agent (or the bridge, which reports in the same status format)."""

    name: str
    node: str
    config: str
    status_file: str
    proc: Proc
    metrics_url: str | None = None  # its Prometheus endpoint, where the backend serves one


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
    dashboard: Proc | None = None  # `pear-mqtt dashboard`, stopped by commands.stop
    dashboard_url: str | None = None

    def processes(self) -> list[tuple[str, Proc]]:
        """Every recorded process, agents first, then the bridge (both are stopped before
        the brokers)."""
        return [(name, proc) for group in self.stop_order() for name, proc in group]

    def stop_order(self) -> list[list[tuple[str, Proc]]]:
        """The processes in the groups they stop in: agents (they disconnect and flush their
        outboxes while the brokers still run), the bridge, the brokers."""
        return [[(f"agent {a.name}", a.proc) for a in self.agents],
                [(f"bridge {b.name}", b.proc) for b in self.bridges],
                [(f"broker {b.name}", b.proc) for b in self.brokers]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UpState:
        def proc(d: dict[str, Any]) -> Proc:
            # Written before psutil: clock ticks since boot, which this version cannot
            # compare; the pid alone then tells whether the process runs.
            d = {k: v for k, v in d.items() if k != "start_ticks"}
            return Proc(**{"start_time": None, **d})

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
                     for a in data.get("bridges", [])],
            dashboard=proc(data["dashboard"]) if data.get("dashboard") else None,
            dashboard_url=data.get("dashboard_url"))


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
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"unknown version {data.get('version')!r}")
        return UpState.from_json(data)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path} is not a pear-mqtt up state file ({exc}); remove it after "
                          "making sure nothing it started still runs") from None


def save_state(directory: Path, state: UpState) -> None:
    """Write ``up.json`` (atomically: a reader sees the old or the new state, never half)."""
    atomic_write(directory / STATE_FILE, json.dumps(state.to_json(), indent=2) + "\n")


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s lock: raise :class:`BrokerError` if another ``up`` holds it."""
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
