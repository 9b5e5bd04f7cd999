"""``python -m bench``: measure, write bench/results.json and docs/BENCHMARKS.md, print a table.

Imports stay inside :func:`main`: spawned workers re-import this module as ``__mp_main__``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
DEFAULT_OUT = _HERE / "results.json"
DEFAULT_DOC = _HERE.parent / "docs" / "BENCHMARKS.md"
DEFAULT_PROFILE_DIR = _HERE / "profile"
DEFAULT_PLOT = _HERE.parent / "docs" / "bench.png"
UNITS = ("A", "A5", "C", "P", "sync", "latency", "bridge", "bridge_scale", "rss", "fanin",
         "market", "repair")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="pear_mqtt throughput vs raw paho-mqtt and mosquitto's C clients, over a "
                    "freshly started mosquitto with the project's rendered mutual-TLS config.")
    p.add_argument("--quick", action="store_true",
                   help="N=10,000 for A/C/P, 5,000 retained states, 3 repetitions, small load "
                        "measurements once (under a minute); without "
                        "it: N=30,000 for A/C/P x5, N=100,000 retained states x3")
    p.add_argument("--n", type=int, help="messages / insights for A, C and P")
    p.add_argument("--n-sync", type=int,
                   help="retained states for sync and publish (default: full 100,000, "
                        "quick 5,000; with only --n given: --n)")
    p.add_argument("--reps", type=int,
                   help="repetitions of every measurement (full 5 for A/C/P and 3 for sync, "
                        "quick 3)")
    p.add_argument("--sync-reps", type=int,
                   help="repetitions of the sync / publish-retained round (overrides --reps)")
    p.add_argument("--window", type=int, default=1000,
                   help="QoS 1 in-flight window of the raw publishers (default 1000)")
    p.add_argument("--categories", type=int, default=16,
                   help="categories P's publisher cycles through (default 16)")
    p.add_argument("--outbox", choices=("memory", "sqlite"), default="memory",
                   help="outbox of pear's publishers (default memory, as with no "
                        "outbox_path configured; sqlite: the durable on-disk outbox)")
    p.add_argument("--mqtt5-baseline", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure A over MQTT 5 (default: on in full runs)")
    p.add_argument("--only", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   help="comma-separated subset of " + ",".join(UNITS) +
                        " (ratios need both sides)")
    ld = p.add_argument_group("load measurements (latency, bridge, rss, fanin, market)")
    ld.add_argument("--load-reps", type=int,
                    help="repetitions of each load measurement (default: full 3 for latency "
                         "and 2 for the others, quick 1; --reps also sets them)")
    ld.add_argument("--lat-seconds", type=float,
                    help="measured seconds per latency run (default: full 6, quick 2)")
    ld.add_argument("--lat-rate", type=float, default=1000.0,
                    help="paced messages / insights per second (default 1000)")
    ld.add_argument("--lat-linger", type=float, default=0.0,
                    help="pear's batch_linger for the latency run (default 0: send at once)")
    ld.add_argument("--lat-default-linger", action=argparse.BooleanOptionalAction,
                    default=None,
                    help="also measure pear with its default batch_linger (default: on in "
                         "full runs)")
    ld.add_argument("--n-bridge", type=int,
                    help="contributions the bridge ingests (default: full 20,000, quick 3,000; "
                         "bridge_scale: once by one bridge, once by two instances)")
    ld.add_argument("--n-rss", type=int,
                    help="insights the agent sends for the RSS run (default: full 10,000, "
                         "quick 3,000)")
    ld.add_argument("--n-ingest", type=int,
                    help="insights in the JSON-lines file `agent --input` ingests (default: "
                         "full 30,000, quick 10,000; a steady rate, not the run's start and "
                         "drain)")
    ld.add_argument("--agents", type=int,
                    help="fan-in agents (default: full 1,000, quick 100)")
    ld.add_argument("--market-rows", type=int,
                    help="insights the market store is filled with before its queries are "
                         "timed (default: full 1,000,000, quick 200,000)")
    ld.add_argument("--n-repair", type=int,
                    help="insights in the log a late joiner repairs (default: full 20,000, "
                         "quick 5,000)")
    ld.add_argument("--fanin-workers", type=int, default=4,
                    help="processes the fan-in agents are spread over (default 4)")
    ld.add_argument("--fanin-mode", choices=("public", "consortium"), default="public",
                    help="network mode of the fan-in agents (default public: a consortium "
                         "node subscribes to every peer's presence, N^2 messages)")
    ld.add_argument("--fanin-downtime", type=float, default=0.5,
                    help="seconds the broker stays down between kill and restart (default "
                         "0.5)")
    p.add_argument("--plot", type=Path, default=None,
                   help=f"PNG of throughput and latency (default "
                        f"{DEFAULT_PLOT.relative_to(_HERE.parent)}, none with --no-doc; "
                        "needs matplotlib: pip install -e '.[bench]')")
    p.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    p.add_argument("--profile", action="store_true",
                   help="after measuring, run P and sync once more under cProfile and report "
                        "the top functions of each pear_mqtt process")
    p.add_argument("--render", action="store_true",
                   help="measure nothing: print the table and rewrite the report from --out")
    p.add_argument("--explore-a", action="store_true",
                   help="only compare raw paho variants (window keeper, reader, protocol)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"results file (default {DEFAULT_OUT.relative_to(_HERE.parent)})")
    p.add_argument("--doc", type=Path, default=DEFAULT_DOC,
                   help=f"markdown report (default {DEFAULT_DOC.relative_to(_HERE.parent)})")
    p.add_argument("--no-doc", action="store_true", help="do not write the markdown report")
    p.add_argument("--workdir", type=Path,
                   help="keep certificates and broker files here (default: a temp dir)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .loadscenarios import LoadParams
    from .report import write_json
    from .runner import explore_a, run
    from .scenarios import Params

    if args.render:
        results = json.loads(args.out.read_text(encoding="utf-8"))
        _print(results, args.out)
        _write_reports(results, args)
        return 0

    if args.quick:
        # 5,000 retained states: a 10,000-state sync round alone took ~11 s of the minute.
        n, n_sync, reps, sync_reps, mode = 10_000, 5_000, 3, 3, "quick"
    else:
        # A 100,000-state sync round takes ~2.5 min at pear_mqtt's current speed (the broker
        # is filled at ~1.4k states/s, then sync() runs at ~2k states/s): five took 15 min in
        # all, so a full run does three to stay near 10 min.
        n, n_sync, reps, sync_reps, mode = 30_000, 100_000, 5, 3, "full"
    if args.n is not None:
        n = n_sync = args.n
    if args.n_sync is not None:
        n_sync = args.n_sync
    if args.reps is not None:
        reps = sync_reps = args.reps
    if args.sync_reps is not None:
        sync_reps = args.sync_reps
    if any(v is not None for v in (args.n, args.n_sync, args.reps, args.sync_reps)):
        mode = f"custom ({mode} defaults)"
    mqtt5 = args.mqtt5_baseline if args.mqtt5_baseline is not None else mode == "full"
    if args.only and not set(args.only) <= set(UNITS):
        print(f"--only takes {', '.join(UNITS)}, not {args.only}", file=sys.stderr)
        return 2
    if min(n, n_sync, reps, sync_reps, args.window, args.categories) < 1:
        print("N, repetitions, window and categories must be at least 1", file=sys.stderr)
        return 2
    params = Params(n=n, n_sync=n_sync, window=args.window, categories=args.categories,
                    outbox=args.outbox)
    quick = args.quick
    # The load measurements' sizes: full ones take ~3 minutes together, quick ones ~25 s.
    load = LoadParams(
        lat_rate=args.lat_rate, lat_linger=args.lat_linger,
        lat_seconds=args.lat_seconds or (2.0 if quick else 6.0),
        lat_warmup=0.5 if quick else 1.0,
        lat_default_linger=(args.lat_default_linger if args.lat_default_linger is not None
                            else not quick),
        n_bridge=args.n_bridge or (3_000 if quick else 20_000),
        n_rss=args.n_rss or (3_000 if quick else 10_000),
        n_ingest=args.n_ingest or (10_000 if quick else 30_000),
        agents=args.agents or (100 if quick else 1000),
        fanin_workers=args.fanin_workers, fanin_mode=args.fanin_mode,
        fanin_downtime=args.fanin_downtime,
        market_rows=args.market_rows or (200_000 if quick else 1_000_000),
        n_repair=args.n_repair or (5_000 if quick else 20_000))
    if min(load.n_bridge, load.n_rss, load.n_ingest, load.agents, load.fanin_workers) < 1 or \
            load.lat_seconds <= 0 or load.lat_rate <= 0:
        print("load sizes must be at least 1 (seconds and rate above 0)", file=sys.stderr)
        return 2
    from .runner import LOAD_UNITS
    if args.load_reps is not None:
        load_reps = dict.fromkeys(LOAD_UNITS, args.load_reps)
    elif args.reps is not None:
        load_reps = dict.fromkeys(LOAD_UNITS, args.reps)
    elif quick:
        load_reps = dict.fromkeys(LOAD_UNITS, 1)
    else:
        load_reps = {"latency": 3, "bridge": 2, "bridge_scale": 2, "rss": 2, "fanin": 2,
                     "market": 1, "repair": 2}

    with tempfile.TemporaryDirectory(prefix="pear-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.explore_a:
            print(f"raw paho variants, N={n}, {reps} repetitions:")
            explore_a(params, reps=reps, workdir=workdir)
            return 0
        print(f"pear_mqtt benchmark ({mode}): N={n:,} for A/C/P x{reps}, "
              f"N={n_sync:,} retained x{sync_reps}", flush=True)
        results = run(params, reps=reps, sync_reps=sync_reps, workdir=workdir, mode=mode,
                      mqtt5_baseline=mqtt5 or "A5" in (args.only or ()), only=args.only,
                      profile_dir=DEFAULT_PROFILE_DIR if args.profile else None,
                      load=load, load_reps=load_reps, log=lambda s: print(s, flush=True))
    write_json(args.out, results)
    _print(results, args.out)
    _write_reports(results, args)
    return 0


def _write_reports(results: dict[str, Any], args: argparse.Namespace) -> None:
    """The PNG (unless --no-plot) and the markdown (unless --no-doc)."""
    import os

    from .report import render_markdown, render_plot

    plot: str | None = None
    # A run that leaves the report alone leaves the report's picture alone too.
    png: Path | None = args.plot if args.plot is not None else (
        None if args.no_doc else DEFAULT_PLOT)
    if not args.no_plot and png is not None:
        if render_plot(results, png):
            print(f"plot:    {png}")
            if not args.no_doc:
                plot = os.path.relpath(png.resolve(), args.doc.resolve().parent)
        else:
            print("plot:    skipped (pip install -e '.[bench]' for matplotlib)")
    if not args.no_doc:
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        args.doc.write_text(render_markdown(results, plot), encoding="utf-8")
        print(f"report:  {args.doc}")


def _print(results: dict[str, Any], out: Path) -> None:
    from .report import render_table

    print()
    print(render_table(results))
    if results.get("profile"):
        for name, info in results["profile"].items():
            top = info["top"]
            print(f"\n{name}: {info['what']}\n  busy {top['busy_s']:.2f} s, idle "
                  f"{top['idle_s']:.2f} s (left out); top by own time ({info['file']})")
            for row in top["rows"]:
                print(f"  {100 * row['share']:5.1f}%  {row['tottime']:7.3f}s  "
                      f"{row['calls']:>9,}  {row['function']}")
    print(f"\nresults: {out}")


if __name__ == "__main__":
    sys.exit(main())
