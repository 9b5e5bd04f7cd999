"""Runs a clustered broker as processes of this machine: one redis-server and one aedes node
(``node deploy/cluster/broker.mjs``) per configured port; nodes can be stopped and started
one at a time (a failover)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

from ...errors import BrokerError
from .render import ClusterFiles

__all__ = ["ClusterProcesses", "cluster_dir", "cluster_problem"]

_NPM_PACKAGES = ("aedes", "aedes-persistence-redis", "mqemitter-redis")


def cluster_dir() -> Path:
    """Where broker.mjs and its npm packages are: ``PEAR_CLUSTER_DIR``, else the
    checkout's deploy/cluster."""
    named = os.environ.get("PEAR_CLUSTER_DIR")
    if named:
        return Path(named)
    return Path(__file__).resolve().parents[3] / "deploy" / "cluster"


def cluster_problem() -> str | None:
    """Why this machine cannot run a clustered broker (with the fix), or None."""
    if shutil.which("node") is None:
        return "needs Node.js (apt-get install nodejs)"
    if shutil.which("redis-server") is None:
        return "needs redis (apt-get install redis-server)"
    where = cluster_dir()
    if not (where / "broker.mjs").is_file():
        return f"{where}/broker.mjs is missing (set PEAR_CLUSTER_DIR to deploy/cluster)"
    absent = [p for p in _NPM_PACKAGES if not (where / "node_modules" / p).is_dir()]
    if absent:
        return (f"the npm packages {', '.join(absent)} are not installed: run `npm ci "
                f"--prefix {where}` (make test does)")
    return None


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class ClusterProcesses:
    """redis and the nodes of one :class:`ClusterFiles`, logging into ``log_dir``."""

    def __init__(self, files: ClusterFiles, *, log_dir: Path) -> None:
        self.files = files
        self.log_dir = Path(log_dir)
        self._redis: subprocess.Popen[bytes] | None = None
        self._nodes: dict[int, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    def _spawn(self, argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = (self.log_dir / log_name).open("ab")
        self._logs.append(out)
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=cluster_dir())
        except OSError as exc:
            raise BrokerError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None

    def _wait(self, proc: subprocess.Popen[bytes], port: int, log_name: str,
              timeout: float) -> None:
        """Until ``port`` accepts connections; BrokerError with the log's tail if the process
        exits or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while not _accepts(self.files.host, port):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.log_dir / log_name).read_text(errors="replace")[-1500:]
                state = (f"exited with {proc.returncode}" if proc.poll() is not None
                         else f"not listening after {timeout:g} s")
                raise BrokerError(f"{log_name[:-4]} on port {port} {state}: {tail.strip()}")
            time.sleep(0.05)  # a port to open, not a message to wait for

    def start(self, *, timeout: float = 30.0) -> ClusterProcesses:
        """Start redis, then every node; return once each accepts connections."""
        problem = cluster_problem()
        if problem is not None:
            raise BrokerError(f"cluster broker: {problem}")
        redis = shutil.which("redis-server")
        assert redis is not None
        self._redis = self._spawn([redis, str(self.files.redis_conf)], "redis.log")
        self._wait(self._redis, self.files.redis_port, "redis.log", timeout)
        for i in range(len(self.files.nodes)):
            self.start_node(i, timeout=timeout)
        return self

    def start_node(self, index: int, *, timeout: float = 30.0) -> None:
        """Start node ``index`` (from 0) and wait until it listens."""
        node = shutil.which("node")
        assert node is not None
        name = f"node-{index + 1}.log"
        proc = self._spawn([node, "broker.mjs", str(self.files.nodes[index].resolve())], name)
        self._nodes[index] = proc
        self._wait(proc, self.files.ports[index], name, timeout)

    def stop_node(self, index: int, *, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop node ``index``: SIGTERM (its clients are disconnected), or SIGKILL (a crash)."""
        proc = self._nodes.pop(index, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def running(self, index: int) -> bool:
        proc = self._nodes.get(index)
        return proc is not None and proc.poll() is None

    def log_text(self) -> str:
        """Every process's log, each under a heading (for a failed test's report)."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop every node, then redis (which writes its log on the way out)."""
        for index in list(self._nodes):
            self.stop_node(index)
        if self._redis is not None and self._redis.poll() is None:
            self._redis.terminate()
            try:
                self._redis.wait(10)
            except subprocess.TimeoutExpired:
                self._redis.kill()
                self._redis.wait(10)
        self._redis = None
        for out in self._logs:
            out.close()
        self._logs.clear()
