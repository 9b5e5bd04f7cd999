"""``pear-mqtt archive --config FILE``: run a network's archive node, which keeps every other
node's verified history log and answers for it (docs/HISTORY.md, "The archive")."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path

from ..agent.runner import load_agent_config
from ..config.models import NetworkConfig
from ..errors import ConfigError, PearError
from ..files import atomic_write
from ..node.network import PearNetwork
from ..ops.metrics import NodeCollector, serve
from .options import add_service_options
from .progress import bars, follow

__all__ = ["register_cli"]


def _cmd_archive(args: argparse.Namespace) -> int:
    try:
        config = load_agent_config(file=args.config)
        path = args.path or config.reliability.archive_path
        if path is None:
            raise ConfigError("give --path DIR (or reliability.archive_path in the config): "
                              "where the archive keeps the logs")
        rel = config.reliability.model_copy(update={"archive_path": path, "archive": None})
        config = config.model_copy(update={"reliability": rel})
        assert rel.outbox_path is not None  # load_agent_config gives one
        rel.outbox_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"pear-mqtt archive: cannot create {exc.filename}: {exc.strerror}",
              file=sys.stderr)
        return 2
    except PearError as exc:
        print(f"pear-mqtt archive: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(config, status_file=args.status_file,
                              interval=args.status_interval, metrics_port=args.metrics_port))


async def _serve(config: NetworkConfig, *, status_file: Path | None, interval: float,
                 metrics_port: int | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    net = PearNetwork(config)
    try:
        await net.connect(wait=False)
    except PearError as exc:
        print(f"pear-mqtt archive: {exc}", file=sys.stderr)
        return 2
    print(f"pear-mqtt archive: keeping the logs of {config.network_id} in "
          f"{config.reliability.archive_path}", file=sys.stderr, flush=True)
    metrics = None
    try:
        if metrics_port is not None:
            metrics = serve(NodeCollector(net.status, cert_file=config.tls.cert_file),
                            port=metrics_port)
            print(f"pear-mqtt archive: metrics at {metrics.url}", file=sys.stderr, flush=True)
        with bars() as b:
            # The entries the senders' signed heads announce, against those verified here.
            task = b.add("history backfill: entries verified")
            async with follow(b, task, lambda: sum(v.verified for v in net.logs()),
                              total=lambda: sum(v.head_length or 0 for v in net.logs())):
                await _report(net, stop, status_file=status_file, interval=interval)
    finally:
        if metrics is not None:
            metrics.close()
        await net.disconnect()
    print("pear-mqtt archive: stopped", file=sys.stderr)
    return 0


async def _report(net: PearNetwork, stop: asyncio.Event, *, status_file: Path | None,
                  interval: float) -> None:
    """A status line every ``interval`` s (and into ``status_file``) until ``stop``."""
    while not stop.is_set():
        kept = net.archived()
        st = net.status()
        line = {"connected": st.connected, "health": st.health.value,
                "logs": len(kept), "entries": sum(kept.values()), "log_gaps": st.log_gaps,
                "log_repaired": st.log_repaired, "log_forks": st.log_forks}
        if status_file is not None:
            atomic_write(status_file, json.dumps(line) + "\n")
        print("pear-mqtt archive: " + " ".join(f"{k}={v}" for k, v in line.items()),
              file=sys.stderr, flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pear-mqtt archive``."""
    parser = subparsers.add_parser(
        "archive", help="run a network's archive node (keeps every member's history log)",
        description="Connects as the config's node and keeps every other node's verified "
                    "history log under --path, answering requests for them, so history "
                    "survives a sender that is offline or whose retention dropped it. Nodes "
                    "ask it when reliability.archive names it ('<member>/<node>').")
    parser.add_argument("--config", type=Path, metavar="FILE", required=True,
                        help="the archive node's config (.toml or .json)")
    parser.add_argument("--path", type=Path, metavar="DIR",
                        help="where the logs are kept (default: reliability.archive_path)")
    add_service_options(parser, status="status line", interval=10.0,
                        interval_help="status lines on stderr")
    parser.set_defaults(handler=_cmd_archive)
