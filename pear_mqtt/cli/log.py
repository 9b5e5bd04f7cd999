"""``pear-mqtt log verify|show``: check and print a node's history log (docs/HISTORY.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import HistoryError
from ..history.log import AppendLog
from ..history.merkle import MerkleTree, leaf_hash
from .progress import Bars, TaskID, bars

__all__ = ["register_cli"]


def _open(path: Path) -> AppendLog:
    if not (path / "entries.bin").is_file():
        raise HistoryError(f"{path} holds no history log (no entries.bin); a node's log is "
                           "next to its outbox as <outbox>.history")
    return AppendLog.open(path)


def _cmd_verify(args: argparse.Namespace) -> int:
    """One log, or every log an archive keeps (``<dir>/<member>/<node>/<log id>``)."""
    path: Path = args.path
    if (path / "entries.bin").is_file():
        kept = [path]
    else:
        kept = sorted(p.parent for p in path.glob("*/*/*/entries.bin"))
        if not kept:
            _open(path)  # raises the error that says what a log directory holds
    with bars() as b:
        task = b.add("verifying entries")
        return max(_verify_one(args, p, b, task) for p in kept)


_STEP = 4096  # entries between two updates of the bar


def _verify_one(args: argparse.Namespace, path: Path, b: Bars, task: TaskID | None) -> int:
    with _open(path) as log:
        tree = log.tree
        held = log.length - log.start
        b.advance(task, total_by=held)
        bad: list[int] = []
        for first in range(log.start, log.length, _STEP):
            last = min(first + _STEP, log.length)
            bad += [i for i, entry in enumerate(log.range(first, last), start=first)
                    if leaf_hash(entry) != tree.leaf(i)]
            b.advance(task, by=last - first)
        # Recomputed from the leaf hashes alone, so the stored subtree hashes are checked too.
        recomputed = MerkleTree([tree.leaf(i) for i in range(log.length)]).root()
        root = log.root()
    summary = {"path": str(path), "length": log.length, "start": log.start,
               "root": root.hex(), "entries_checked": log.length - log.start,
               "bad_entries": bad[:100], "ok": not bad and recomputed == root}
    if args.root is not None and args.root.lower() != root.hex():
        summary["ok"] = False
        summary["expected_root"] = args.root.lower()
    if args.json:
        print(json.dumps(summary))
    else:
        verdict = "ok" if summary["ok"] else "FAILED"
        print(f"{path}: {verdict}: {log.length} entries ({log.start} dropped by "
              f"retention), root {root.hex()}")
        if bad:
            print(f"  {len(bad)} entries do not match their leaf hash, first: {bad[:10]}")
        if "expected_root" in summary:
            print(f"  root differs from the expected {summary['expected_root']}")
    return 0 if summary["ok"] else 1


def _cmd_show(args: argparse.Namespace) -> int:
    with _open(args.path) as log:
        first = max(log.start, args.first if args.first is not None else log.start)
        last = min(log.length, args.last + 1 if args.last is not None else log.length)
        records = log.records(first, last) if first < last else []
    for index, (topic, entry) in enumerate(records, start=first):
        row: dict[str, Any] = {"index": index, "topic": topic, "bytes": len(entry),
                               "kind": _kind(entry)}
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{index:>8}  {row['kind']:<11} {len(entry):>8} B  {topic}")
    if not records and not args.json:
        print(f"{args.path}: no entries in that range (held: {log.start}..{log.length - 1})",
              file=sys.stderr)
    return 0


def _kind(entry: bytes) -> str:
    """The envelope's kind, read without verifying (the log holds only what was signed)."""
    at = entry.find(b'"kind":"')
    if at < 0:
        return "?"
    end = entry.find(b'"', at + 8)
    return entry[at + 8:end].decode("ascii", "replace") if end > 0 else "?"


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pear-mqtt log``."""
    parser = subparsers.add_parser(
        "log", help="check or print a node's verified-history log",
        description="A node keeps every envelope it publishes in an append-only Merkle log "
                    "(by default <outbox>.history next to its outbox; docs/HISTORY.md).")
    sub = parser.add_subparsers(dest="log_command", metavar="ACTION", required=True)
    verify = sub.add_parser("verify", help="check every held entry against its leaf hash and "
                                           "recompute the root (exit 1 on any mismatch)")
    verify.add_argument("path", type=Path, metavar="DIR",
                        help="the log directory, or an archive's (every log it keeps)")
    verify.add_argument("--root", metavar="HEX",
                        help="also require this root (e.g. from a signed head)")
    verify.add_argument("--json", action="store_true", help="one JSON object on stdout")
    verify.set_defaults(handler=_cmd_verify)
    show = sub.add_parser("show", help="list entries: index, kind, size, topic")
    show.add_argument("path", type=Path, metavar="DIR", help="the log directory")
    show.add_argument("--from", dest="first", type=int, metavar="N", help="first index")
    show.add_argument("--to", dest="last", type=int, metavar="M", help="last index")
    show.add_argument("--json", action="store_true", help="one JSON object per entry")
    show.set_defaults(handler=_cmd_show)
