"""Docker Compose driver for ``pear-mqtt up --backend docker``: runs ``deploy/compose.yaml``.

Finds a Compose (v2 ``docker compose`` or Debian's ``docker-compose`` 1.29), tells whether the
engine and images are there, and reads containers' state and logs through the ``docker``
command line (no Docker library at run time). Containers are found by Compose's labels, never
by their names, which differ between Compose v1 and v2.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ..errors import BrokerError

__all__ = [
    "APP_IMAGE",
    "BROKER_IMAGE",
    "COMPOSE_FILE",
    "Compose",
    "Container",
    "compose_command",
    "docker_problem",
    "project_name",
]

COMPOSE_FILE: Final = Path(__file__).resolve().parents[2] / "deploy" / "compose.yaml"
"""``deploy/compose.yaml`` of a source checkout (``PEAR_COMPOSE_FILE`` overrides)."""

BROKER_IMAGE: Final = "pear/mosquitto:latest"
APP_IMAGE: Final = "pear/pear-mqtt:latest"

_PROJECT_LABEL = "com.docker.compose.project"
_SERVICE_LABEL = "com.docker.compose.service"
_CLI_TIMEOUT = 120.0  # `up` of a dozen containers on two cores, with margin


def _run(argv: Sequence[str], *, timeout: float = 30.0, env: Mapping[str, str] | None = None,
         check: bool = False) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout, env=dict(env) if env else None,
                              check=False)
    except FileNotFoundError:
        raise BrokerError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise BrokerError(f"`{shlex.join(argv)}` did not finish within {timeout:.0f}s") \
            from None
    if check and done.returncode != 0:
        raise BrokerError(f"`{shlex.join(argv)}` failed (exit {done.returncode}):\n"
                          f"{(done.stderr or done.stdout).strip()}")
    return done


def compose_file() -> Path:
    """The Compose file to run (``PEAR_COMPOSE_FILE`` or the checkout's
    ``deploy/compose.yaml``)."""
    return Path(os.environ.get("PEAR_COMPOSE_FILE") or COMPOSE_FILE).resolve()


def images() -> tuple[str, str]:
    """The broker and app images (``PEAR_BROKER_IMAGE``, ``PEAR_APP_IMAGE``)."""
    return (os.environ.get("PEAR_BROKER_IMAGE") or BROKER_IMAGE,
            os.environ.get("PEAR_APP_IMAGE") or APP_IMAGE)


def compose_command() -> list[str] | None:
    """The Compose command line: ``PEAR_COMPOSE`` if set, else ``docker compose`` (v2) if it
    works, else ``docker-compose``; None when there is none."""
    chosen = os.environ.get("PEAR_COMPOSE")
    if chosen:
        return shlex.split(chosen)
    if shutil.which("docker"):
        with contextlib.suppress(BrokerError):
            if _run(["docker", "compose", "version"], timeout=15).returncode == 0:
                return ["docker", "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def engine_reachable() -> bool:
    """Whether ``docker info`` succeeds (a CLI and an engine that answers it)."""
    if shutil.which("docker") is None:
        return False
    try:
        return _run(["docker", "info"], timeout=10).returncode == 0
    except BrokerError:
        return False


def docker_problem() -> str | None:
    """What keeps the docker backend from running here (with the fix), or None."""
    if shutil.which("docker") is None:
        return "the docker command is not installed (apt-get install docker.io)"
    if not engine_reachable():
        return ("no Docker engine answers `docker info` (start one: see "
                "deploy/CONTAINERS.md)")
    if compose_command() is None:
        return "no Compose: neither `docker compose` nor docker-compose (apt-get install " \
               "docker-compose)"
    path = compose_file()
    if not path.is_file():
        return f"{path} is missing (a source checkout has it; or set PEAR_COMPOSE_FILE)"
    missing = [i for i in images()
               if _run(["docker", "image", "inspect", i], timeout=15).returncode != 0]
    if missing:
        return (f"image(s) {', '.join(missing)} not built: run deploy/images/build.sh as root "
                "(offline; see deploy/CONTAINERS.md)")
    return None


def project_name(directory: Path) -> str:
    """A Compose project name unique to the state directory, valid for Compose v1 and v2."""
    digest = hashlib.sha256(str(Path(directory).resolve()).encode()).hexdigest()[:10]
    return f"pear-{digest}"


@dataclass(frozen=True, slots=True)
class Container:
    """The state of one service's container, from ``docker inspect``."""

    service: str
    name: str
    status: str  # created, running, restarting, exited, paused, dead
    pid: int | None
    health: str | None  # starting, healthy, unhealthy; None without a health check
    exit_code: int | None

    @property
    def running(self) -> bool:
        return self.status in ("running", "paused") and self.pid is not None


