"""``pear-mqtt agent``: the edge store agent's command line (sources, signals, the report)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import signal
import sys
from pathlib import Path

from ..agent.records import CSV_COLUMNS
from ..agent.runner import load_agent_config, run_agent
from ..agent.simulate import DEFAULT_CATEGORIES, DEFAULT_RATE, MAX_CATEGORIES, SimulatedSource
from ..agent.sources import FileSource, InsightSource, NoSource, WatchSource
from ..config.manager import NetworkConfigManager
from ..config.models import NetworkConfig
from ..errors import ConfigError, PearError, PKIError
from .allowed import insight_values
from .options import add_service_options
from .progress import bars

__all__ = ["EX_TEMPFAIL", "register_cli"]

EX_TEMPFAIL = 75
"""Exit status of a one-shot run (--input, --simulate) that could not deliver (sysexits.h)."""


def _make_source(args: argparse.Namespace) -> InsightSource:
    if args.input is not None:
        file_source = FileSource(args.input)
        file_source.check()
        return file_source
    if args.watch is not None:
        watch = WatchSource(args.watch, poll_interval=args.poll_interval)
        watch.check()
        return watch
    if args.simulate:
        sim = SimulatedSource(seed=args.seed, rate=args.rate, count=args.count,
                              categories=args.categories, region=args.region)
        print(f"pear-mqtt agent: simulating {len(sim.categories)} categories with seed "
              f"{sim.seed}", file=sys.stderr)
        return sim
    return NoSource()


def _cmd_agent(args: argparse.Namespace) -> int:
    try:
        config = load_agent_config(file=args.config, outbox=args.outbox)
        source = _make_source(args)
        if args.status_interval < 0 or args.drain_timeout < 0:
            raise ConfigError("--status-interval and --drain-timeout must be >= 0")
        if args.workers is not None and args.workers < 0:
            raise ConfigError(f"--workers must be 0 or more, not {args.workers}")
    except ConfigError as exc:
        print(f"pear-mqtt agent: {exc}", file=sys.stderr)
        return 2
    for warning in NetworkConfigManager.warnings(config):
        print(f"pear-mqtt agent: warning: {warning}", file=sys.stderr)
    # What startup loaded (modules, schemas, config) lives as long as the process. Left to the
    # cyclic collector, every full collection walks all of it: 15-40 ms with the network
    # stack loaded (measured), a pause that every insight in flight waits out.
    from ..node import network  # noqa: F401  (loaded now, so that it is frozen too)
    gc.freeze()
    # The total a progress bar runs to, known for a one-shot run.
    total = (source.records() if isinstance(source, FileSource)
             else args.count if args.simulate else None)
    workers = _workers_for(args, source)
    if not workers:
        return asyncio.run(_serve(args, config, source, total))
    from ..agent.parallel import ParallelFileSource, prepared_chunks
    from ..agent.workers import WorkerPool
    with WorkerPool(config=config, workers=workers) as pool:
        # Forked now, before the event loop and its threads exist.
        pool.start()
        if pool.running:
            what = source.path if isinstance(source, FileSource) else "each watched file"
            print(f"pear-mqtt agent: {pool.size} worker process(es) prepare {what}",
                  file=sys.stderr, flush=True)
        if isinstance(source, WatchSource):
            source.prepare_with(functools.partial(prepared_chunks, pool=pool))
        elif isinstance(source, FileSource):
            source = ParallelFileSource(source, pool=pool)
        return asyncio.run(_serve(args, config, source, total))


def _workers_for(args: argparse.Namespace, source: InsightSource) -> int:
    """How many worker processes prepare the input: for a file, none unless it is large
    enough for them to pay; for a watched directory, started at once (its files come later,
    and workers can only be forked before the event loop starts)."""
    if isinstance(source, FileSource):
        from ..agent.parallel import MIN_PARALLEL_BYTES
        try:
            size = source.path.stat().st_size
        except OSError:
            return 0  # reading it says why
        if size < MIN_PARALLEL_BYTES:
            return 0
    elif not isinstance(source, WatchSource):
        return 0
    from ..agent.workers import default_workers
    return default_workers() if args.workers is None else args.workers


async def _serve(args: argparse.Namespace, config: NetworkConfig,
                 source: InsightSource, total: int | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            print(f"pear-mqtt agent: {signal.Signals(signum).name}: stopping, delivering for up "
                  f"to {args.drain_timeout:g} s (signal again to stop at once)",
                  file=sys.stderr, flush=True)
            stop.set()
        else:
            main.cancel()

    handled = (signal.SIGTERM, signal.SIGINT)
    for sig in handled:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        with bars() as b:
            # One-shot work of a known size: read and acknowledged, on a terminal only.
            read_bar = b.add("read", total=total) if total is not None else None
            acked_bar = b.add("acknowledged", total=total) if total is not None else None

            def progress(handled: int, acked: int) -> None:
                b.update(read_bar, completed=handled)
                b.update(acked_bar, completed=acked)

            report = await run_agent(config=config, source=source, stop=stop,
                                     status_interval=args.status_interval,
                                     status_file=args.status_file,
                                     drain_timeout=args.drain_timeout,
                                     metrics_port=args.metrics_port,
                                     progress=progress if b.drawing and total else None)
    except (ConfigError, PKIError) as exc:  # PKIError: unusable certificate or key files
        print(f"pear-mqtt agent: {exc}", file=sys.stderr)
        return 2
    except PearError as exc:  # e.g. the outbox is locked by another agent
        print(f"pear-mqtt agent: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        main.uncancel()
        print("pear-mqtt agent: stopped without delivering; unsent insights stay in "
              f"{config.reliability.outbox_path}", file=sys.stderr)
        return 1
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
    where = ("everything delivered" if report.drained else
             f"{report.outbox_depth} outbox row(s) kept in {config.reliability.outbox_path}")
    print(f"pear-mqtt agent: done: read {report.read}, queued {report.queued}, sent (acknowledged) "
          f"{report.sent}, rejected {report.rejected}, failed {report.failed}; {where}",
          file=sys.stderr)
    print(json.dumps(report.to_dict()), flush=True)
    if args.drain_only and not report.drained:
        return 1
    if (args.input is not None or args.simulate) and not report.drained and not report.stopped:
        # A one-shot run that could not deliver: a temporary failure, to try again later.
        why = report.error or f"no acknowledgement within --drain-timeout {args.drain_timeout:g} s"
        print(f"pear-mqtt agent: not delivered: broker {report.broker}: {why}; "
              f"{report.outbox_depth} row(s) wait in {config.reliability.outbox_path} for the "
              f"next run", file=sys.stderr)
        return EX_TEMPFAIL
    return 0


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pear-mqtt agent``."""
    parser = subparsers.add_parser(
        "agent", help="run an edge store agent that shares insights from files or a simulation",
        description=(
            "Read market insights from one source and share them through the network. The "
            "agent starts offline and keeps every insight in an on-disk outbox (SQLite) until "
            "the broker has acknowledged it: the config's reliability.outbox_path, or, if "
            "that is unset, .pear/outbox-<node_id>.sqlite next to the config file (--outbox "
            "overrides both). SIGTERM or SIGINT stops it: it stops reading, delivers for up to "
            "--drain-timeout seconds, and leaves the rest in the outbox for the next run (a "
            "second signal stops at once). Bad input lines are logged as FILE:LINE: ERROR and "
            "skipped (the first 20 one by one, then a summary by reason at the end). On exit a "
            "JSON report goes to stdout ('sent' counts what a broker acknowledged). Exit status: "
            "0 on a clean stop, 75 if a one-shot run (--input, --simulate) could not deliver "
            "everything (it says why, and how many rows wait in the outbox), 1 if stopped by a "
            "second signal or if --drain-only left rows undelivered, 2 on configuration errors."))
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="network config (.toml or .json); PEAR_* environment variables "
                             "override it")
    src = parser.add_argument_group("source (exactly one)")
    one = src.add_mutually_exclusive_group(required=True)
    one.add_argument("--input", type=Path, metavar="FILE",
                     help="read one file once: .jsonl (a MarketInsight JSON object per line) "
                          f"or .csv (header with some of: {', '.join(CSV_COLUMNS)}; empty "
                          f"cells are absent); {insight_values()}")
    one.add_argument("--watch", type=Path, metavar="DIR",
                     help="read each new *.jsonl / *.csv file dropped into DIR once, then move "
                          "it to DIR/done/; bad lines go to DIR/rejected/ with a .err file")
    one.add_argument("--simulate", action="store_true",
                     help="generate realistic hourly store data (see --seed, --rate, --count)")
    one.add_argument("--drain-only", action="store_true",
                     help="read nothing: deliver what the outbox holds and exit (1 if rows "
                          "remain after --drain-timeout)")
    src.add_argument("--workers", type=int, default=None, metavar="N",
                     help="--input and --watch: processes that parse, filter and seal a "
                          "file's lines beside the agent, which stores and sends them in file "
                          "order (default: one fewer than the CPUs, at most 4; 0: none, all "
                          "in the agent's process; an --input file under 1 MiB never uses "
                          "them)")
    src.add_argument("--poll-interval", type=float, default=1.0, metavar="S",
                     help="--watch: seconds between directory scans (default: 1)")
    sim = parser.add_argument_group("simulation")
    sim.add_argument("--seed", type=int, default=None,
                     help="random seed (default: drawn and printed, so a run can be replayed)")
    sim.add_argument("--rate", type=float, default=DEFAULT_RATE, metavar="R",
                     help="insights per second (0: as fast as possible; default: "
                          f"{DEFAULT_RATE:g})")
    sim.add_argument("--count", type=int, default=None, metavar="N",
                     help="stop after N insights (default: run until stopped)")
    sim.add_argument("--categories", type=int, default=DEFAULT_CATEGORIES, metavar="N",
                     help=f"number of product categories (1-{MAX_CATEGORIES}; default: "
                          f"{DEFAULT_CATEGORIES})")
    sim.add_argument("--region", default="global",
                     help="region the insights are for (default: global)")
    run = parser.add_argument_group("running")
    run.add_argument("--outbox", type=Path, metavar="PATH",
                     help="outbox file (default: reliability.outbox_path, else "
                          ".pear/outbox-<node_id>.sqlite next to the config)")
    add_service_options(run, status="NetworkStatus", interval=10.0,
                        interval_help="status lines on stderr (0: none)")
    run.add_argument("--drain-timeout", type=float, default=10.0, metavar="S",
                     help="seconds to keep delivering after the source ends or a stop signal "
                          "(default: 10)")
    parser.set_defaults(handler=_cmd_agent)
