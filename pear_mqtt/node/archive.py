"""An archive node: it keeps every other node's verified history log on disk, exactly as
each sender signed it, and answers requests for any of them, so history survives a sender
that is offline or whose retention dropped it. Protocol: docs/HISTORY.md."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import HistoryError, TopicError
from ..history.log import AppendLog
from ..model.topics import TopicScheme, validate_identifier
from ..security.envelope import EnvelopeCodec
from ..security.identity import Identity
from ..transport import Connection, InboundMessage
from .answers import Record
from .counters import Counters, open_counted
from .history import Answer, range_bodies, reply_budget, send_range
from .replicas import Replicas

__all__ = ["Archive"]

log = logging.getLogger(__name__)


class Archive:
    """Per sender, an :class:`AppendLog` under ``<path>/<member>/<node>/<log id>``."""

    def __init__(self, *, path: Path, counters: Counters) -> None:
        self.path = path
        self._counters = counters
        self._logs: dict[tuple[str, str], tuple[str, AppendLog]] = {}  # sender -> (id, log)
        self._codec: EnvelopeCodec | None = None
        self._scheme: TopicScheme | None = None

    def attach(self, *, codec: EnvelopeCodec, topics: TopicScheme) -> None:
        self._codec, self._scheme = codec, topics

    def open(self, replicas: Replicas, network: str) -> None:
        """Open every log kept so far and start ``replicas`` from what they hold."""
        for entries in sorted(self.path.glob("*/*/*/entries.bin")):
            log_dir = entries.parent
            member, node = log_dir.parent.parent.name, log_dir.parent.name
            try:
                validate_identifier(member, what="member")
                validate_identifier(node, what="node_id")
                held = AppendLog.open(log_dir)
            except (TopicError, HistoryError) as exc:
                log.warning("archive: skipping %s (%s)", log_dir, exc)
                continue
            previous = self._logs.get((member, node))
            if previous is not None:
                if previous[1].length >= held.length:
                    held.close()
                    continue
                previous[1].close()
            self._logs[(member, node)] = (log_dir.name, held)
        for (member, node), (log_id, held) in self._logs.items():
            tree = held.tree
            replicas.seed(Identity(network=network, member=member, node=node), log_id,
                          [tree.leaf(i) for i in range(held.length)])

    def close(self) -> None:
        for _, held in self._logs.values():
            held.close()
        self._logs.clear()

    def logs(self) -> dict[str, int]:
        """Entries kept per sender."""
        return {f"{m}/{n}": held.length for (m, n), (_, held) in self._logs.items()}

    def keep(self, owner: Identity, log_id: str, first: int,
             records: list[Record]) -> None:
        """Verified entries ``first``.. of ``owner``'s log ``log_id``, in order."""
        key = (owner.member, owner.node)
        current = self._logs.get(key)
        if current is None or current[0] != log_id:
            if current is not None:
                current[1].close()  # the sender started a new log: keep both on disk
            current = (log_id, AppendLog.open(self.path / owner.member / owner.node / log_id))
            self._logs[key] = current
        held = current[1]
        if first != held.length:
            # Entries verified before this archive held the ones before them (a sender whose
            # retention had dropped them): they cannot be kept in place.
            log.warning("archive: %s entries %d.. arrived while it holds %d; not kept",
                        owner.sender, first, held.length)
            return
        try:
            held.append_many([payload for _, payload in records],
                             tags=[topic for topic, _ in records])
            held.flush()
        except HistoryError as exc:
            log.error("archive: %s (the entries stay with their senders)", exc)

    def answer(self, conn: Connection, msg: InboundMessage) -> bool:
        """Answer a ``logreq`` that names another node's log (``sender``); False when the
        request is not for the archive (it names none)."""
        assert self._codec is not None and self._scheme is not None
        decoded = open_counted(self._codec, msg.payload, self._counters)
        if decoded is None:
            return True
        body: Any = decoded.message.body
        if not isinstance(body, dict) or not isinstance(body.get("sender"), str):
            return False
        first, end, log_id = body.get("from"), body.get("to"), body.get("log")
        member, _, node = body["sender"].partition("/")
        current = self._logs.get((member, node))
        if (decoded.message.kind != "logreq" or type(first) is not int
                or type(end) is not int or not 0 <= first < end or not isinstance(log_id, str)):
            self._counters.dropped["malformed"] += 1
            return True
        answers: Iterable[Answer]
        if current is None or current[0] != log_id:
            # Not kept here: an answer that holds nothing (from 0), so the asker goes back
            # to the sender instead of waiting.
            answers = [({"log": log_id, "id": body.get("id") if isinstance(body.get("id"), str)
                         else None, "length": 0, "held_from": 0, "from": first, "count": 0,
                         "topics": []}, [])]
        else:
            current[1].flush()
            answers = range_bodies(current[1], log_id=log_id, first=first, end=end,
                                   request_id=body.get("id"), size=body.get("size"),
                                   max_bytes=reply_budget(self._codec))
        sender = body["sender"]
        send_range(conn, codec=self._codec, scheme=self._scheme, counters=self._counters,
                   asker=decoded.signer,
                   answers=(({**reply, "sender": sender}, blob) for reply, blob in answers))
        return True
