"""The Compose backend: ``deploy/compose.yaml`` runs every component in a container."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

from ...errors import BrokerError
from ...files import atomic_write
from ...security.pki import CertPaths
from ..compose import Compose, docker_problem, engine_reachable
from .backend import Backend, Group
from .local import render_mosquitto
from .processes import alive, print_logs, start_time, tail
from .state import BrokerEntry, NodeEntry, Proc, UpState, save_state
from .topology import HOST, NetworkSpec

__all__ = ["DockerBackend"]

_LOG_PREFIX = "docker:"  # a component's log is its container's output


def _compose(state: UpState) -> Compose | None:
    """The Compose project a docker-backend state recorded, None if it recorded none."""
    return Compose.from_json(state.compose) if state.compose else None


class DockerBackend(Backend):
    """The same rendered configurations in the images ``deploy/images/build.sh`` builds: the
    state directory mounted at its own path, host networking, every listener on 127.0.0.1."""

    name: ClassVar[str] = "docker"
    serves_sys: ClassVar[bool] = True
    # Host networking: a container's --metrics-port listens on this machine's loopback.
    serves_metrics: ClassVar[bool] = True
    agents_suffix: ClassVar[str] = " (containers)"

    @classmethod
    def offered(cls) -> bool:
        return engine_reachable()

    @classmethod
    def problem(cls) -> str | None:
        return docker_problem()

    @classmethod
    def refusal(cls, problem: str) -> str:
        return (f"docker backend: {problem}; or use PEAR_BACKEND=local (mosquitto) or "
                "PEAR_BACKEND=embedded")

    @classmethod
    def chosen(cls, *, auto: bool) -> str:
        why = "; a Docker engine answers" if auto else ""
        return f"backend: docker (deploy/compose.yaml, host network{why})"

    def __init__(self) -> None:
        self._project: Compose | None = None

    def _started(self) -> Compose:
        assert self._project is not None, "begin() sets the Compose project up"
        return self._project

    def _container(self, service: str, metrics_port: int | None = None) -> Proc:
        if metrics_port is not None:
            # deploy/compose.yaml passes it as the service's --metrics-port.
            var = "PEAR_METRICS_" + service.upper().replace("-", "_")
            self._started().env[var] = str(metrics_port)
        return Proc(pid=None, start_time=None, argv=self._started().argv("up", "-d", service),
                    log=f"{_LOG_PREFIX}{service}", container=service)

    # -- preparing --------------------------------------------------------------------------
    def broker_config(self, *, directory: Path, spec: NetworkSpec, port: int, ca_dir: Path,
                      certs: CertPaths, probe: NodeEntry) -> tuple[Path | None, str]:
        # A container logs to stderr: `docker logs` / `compose logs` collect it.
        conf = render_mosquitto(directory=directory, spec=spec, port=port, ca_dir=ca_dir,
                                certs=certs, log_file=None)
        # The container's health check makes the same mutual-TLS CONNECT as `status`.
        atomic_write(conf.parent / "health.json", json.dumps(
            {"host": HOST, "port": port, "ca": probe.ca, "cert": probe.cert,
             "key": probe.key}, indent=2) + "\n")
        return conf, f"{_LOG_PREFIX}broker-{spec.mode}"

    def begin(self, *, directory: Path, state: UpState, agent_nodes: Sequence[NodeEntry],
              with_agents: bool, rate: float | None) -> None:
        extra = {"PEAR_AGENT_RATE": f"{rate:g}" if rate is not None else "1",
                 # Recorded, so `stop` takes the bridge down too.
                 "COMPOSE_PROFILES": "bridge"}
        compose = self._project = Compose.for_directory(directory, extra_env=extra)
        compose.write_env_file(directory)
        state.compose = compose.to_json()
        services = set(compose.run("config", "--services").stdout.split())
        wanted = [f"broker-{b.name}" for b in state.brokers] + \
            ([f"agent-{n.name}" for n in agent_nodes] if with_agents else [])
        missing = [s for s in wanted if s not in services]
        if missing:
            raise BrokerError(f"{compose.file} defines no service {', '.join(missing)}: it has "
                              "fallen behind pear_mqtt.ops.up.topology.TOPOLOGY")

    # -- starting ---------------------------------------------------------------------------
    def broker_process(self, *, directory: Path, broker: BrokerEntry) -> Proc:
        return self._container(f"broker-{broker.name}")

    def bridge_process(self, *, directory: Path, config: str, status_file: Path,
                       metrics_port: int | None = None) -> Proc:
        return self._container("bridge", metrics_port)

    def agent_process(self, *, directory: Path, node: NodeEntry, status_file: Path,
                      rate: float | None, metrics_port: int | None = None) -> Proc:
        return self._container(f"agent-{node.name}", metrics_port)

    def launch(self, *, directory: Path, state: UpState, group: Group,
               procs: Sequence[Proc]) -> None:
        # Record the project (with the metrics ports its services were given) before
        # starting anything: should this command die, `stop` finds it.
        state.compose = self._started().to_json()
        self._started().write_env_file(directory)
        save_state(directory, state)
        # The bridge and agents with --no-deps: their brokers are already known healthy, and
        # Compose's own service_healthy wait would add a health-check interval.
        self._started().up([p.container for p in procs if p.container],
                           no_deps=group != "broker")
        self.refresh(state)

    def runs_bridge(self, *, with_agents: bool) -> bool:
        return True

    def announce_bridge(self, config: str) -> str | None:
        return f"bridge: starting the bridge container ({config})"

    # -- watching ---------------------------------------------------------------------------
    def refresh(self, state: UpState) -> None:
        """Point each container's recorded pid at its current main process (none if stopped).

        Containers restart (``restart: unless-stopped``) and Compose recreates them, so the
        pid recorded at start may be stale; from then on the usual pid checks apply unchanged.
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
                proc.start_time = start_time(pid) if pid is not None else None

    def tail(self, state: UpState, log: str, lines: int, *, since: int = 0) -> str:
        if not log.startswith(_LOG_PREFIX):
            return tail(log, lines, since=since)
        service = log.removeprefix(_LOG_PREFIX)
        compose = _compose(state)
        if compose is None:
            return "(no Compose project recorded)\n"
        try:
            container = compose.containers().get(service)
            return compose.tail(container.name, lines) if container else \
                f"(no container for {service})\n"
        except BrokerError as exc:
            return f"(no logs: {exc})\n"

    def logs(self, *, directory: Path, state: UpState, lines: int, follow: bool,
             out: Callable[[str], None]) -> bool:
        compose = _compose(state)
        if compose is None:
            return print_logs(directory=directory, state=state, lines=lines, follow=follow,
                              out=out)
        # Containers log to stderr; Compose prints every service's, prefixed by its name.
        return compose.logs(lines=lines, follow=follow) == 0

    def where(self, state: UpState) -> str:
        return f" (compose project {state.compose.get('project')})" if state.compose else ""

    # -- stopping ---------------------------------------------------------------------------
    def stop(self, state: UpState, *, grace: float, out: Callable[[str], None]) -> list[str]:
        """``compose down`` the recorded project."""
        compose = _compose(state)
        if compose is None:
            return []
        self.refresh(state)
        running = [name for name, p in state.processes() if alive(p)]
        stuck: list[str] = []
        try:
            compose.down(grace=grace)
        except BrokerError as exc:
            out(f"compose down failed: {exc}")
        self.refresh(state)
        for name, p in state.processes():
            if alive(p):
                stuck.append(f"{name} (container {p.container}, pid {p.pid})")
            elif name in running:
                out(f"stopped {name} (container {p.container})")
        return stuck
