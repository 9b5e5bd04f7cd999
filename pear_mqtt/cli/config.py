"""``pear-mqtt config``: configuration files: show and check."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config.manager import NetworkConfigManager
from ..errors import ConfigError
from .allowed import config_values

__all__ = ["register_cli"]


def _cmd_show(args: argparse.Namespace) -> int:
    config = NetworkConfigManager.load(file=args.file)
    sys.stdout.write(NetworkConfigManager.to_toml(config, secrets="mask"))
    for warning in NetworkConfigManager.warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        config = NetworkConfigManager.load(file=args.file)
        NetworkConfigManager.validate(config, for_connect=args.for_connect)
    except ConfigError as exc:
        print(f"pear-mqtt config check: {exc}", file=sys.stderr)
        return 2
    for warning in NetworkConfigManager.warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    what = "ready to connect" if args.for_connect else "valid"
    print(f"configuration is {what}: {config.mode.value} network {config.network_id!r}, "
          f"company {config.company_id!r}, broker {config.broker}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pear-mqtt config {show,check}``."""
    parser = subparsers.add_parser(
        "config", help="show or check the effective network configuration",
        description="The effective configuration: file < PEAR_* environment variables.",
        epilog=config_values())
    sub = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    file_help = "TOML or JSON config file (.toml, .json)"

    show = sub.add_parser("show", help="print the effective configuration as TOML "
                                       "(secrets masked)", epilog=config_values())
    show.add_argument("--file", type=Path, help=file_help)
    show.set_defaults(handler=_cmd_show)

    check = sub.add_parser("check", help="validate the configuration (exit 0 valid, 2 invalid)",
                           epilog=config_values())
    check.add_argument("--file", type=Path, help=file_help)
    check.add_argument("--for-connect", action="store_true",
                       help="also require TLS material that exists and is readable")
    check.set_defaults(handler=_cmd_check)
