"""The configuration of each node of a clustered (aedes on redis) broker, from the same ACL
rules mosquitto's file is made of (:func:`pear_mqtt.model.acl.acl_rules`), and redis's."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ...errors import BrokerError, ConfigError, TopicError
from ...files import atomic_write
from ...model.topics import validate_identifier
from ..brokerconf import Mode, network_rules

__all__ = ["ClusterFiles", "render_cluster"]

# What a persistent session keeps for a client that is away (aedes's default is 1,000).
MAX_SESSION_DELIVERY = 1_000_000


@dataclass(frozen=True, slots=True)
class ClusterFiles:
    """What :func:`render_cluster` wrote: one JSON file per node and redis's configuration."""

    nodes: tuple[Path, ...]
    redis_conf: Path
    host: str
    ports: tuple[int, ...]
    redis_port: int
    rules: int

    @classmethod
    def load(cls, directory: Path) -> ClusterFiles:
        """What :func:`render_cluster` wrote into ``directory``, read back."""
        nodes = sorted(Path(directory).glob("node-*.json"))
        redis_conf = Path(directory) / "redis.conf"
        if not nodes or not redis_conf.is_file():
            raise ConfigError(f"{directory} holds no clustered broker's configuration (write "
                              "it with `pear-mqtt broker render --flavor cluster`)")
        try:
            confs = [json.loads(n.read_text(encoding="utf-8")) for n in nodes]
            return cls(nodes=tuple(nodes), redis_conf=redis_conf, host=confs[0]["host"],
                       ports=tuple(int(c["port"]) for c in confs),
                       redis_port=int(confs[0]["redis"]["port"]),
                       rules=len(confs[0]["rules"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot read the cluster configuration in {directory}: "
                              f"{exc}") from None

    @property
    def urls(self) -> str:
        """The ``broker_url`` setting that names every node (clients try them in turn)."""
        return ",".join(f"mqtts://{self.host}:{p}" for p in self.ports)


def _existing(path: Path, what: str) -> str:
    if not Path(path).is_file():
        raise ConfigError(f"{what} {path} does not exist (see `pear-mqtt pki`)")
    return str(Path(path).resolve())


def render_cluster(*, mode: Mode, network: str, out_dir: Path, ca_file: Path, cert_file: Path,
                   key_file: Path, ports: Sequence[int], redis_port: int,
                   crl_file: Path | None = None, host: str = "127.0.0.1",
                   bridge_users: Sequence[str] = (), monitor_users: Sequence[str] = (),
                   revoked: Iterable[tuple[str, str]] = (),
                   acl_modes: Sequence[Mode] | None = None) -> ClusterFiles:
    """Write ``node-<i>.json`` for each port in ``ports`` and ``redis.conf`` into ``out_dir``.

    Every node serves mutual TLS with the broker certificate, takes the client
    certificate's CN as the identity the ACL names, and keeps sessions, retained messages
    and the message bus in the redis on ``redis_port``, which appends every write to its
    log in ``out_dir/redis``.
    """
    try:
        validate_identifier(network, what="network")
    except TopicError as exc:
        raise ConfigError(str(exc)) from None
    if len(ports) < 1 or len(set([*ports, redis_port])) != len(ports) + 1:
        raise ConfigError(f"a cluster needs distinct ports for its nodes and redis, got "
                          f"{list(ports)} and {redis_port}")
    for port in (*ports, redis_port):
        if not 0 < port < 65536:
            raise ConfigError(f"port must be between 1 and 65535, got {port}")
    tls = {"ca": _existing(ca_file, "ca_file"), "cert": _existing(cert_file, "cert_file"),
           "key": _existing(key_file, "key_file"),
           "crl": (_existing(crl_file, "crl_file") if crl_file is not None
                   and Path(crl_file).is_file() else None)}
    rules = network_rules(modes=list(dict.fromkeys([mode, *(acl_modes or ())])),
                          network=network, bridge_users=bridge_users,
                          monitor_users=monitor_users, revoked=revoked)
    out_dir = Path(out_dir)
    data = out_dir / "redis"
    nodes = []
    try:
        data.mkdir(parents=True, exist_ok=True)
        for i, port in enumerate(ports, start=1):
            conf = {"id": f"{mode}-{network}-{i}", "host": host, "port": port, "tls": tls,
                    "redis": {"host": host, "port": redis_port},
                    "max_session_delivery": MAX_SESSION_DELIVERY,
                    "rules": [{"access": r.access, "topic": r.topic, "user": r.user}
                              for r in rules]}
            path = out_dir / f"node-{i}.json"
            atomic_write(path, json.dumps(conf, indent=1) + "\n", mode=0o600)
            nodes.append(path)
        redis_conf = out_dir / "redis.conf"
        atomic_write(redis_conf, "\n".join([
            "# pear_mqtt: the redis of one clustered broker (pear_mqtt.ops.cluster.render)",
            f"bind {host}", f"port {redis_port}", "protected-mode yes",
            f"dir {data.resolve()}", "appendonly yes", "appendfsync everysec", 'save ""',
            "daemonize no", "logfile \"\"", ""]))
    except OSError as exc:
        raise BrokerError(f"cannot write the cluster configuration under {out_dir}: "
                          f"{exc.strerror or exc}") from None
    return ClusterFiles(nodes=tuple(nodes), redis_conf=redis_conf, host=host,
                        ports=tuple(ports), redis_port=redis_port, rules=len(rules))
