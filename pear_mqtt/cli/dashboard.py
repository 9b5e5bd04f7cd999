"""``pear-mqtt dashboard``: the read-only page over a ``make up`` topology."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from ..files import atomic_write

__all__ = ["register_cli"]


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _cmd_dashboard(args: argparse.Namespace) -> int:
    # Imported here: `pear-mqtt --help` does not load the node stack.
    from ..dashboard.market import StoredAggregates
    from ..dashboard.server import DashboardServer
    from ..dashboard.topology import TopologyFile
    from ..ops.brokersys import BrokerSys, SysSource

    topology = TopologyFile(args.up_file)
    # The market reader joins the brokers as up.json names them when the dashboard starts.
    store = args.market_store or args.up_file.parent / "run" / "dashboard.market.db"
    market = StoredAggregates(topology.current(), store=store, node=args.market_node)
    # The brokers' own figures, where up.json names a monitor identity (mosquitto backends).
    brokers = BrokerSys([SysSource(name=b.name, url=b.url, ca=Path(b.ca),
                                   cert=Path(b.monitor_cert), key=Path(b.monitor_key))
                         for b in topology.current().state.brokers
                         if b.monitor_cert and b.monitor_key])
    try:
        server = DashboardServer(topology, market, host=args.host, port=args.port,
                                 broker_metrics=brokers.exposition)
    except OSError as exc:
        print(f"pear-mqtt dashboard: cannot listen on {args.host}:{args.port}: "
              f"{exc.strerror or exc}; pick another --port", file=sys.stderr)
        return 1
    market.start()
    brokers.start()
    signal.signal(signal.SIGTERM, _stop)
    print(f"dashboard: {server.url} (read-only; Ctrl-C stops it)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {args.host} without authentication: whoever reaches it "
              "sees the topology's health and certificates", file=sys.stderr, flush=True)
    if args.ready_file is not None:
        atomic_write(args.ready_file, json.dumps({"url": server.url, "pid": os.getpid()}) + "\n")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        market.close()
        brokers.close()
    return 0


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pear-mqtt dashboard``."""
    p = subparsers.add_parser(
        "dashboard", help="serve a read-only page: health, counters, certificates, market",
        description="Serve the topology's health, live counters, certificate expiry and the "
                    "market view (public aggregates, consortium price bands) as a page and "
                    "JSON endpoints (/api/health, /api/counters, /api/certs, /api/market).")
    p.add_argument("--up-file", type=Path, default=Path(".pear/up.json"),
                   help="the topology's state file (default .pear/up.json)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    p.add_argument("--market-node", default=None,
                   help="public node of up.json to read aggregates as (default the last one)")
    p.add_argument("--market-store", type=Path, default=None,
                   help="the market store the page's charts are read from and the public "
                        "reader writes (default: run/dashboard.market.db next to --up-file)")
    p.add_argument("--ready-file", type=Path, default=None,
                   help="write {url, pid} as JSON here once serving (used by `up start`)")
    p.set_defaults(handler=_cmd_dashboard)
