"""The benchmark's world: a throw-away PKI and mosquitto with the project's rendered config.

:func:`build_env` mints a CA and certificates with :mod:`pear_mqtt.security.pki`; :class:`Broker`
renders ``mosquitto.conf`` and the ACL with :func:`pear_mqtt.ops.brokerconf.render` (the file an
operator deploys) and runs mosquitto on a free loopback port with only the mutual-TLS
listener. Everything a worker process needs travels as the plain, picklable :class:`BenchEnv`.

pear_mqtt is imported inside the functions that need it: the raw paho workers import this
module too and should not pay for loading pear_mqtt when they start.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BRIDGE_COMPANIES", "BRIDGE_USER", "MEMBERS", "BenchEnv", "Broker", "BrokerError",
           "build_env", "issue_shard", "mosquitto_version"]

MEMBERS = ("acme", "globex", "initech")
"""acme publishes, globex receives or joins late, initech runs the raw baselines' other side."""

BRIDGE_COMPANIES = (*MEMBERS, "umbrella", "hooli", "stark")
"""The consortium members whose contributions the bridge benchmark aggregates: more than the
bridge's default k = 5, so that every cell it counts could be published."""

BRIDGE_USER = "bench-bridge"
"""CN of the bridge's certificate, listed in the rendered ACL's ``bridge_users``."""

NETWORK = "benchnet"
NODE = "store-1"
# The queue and in-flight settings the benchmark needs; brokerconf renders the queue limit as
# 1,000,000 by default, which is already above any N here, but 0 (unlimited) is what the
# benchmark issue asks for and removes the limit from the comparison altogether.
MAX_QUEUED_MESSAGES = 0
MAX_INFLIGHT_MESSAGES = 0


class BrokerError(RuntimeError):
    """mosquitto would not start or is missing."""


@dataclass(frozen=True)
class BenchEnv:
    """Paths and secrets for one benchmark run (picklable: sent to spawned workers)."""

    root: Path
    network: str
    ca: Path
    crl: Path
    broker_cert: Path
    broker_key: Path
    certs: dict[str, tuple[Path, Path]]  # member -> (cert, key) of its node "store-1"
    aggregator_pub: Path
    aggregator_key: Path  # the X25519 private half, for the bridge
    bridge_cert: Path
    bridge_key: Path
    group_key: str
    host: str = "localhost"
    port: int = 0

    def with_port(self, port: int) -> BenchEnv:
        """This environment pointing at a broker on ``port``."""
        return BenchEnv(**{**self.__dict__, "port": port})

    def cert(self, member: str) -> tuple[Path, Path]:
        """(certificate, key) of ``member``'s node."""
        return self.certs[member]

    def topic_root(self, member: str) -> str:
        """The subtree ``member`` may write in this consortium network."""
        return f"pear/v1/consortium/{self.network}/{member}"

    def state_filter(self) -> str:
        """Every retained state in the network (what ``PearNetwork.sync`` subscribes to)."""
        return f"pear/v1/consortium/{self.network}/+/state/#"


def build_env(root: Path) -> BenchEnv:
    """Create the CA, the broker and node certificates and the aggregator key under ``root``."""
    from pear_mqtt.security import pki
    from pear_mqtt.security.seal import (
        generate_x25519_key,
        save_x25519_private_key,
        save_x25519_public_key,
    )

    ca_dir = root / "ca"
    pki.create_ca(directory=ca_dir, network=NETWORK)
    broker = pki.issue(ca_dir=ca_dir, out_dir=root / "broker", role="broker",
                       member="benchbroker", hosts=("localhost", "127.0.0.1"))
    bridge = pki.issue(ca_dir=ca_dir, out_dir=root / "bridge", role="bridge",
                       member=BRIDGE_USER)
    certs = {}
    for member in BRIDGE_COMPANIES:
        paths = pki.issue(ca_dir=ca_dir, out_dir=root / "nodes", role="node", member=member,
                          node=NODE)
        certs[member] = (paths.cert, paths.key)
    aggregator, aggregator_key = root / "aggregator.pub", root / "aggregator.key"
    key = generate_x25519_key()
    save_x25519_public_key(key.public_key(), aggregator)
    save_x25519_private_key(key, aggregator_key)
    return BenchEnv(root=root, network=NETWORK, ca=ca_dir / pki.CA_CERT,
                    crl=ca_dir / pki.CA_CRL,
                    broker_cert=broker.cert, broker_key=broker.key, certs=certs,
                    aggregator_pub=aggregator, aggregator_key=aggregator_key,
                    bridge_cert=bridge.cert, bridge_key=bridge.key,
                    group_key=base64.b64encode(os.urandom(32)).decode())


