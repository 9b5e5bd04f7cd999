"""The topology's health: the checks of ``pear-mqtt up status`` (brokers admit a node over
mutual TLS, the bridge and agents report "ok" in fresh status files), as JSON."""

from __future__ import annotations

import threading
import time
from typing import Any, Final

from ..ops.up.health import check
from ..ops.up.selection import backend_for
from .topology import Topology, TopologyFile

__all__ = ["HealthProbe"]

_TTL: Final = 2.0  # several open pages poll at once: probe the brokers at most this often


class HealthProbe:
    """Runs the checks at most once per :data:`_TTL` seconds, whoever asks."""

    def __init__(self, topology: TopologyFile) -> None:
        self._topology = topology
        self._lock = threading.Lock()
        self._at = -_TTL
        self._of: Topology | None = None
        self._last: dict[str, Any] = {}

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            topology = self._topology.current()
            if topology is not self._of or time.monotonic() - self._at >= _TTL:
                self._last = self._run(topology)
                self._of, self._at = topology, time.monotonic()
            return self._last

    @staticmethod
    def _run(topology: Topology) -> dict[str, Any]:
        state = topology.state
        components: list[dict[str, Any]] = []
        if state.state == "up":
            for c in check(state, backend_for(state)):
                kind, _, name = c.component.partition(" ")
                components.append({"kind": kind, "name": name, "ok": c.ok, "pid": c.pid,
                                   "detail": c.detail})
        brokers = [c for c in components if c["kind"] == "broker"]
        return {"state": state.state, "backend": state.backend,
                "started_at": state.started_at,
                "healthy": bool(components) and all(c["ok"] for c in components),
                "brokers_healthy": sum(1 for c in brokers if c["ok"]),
                "brokers": len(brokers), "components": components,
                "checked_at": time.time()}
