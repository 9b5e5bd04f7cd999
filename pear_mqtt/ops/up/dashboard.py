"""The dashboard ``start`` runs next to the topology (``pear-mqtt dashboard``, a process of
this machine whatever the backend), and ``stop`` stops."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from .processes import alive, spawn, stop_groups, tail
from .state import STATE_FILE, UpState

__all__ = ["start_dashboard", "stop_dashboard"]

_READY_TIMEOUT: Final = 15.0


def start_dashboard(directory: Path, state: UpState, *,
                    out: Callable[[str], None]) -> None:
    """Start the dashboard on a free loopback port and record its process and URL in
    ``state``; a dashboard that does not come up is reported, not fatal (the topology is)."""
    ready = directory / "run" / "dashboard.json"
    ready.parent.mkdir(parents=True, exist_ok=True)
    ready.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "pear_mqtt.cli", "dashboard",
            "--up-file", str(directory / STATE_FILE), "--port", "0",
            "--ready-file", str(ready)]
    proc = spawn(argv, log=directory / "logs" / "dashboard.log", cwd=directory)
    state.dashboard, state.dashboard_url = proc, None
    end = time.monotonic() + _READY_TIMEOUT
    delay = 0.02
    while time.monotonic() < end and alive(proc):
        try:
            data = json.loads(ready.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            time.sleep(delay)  # poll for the ready file while it starts
            delay = min(delay * 1.5, 0.25)
            continue
        if data.get("pid") == proc.pid:
            state.dashboard_url = str(data["url"])
            for broker in state.brokers:  # their $SYS figures, read with the monitor identity
                broker.metrics_url = (f"{state.dashboard_url}metrics/brokers/{broker.name}"
                                      if broker.monitor_cert else None)
            return
    out(f"dashboard: did not come up; see {proc.log}:\n"
        + tail(proc.log, 8, since=proc.log_offset).rstrip())


def stop_dashboard(state: UpState, *, grace: float, out: Callable[[str], None]) -> list[str]:
    """Stop the recorded dashboard; the components that could not be stopped."""
    if state.dashboard is None:
        return []
    stuck = stop_groups([[("dashboard", state.dashboard)]], grace=grace, out=out)
    if not stuck:
        state.dashboard_url = None
    return stuck
