"""The container backend of the broker harness (``PEAR_TEST_BACKEND=container``).

:class:`ContainerMosquittoBroker` is a :class:`brokers.MosquittoBroker` whose mosquitto runs in
the broker image (``broker/image``, built by ``deploy/images/build.sh``) through testcontainers,
so every integration test runs unchanged against the containerised broker:

- **Host networking, no port mapping.** The container shares the host's network namespace
  (``network_mode="host"``), and the rendered configuration binds 127.0.0.1 on ports picked on
  the host, exactly as for a process. Nothing listens anywhere but loopback.
- **Same files, same paths.** The broker's work directory (configuration, ACL, log,
  persistence) and the PKI directory are bind-mounted at their host paths, so the rendered
  absolute paths hold inside the container, ``log_text()`` reads the broker's own log file,
  and a CRL rewritten on the host is what a reload reads.
- **Same lifecycle.** ``kill`` is ``docker kill`` (SIGKILL), ``stop`` is SIGTERM and a wait,
  and a later ``start`` starts *the same container* again: same ports, same persistence
  directory. ``pause``/``resume`` freeze and thaw the container's cgroup (the broker holds its
  sockets and answers nothing, like SIGSTOP); ``reload`` is ``docker kill -s HUP``.
- **Readiness** is the broker's log line ("... running") plus a TCP connect, as for a process;
  what mosquitto printed before its log was open is the container's output (``docker logs``).
- **No Ryuk.** The reaper image is not to be had offline, so ``TESTCONTAINERS_RYUK_DISABLED``
  is set; the fixtures remove their containers, and every container carries the label
  :data:`LABEL` so :func:`sweep` removes what an interrupted run left behind.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import uuid
from pathlib import Path
from typing import Any

# testcontainers reads its configuration when it is first used; Ryuk would need an image from a
# registry, which this machine cannot reach.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

import docker
import docker.errors
from brokers import MosquittoBroker
from testcontainers.core.container import DockerContainer

from pear_mqtt.errors import BrokerError

__all__ = ["IMAGE", "LABEL", "ContainerMosquittoBroker", "engine_problem", "sweep"]

IMAGE = os.environ.get("PEAR_TEST_BROKER_IMAGE", "pear/mosquitto:latest")
"""The broker image the tests run (``deploy/images/build.sh`` builds it)."""

LABEL = "org.pear.test-broker"
"""Label on every container this module starts (value: the pid of the pytest process)."""

_STOPPED = ("exited", "dead", "created", "removing")


@functools.cache
def _client() -> docker.DockerClient:
    return docker.from_env(timeout=30)


@functools.cache
def engine_problem() -> str | None:
    """Why the container backend cannot run here, or None. Sweeps leftovers once it can."""
    try:
        _client().ping()
    except Exception as exc:  # any failure to reach the engine means the same thing here
        return (f"PEAR_TEST_BACKEND=container, but no Docker engine answers ({exc}); start "
                "one as deploy/CONTAINERS.md shows, or unset PEAR_TEST_BACKEND")
    try:
        _client().images.get(IMAGE)
    except docker.errors.ImageNotFound:
        return (f"PEAR_TEST_BACKEND=container, but the image {IMAGE} is missing: build it "
                "with deploy/images/build.sh")
    sweep()
    return None


def sweep() -> int:
    """Remove test broker containers whose pytest process is gone; returns how many."""
    removed = 0
    for container in _client().containers.list(all=True, filters={"label": LABEL}):
        owner = container.labels.get(LABEL, "")
        if owner.isdigit() and Path(f"/proc/{owner}").exists():
            continue  # this run's, or another test run's on this machine that still goes on
        with contextlib.suppress(docker.errors.APIError):
            container.remove(force=True)
            removed += 1
    return removed


class ContainerMosquittoBroker(MosquittoBroker):
    """A :class:`brokers.MosquittoBroker` run in the broker image (see the module doc)."""

    backend = "container"

    def __init__(self, **kwargs: Any) -> None:
        self._container: DockerContainer | None = None
        self.container_name = f"pear-test-mosquitto-{uuid.uuid4().hex[:10]}"
        super().__init__(**kwargs)

    def _check_available(self) -> None:
        problem = engine_problem()
        if problem is not None:
            raise BrokerError(problem)

    # -- the container -------------------------------------------------------------------------
    def _mounts(self) -> list[Path]:
        """Host directories the configuration refers to, mounted at the same paths."""
        wanted = [self.workdir.resolve()]
        if self.pki is not None:
            wanted.append(self.pki.root.resolve())
        # A directory inside another mounted one comes with it.
        return [p for p in wanted
                if not any(q != p and q in p.parents for q in wanted)]

    def docker(self) -> Any:
        """The docker-py container object (refreshed)."""
        assert self._container is not None
        wrapped = self._container.get_wrapped_container()
        wrapped.reload()
        return wrapped

    def _spawn(self) -> None:
        if self._container is not None:
            # Same container again: same command, mounts and (host-network) ports.
            self._container.get_wrapped_container().start()
            return
        container = (
            DockerContainer(IMAGE)
            .with_name(self.container_name)
            .with_command(["-c", str(self.conf_path.resolve())])
            .with_kwargs(network_mode="host",
                         # Files the broker writes (log, persistence) belong to the test user.
                         user=f"{os.getuid()}:{os.getgid()}",
                         labels={LABEL: str(os.getpid())},
                         # mosquitto's own log is the record; keep docker's copy small.
                         log_config={"type": "json-file", "config": {"max-size": "1m"}}))
        for path in self._mounts():
            container.with_volume_mapping(str(path), str(path), "rw")
        self._container = container
        try:
            container.start()
        except docker.errors.APIError as exc:
            raise BrokerError(f"cannot start the broker container ({IMAGE}): {exc}") from None

    def _exit_status(self) -> int | None:
        state = self.docker().attrs["State"]
        if state["Status"] in _STOPPED:
            return int(state.get("ExitCode", -1))
        return None

    @property
    def pid(self) -> int | None:
        """The host pid of the containerised mosquitto, None when it does not run."""
        if self._container is None:
            return None
        pid = int(self.docker().attrs["State"].get("Pid") or 0)
        return pid or None

    @property
    def running(self) -> bool:
        return self._container is not None and self._exit_status() is None

    def output_text(self) -> str:
        """The container's output: what mosquitto printed before its log was open."""
        if self._container is None:
            return ""
        try:
            raw = self._container.get_wrapped_container().logs(stdout=True, stderr=True)
        except docker.errors.APIError as exc:
            return f"(no container output: {exc})"
        return bytes(raw).decode("utf-8", errors="replace")

    # -- lifecycle -----------------------------------------------------------------------------
    def _wait_exited(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        delay = 0.005
        while self._exit_status() is None:
            if time.monotonic() > deadline:
                return False
            time.sleep(delay)  # poll back-off for the container to exit
            delay = min(delay * 2, 0.05)
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait: mosquitto saves its persistence file on the way out."""
        if self._container is None or not self.running:
            return
        wrapped = self.docker()
        if wrapped.attrs["State"].get("Paused"):
            wrapped.unpause()  # a frozen broker cannot act on SIGTERM
        with contextlib.suppress(docker.errors.APIError):  # it may have exited meanwhile
            wrapped.kill(signal="SIGTERM")
        if not self._wait_exited(timeout):
            self.kill()
            raise BrokerError(f"mosquitto did not stop within {timeout}s; killed")

    def kill(self) -> None:
        """``docker kill``: what arrived since the last autosave is lost, like a crash."""
        if self._container is None or not self.running:
            return
        with contextlib.suppress(docker.errors.APIError):
            self.docker().kill()  # SIGKILL; a paused container is killed too
        if not self._wait_exited(10.0):
            raise BrokerError(f"container {self.container_name} did not die on SIGKILL")

    def pause(self) -> None:
        """Freeze the container: the broker holds its sockets but answers nothing."""
        if self.running:
            self.docker().pause()

    def resume(self) -> None:
        """Thaw the container after :meth:`pause`."""
        if self._container is not None and self.docker().attrs["State"].get("Paused"):
            self.docker().unpause()

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its configuration (and the ACL and CRL files)."""
        if self.running:
            self.docker().kill(signal="SIGHUP")

    def close(self) -> None:
        """Remove the container (killing it if it still runs)."""
        if self._container is None:
            return
        with contextlib.suppress(docker.errors.APIError):
            self._container.get_wrapped_container().remove(force=True)
        self._container = None
