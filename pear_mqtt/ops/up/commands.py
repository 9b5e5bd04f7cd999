"""``pear-mqtt up start | status | logs | stop`` on a state directory, whatever the backend."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Final

from ...errors import BrokerError, ConfigError
from .backend import Backend, Group
from .dashboard import start_dashboard, stop_dashboard
from .health import (
    Check,
    broker_side,
    check,
    failure_report,
    free_port,
    port_free,
    wait_healthy,
)
from .migrate import migrate, outdated
from .prepare import first_aggregates_in, prepare
from .processes import TAIL_LINES, alive, print_logs
from .selection import backend_for, choose_backend
from .state import (
    STATE_FILE,
    STATE_VERSION,
    AgentEntry,
    NodeEntry,
    Proc,
    UpState,
    load_state,
    locked,
    now_iso,
    save_state,
)
from .topology import BRIDGE_LINE, BRIDGE_USER, DEFAULT_PORTS, HOST, TOPOLOGY

__all__ = ["STOP_GRACE", "logs", "parse_ports", "start", "status", "stop"]

STOP_GRACE: Final = 10.0
_FAILED_START_GRACE = 3.0


def parse_ports(text: str | None) -> tuple[int, ...] | None:
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
            p = free_port()
            while p in taken:
                p = free_port()
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
    consortium = next((n for n in state.nodes
                       if n.mode == "consortium" and n.role == "store" and n.config), None)
    if consortium is not None:
        # Decrypted and verified, as that member may read it (mosquitto_sub shows ciphertext).
        out(f"try: {_cli()} watch --node {consortium.name}")
    metrics = [url for url in (*(b.metrics_url for b in state.brokers),
                               *(a.metrics_url for a in (*state.bridges, *state.agents)))
               if url]
    if metrics:
        out(f"metrics: {len(metrics)} Prometheus endpoints (metrics_url in up.json), e.g. "
            f"{metrics[0]}")
    if state.dashboard_url:
        out(f"dashboard: {state.dashboard_url}")


def _cli() -> str:
    """How the user runs this command line: ``.venv/bin/pear-mqtt`` from a checkout (what
    `make up` runs), plain ``pear-mqtt`` otherwise."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "pear-mqtt":
        with contextlib.suppress(ValueError):
            return str(argv0.resolve().relative_to(Path.cwd().resolve()))
    return "pear-mqtt"


def _fresh_status_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a stale "ok" must not count
    return path


def _ports(requested: Sequence[int] | None, previous: UpState | None,
           out: Callable[[str], None] = print) -> tuple[int, ...]:
    if requested is not None:
        ports = tuple(requested)
        if len(ports) != len(TOPOLOGY):
            raise ConfigError(f"need {len(TOPOLOGY)} ports, got {list(ports)}")
        busy = [p for p in ports if not port_free(p)]
        if busy:
            raise BrokerError(f"port(s) {busy} on {HOST} already have a listener that "
                              "`pear-mqtt up` did not start; choose others, e.g. "
                              "PEAR_UP_PORTS=0,0,0 make up (0 = any free port)")
        return ports
    if previous is not None and len(previous.brokers) == len(TOPOLOGY) \
            and all(port_free(b.port) for b in previous.brokers):
        # Same endpoints as last time: code and configs pointed at them keep working.
        return tuple(b.port for b in previous.brokers)
    # Nothing asked for: the defaults where free, any free port where one is taken.
    chosen: list[int] = []
    for default in DEFAULT_PORTS:
        port = default
        while not port_free(port) or port in chosen:
            port = free_port()
        if port != default:
            out(f"port {default} is taken on {HOST}; using {port} instead "
                "(PEAR_UP_PORTS=a,b,c make up chooses them)")
        chosen.append(port)
    return tuple(chosen)


