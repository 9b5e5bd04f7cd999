"""``pear-mqtt cluster install|run``: the clustered broker's npm packages, and running one
rendered cluster (redis and its aedes nodes) in the foreground (deploy/cluster/README.md)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from ..errors import BrokerError
from ..ops.cluster.render import ClusterFiles
from ..ops.cluster.run import ClusterProcesses, install_packages

__all__ = ["register_cli"]


def _cmd_install(args: argparse.Namespace) -> int:
    print("installing the clustered broker's npm packages (npm ci)", file=sys.stderr)
    where = install_packages()
    print(f"installed into {where}/node_modules", file=sys.stderr)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    files = ClusterFiles.load(args.dir)
    procs = ClusterProcesses(files, log_dir=args.logs or args.dir / "logs")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    procs.start()
    pids = ",".join(str(procs.pid(i)) for i in range(len(files.nodes)))
    print(f"pear-mqtt cluster: {len(files.nodes)} nodes on {files.urls} (pids {pids}; redis "
          f"on port {files.redis_port}); logs in {procs.log_dir}", file=sys.stderr, flush=True)
    try:
        while not stop.wait(1.0):
            dead = [i for i in range(len(files.nodes)) if not procs.running(i)]
            if dead and not args.restart:
                print(f"pear-mqtt cluster: node(s) {[i + 1 for i in dead]} exited; stopping "
                      f"(see {procs.log_dir})", file=sys.stderr)
                return 1
            for i in dead:
                print(f"pear-mqtt cluster: node {i + 1} exited; starting it again (its "
                      "clients use the other nodes meanwhile)", file=sys.stderr, flush=True)
                try:
                    procs.start_node(i)
                except BrokerError as exc:  # tried again on the next round
                    print(f"pear-mqtt cluster: {exc}", file=sys.stderr, flush=True)
    finally:
        procs.stop()
    print("pear-mqtt cluster: stopped", file=sys.stderr)
    return 0


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pear-mqtt cluster {install,run}``."""
    cluster = subparsers.add_parser(
        "cluster", help="run a network's broker as a 2-node aedes cluster on redis",
        description="The clustered broker (deploy/cluster/README.md): render its "
                    "configuration with `pear-mqtt broker render --flavor cluster`.")
    sub = cluster.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    p = sub.add_parser("install", help="install the pinned npm packages (npm ci)")
    p.set_defaults(handler=_cmd_install)
    p = sub.add_parser("run", help="run redis and every node of a rendered cluster until "
                                   "SIGTERM / Ctrl-C")
    p.add_argument("--dir", type=Path, required=True,
                   help="the directory `broker render --flavor cluster` wrote")
    p.add_argument("--logs", type=Path, help="where the processes log (default DIR/logs)")
    p.add_argument("--restart", action="store_true",
                   help="start a node that exits again (its clients use the other nodes "
                        "meanwhile); without it, one node exiting stops the cluster")
    p.set_defaults(handler=_cmd_run)