def issue_shard(env: BenchEnv, shard: Path, members: list[str],
                node: str = NODE) -> dict[str, tuple[Path, Path]]:
    """Node certificates for ``members`` from the network CA, issued with
    :func:`pear_mqtt.security.pki.issue` into ``shard`` (reused when already there).

    ``pki.issue`` reads and rewrites the CA's whole ``registry.json`` for every certificate,
    so issuing 1,000 from one CA directory is quadratic (~12 s here). Each shard is a copy of
    the CA's certificate and key with a registry of its own: the certificates are the same
    (same CA, random serials), and shards can be issued in parallel by the fan-in workers.
    """
    import json

    from pear_mqtt.security import pki

    out = shard / "nodes"
    paths: dict[str, tuple[Path, Path]] = {}
    if not (shard / pki.REGISTRY).exists():
        shard.mkdir(parents=True, exist_ok=True)
        ca_dir = env.ca.parent
        for name in (pki.CA_CERT, pki.CA_KEY, pki.CA_CRL):
            shutil.copy2(ca_dir / name, shard / name)
        registry = json.loads((ca_dir / pki.REGISTRY).read_text(encoding="utf-8"))
        registry["certificates"] = []
        (shard / pki.REGISTRY).write_text(json.dumps(registry), encoding="utf-8")
    for member in members:
        cert, key = out / f"node-{member}-{node}.crt", out / f"node-{member}-{node}.key"
        if not cert.exists():
            issued = pki.issue(ca_dir=shard, out_dir=out, role="node", member=member, node=node)
            cert, key = issued.cert, issued.key
        paths[member] = (cert, key)
    return paths


def _raise_nofile() -> None:
    """In the broker's child before exec: as many descriptors as the hard limit allows (the
    fan-in benchmark holds 1,000 client connections, one descriptor each)."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _mosquitto() -> str:
    path = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                         if os.path.exists("/usr/sbin/mosquitto") else None)
    if path is None:
        raise BrokerError("mosquitto is not installed (apt-get install mosquitto "
                          "mosquitto-clients)")
    return path


def mosquitto_version() -> str:
    """``mosquitto version X.Y.Z`` as the binary reports it."""
    out = subprocess.run([_mosquitto(), "-h"], capture_output=True, text=True, check=False)
    match = re.search(r"mosquitto version \S+", out.stdout + out.stderr)
    return match.group(0) if match else "unknown"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """One mosquitto process with the rendered configuration (mTLS only; consortium mode
    unless told otherwise).

    Use as a context manager; every benchmark repetition gets a fresh one, so nothing retained
    or queued by an earlier measurement can leak into the next. ``acl_modes`` and
    ``bridge_users`` make the all-in-one broker of the bridge benchmark; ``persistence`` the
    production setting the fan-in benchmark restarts with (:meth:`kill` then :meth:`restart`,
    same port, same files).
    """

    def __init__(self, env: BenchEnv, workdir: Path, *, start_timeout: float = 10.0,
                 mode: str = "consortium", acl_modes: tuple[str, ...] = (),
                 bridge_users: tuple[str, ...] = (), persistence: bool = False) -> None:
        self.env = env
        self.workdir = workdir
        self.start_timeout = start_timeout
        self.mode = mode
        self.acl_modes = acl_modes
        self.bridge_users = bridge_users
        self.persistence = persistence
        self.port = 0
        self.conf_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> Broker:
        """Render the configuration, start mosquitto and wait until it accepts connections."""
        from pear_mqtt.ops.brokerconf import render

        self.workdir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):
            self.port = _free_port()
            render(mode=self.mode, acl_modes=self.acl_modes or None,  # type: ignore[arg-type]
                   network=self.env.network, out_dir=self.workdir,
                   ca_file=self.env.ca, cert_file=self.env.broker_cert,
                   key_file=self.env.broker_key, crl_file=self.env.crl, tls_port=self.port,
                   bridge_users=self.bridge_users, persistence=self.persistence,
                   bind_address="127.0.0.1",
                   run_as="root" if os.geteuid() == 0 else None, log_file=self.log_path,
                   max_queued_messages=MAX_QUEUED_MESSAGES,
                   max_inflight_messages=MAX_INFLIGHT_MESSAGES)
            self._spawn()
            if self._wait_ready():
                return self
            self.stop()  # most likely the port was taken between probe and bind: retry
        raise BrokerError(f"mosquitto did not start; see {self.workdir}")

    def _spawn(self) -> None:
        with (self.workdir / "mosquitto.out").open("ab") as out:
            self._proc = subprocess.Popen([_mosquitto(), "-c", str(self.conf_path)],
                                          stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, cwd=self.workdir,
                                          start_new_session=True, preexec_fn=_raise_nofile)

    def kill(self) -> None:
        """SIGKILL, as a crash: no will messages, no final save of the persistence file."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Start mosquitto again on the same port with the same files (after :meth:`kill`)."""
        for _attempt in range(50):
            self._spawn()
            if self._wait_ready():
                return
            # The port can stay busy for a moment after a kill: retry, bounded.
            time.sleep(0.02)
        raise BrokerError(f"mosquitto did not restart on port {self.port}; see {self.workdir}")

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        delay = 0.002
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(delay)  # start-up poll with a deadline, not synchronisation
                delay = min(delay * 2, 0.05)
        return False

    def effective_settings(self) -> dict[str, str]:
        """The queue, in-flight and TCP settings as written in the rendered file."""
        wanted = ("max_queued_messages", "max_queued_bytes", "max_inflight_messages",
                  "set_tcp_nodelay", "persistence", "max_packet_size")
        found: dict[str, str] = {}
        for line in self.conf_path.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] in wanted:
                found[parts[0]] = parts[1]
        return found

    def stop(self) -> None:
        """Stop mosquitto (SIGTERM, SIGKILL after 5 s); nothing is persisted."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
