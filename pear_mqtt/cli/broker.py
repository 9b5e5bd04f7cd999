"""``pear-mqtt broker render``: write mosquitto.conf and the ACL for one network (or, with
``--flavor emqx`` / ``cluster``, EMQX 5's or the aedes cluster's configuration from the same
rules)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import get_args

from ..errors import ConfigError, PKIError, TopicError
from ..model.topics import validate_identifier
from ..ops.brokerconf import Mode, broker_cert_in, render
from ..ops.cluster.render import render_cluster
from ..ops.emqx import render_emqx
from ..security.pki import REGISTRY, revoked_nodes

__all__ = ["register_cli"]


def _cmd_render(args: argparse.Namespace) -> int:
    pki_dir: Path = args.pki
    if bool(args.cert) != bool(args.key):
        raise ConfigError("--cert and --key go together")
    cert, key = (args.cert, args.key) if args.cert else broker_cert_in(pki_dir)
    revoked = [_member_node(text) for text in args.revoked_node or ()]
    has_registry = (pki_dir / REGISTRY).is_file()
    if has_registry:
        try:
            revoked += revoked_nodes(ca_dir=pki_dir)
        except PKIError as exc:
            raise ConfigError(f"cannot read the revoked nodes from the CA registry: {exc}") \
                from None
    if args.flavor != "mosquitto":
        for flag, value in (("--plain-port", args.plain_port), ("--user", args.user),
                            ("--persistence-dir", args.persistence_dir)):
            if value is not None:
                where = {"emqx": "EMQX keeps its own (see deploy/EMQX.md)",
                         "cluster": "the cluster keeps its state in redis (see "
                                    "deploy/cluster/README.md)"}[args.flavor]
                raise ConfigError(f"{flag} is a mosquitto setting; {where}")
    if args.flavor == "cluster":
        ports = args.node_port or [args.tls_port, args.tls_port + 1]
        files = render_cluster(
            mode=args.mode, network=args.network, out_dir=args.out,
            ca_file=pki_dir / "ca.crt", cert_file=cert, key_file=key,
            crl_file=pki_dir / "ca.crl", ports=ports,
            redis_port=args.redis_port or max(ports) + 1, host=args.bind or "127.0.0.1",
            bridge_users=tuple(args.bridge_user or ()),
            monitor_users=tuple(args.monitor_user or ()), revoked=revoked)
        print(f"nodes:         {', '.join(str(n) for n in files.nodes)} ({files.rules} ACL "
              f"rules each)\nredis:         {files.redis_conf} (port {files.redis_port})\n"
              f"broker_url:    {files.urls}\n"
              f"run:           pear-mqtt cluster run --dir {args.out}")
        return 0
    if args.flavor == "emqx":
        emqx = render_emqx(
            mode=args.mode, network=args.network, out_dir=args.out,
            ca_file=pki_dir / "ca.crt", cert_file=cert, key_file=key, tls_port=args.tls_port,
            bind_address=args.bind, bridge_users=tuple(args.bridge_user or ()),
            monitor_users=tuple(args.monitor_user or ()), revoked=revoked,
            max_message_bytes=args.max_message_bytes)
        print(f"configuration: {emqx.conf_path} (include it in emqx.conf)\n"
              f"ACL:           {emqx.acl_path} ({emqx.rules} rules)\n"
              "caveats:       deploy/EMQX.md (revocation, retained messages in a cluster)")
        return 0
    rendered = render(
        mode=args.mode, network=args.network, out_dir=args.out, ca_file=pki_dir / "ca.crt",
        cert_file=cert, key_file=key, crl_file=pki_dir / "ca.crl", tls_port=args.tls_port,
        plain_port=args.plain_port, bridge_users=tuple(args.bridge_user or ()),
        persistence_dir=args.persistence_dir, bind_address=args.bind, run_as=args.user,
        max_message_bytes=args.max_message_bytes, revoked=revoked,
        monitor_users=tuple(args.monitor_user or ()))
    denied = ", ".join(f"{m}/{n}" for m, n in rendered.revoked) or "none"
    print(f"configuration: {rendered.conf_path}\nACL:           {rendered.acl_path}\n"
          f"revoked nodes: {denied}\n"
          f"run:           mosquitto -c {rendered.conf_path}  (running: kill -HUP it)")
    if not has_registry:
        print(f"note: no {REGISTRY} in {pki_dir}, so revoked nodes are not known here beyond "
              "--revoked-node; their retained state stays visible until they are listed",
              file=sys.stderr)
    return 0


def _member_node(text: str) -> tuple[str, str]:
    member, sep, node = text.partition("/")
    if not sep:
        raise ConfigError(f"--revoked-node {text!r} must be MEMBER/NODE")
    try:
        return (validate_identifier(member, what="--revoked-node member"),
                validate_identifier(node, what="--revoked-node node"))
    except TopicError as exc:
        raise ConfigError(str(exc)) from None


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pear-mqtt broker render``."""
    broker = subparsers.add_parser("broker", help="render broker (mosquitto) configuration")
    sub = broker.add_subparsers(dest="broker_command", metavar="ACTION", required=True)
    p = sub.add_parser("render", help="write mosquitto.conf and acl for one network")
    p.add_argument("--mode", choices=list(get_args(Mode)), required=True)
    p.add_argument("--network", required=True, help="network id")
    p.add_argument("--pki", type=Path, required=True,
                   help="CA directory holding ca.crt and ca.crl (and, unless --cert/--key "
                        "are given, the one broker-*.crt/.key pair)")
    p.add_argument("--out", type=Path, required=True, help="where to write the files")
    p.add_argument("--cert", type=Path, help="broker certificate")
    p.add_argument("--key", type=Path, help="broker private key")
    p.add_argument("--tls-port", type=int, default=8883)
    p.add_argument("--plain-port", type=int, default=None,
                   help="also open an unauthenticated plaintext listener (development only)")
    p.add_argument("--bridge-user", action="append",
                   help="CN of a bridge certificate (repeat)")
    p.add_argument("--persistence-dir", type=Path, default=None,
                   help="where mosquitto.db lives (default OUT/data)")
    p.add_argument("--bind", default=None, help="listen address (default: all)")
    p.add_argument("--user", default=None,
                   help="user mosquitto switches to when started as root")
    p.add_argument("--max-message-bytes", type=int, default=1024 * 1024)
    p.add_argument("--revoked-node", action="append", metavar="MEMBER/NODE",
                   help="deny this node's topics, so its retained state is no longer served "
                        "(repeat; revoked nodes in the --pki registry are denied anyway)")
    p.add_argument("--monitor-user", action="append", metavar="CN",
                   help="a monitor certificate's CN allowed to read the broker's $SYS figures "
                        "(repeat)")
    p.add_argument("--flavor", choices=("mosquitto", "emqx", "cluster"), default="mosquitto",
                   help="which broker's configuration to write (default mosquitto; emqx: "
                        "an EMQX 5 emqx.conf fragment and acl.conf from the same rules; "
                        "cluster: each aedes node's JSON and redis.conf, deploy/cluster)")
    p.add_argument("--node-port", type=int, action="append", metavar="PORT",
                   help="cluster: a node's TLS port (repeat; default --tls-port and the next)")
    p.add_argument("--redis-port", type=int, metavar="PORT",
                   help="cluster: redis's port (default: after the nodes')")
    p.set_defaults(handler=_cmd_render)
