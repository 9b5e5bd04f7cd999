"""``pear-mqtt market query|position|history|aggregates|export|status``: ask a node's market
store (docs/MARKET.md) from a terminal or a script: a table on a terminal, ``--json`` (one
object per line) or ``--csv`` for scripts."""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ..agent.runner import default_outbox_path, load_agent_config
from ..config.manager import NetworkConfigManager
from ..config.models import NetworkConfig
from ..errors import ConfigError
from ..market import METRICS, MarketStore
from ..market.rows import MarketRow
from ..node.network import PearNetwork
from ..privacy.ranges import ValueRange
from .progress import bars, follow

__all__ = ["register_cli"]


def _store(args: argparse.Namespace) -> MarketStore:
    """The store named by ``--store``, else the one ``--config``'s node keeps (first taking
    in what the broker retains, with ``--sync``)."""
    if args.store is not None:
        if args.sync:
            raise ConfigError("--sync needs --config (the node to connect as), not --store")
        return MarketStore.open(args.store, readonly=True)
    if args.config is None:
        raise ConfigError("give --config NODE.toml (the node whose store to read) or "
                          "--store FILE")
    if args.sync:
        config = load_agent_config(file=args.config)
        asyncio.run(_take_in(config))
    else:
        config = NetworkConfigManager.load(file=args.config)
    outbox = config.reliability.outbox_path or default_outbox_path(config=config,
                                                                  config_file=args.config)
    path = config.market.store_path(outbox)
    assert path is not None  # an outbox path always gives one
    return MarketStore.open(path, readonly=True)


async def _take_in(config: NetworkConfig) -> None:
    """Connect as the node, collect what the broker retains for it (states, aggregates) into
    its store, and leave."""
    async with PearNetwork(config) as net:
        with bars(transient=True) as b:
            # How much has come in so far: the total is not known before it ends.
            task = b.add("syncing: messages received")
            async with follow(b, task, lambda: net.status().messages_in):
                result = await net.sync(timeout=60)
                await net.market_settled(timeout=60)
        broker = net.status().broker
    print(f"synced {len(result)} states and {len(result.aggregates)} aggregates from "
          f"{broker}", file=sys.stderr)


def _when(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date: use ISO 8601, e.g. 2026-11-01 or "
            "2026-11-01T12:00+00:00") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _since(args: argparse.Namespace) -> datetime | None:
    if args.days is not None:
        return datetime.now(UTC) - timedelta(days=args.days)
    since: datetime | None = args.since
    return since


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, ValueRange):
        lo = "" if value.lo is None else f"{value.lo:g}"
        hi = "" if value.hi is None else f"{value.hi:g}"
        return f"[{lo}, {hi})"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d" if (value.hour, value.minute) == (0, 0)
                              else "%Y-%m-%d %H:%M")
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, ValueRange):
        return {"lo": value.lo, "hi": value.hi}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _records(rows: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        if isinstance(row, MarketRow):
            rec = {k: v for k, v in dataclasses.asdict(row).items() if k != "values"}
            rec.update(row.values)
        else:
            rec = dataclasses.asdict(row)
        out.append(rec)
    return out


def _emit(args: argparse.Namespace, rows: Sequence[Any], *, title: str,
          columns: Sequence[str] | None = None) -> None:
    records = _records(rows)
    if columns is None:
        seen: dict[str, None] = {}
        for rec in records:
            seen.update(dict.fromkeys(rec))
        columns = list(seen)
    if args.json:
        for rec in records:
            print(json.dumps({c: _jsonable(rec.get(c)) for c in columns}))
        return
    if args.csv:
        out = csv.writer(sys.stdout)
        out.writerow(columns)
        for rec in records:
            value = [rec.get(c) for c in columns]
            out.writerow(["" if v is None else
                          (_cell(v) if isinstance(v, ValueRange | datetime) else v)
                          for v in value])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c, justify="right" if c in METRICS else "left")
    for rec in records:
        table.add_row(*(_cell(rec.get(c)) for c in columns))
    # A pipe or a file gets the whole table, not one cut to 80 columns.
    Console(width=None if sys.stdout.isatty() else 250).print(table)
    if not records:
        print("(no rows: `pear-mqtt market status` shows what the store holds)",
              file=sys.stderr)


_ROW_COLUMNS = ("id", "member", "node", "category", "region", "product_id", "window_end",
                "currency", "direction")


def _cmd_query(args: argparse.Namespace) -> int:
    with _store(args) as store:
        kw: dict[str, Any] = {"category": args.category, "region": args.region,
                              "since": _since(args), "until": args.until}
        if args.group_by is not None:
            groups = store.query(**kw, group_by=args.group_by, metric=args.metric)
            _emit(args, groups, title=f"{store.mode} network {store.network}: by {args.group_by}",
                  columns=["period", "metric", "count", "companies", "mean", "stddev", "low",
                           "high", "exact"])
            return 0
        page = store.query(**kw, member=args.member, limit=args.limit, cursor=args.cursor)
    present = [m for m in METRICS if any(m in r.values for r in page.rows)]
    _emit(args, page.rows, title=f"{store.mode} network {store.network}: insights",
          columns=[*_ROW_COLUMNS, *present])
    if page.next_cursor is not None:
        print(f"more rows: add --cursor {page.next_cursor}", file=sys.stderr)
    return 0


