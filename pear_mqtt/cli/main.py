"""The ``pear-mqtt`` dispatcher: each command's arguments live in ``pear_mqtt.cli.<command>``,
and only the command being run is imported (an edge agent does not load amqtt or ``up``)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from ..errors import PearError
from .logs import FORMATS, LOG_FORMAT_VAR, configure

__all__ = ["main"]

_COMMANDS = ("config", "pki", "broker", "embedded", "agent", "archive", "bridge", "log", "market",
             "watch", "up", "dashboard", "cluster")


def _command_of(argv: Sequence[str]) -> str | None:
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--log-format":
            skip = True  # its value is not the command
        elif not arg.startswith("-"):
            return arg
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``pear-mqtt`` parser; with a known ``command``, only that command's module is
    loaded (``--help`` and unknown commands load them all)."""
    parser = argparse.ArgumentParser(
        prog="pear-mqtt",
        description="Share retail market insights over MQTT without giving away private data.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug); also after the command")
    parser.add_argument("--version", action="version", version=f"pear-mqtt {_version()}")
    parser.add_argument("--log-format", choices=FORMATS,
                        default=os.environ.get(LOG_FORMAT_VAR, "text"),
                        help="log lines as text (default) or one JSON object each: ts, level, "
                             "logger, msg and extras (also PEAR_LOG_FORMAT); also after the "
                             "command")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in (command,) if command in _COMMANDS else _COMMANDS:
        module = importlib.import_module(f"pear_mqtt.cli.{name}")
        register: Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]
        register = module.register_cli
        register(sub)
    _verbose_everywhere(sub)
    return parser


def _verbose_everywhere(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``-v`` after any command or action too (SUPPRESS keeps one given before it)."""
    for child in sub.choices.values():
        if not any("-v" in a.option_strings for a in child._actions):
            child.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                               help="more log output (-vv for debug)")
        if not any("--log-format" in a.option_strings for a in child._actions):
            child.add_argument("--log-format", choices=FORMATS, default=argparse.SUPPRESS,
                               help="log lines as text or JSON")
        for action in child._actions:
            if isinstance(action, argparse._SubParsersAction):
                _verbose_everywhere(action)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pear-mqtt")
    except PackageNotFoundError:
        from .. import __version__

        return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pear-mqtt`` console script; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(arguments))
    args = parser.parse_args(arguments)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    configure(level=level, fmt=args.log_format)
    # The processes a command starts (`up`'s brokers, bridge and agents) log the same way.
    os.environ[LOG_FORMAT_VAR] = args.log_format
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except PearError as exc:
        print(f"pear-mqtt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
