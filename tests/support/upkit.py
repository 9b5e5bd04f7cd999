"""Drives ``pear-mqtt up`` as a user would: one state directory, fixed free ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from brokers import free_port

CLI_TIMEOUT = 60.0
# A start that is slow says itself what did not come up (the log tails) well before the
# test gives up on the command.
START_TIMEOUT = 60.0
START_CLI_TIMEOUT = 120.0


class Up:
    """Runs ``pear-mqtt up ...`` against one state directory with fixed free ports."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "state"
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(free_port())
        self.ports = sorted(ports)

    def run(self, *args: str, backend: str | None = None,
            timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env.pop("PEAR_UP_PORTS", None)
        env.pop("PEAR_BACKEND", None)
        if backend is not None:
            env["PEAR_BACKEND"] = backend
        return subprocess.run(
            [sys.executable, "-m", "pear_mqtt.cli", "up", *args, "--dir", str(self.dir)],
            cwd=self.root, env=env, capture_output=True, text=True, timeout=timeout,
            check=False)

    def start(self, *extra: str, backend: str | None = None
              ) -> subprocess.CompletedProcess[str]:
        if "--timeout" not in extra:
            extra = (*extra, "--timeout", f"{START_TIMEOUT:g}")
        return self.run("start", "--ports", ",".join(map(str, self.ports)), *extra,
                        backend=backend, timeout=START_CLI_TIMEOUT)

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.dir / "up.json").read_text())
        return data


def scrape_until(url: str, name: str, timeout: float = 60.0) -> dict[str, float]:
    """The samples at ``url`` (``name{labels}`` -> value) once one named ``name`` is there.
    Polled: an endpoint that a process (or a container) serves a moment after it starts,
    or whose figures arrive later, has no event to wait on."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
        except OSError as exc:
            last = str(exc)
        else:
            samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                       for line in text.splitlines() if line and not line.startswith("#")}
            if any(k.split("{", 1)[0] == name for k in samples):
                return samples
            last = f"{len(samples)} samples, none named {name}"
        time.sleep(0.5)  # poll back-off
    raise AssertionError(f"{url}: {last} within {timeout} s")