def _cmd_position(args: argparse.Namespace) -> int:
    with _store(args) as store:
        pos = store.price_position(args.category, args.price, region=args.region)
    if args.json or args.csv:
        _emit(args, [pos], title="")
        return 0
    band = (f"{_ordinal(pos.percentile_low)} percentile"
            if pos.percentile_low == pos.percentile_high
            else f"between the {_ordinal(pos.percentile_low)} and "
                 f"{_ordinal(pos.percentile_high)} percentile")
    mean = "" if pos.mean is None else f"; market mean {pos.mean:.4g}"
    dist = "" if pos.distance_from_mean is None else f" ({pos.distance_from_mean:+.4g})"
    print(f"{pos.price:g} {pos.currency or ''} in {pos.category}: {band}{mean}{dist}; "
          f"from {pos.basis} data of {pos.companies} compan"
          f"{'y' if pos.companies == 1 else 'ies'} ({pos.observations} observation"
          f"{'' if pos.observations == 1 else 's'}, "
          f"as of {pos.as_of:%Y-%m-%d %H:%M} UTC)")
    return 0


def _ordinal(x: float) -> str:
    """1st, 2nd, 3rd, 11th, 22nd, 50.5th."""
    if x != int(x):
        return f"{x:g}th"
    n = int(x)
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _cmd_history(args: argparse.Namespace) -> int:
    with _store(args) as store:
        series = store.history(args.category, args.metric, region=args.region,
                               since=_since(args), until=args.until, group_by=args.group_by)
    _emit(args, series, title=f"{args.category} {args.metric}",
          columns=["period", "region", "count", "companies", "mean", "stddev", "low", "high"])
    return 0


def _cmd_aggregates(args: argparse.Namespace) -> int:
    with _store(args) as store:
        cells = store.aggregates(args.category, region=args.region, since=_since(args),
                                 until=args.until)
    _emit(args, cells[-args.limit:], title="aggregates",
          columns=["window_start", "window_end", "category", "region", "group", "field",
                   "currency", "companies", "mean", "stddev"])
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    with _store(args) as store:
        n = store.export(args.out, fmt=args.format, kind=args.kind, category=args.category,
                         region=args.region, since=_since(args), until=args.until)
    print(f"{n} {args.kind} rows written to {args.out}", file=sys.stderr)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    with _store(args) as store:
        st = store.status()
        mode, network = store.mode, store.network
    if args.json:
        print(json.dumps({"mode": mode, "network": network,
                          **_jsonable(dataclasses.asdict(st))}))
    else:
        print(f"{st.path}: {mode} network {network}: {st.insights} insight rows, "
              f"{st.aggregates} aggregate cells, {st.bytes / 1e6:.1f} MB, oldest window "
              f"{_cell(st.oldest) or '-'}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pear-mqtt market``."""
    parser = subparsers.add_parser(
        "market", help="query a node's market store (what it received and verified)",
        description="Every receiving node keeps what it verified in a market store "
                    "(<outbox>.market.db by default; docs/MARKET.md). These commands read it, "
                    "also while the node runs.")
    sub = parser.add_subparsers(dest="market_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser, *, filters: bool = True) -> None:
        p.add_argument("--config", type=Path, metavar="FILE",
                       help="the node's config (.toml/.json): its store is read")
        p.add_argument("--store", type=Path, metavar="FILE", help="a store file instead")
        p.add_argument("--sync", action="store_true",
                       help="connect as the --config node first and store what the broker "
                            "retains for it (for a node that is not running, e.g. a public "
                            "participant's)")
        out = p.add_mutually_exclusive_group()
        out.add_argument("--json", action="store_true", help="one JSON object per line")
        out.add_argument("--csv", action="store_true", help="CSV with a header row")
        if filters:
            p.add_argument("--region", help="one region only")
            p.add_argument("--since", type=_when, metavar="DATE",
                           help="windows ending at or after DATE (ISO 8601, UTC if no zone)")
            p.add_argument("--days", type=float, metavar="N", help="the last N days")
            p.add_argument("--until", type=_when, metavar="DATE",
                           help="windows ending at or before DATE")

    q = sub.add_parser("query", help="insight rows, or day/week groups with --group-by")
    common(q)
    q.add_argument("--category", help="a category and its sub-categories (e.g. grocery)")
    q.add_argument("--member", help="one member (a pseudonym where the network anonymises)")
    q.add_argument("--group-by", choices=["day", "week"],
                   help="one row per period and metric: count, companies, mean, bounds")
    q.add_argument("--metric", choices=METRICS, help="with --group-by: only this metric")
    q.add_argument("--limit", type=int, default=100, help="rows per page (default 100)")
    q.add_argument("--cursor", type=int, help="continue after this row id")
    q.set_defaults(handler=_cmd_query)

    p = sub.add_parser("position", help="where a price stands in a category's market")
    common(p, filters=False)
    p.add_argument("category")
    p.add_argument("price", type=float)
    p.add_argument("--region", help="one region only")
    p.set_defaults(handler=_cmd_position)

    h = sub.add_parser("history", help="a metric's time series (public nodes: aggregates)")
    common(h)
    h.add_argument("category")
    h.add_argument("metric", nargs="?", default="price", choices=METRICS,
                   help="default: price")
    h.add_argument("--group-by", choices=["day", "week"], default="day")
    h.set_defaults(handler=_cmd_history)

    a = sub.add_parser("aggregates", help="the bridge's aggregate cells, newest last")
    common(a)
    a.add_argument("category", nargs="?")
    a.add_argument("--limit", type=int, default=50, help="the last N cells (default 50)")
    a.set_defaults(handler=_cmd_aggregates)

    e = sub.add_parser("export", help="rows to a CSV or Parquet file (pseudonyms kept)")
    common(e)
    e.add_argument("out", type=Path, metavar="FILE")
    e.add_argument("--format", choices=["csv", "parquet"], default="csv")
    e.add_argument("--kind", choices=["insights", "aggregates"], default="insights")
    e.add_argument("--category")
    e.set_defaults(handler=_cmd_export)

    s = sub.add_parser("status", help="rows, size and oldest window of the store")
    common(s, filters=False)
    s.set_defaults(handler=_cmd_status)