def start(*, directory: Path, ports: Sequence[int] | None = None,
          backend: str | None = None, with_agents: bool = True, rate: float | None = None,
          timeout: float = 60.0, out: Callable[[str], None] = print) -> UpState:
    """Bring the topology up in ``directory`` and return its recorded state once healthy.

    ``ports``: the TLS ports of the private, consortium and public brokers; by default the
    ports of the last run (if free), else :data:`DEFAULT_PORTS`. ``backend``: see
    :func:`choose_backend`. ``rate`` is passed to the agents; ``timeout`` bounds the wait.

    Already up and healthy: returns the recorded state unchanged. Partly up (a process
    died): stops what remains and starts afresh. A state directory made by an older
    pear-mqtt (a pseudonym secret shared with every member) is stopped and migrated first
    (:mod:`.migrate`). Raises :class:`BrokerError` with the log tails of what failed;
    everything this call started is stopped again before that.
    """
    directory = Path(directory).resolve()
    began = time.monotonic()
    with locked(directory):
        previous = load_state(directory)
        stale = outdated(directory)
        if previous is not None and previous.state == "up":
            earlier = backend_for(previous)
            checks = check(previous, earlier)
            if all(c.ok for c in checks) and stale is None:
                out(f"already up ({previous.backend} backend, since {previous.started_at}); "
                    f"state in {directory / STATE_FILE}")
                recorded = [b.port for b in previous.brokers]
                if previous.dashboard is None or not alive(previous.dashboard):
                    start_dashboard(directory, previous, out=out)
                    save_state(directory, previous)
                if ports is not None and list(ports) != recorded:
                    out(f"note: running on ports {recorded}, not the requested {list(ports)}; "
                        "`pear-mqtt up stop` first to move it")
                _print_endpoints(previous, out)
                return previous
            if stale is not None:
                out(f"{stale}; stopping it to migrate")
            elif any(alive(p) for _, p in previous.processes()):  # check() refreshed them
                out("partly up; stopping the rest and starting afresh:")
                for c in checks:
                    if not c.ok:
                        out(f"  {c.component}: {c.detail}")
            stop_dashboard(previous, grace=STOP_GRACE, out=out)
            earlier.stop(previous, grace=STOP_GRACE, out=out)
        for line in migrate(directory):
            out(line)

        chosen, notes = choose_backend(backend)
        for line in notes:
            out(line)
        port_list = _ports(ports, previous, out)
        agents_note = ("agents: simulated stores and an archive node per network"
                       if with_agents else "agents: not started (--no-agents)")

        runner = chosen()
        plan = prepare(directory, port_list, runner)
        out(f"pki: {len(TOPOLOGY)} CAs ({', '.join(s.network for s in TOPOLOGY)}), "
            f"{len(plan.nodes)} node certificates, under {directory / 'pki'}")
        state = UpState(version=STATE_VERSION, state="up", backend=chosen.name,
                        dir=str(directory), started_at=now_iso(), brokers=plan.brokers,
                        nodes=plan.nodes, agents_note=agents_note, bridge=plan.bridge)
        deadline = time.monotonic() + timeout
        try:
            runner.begin(directory=directory, state=state, agent_nodes=plan.agent_nodes,
                         with_agents=with_agents, rate=rate)
            _start_components(directory, state, runner, agent_nodes=plan.agent_nodes,
                              bridge_config=plan.bridge["config"], with_agents=with_agents,
                              rate=rate, deadline=deadline, out=out)
        except BaseException:
            # Nothing worth draining on a failed start: do not make the user wait for it.
            runner.stop(state, grace=_FAILED_START_GRACE, out=lambda _line: None)
            state.state = "failed"
            state.stopped_at = now_iso()
            save_state(directory, state)
            raise
        state.startup_seconds = round(time.monotonic() - began, 3)
        start_dashboard(directory, state, out=out)
        save_state(directory, state)
    out(f"up and healthy in {state.startup_seconds:.1f}s:")
    _print_endpoints(state, out)
    first = first_aggregates_in(rate) if state.bridges and state.agents else None
    if first is not None:
        public = next((n for n in reversed(state.nodes) if n.mode == "public"), None)
        out(f"first public aggregates expected in ~{first:.0f} s (a simulated store reports "
            "a day of history at a time; the bridge publishes a day once it settled)"
            + (f"; then: {_cli()} market aggregates --config {public.config} --sync"
               if public is not None and public.config else ""))
    out(f"endpoints, CA and node certificates: {directory / STATE_FILE}")
    return state


