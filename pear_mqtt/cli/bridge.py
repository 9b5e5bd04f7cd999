"""``pear-mqtt bridge``: run the public bridge, check its configuration, list its receipts."""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from pathlib import Path

from ..bridge.config import BridgeConfigManager, BridgeRole
from ..bridge.runner import describe, serve
from ..bridge.state import BridgeStore
from .options import add_service_options

__all__ = ["register_cli"]


def _cmd_bridge(args: argparse.Namespace) -> int:
    config = BridgeConfigManager.load(file=args.config, instance=args.instance,
                                      instances=args.instances)
    for warning in BridgeConfigManager.warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    if args.receipts:
        store = BridgeStore(config.role_state_path(
            "single" if config.instances == 1 else "merge"))
        try:
            for _window, _category, payload in store.receipts():
                sys.stdout.write(payload.decode("utf-8") + "\n")
        finally:
            store.close()
        return 0
    BridgeConfigManager.validate(config, for_connect=True)
    if args.check:
        print(describe(config))
        return 0
    # Long-lived startup objects (modules, schemas, config) stay out of the cyclic collector's
    # full collections (15-40 ms each over them, measured): see the agent's command.
    gc.freeze()
    roles: list[BridgeRole]
    if config.instances == 1:
        roles = ["single"]
    elif args.role == "auto":
        # Instance 0 also merges, in the same process: N processes in all.
        roles = ["worker", "merge"] if config.instance == 0 else ["worker"]
    else:
        roles = [args.role]
    final = asyncio.run(serve(config, roles=roles, status_file=args.status_file,
                              status_interval=args.status_interval,
                              metrics_port=args.metrics_port))
    print(final.model_dump_json(indent=2))
    return 0


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pear-mqtt bridge``."""
    parser = subparsers.add_parser(
        "bridge", help="run the public bridge: k-anonymous aggregates to the public broker",
        description=(
            "Read the consortium broker, opted-in private brokers and public contributions "
            "with the bridge's certificates, verify and policy-check every item, and publish "
            "retained, signed aggregates per (category, region, window) to the public broker "
            "once a window is older than the publication lag — only for statistics of at least "
            "k companies with no company above the dominance cap, optionally with noise "
            "against an ε budget — plus a disclosure receipt per aggregate; with "
            "consortium_output, the same statistics to the consortium's members on its own "
            "broker after a shorter lag. State (open "
            "windows, counted item ids, ledger, outbox) lives in state_path, so a restart "
            "neither loses nor double-counts. SIGTERM/SIGINT stop it cleanly; a JSON status "
            "goes to stdout on exit."))
    parser.add_argument("--config", type=Path, metavar="FILE", required=True,
                        help="bridge config (.toml or .json); PEAR_BRIDGE_* variables "
                             "override it")
    add_service_options(parser, status="BridgeStatus", interval=2.0,
                        interval_help="status file updates")
    scale = parser.add_argument_group("scale-out (docs/BRIDGE.md, Scale-out)")
    scale.add_argument("--instances", type=int, metavar="N",
                       help="run the bridge as N instances sharing its input (overrides "
                            "the config's instances); one process per instance")
    scale.add_argument("--instance", type=int, metavar="I",
                       help="this process's instance, 0 <= I < N (overrides instance)")
    scale.add_argument("--role", choices=("auto", "worker", "merge"), default="auto",
                       help="auto (default): instance 0 counts its share and merges, the "
                            "others count theirs; worker or merge alone")
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration and key material, print a summary")
    parser.add_argument("--receipts", action="store_true",
                        help="print every disclosure receipt issued so far (one signed "
                             "envelope per line) and exit")
    parser.set_defaults(handler=_cmd_bridge)
