"""``pear-mqtt embedded``: the in-process amqtt broker with pear_mqtt's TLS identity and ACL."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

from ..errors import BrokerError
from ..ops.brokerconf import Mode
from ..ops.embedded.available import missing

__all__ = ["register_cli"]


def _cmd_embedded(args: argparse.Namespace) -> int:
    problem = missing()
    if problem is not None:
        raise BrokerError(problem)
    from ..ops.embedded.run import run_embedded

    return run_embedded(mode=args.mode, network=args.network, pki_dir=args.pki,
                        port=args.port, plain_port=args.plain_port, host=args.host,
                        bridge_users=args.bridge_users, cert_file=args.cert,
                        key_file=args.key, crl_file=args.crl)


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pear-mqtt embedded``."""
    parser = subparsers.add_parser(
        "embedded", help="run the in-process amqtt broker with pear_mqtt's TLS identity and ACL",
        description="Run an amqtt broker in this process with the same mutual-TLS identity and "
                    "ACL rules as the mosquitto deployment, until SIGINT/SIGTERM "
                    "(SIGHUP reloads the CRL).")
    parser.add_argument("--mode", choices=get_args(Mode), required=True)
    parser.add_argument("--network", required=True,
                        help="network id (the O of every client certificate)")
    parser.add_argument("--pki", type=Path, required=True,
                        help="directory with ca.crt, broker-*.crt/.key and optionally ca.crl")
    parser.add_argument("--cert", type=Path, help="broker certificate (default: the one "
                                                  "broker-*.crt in --pki)")
    parser.add_argument("--key", type=Path, help="broker key (default: beside --cert)")
    parser.add_argument("--crl", type=Path, help="CRL (default: <pki>/ca.crl if present)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8883,
                        help="mutual-TLS port (default 8883; 0 picks a free port)")
    parser.add_argument("--plain-port", type=int,
                        help="also listen without TLS: anonymous, no ACL (development only)")
    parser.add_argument("--bridge-user", dest="bridge_users", action="append", default=[],
                        metavar="USER", help="certificate CN with bridge rights (repeatable)")
    parser.set_defaults(handler=_cmd_embedded)