def _start_components(directory: Path, state: UpState, backend: Backend, *,
                      agent_nodes: Sequence[NodeEntry], bridge_config: str,
                      with_agents: bool, rate: float | None, deadline: float,
                      out: Callable[[str], None]) -> None:
    """Brokers, then the bridge, then the agents, each group healthy before the next."""
    for b in state.brokers:
        b.proc = backend.broker_process(directory=directory, broker=b)
    _launch(directory, state, backend, "broker", [b.proc for b in state.brokers],
            deadline=deadline, failure="brokers did not come up")
    if backend.runs_bridge(with_agents=with_agents):
        line = backend.announce_bridge(bridge_config)
        if line is not None:
            out(line)
        # Before the agents: its persistent sessions must exist before they publish, or the
        # broker has no queue to keep their first insights in.
        status_file = _fresh_status_file(directory / "run" / "bridge.status.json")
        port = free_port() if backend.serves_metrics else None
        bridge = AgentEntry(name="public", node=BRIDGE_USER, config=bridge_config,
                            status_file=str(status_file),
                            proc=backend.bridge_process(directory=directory, config=bridge_config,
                                                        status_file=status_file,
                                                        metrics_port=port),
                            metrics_url=_metrics_url(port))
        state.bridges.append(bridge)
        _launch(directory, state, backend, "bridge", [bridge.proc], deadline=deadline,
                failure="the bridge did not become healthy")
    if not with_agents:
        return
    archives = sum(1 for n in agent_nodes if n.role == "archive")
    out(f"brokers up; starting {len(agent_nodes) - archives} simulated agents and {archives} "
        f"archive nodes{backend.agents_suffix}")
    # After the brokers: agents then connect at once instead of backing off.
    for node in agent_nodes:
        status_file = _fresh_status_file(directory / "run" / f"{node.name}.status.json")
        assert node.config is not None
        port = free_port() if backend.serves_metrics else None
        state.agents.append(AgentEntry(
            name=node.name, node=node.name, config=node.config, status_file=str(status_file),
            proc=backend.agent_process(directory=directory, node=node, status_file=status_file,
                                       rate=rate, metrics_port=port),
            metrics_url=_metrics_url(port)))
    _launch(directory, state, backend, "agent", [a.proc for a in state.agents],
            deadline=deadline, failure="agents did not become healthy")


def _metrics_url(port: int | None) -> str | None:
    return None if port is None else f"http://{HOST}:{port}/metrics"


def _launch(directory: Path, state: UpState, backend: Backend, group: Group,
            procs: Sequence[Proc], *, deadline: float, failure: str) -> None:
    """Start ``procs`` and wait until their group is healthy; raise :class:`BrokerError`
    saying ``failure``, with the log tails, when it does not become so."""
    backend.launch(directory=directory, state=state, group=group, procs=procs)
    # Record pids at once: should this command die now, `stop` still finds them.
    save_state(directory, state)
    failing = wait_healthy(state, backend, deadline=deadline, kind=group)
    if failing:
        # A refused agent is explained in its broker's log, not in its own.
        explain = broker_side(failing, state=state, backend=backend) if group == "agent" \
            else ""
        raise BrokerError(f"{failure}:\n"
                          + failure_report(failing, state=state, backend=backend) + explain)


def stop(*, directory: Path, grace: float = STOP_GRACE,
         out: Callable[[str], None] = print) -> bool:
    """Stop everything recorded in ``directory``; True when nothing is left running.

    Already down (or never started): True. Checks that no listener remains on the recorded
    ports, waiting briefly for sockets to close.
    """
    directory = Path(directory).resolve()
    with locked(directory):
        state = load_state(directory)
        if state is None:
            out(f"already down (no {STATE_FILE} in {directory})")
            return True
        backend = backend_for(state)
        backend.refresh(state)
        was_up = any(alive(p) for _, p in state.processes())
        stuck = stop_dashboard(state, grace=grace, out=out)
        stuck += backend.stop(state, grace=grace, out=out)
        end = time.monotonic() + 3
        busy = [b for b in state.brokers if not port_free(b.port, b.host)]
        while busy and was_up and time.monotonic() < end:
            time.sleep(0.05)  # a listener closes just after its process is reaped
            busy = [b for b in busy if not port_free(b.port, b.host)]
        if state.state == "up" and not stuck:
            state.state = "stopped"
            state.stopped_at = now_iso()
        save_state(directory, state)
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
    backend = backend_for(state)
    checks = check(state, backend)
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
        out(f"{'bridge':<{width}}  {'-':>7}  {'-':<9}  not started (--no-agents)")
    if not state.agents:
        note = state.agents_note.removeprefix("agents: ")
        out(f"{'agents':<{width}}  {'-':>7}  {'-':<9}  {note}")
    out(f"backend {state.backend}{backend.where(state)}, up since {state.started_at}: "
        + ("healthy" if healthy else f"{sum(not c.ok for c in checks)} component(s) failing"))
    return healthy


def logs(*, directory: Path, lines: int = TAIL_LINES, follow: bool = False,
         out: Callable[[str], None] = print) -> bool:
    """Print the tail of every log; with ``follow`` keep printing new lines until Ctrl-C.

    False when there is no log at all.
    """
    directory = Path(directory).resolve()
    try:
        state = load_state(directory)
        backend = backend_for(state) if state is not None else None
    except ConfigError:
        state, backend = None, None
    if state is not None and backend is not None:
        return backend.logs(directory=directory, state=state, lines=lines, follow=follow,
                            out=out)
    return print_logs(directory=directory, state=None, lines=lines, follow=follow, out=out)
