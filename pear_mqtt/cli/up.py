"""``pear-mqtt up {start,status,logs,stop}``: the whole topology on this machine (make up)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import BrokerError
from ..ops.up.commands import STOP_GRACE, logs, parse_ports, start, status, stop
from ..ops.up.processes import TAIL_LINES
from ..ops.up.selection import BACKENDS
from ..ops.up.topology import DEFAULT_DIR

__all__ = ["register_cli"]


def _say(line: str) -> None:
    print(line, flush=True)


def _cmd_start(args: argparse.Namespace) -> int:
    try:
        start(directory=args.dir, ports=parse_ports(args.ports), backend=args.backend,
              with_agents=not args.no_agents, rate=args.rate, timeout=args.timeout, out=_say)
    except BrokerError as exc:
        print(f"pear-mqtt up: start failed; everything it started is stopped again\n{exc}",
              file=sys.stderr)
        return 1
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    return 0 if status(directory=args.dir, as_json=args.json, out=_say) else 1


def _cmd_logs(args: argparse.Namespace) -> int:
    try:
        return 0 if logs(directory=args.dir, lines=args.lines, follow=args.follow,
                         out=_say) else 1
    except BrokenPipeError:
        # `pear-mqtt up logs | head`: the reader has all it wanted. Point stdout at /dev/null
        # so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    return 0 if stop(directory=args.dir, grace=args.grace, out=_say) else 1


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pear-mqtt up {start,status,logs,stop}``."""
    up = subparsers.add_parser(
        "up", help="run the whole topology locally (brokers, PKI, simulated agents)",
        description="Run the pear_mqtt topology on loopback: a private, a consortium and a "
                    "public network, each with its CA and broker, plus simulated store agents.")
    sub = up.add_subparsers(dest="up_command", metavar="ACTION", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                       help="state directory (default .pear in the current directory)")
        return p

    p = add("start", "start everything; returns once healthy")
    p.add_argument("--ports", default=None,
                   help="TLS ports of the private,consortium,public brokers on 127.0.0.1 "
                        "(default $PEAR_UP_PORTS, else the last run's ports if free, else "
                        "18883,18884,18885; 0 = any free port)")
    p.add_argument("--backend", choices=("auto", *BACKENDS), default=None,
                   help="broker backend (default $PEAR_BACKEND or auto: docker if reachable, "
                        "else local mosquitto, else embedded amqtt)")
    p.add_argument("--no-agents", action="store_true", help="brokers and PKI only")
    p.add_argument("--rate", type=float, default=None,
                   help="insights per second per simulated agent (agent's default if unset)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for everything to be healthy (default 60)")
    p.set_defaults(handler=_cmd_start)

    p = add("status", "health table; exit 0 only when everything is healthy")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_cmd_status)

    p = add("logs", "print the tail of every log")
    p.add_argument("-n", "--lines", type=int, default=TAIL_LINES,
                   help=f"lines per log (default {TAIL_LINES})")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.set_defaults(handler=_cmd_logs)

    p = add("stop", "stop everything `start` started")
    p.add_argument("--grace", type=float, default=STOP_GRACE,
                   help=f"seconds between SIGTERM and SIGKILL (default {STOP_GRACE:.0f})")
    p.set_defaults(handler=_cmd_stop)
