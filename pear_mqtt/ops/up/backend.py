"""The one interface a ``pear-mqtt up`` backend implements (mosquitto, amqtt, Compose, ...)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar, Literal

from ...security.pki import CertPaths
from .state import BrokerEntry, NodeEntry, Proc, UpState
from .topology import HOST, NetworkSpec

__all__ = ["Backend", "Group"]

Group = Literal["broker", "bridge", "agent"]


class Backend(ABC):
    """Runs the brokers, the bridge and the agents of the topology, and stops them again.

    ``pear_mqtt.ops.up.commands`` drives it: it prepares the PKI and configurations, asks the
    backend for each component's :class:`Proc`, waits until they are healthy and records
    them in ``up.json``; ``status``, ``logs`` and ``stop`` find the backend by its
    :attr:`name` there.
    """

    name: ClassVar[str]
    """What ``--backend`` / ``PEAR_BACKEND`` and ``up.json`` call it."""

    # -- choosing ---------------------------------------------------------------------------
    @classmethod
    def offered(cls) -> bool:
        """Whether ``auto`` considers this backend on this machine at all."""
        return cls.problem() is None

    @classmethod
    def problem(cls) -> str | None:
        """Why this machine cannot run this backend (None: it can)."""
        return None

    @classmethod
    def refusal(cls, problem: str) -> str:
        """The error when this backend is asked for but cannot run here."""
        return f"{cls.name} backend: {problem}"

    @classmethod
    @abstractmethod
    def chosen(cls, *, auto: bool) -> str:
        """The ``backend: ...`` line ``start`` prints (``auto``: picked, not asked for)."""

    # -- preparing --------------------------------------------------------------------------
    @abstractmethod
    def broker_config(self, *, directory: Path, spec: NetworkSpec, port: int, ca_dir: Path,
                      certs: CertPaths, probe: NodeEntry) -> tuple[Path | None, str]:
        """Write what the broker of ``spec`` needs to run; return its configuration file (None
        when it takes its settings on the command line) and where its output goes (a file,
        or a name :meth:`tail` understands)."""

    def broker_url(self, *, spec: NetworkSpec, port: int, index: int) -> str:
        """The ``broker_url`` the ``index``-th client of ``spec``'s broker is given (one
        URL; a clustered broker's lists its nodes, in an order that spreads the clients)."""
        return f"mqtts://{HOST}:{port}"

    def begin(self, *, directory: Path, state: UpState, agent_nodes: Sequence[NodeEntry],
              with_agents: bool, rate: float | None) -> None:
        """Set up what every component shares, before the first one starts."""
        return None  # nothing to do unless a backend says otherwise

    # -- starting ---------------------------------------------------------------------------
    @abstractmethod
    def broker_process(self, *, directory: Path, broker: BrokerEntry) -> Proc:
        """The process of ``broker`` (started now, or by :meth:`launch`)."""

    @abstractmethod
    def bridge_process(self, *, directory: Path, config: str, status_file: Path,
                       metrics_port: int | None = None) -> Proc:
        """The process of the public bridge, which reports to ``status_file`` (and serves
        metrics on ``metrics_port``, where the backend does)."""

    @abstractmethod
    def agent_process(self, *, directory: Path, node: NodeEntry, status_file: Path,
                      rate: float | None, metrics_port: int | None = None) -> Proc:
        """The process of the simulated agent (or archive) of ``node``, which reports to
        ``status_file`` (and serves metrics on ``metrics_port``, where the backend does)."""

    def launch(self, *, directory: Path, state: UpState, group: Group,
               procs: Sequence[Proc]) -> None:
        """Start ``procs`` (of one ``group``) if their ``*_process`` method did not."""
        return None  # nothing to do unless a backend says otherwise

    def runs_bridge(self, *, with_agents: bool) -> bool:
        """Whether ``start`` runs the bridge (it needs the agents' input to be useful)."""
        return with_agents

    def announce_bridge(self, config: str) -> str | None:
        """The line ``start`` prints before starting the bridge, if any."""
        return None

    serves_metrics: ClassVar[bool] = False
    """Whether its processes take ``--metrics-port`` (processes of this machine do)."""

    serves_sys: ClassVar[bool] = False
    """Whether its brokers publish ``$SYS`` figures to the monitor identity (mosquitto's)."""

    agents_suffix: ClassVar[str] = ""
    """What ``start``'s "starting N simulated agents" line adds for this backend."""

    # -- watching ---------------------------------------------------------------------------
    def refresh(self, state: UpState) -> None:
        """Bring the recorded pids up to date (a backend whose processes may move)."""
        return None  # nothing to do unless a backend says otherwise

    @abstractmethod
    def tail(self, state: UpState, log: str, lines: int, *, since: int = 0) -> str:
        """The last ``lines`` of a component's output (``since``: bytes of a file to skip)."""

    @abstractmethod
    def logs(self, *, directory: Path, state: UpState, lines: int, follow: bool,
             out: Callable[[str], None]) -> bool:
        """Print every component's recent output (``follow``: until Ctrl-C); False when there
        is none."""

    def where(self, state: UpState) -> str:
        """What ``status`` adds after the backend's name (e.g. the Compose project)."""
        return ""

    # -- stopping ---------------------------------------------------------------------------
    @abstractmethod
    def stop(self, state: UpState, *, grace: float, out: Callable[[str], None]) -> list[str]:
        """Stop every recorded component (agents first, brokers last; SIGKILL what outlives
        ``grace``); return those that could not be stopped."""
