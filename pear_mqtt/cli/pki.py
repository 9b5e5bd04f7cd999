"""``pear-mqtt pki``: the certificate authority: init, issue, enrol, revoke, crl, list,
pseudonyms, rotate-pseudonyms."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import get_args

from ..errors import PKIError
from ..security.pki import (
    CA_CRL,
    CA_KEY,
    CRL_DAYS,
    DEFAULT_KEY_TYPE,
    KeyType,
    Role,
    create_ca,
    enrol,
    has_pseudonyms,
    issue,
    list_certificates,
    list_pseudonyms,
    refresh_crl,
    revoke,
    rotate_pseudonyms,
)
from .progress import bars

__all__ = ["register_cli"]

_DESCRIPTION = ("Certificate authority for one pear_mqtt network: CA, broker, node and bridge "
                "certificates.")


def _cmd_init(args: argparse.Namespace) -> int:
    path = create_ca(directory=args.dir, network=args.network, days=args.days,
                     key_type=args.key_type, force=args.force, pseudonyms=args.pseudonyms)
    print(f"created CA for network {args.network!r}: {path} (key {args.dir / CA_KEY})")
    if args.pseudonyms:
        print("stores are enrolled under random pseudonyms: `pear-mqtt pki enrol --company "
              "... --store ...`")
    return 0


def _cmd_issue(args: argparse.Namespace) -> int:
    if args.role == "node" and has_pseudonyms(ca_dir=args.dir):
        raise PKIError(f"the CA in {args.dir} enrols stores under pseudonyms: use `pear-mqtt "
                       f"pki enrol --dir {args.dir} --out {args.out} --company "
                       f"{args.member} --store {args.node or '<store>'}`")
    paths = issue(ca_dir=args.dir, out_dir=args.out, role=args.role, member=args.member,
                  node=args.node, hosts=tuple(args.host or ("localhost", "127.0.0.1")),
                  days=args.days, key_type=args.key_type, force=args.force)
    print(f"certificate: {paths.cert}\nkey:         {paths.key}\nCA:          {paths.ca}")
    return 0


def _cmd_enrol(args: argparse.Namespace) -> int:
    stores = _stores(args)
    if len(stores) == 1:
        paths, who = enrol(ca_dir=args.dir, out_dir=args.out, company=args.company,
                           store=stores[0], days=args.days, key_type=args.key_type,
                           force=args.force)
        print(f"certificate: {paths.cert}\nkey:         {paths.key}\nCA:          {paths.ca}\n"
              f"company {who.company!r} is member {who.member} (CN); store {who.store!r} is "
              f"node {who.node} (OU).\nIn this store's node configuration set node_id = "
              f"\"{who.node}\" (company_id stays the company's own id).")
        return 0
    rows = []
    with bars() as b:
        task = b.add(f"enrolling {args.company}'s stores", total=len(stores))
        for done, store in enumerate(stores, start=1):
            paths, who = enrol(ca_dir=args.dir, out_dir=args.out, company=args.company,
                               store=store, days=args.days, key_type=args.key_type,
                               force=args.force)
            rows.append((who.store, who.node, paths.cert.name))
            b.update(task, completed=done)
    print(f"{len(rows)} stores of {args.company!r} (member {who.member}) enrolled into "
          f"{args.out}; set each store's node_id to its NODE:")
    print(f"{'STORE':<24} {'NODE (OU)':<26} CERTIFICATE")
    for store, node, cert in rows:
        print(f"{store:<24} {node:<26} {cert}")
    return 0


def _stores(args: argparse.Namespace) -> list[str]:
    """The stores named by ``--store`` (repeated) and ``--stores-file``, in order, once each."""
    named: list[str] = list(args.store or [])
    if args.stores_file is not None:
        try:
            text = args.stores_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise PKIError(f"cannot read --stores-file {args.stores_file}: "
                           f"{exc.strerror or exc}") from None
        named += [line.strip() for line in text.splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
    if not named:
        raise PKIError("name the stores to enrol: --store ID (repeat it) or --stores-file "
                       "FILE (one store id per line)")
    return list(dict.fromkeys(named))


def _cmd_pseudonyms(args: argparse.Namespace) -> int:
    enrolments = list_pseudonyms(ca_dir=args.dir)
    if args.json:
        json.dump([e.to_json() for e in enrolments], sys.stdout, indent=2)
        print()
        return 0
    print(f"{'COMPANY':<20} {'STORE':<16} {'MEMBER (CN)':<26} NODE (OU)")
    for e in enrolments:
        print(f"{e.company:<20} {e.store:<16} {e.member:<26} {e.node}")
    return 0


def _cmd_rotate(args: argparse.Namespace) -> int:
    if not args.yes:
        raise PKIError("rotate-pseudonyms revokes every node certificate of the network; "
                       "pass --yes to go ahead")
    enrolments = rotate_pseudonyms(ca_dir=args.dir)
    print(f"new pseudonyms for {len(enrolments)} store(s); every node certificate is revoked "
          f"(CRL {args.dir / CA_CRL}).\nRe-enrol each store (`pear-mqtt pki enrol --dir "
          f"{args.dir} --out ... --company ... --store ...`) and set its new node_id, then "
          "re-render the broker configuration and SIGHUP (or restart) the broker.")
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    target: Path | int
    if args.serial is not None:
        try:
            target = int(args.serial, 0) if args.serial.startswith("0x") else int(args.serial)
        except ValueError:
            raise PKIError(f"--serial {args.serial!r} is not a number (decimal or 0x-hex)") \
                from None
    else:
        target = args.cert
    path = revoke(ca_dir=args.dir, cert=target)
    print(f"revoked; CRL written to {path}.\n"
          "Apply it: re-render the broker configuration (`pear-mqtt broker render --pki "
          f"{args.dir} ...`), whose ACL then denies a revoked node's topics so that its "
          "retained state and presence stop being served, and SIGHUP (or restart) the broker.")
    return 0


def _cmd_crl(args: argparse.Namespace) -> int:
    path = refresh_crl(ca_dir=args.dir, days=args.days)
    print(f"CRL re-signed: {path}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    records = list_certificates(ca_dir=args.dir)
    if args.json:
        json.dump([r.to_json() for r in records], sys.stdout, indent=2)
        print()
        return 0
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    print(f"{'SERIAL':<12} {'ROLE':<7} {'MEMBER':<20} {'NODE':<16} {'NOT AFTER':<20} STATUS")
    for r in records:
        print(f"{r.serial:x}"[:12].ljust(12), f"{r.role:<7} {r.member:<20} {r.node:<16} "
              f"{r.not_after:%Y-%m-%d %H:%M:%S} {r.status(now)}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pear-mqtt pki {init,issue,enrol,revoke,crl,list,pseudonyms,
    rotate-pseudonyms}``."""
    pki = subparsers.add_parser("pki", help="run the network's certificate authority",
                                description=_DESCRIPTION)
    sub = pki.add_subparsers(dest="pki_command", metavar="ACTION", required=True)
    key_types = list(get_args(KeyType))

    p = sub.add_parser("init", help="create a network CA")
    p.add_argument("--dir", type=Path, required=True, help="CA directory")
    p.add_argument("--network", required=True, help="network id (the O of every certificate)")
    p.add_argument("--days", type=int, default=3650, help="CA validity (default 3650)")
    p.add_argument("--key-type", choices=key_types, default=DEFAULT_KEY_TYPE)
    p.add_argument("--force", action="store_true", help="replace an existing CA")
    p.add_argument("--pseudonyms", action="store_true",
                   help="an anonymising network (consortium, public): enrol stores under "
                        "random pseudonyms the CA assigns (company -> CN, store -> OU), kept "
                        "in the CA's 0600 pseudonyms.json; node certificates are then issued "
                        "with `enrol` only")
    p.set_defaults(handler=_cmd_init)

    p = sub.add_parser("issue", help="issue a node, broker or bridge certificate")
    p.add_argument("--dir", type=Path, required=True, help="CA directory")
    p.add_argument("--out", type=Path, required=True, help="where to write cert, key, ca.crt")
    p.add_argument("--role", choices=list(get_args(Role)), required=True)
    p.add_argument("--member", required=True,
                   help="company id (node, CA without pseudonyms), broker name, or bridge "
                        "username")
    p.add_argument("--node", help="node (store) id; required for --role node")
    p.add_argument("--host", action="append",
                   help="broker DNS name or IP (repeat; default localhost and 127.0.0.1)")
    p.add_argument("--days", type=int, default=397, help="validity (default 397)")
    p.add_argument("--key-type", choices=key_types, default=DEFAULT_KEY_TYPE)
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(handler=_cmd_issue)

    p = sub.add_parser("enrol", help="issue a store's node certificate under the pseudonyms "
                                     "the CA assigns (CA made with init --pseudonyms)")
    p.add_argument("--dir", type=Path, required=True, help="CA directory")
    p.add_argument("--out", type=Path, required=True, help="where to write cert, key, ca.crt")
    p.add_argument("--company", required=True,
                   help="the company's own id (stays in the CA; the certificate carries its "
                        "pseudonym)")
    p.add_argument("--store", action="append",
                   help="the store's own id (the certificate's OU is its pseudonym); repeat "
                        "it to enrol many stores at once")
    p.add_argument("--stores-file", type=Path, metavar="FILE",
                   help="enrol every store named in FILE, one id per line (# comments)")
    p.add_argument("--days", type=int, default=397, help="validity (default 397)")
    p.add_argument("--key-type", choices=key_types, default=DEFAULT_KEY_TYPE)
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(handler=_cmd_enrol)

    p = sub.add_parser("revoke", help="revoke a certificate and re-sign the CRL")
    p.add_argument("--dir", type=Path, required=True, help="CA directory")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--cert", type=Path, help="the certificate file")
    which.add_argument("--serial", help="serial number (decimal, or hex with 0x)")
    p.set_defaults(handler=_cmd_revoke)

    p = sub.add_parser("crl", help="re-sign the CRL before its nextUpdate passes")
    p.add_argument("--dir", type=Path, required=True, help="CA directory")
    p.add_argument("--days", type=int, default=CRL_DAYS, help="CRL validity (default 365)")
    p.set_defaults(handler=_cmd_crl)

    p = sub.add_parser("list", help="list issued certificates")
    p.add_argument("--dir", type=Path, required=True, help="CA directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_cmd_list)

    p = sub.add_parser("pseudonyms", help="list which pseudonyms stand for which company and "
                                          "store (operator only)")
    p.add_argument("--dir", type=Path, required=True, help="CA directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_cmd_pseudonyms)

    p = sub.add_parser("rotate-pseudonyms",
                       help="draw new pseudonyms for every company and store and revoke every "
                            "node certificate (each store is then enrolled again); turns "
                            "pseudonyms on for a CA that had none")
    p.add_argument("--dir", type=Path, required=True, help="CA directory")
    p.add_argument("--yes", action="store_true",
                   help="confirm: every node certificate of the network is revoked")
    p.set_defaults(handler=_cmd_rotate)
