"""The ``cluster`` backend: each network's broker is a 2-node aedes cluster on its own redis
(deploy/cluster), run by one ``pear-mqtt cluster run`` process; the rest are processes of this
machine as with the local backend. Agents list both nodes, half of them node 2 first."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from ...security import pki as pkimod
from ...security.pki import CertPaths
from ..cluster.render import render_cluster
from ..cluster.run import cluster_problem, install_packages
from .health import free_port
from .local import ProcessBackend, broker_log
from .processes import spawn
from .state import BrokerEntry, NodeEntry, Proc, UpState
from .topology import BRIDGE_USER, HOST, MONITOR_USER, NetworkSpec

__all__ = ["ClusterBackend"]


class ClusterBackend(ProcessBackend):
    """Every network's broker as two aedes nodes sharing a redis (``PEAR_BACKEND=cluster``)."""

    name: ClassVar[str] = "cluster"

    def __init__(self) -> None:
        # The second node's and redis's ports of each network, chosen with its first.
        self._more: dict[str, tuple[int, int]] = {}

    @classmethod
    def offered(cls) -> bool:
        return False  # asked for by name only: `auto` keeps to one broker per network

    @classmethod
    def problem(cls) -> str | None:
        return cluster_problem(packages=False)

    @classmethod
    def chosen(cls, *, auto: bool) -> str:
        return "backend: cluster (per network: 2 aedes nodes on a redis, deploy/cluster)"

    def _ports(self, spec: NetworkSpec, port: int) -> tuple[int, int, int]:
        if spec.mode not in self._more:
            taken = {port}
            second = free_port()
            while second in taken:
                second = free_port()
            taken.add(second)
            redis = free_port()
            while redis in taken:
                redis = free_port()
            self._more[spec.mode] = (second, redis)
        return (port, *self._more[spec.mode])

    def broker_url(self, *, spec: NetworkSpec, port: int, index: int) -> str:
        first, second, _ = self._ports(spec, port)
        order = (first, second) if index % 2 == 0 else (second, first)
        return ",".join(f"mqtts://{HOST}:{p}" for p in order)

    def begin(self, *, directory: Path, state: UpState, agent_nodes: Sequence[NodeEntry],
              with_agents: bool, rate: float | None) -> None:
        if cluster_problem() is not None:  # only the npm packages can be missing here
            print("installing the clustered broker's npm packages (npm ci)", file=sys.stderr)
            install_packages()

    def broker_config(self, *, directory: Path, spec: NetworkSpec, port: int, ca_dir: Path,
                      certs: CertPaths, probe: NodeEntry) -> tuple[Path | None, str]:
        first, second, redis = self._ports(spec, port)
        files = render_cluster(
            mode=spec.mode, network=spec.network, out_dir=directory / "brokers" / spec.mode,
            ca_file=ca_dir / pkimod.CA_CERT, cert_file=certs.cert, key_file=certs.key,
            crl_file=ca_dir / pkimod.CA_CRL, ports=(first, second), redis_port=redis,
            host=HOST, bridge_users=(BRIDGE_USER,) if spec.bridge else (),
            monitor_users=(MONITOR_USER,), revoked=pkimod.revoked_nodes(ca_dir=ca_dir))
        return files.nodes[0], str(broker_log(directory, spec))

    def broker_process(self, *, directory: Path, broker: BrokerEntry) -> Proc:
        assert broker.conf is not None
        where = Path(broker.conf).parent
        argv = [sys.executable, "-m", "pear_mqtt.cli", "cluster", "run", "--dir", str(where),
                "--restart"]
        return spawn(argv, log=Path(broker.proc.log), cwd=directory)
