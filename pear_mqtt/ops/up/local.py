"""Backends whose components are processes of this machine: mosquitto, or amqtt brokers."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar, Final

from ...security import pki as pkimod
from ...security.pki import CertPaths
from ..brokerconf import render
from ..embedded.available import missing
from .backend import Backend
from .processes import print_logs, spawn, stop_groups, tail
from .state import BrokerEntry, NodeEntry, Proc, UpState
from .topology import BRIDGE_USER, HOST, MONITOR_USER, TOPOLOGY, NetworkSpec

__all__ = [
    "EmbeddedBackend",
    "LocalBackend",
    "ProcessBackend",
    "broker_log",
    "mosquitto",
    "render_mosquitto",
]

# How often agents rewrite their status file (the health check reads it).
AGENT_STATUS_INTERVAL: Final = 2.0
# An agent told to stop keeps delivering its outbox this long; shorter than `stop`'s grace
# so a healthy agent always exits on its own before SIGKILL.
AGENT_DRAIN: Final = 5.0


def mosquitto() -> str | None:
    """The mosquitto executable, if this machine has one."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def render_mosquitto(*, directory: Path, spec: NetworkSpec, port: int, ca_dir: Path,
                     certs: CertPaths, log_file: Path | None) -> Path:
    """``brokers/<mode>/mosquitto.conf`` and its ACL for the broker of ``spec``."""
    return render(
        mode=spec.mode, network=spec.network, out_dir=directory / "brokers" / spec.mode,
        ca_file=ca_dir / pkimod.CA_CERT, cert_file=certs.cert, key_file=certs.key,
        crl_file=ca_dir / pkimod.CA_CRL, tls_port=port,
        # The CA registry names revoked nodes: their retained messages are denied.
        ca_dir=ca_dir,
        bridge_users=(BRIDGE_USER,) if spec.bridge else (), bind_address=HOST,
        monitor_users=(MONITOR_USER,),
        # As the test harness does: started as root, mosquitto would switch to the
        # `mosquitto` user before reading the 0600 key it cannot read as that user.
        # (Containers run as the invoking user, so the same holds there.)
        run_as="root" if os.geteuid() == 0 else None,
        log_file=log_file).conf_path


def broker_log(directory: Path, spec: NetworkSpec) -> Path:
    """Where the broker of ``spec`` logs when it runs as a process of this machine."""
    return directory / "logs" / f"broker-{spec.mode}.log"


def _metrics(port: int | None) -> list[str]:
    return [] if port is None else ["--metrics-port", str(port)]


class ProcessBackend(Backend):
    """Components are detached processes of this machine, each logging to ``logs/``."""

    serves_metrics: ClassVar[bool] = True

    def bridge_process(self, *, directory: Path, config: str, status_file: Path,
                       metrics_port: int | None = None) -> Proc:
        argv = [sys.executable, "-m", "pear_mqtt.cli", "bridge", "--config", config,
                "--status-file", str(status_file), "--status-interval", "2",
                *_metrics(metrics_port)]
        return spawn(argv, log=directory / "logs" / "bridge.log", cwd=directory)

    def agent_process(self, *, directory: Path, node: NodeEntry, status_file: Path,
                      rate: float | None, metrics_port: int | None = None) -> Proc:
        assert node.config is not None
        if node.role == "archive":
            argv = [sys.executable, "-m", "pear_mqtt.cli", "archive", "--config", node.config,
                    "--status-file", str(status_file),
                    "--status-interval", f"{AGENT_STATUS_INTERVAL:g}", *_metrics(metrics_port)]
            return spawn(argv, log=directory / "logs" / f"agent-{node.name}.log",
                         cwd=directory)
        argv = [sys.executable, "-m", "pear_mqtt.cli", "agent", "--config", node.config,
                "--simulate", "--status-file", str(status_file),
                "--status-interval", f"{AGENT_STATUS_INTERVAL:g}",
                "--drain-timeout", f"{AGENT_DRAIN:g}", *_metrics(metrics_port)]
        if rate is not None:
            argv += ["--rate", str(rate)]
        return spawn(argv, log=directory / "logs" / f"agent-{node.name}.log", cwd=directory)

    def tail(self, state: UpState, log: str, lines: int, *, since: int = 0) -> str:
        return tail(log, lines, since=since)

    def logs(self, *, directory: Path, state: UpState, lines: int, follow: bool,
             out: Callable[[str], None]) -> bool:
        return print_logs(directory=directory, state=state, lines=lines, follow=follow, out=out)

    def stop(self, state: UpState, *, grace: float, out: Callable[[str], None]) -> list[str]:
        return stop_groups(state.stop_order(), grace=grace, out=out)


class LocalBackend(ProcessBackend):
    """One ``mosquitto`` process per network, configured by :mod:`pear_mqtt.ops.brokerconf`."""

    name: ClassVar[str] = "local"
    serves_sys: ClassVar[bool] = True

    @classmethod
    def problem(cls) -> str | None:
        return None if mosquitto() else "needs mosquitto (apt-get install mosquitto)"

    @classmethod
    def refusal(cls, problem: str) -> str:
        return f"local backend {problem}, or use PEAR_BACKEND=embedded"

    @classmethod
    def chosen(cls, *, auto: bool) -> str:
        return f"backend: local (mosquitto {mosquitto()})"

    def broker_config(self, *, directory: Path, spec: NetworkSpec, port: int, ca_dir: Path,
                      certs: CertPaths, probe: NodeEntry) -> tuple[Path | None, str]:
        log = broker_log(directory, spec)
        conf = render_mosquitto(directory=directory, spec=spec, port=port, ca_dir=ca_dir,
                                certs=certs, log_file=log)
        return conf, str(log)

    def broker_process(self, *, directory: Path, broker: BrokerEntry) -> Proc:
        executable = mosquitto()
        assert executable is not None and broker.conf is not None  # checked by choose_backend
        return spawn([executable, "-c", broker.conf], log=Path(broker.proc.log), cwd=directory)


class EmbeddedBackend(ProcessBackend):
    """One ``pear-mqtt embedded`` (amqtt) process per network, for machines without mosquitto:
    the same identity and ACL rules, no persistence."""

    name: ClassVar[str] = "embedded"

    @classmethod
    def problem(cls) -> str | None:
        return missing()

    @classmethod
    def chosen(cls, *, auto: bool) -> str:
        if auto:  # the last resort of `auto`
            return "backend: embedded (mosquitto not found; amqtt `pear-mqtt embedded` processes)"
        return "backend: embedded (amqtt, `pear-mqtt embedded` processes)"

    def broker_config(self, *, directory: Path, spec: NetworkSpec, port: int, ca_dir: Path,
                      certs: CertPaths, probe: NodeEntry) -> tuple[Path | None, str]:
        return None, str(broker_log(directory, spec))  # configured on its command line

    def broker_process(self, *, directory: Path, broker: BrokerEntry) -> Proc:
        spec = next(s for s in TOPOLOGY if s.mode == broker.mode)
        argv: Sequence[str] = [
            sys.executable, "-m", "pear_mqtt.cli", "embedded", "--mode", broker.mode,
            "--network", broker.network, "--pki", broker.ca_dir, "--cert", broker.cert,
            "--key", broker.key, "--crl", broker.crl, "--host", broker.host,
            "--port", str(broker.port), *(["--bridge-user", BRIDGE_USER] if spec.bridge else [])]
        return spawn(argv, log=Path(broker.proc.log), cwd=directory)