class Compose:
    """One Compose project: ``deploy/compose.yaml`` run for one state directory."""

    def __init__(self, *, command: Sequence[str], file: Path | str, project: str,
                 env: Mapping[str, str]) -> None:
        self.command = list(command)
        self.file = Path(file)
        self.project = project
        self.env = dict(env)

    @classmethod
    def for_directory(cls, directory: Path, *, extra_env: Mapping[str, str] | None = None
                      ) -> Compose:
        """The project for ``directory``, with the variables ``deploy/compose.yaml`` reads."""
        command = compose_command()
        if command is None:
            raise BrokerError("docker backend: no Compose (apt-get install docker-compose)")
        broker_image, app_image = images()
        env = {"PEAR_DIR": str(Path(directory).resolve()), "PEAR_UID": str(os.getuid()),
               "PEAR_GID": str(os.getgid()), "PEAR_BROKER_IMAGE": broker_image,
               "PEAR_APP_IMAGE": app_image, **(extra_env or {})}
        return cls(command=command, file=compose_file(), project=project_name(directory),
                   env=env)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Compose:
        return cls(command=data["command"], file=data["file"], project=data["project"],
                   env=data["env"])

    def to_json(self) -> dict[str, Any]:
        return {"command": self.command, "file": str(self.file), "project": self.project,
                "env": self.env}

    def argv(self, *args: str) -> list[str]:
        """The full command line for ``compose ARGS``."""
        return [*self.command, "-p", self.project, "-f", str(self.file), *args]

    def _environ(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def run(self, *args: str, timeout: float = _CLI_TIMEOUT
            ) -> subprocess.CompletedProcess[str]:
        """Run ``compose ARGS``; raise :class:`BrokerError` with its output when it fails."""
        return _run(self.argv(*args), timeout=timeout, env=self._environ(), check=True)

    def write_env_file(self, directory: Path) -> Path:
        """``compose.env`` and ``compose.project`` in ``directory``, for running Compose by
        hand."""
        path = Path(directory) / "compose.env"
        lines = [f"{k}={v}" for k, v in sorted(self.env.items())]
        path.write_text("# written by `pear-mqtt up start --backend docker`\n"
                        + "\n".join(lines) + "\n", encoding="utf-8")
        (Path(directory) / "compose.project").write_text(self.project + "\n", encoding="utf-8")
        return path

    def up(self, services: Sequence[str], *, no_deps: bool = False) -> None:
        """Create and start ``services`` detached (recreating them if their definition
        changed)."""
        if services:
            self.run("up", "-d", *(["--no-deps"] if no_deps else []), *services)

    def down(self, *, grace: float) -> None:
        """Stop (SIGTERM, SIGKILL after ``grace``) and remove every container of the project.

        Compose removes only the services it knows about (active profiles); anything else
        carrying the project label is removed after it, so nothing is left running.
        """
        self.run("down", "--timeout", str(max(1, round(grace))), "--remove-orphans",
                 timeout=_CLI_TIMEOUT + grace)
        ids = self._ids()
        if ids:
            _run(["docker", "rm", "-f", *ids], timeout=60)

    def _ids(self) -> list[str]:
        done = _run(["docker", "ps", "-a", "-q", "--filter",
                     f"label={_PROJECT_LABEL}={self.project}"], timeout=30)
        if done.returncode != 0:
            raise BrokerError(f"docker ps failed: {done.stderr.strip()}")
        return done.stdout.split()

    def containers(self) -> dict[str, Container]:
        """Every container of the project by service (the newest one if a service has
        several)."""
        ids = self._ids()
        if not ids:
            return {}
        done = _run(["docker", "inspect", *ids], timeout=30)
        if done.returncode != 0:
            # A container removed between `ps` and `inspect` (a restart): ask once more.
            ids = self._ids()
            done = _run(["docker", "inspect", *ids], timeout=30, check=True) if ids else done
            if not ids:
                return {}
        found: dict[str, tuple[str, Container]] = {}
        for item in json.loads(done.stdout):
            labels = item.get("Config", {}).get("Labels") or {}
            service = labels.get(_SERVICE_LABEL)
            if not service:
                continue
            state = item.get("State", {})
            health = (state.get("Health") or {}).get("Status")
            pid = int(state.get("Pid") or 0) or None
            c = Container(service=service, name=str(item.get("Name", "")).lstrip("/"),
                          status=str(state.get("Status", "unknown")), pid=pid, health=health,
                          exit_code=state.get("ExitCode"))
            created = str(item.get("Created", ""))
            if service not in found or created > found[service][0]:
                found[service] = (created, c)
        return {service: c for service, (_, c) in found.items()}

    def tail(self, container: str, lines: int) -> str:
        """The last ``lines`` lines of a container's output (``docker logs --tail``)."""
        done = _run(["docker", "logs", "--tail", str(lines), container], timeout=30)
        text = (done.stdout + done.stderr).rstrip("\n")
        if done.returncode != 0:
            return f"(no logs: {text})\n"
        return text + "\n" if text else "(empty)\n"

    def logs(self, *, lines: int, follow: bool) -> int:
        """``compose logs`` of every service to this process's stdout; the exit status."""
        args = ["logs", "--no-color", "--tail", str(lines), *(["--follow"] if follow else [])]
        try:
            return subprocess.run(self.argv(*args), env=self._environ(), check=False,
                                  stdin=subprocess.DEVNULL).returncode
        except KeyboardInterrupt:
            return 0
