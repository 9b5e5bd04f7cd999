"""``pear-mqtt watch``: the network's traffic in plain form, as one node may read it. A
read-only session with that node's certificate verifies each message, decrypts what the node
may decrypt and prints it; it publishes nothing and the broker keeps nothing of it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..config.manager import NetworkConfigManager
from ..config.models import NetworkConfig
from ..errors import ConfigError
from ..node.network import PearNetwork
from ..node.records import ReceivedAggregate, ReceivedInsight
from ..privacy.ranges import ValueRange

__all__ = ["describe", "register_cli"]


def _value(value: Any) -> Any:
    if isinstance(value, ValueRange):
        return {"lo": value.lo, "hi": value.hi}
    return value


def _shown(value: Any) -> str:
    if isinstance(value, ValueRange):
        lo = "" if value.lo is None else f"{value.lo:g}"
        hi = "" if value.hi is None else f"{value.hi:g}"
        return f"[{lo},{hi})"
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe(item: ReceivedInsight | ReceivedAggregate, *, mode: str) -> dict[str, Any]:
    """One received item as plain JSON-ready fields: who, what, when and the disclosed
    figures (a range as ``{"lo", "hi"}``)."""
    if isinstance(item, ReceivedInsight):
        s = item.insight
        values = {f"{group}.{name}": _value(v) for group, fields in s.groups.items()
                  for name, v in fields.items()}
        if s.sample_size is not None:
            values["sample_size"] = _value(s.sample_size)
        return {"kind": "insight", "mode": mode, "member": item.member, "node": item.node,
                "category": s.category, "region": s.region, "product": s.product_id,
                "window_start": s.window_start.isoformat(),
                "window_end": s.window_end.isoformat(), "retained": item.retained,
                "values": values}
    body = item.aggregate
    cells = {}
    for cell in body.cells:
        for group in cell.groups:
            for name, stat in group.fields.items():
                cells[f"{cell.region}.{group.group}.{name}"] = {
                    "mean": stat.mean, "stddev": stat.stddev, "companies": stat.companies}
    return {"kind": "aggregate", "mode": mode, "member": None, "node": None,
            "category": body.category, "region": None, "product": None,
            "window_start": body.window_start.isoformat(),
            "window_end": body.window_end.isoformat(), "retained": item.retained,
            "values": cells}


def _line(item: ReceivedInsight | ReceivedAggregate, *, mode: str) -> str:
    now = datetime.now(UTC).strftime("%H:%M:%S")
    if isinstance(item, ReceivedInsight):
        s = item.insight
        figures = " ".join(f"{name}={_shown(v)}" for fields in s.groups.values()
                           for name, v in fields.items())
        what = s.category + (f"/{s.product_id}" if s.product_id else "")
        return (f"{now}  {mode:<10}  {item.member}/{item.node}  {what}  {s.region}  "
                f"{s.window_start:%Y-%m-%d %H:%M}  {figures}"
                + ("  (retained)" if item.retained else ""))
    body = item.aggregate
    stats = " ".join(f"{cell.region}.{name}={stat.mean:g}±{stat.stddev or 0:g}"
                     f"(n={stat.companies})"
                     for cell in body.cells for group in cell.groups
                     for name, stat in group.fields.items())
    return (f"{now}  {mode:<10}  aggregate  {body.category}  "
            f"{body.window_start:%Y-%m-%d}..{body.window_end:%Y-%m-%d}  {stats}")


def _config(args: argparse.Namespace) -> NetworkConfig:
    if (args.config is None) == (args.node is None):
        raise ConfigError("give --config NODE.toml or --node NAME (a node of `make up`'s "
                          ".pear/up.json), one of them")
    if args.config is not None:
        return NetworkConfigManager.load(file=args.config)
    from ..ops.up.state import STATE_FILE, load_state
    directory = args.up_file.parent
    state = load_state(directory)
    if state is None:
        raise ConfigError(f"no {args.up_file}: start the topology with `make up`, or give "
                          "--config")
    node = next((n for n in state.nodes if n.name == args.node), None)
    if node is None or not node.config:
        names = ", ".join(n.name for n in state.nodes if n.config)
        raise ConfigError(f"{directory / STATE_FILE} has no node {args.node!r} with a "
                          f"config; choose one of: {names}")
    return NetworkConfigManager.load(file=Path(node.config))


async def _watch(config: NetworkConfig, *, as_json: bool, count: int | None,
                 timeout: float | None) -> tuple[Counter[str], dict[str, int], float]:
    mode = config.mode.value
    seen: Counter[str] = Counter()
    queue: asyncio.Queue[ReceivedInsight | ReceivedAggregate] = asyncio.Queue()
    started = time.monotonic()
    async with PearNetwork(config, read_only=True) as net:

        async def pump(stream: Any) -> None:
            async for item in stream:
                await queue.put(item)

        pumps = [asyncio.create_task(pump(net.insights())),
                 asyncio.create_task(pump(net.aggregates()))]
        print(f"watching {net.status().broker} as {config.company_id}/{config.node_id} "
              f"({mode}, read-only){'' if count is None else f'; {count} item(s)'}",
              file=sys.stderr, flush=True)
        try:
            async with asyncio.timeout(timeout):
                while count is None or seen.total() < count:
                    item = await queue.get()
                    seen[type(item).__name__] += 1
                    text = (json.dumps(describe(item, mode=mode)) if as_json
                            else _line(item, mode=mode))
                    print(text, flush=True)
        except TimeoutError:
            pass
        finally:
            for task in pumps:
                task.cancel()
            for task in pumps:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        dropped = dict(net.status().dropped)
    return seen, dropped, time.monotonic() - started


def _cmd_watch(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.count is not None and args.count < 1:
        raise ConfigError(f"--count must be at least 1, got {args.count}")
    try:
        seen, dropped, spent = asyncio.run(_watch(config, as_json=args.json, count=args.count,
                                                  timeout=args.timeout))
    except KeyboardInterrupt:
        return 130
    refused = ", ".join(f"{reason}={n}" for reason, n in sorted(dropped.items())) or "none"
    print(f"watched {seen['ReceivedInsight']} insight(s) and {seen['ReceivedAggregate']} "
          f"aggregate(s) in {spent:.1f} s; dropped: {refused}", file=sys.stderr)
    return 0


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pear-mqtt watch``."""
    p = subparsers.add_parser(
        "watch", help="print the network's traffic in plain form, as one node may read it",
        description="Connect read-only with a node's certificate (its own client id, no "
                    "presence, nothing retained or queued for it), verify every message, "
                    "decrypt what that node may decrypt and print one line per insight or "
                    "aggregate. Ctrl-C, --count or --timeout stops it.")
    p.add_argument("--config", type=Path, metavar="FILE", default=None,
                   help="the node's config (.toml or .json)")
    p.add_argument("--node", metavar="NAME", default=None,
                   help="a node `make up` recorded (e.g. consortium-acme-store-1)")
    p.add_argument("--up-file", type=Path, default=Path(".pear/up.json"),
                   help="the topology --node is looked up in (default .pear/up.json)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--count", type=int, default=None, metavar="N",
                   help="stop after N items")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="stop after S seconds")
    p.set_defaults(handler=_cmd_watch)
