"""A node's own history log: every envelope it publishes is appended (with the topic beside
it), its signed tree head is published retained, and it answers other nodes' requests for
ranges of it (the bridge keeps its log with the same :class:`NodeLog`). The receiving side
is :mod:`.replicas`; the protocol is in docs/HISTORY.md."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import HistoryError, LogTruncated, OversizedMessage, TopicError, TransportError
from ..files import atomic_write
from ..history.frame import join, leaves_digest, pack_entries
from ..history.head import TreeHead, head_body
from ..history.log import AppendLog, Retention
from ..model.topics import ParsedTopic, TopicScheme
from ..security.base64url import b64url_encode
from ..security.envelope import EnvelopeCodec
from ..security.identity import Identity
from ..transport import Connection, InboundMessage
from .counters import Counters, open_counted

__all__ = ["HEAD_INTERVAL", "REPLY_MAX_BYTES", "REPLY_MAX_ENTRIES", "REQUEST_MAX_BYTES", "Answer",
           "NodeLog", "range_bodies", "reply_budget", "send_range", "settle"]

log = logging.getLogger(__name__)

HEAD_INTERVAL = 1.0
"""Seconds between two signed heads while the log grows (a flush sends one at once)."""
REPLY_MAX_ENTRIES = 4096
REPLY_MAX_BYTES = 768 * 1024
"""At most this much per answer (one envelope) to a log request."""
REQUEST_MAX_BYTES = 32 * 1024 * 1024
"""At most this much in the answers to one request: the asker asks again for the rest."""


Answer = tuple[dict[str, Any], list[bytes | memoryview]]
"""A ``logrange`` answer's body and the parts of its attachment (:mod:`..history.frame`)."""


class NodeLog:
    """This node's :class:`AppendLog`, its id, and the head and answers it publishes."""

    def __init__(self, *, path: Path, retention: Retention | None, node_id: str,
                 counters: Counters) -> None:
        self._log = AppendLog.open(path, retention=retention)
        self._id = _log_id(path)
        self._node = node_id
        self._counters = counters
        self._codec: EnvelopeCodec | None = None
        self._scheme: TopicScheme | None = None
        self._head_length = -1
        self._head_at = 0.0
        self._head_slots = 0  # the checkpoint parts' version (CheckpointPages.slots) it named
        self._head_oversized = False

    def attach(self, *, codec: EnvelopeCodec, topics: TopicScheme) -> None:
        self._codec, self._scheme = codec, topics

    @property
    def log_id(self) -> str:
        return self._id

    @property
    def length(self) -> int:
        return self._log.length

    def next_ref(self) -> str:
        """The ``log`` member of the next envelope appended."""
        return f"{self._id}:{self._log.length}"

    def append(self, topic: str, payload: bytes) -> None:
        """Record an envelope encoded with :meth:`next_ref` (before it is published)."""
        self._log.append(payload, tag=topic)

    def close(self) -> None:
        self._log.close()

    # -- the signed head ----------------------------------------------------------------------
    def head_wait(self, *, forced: bool, slots: int = 0) -> float | None:
        """None when the last head covers the log and names the checkpoint parts as they
        are (``slots``: their version, bumped when one is added or dropped); else seconds
        until a new one may go (0: now)."""
        if self._log.length == self._head_length and slots == self._head_slots:
            return None
        if forced:
            return 0.0
        return max(0.0, self._head_at + HEAD_INTERVAL - time.monotonic())

    async def publish_head(self, conn: Connection, *, pages: dict[int, int],
                           slots: int = 0) -> None:
        """Make the log durable, then publish its signed head (retained), naming the
        envelope sequence of each checkpoint page part's latest version (``pages``, whose
        version is ``slots``). A head over ``max_message_bytes`` (a node with tens of
        thousands of parts under a small limit) is not sent: counted
        (``dropped["head_oversized"]``) and warned about once."""
        assert self._codec is not None and self._scheme is not None
        self._log.enforce_retention()
        sync = self._log.syncer()
        head = TreeHead(log=self._id, length=self._log.length, start=self._log.start,
                        root=self._log.root(), time=time.time(), pages=dict(pages))
        self._head_length, self._head_at = head.length, time.monotonic()
        self._head_slots = slots
        # The fsyncs (milliseconds, more on a slow card) on a thread: the loop goes on
        # sending meanwhile, and the head, signed only once they return, names no entry
        # that a power cut could still take.
        await asyncio.to_thread(sync)
        try:
            payload = self._codec.encode(kind="loghead", body=head_body(head))
        except OversizedMessage:
            self._counters.dropped["head_oversized"] += 1
            if not self._head_oversized:
                self._head_oversized = True
                log.warning("the signed log head naming %d checkpoint parts is over "
                            "max_message_bytes and is not sent: late joiners cannot tell when "
                            "they hold every state; raise max_message_bytes (docs/HISTORY.md)",
                            len(pages))
            return
        settle(conn.publish(self._scheme.log_head(self._node), payload, qos=1, retain=True))

    # -- answering requests -------------------------------------------------------------------
    def answer(self, conn: Connection, msg: InboundMessage, parsed: ParsedTopic) -> None:
        """Answer a ``logreq`` for this node's log, sent to ``parsed`` (our request topic)."""
        assert self._codec is not None and self._scheme is not None
        decoded = open_counted(self._codec, msg.payload, self._counters)
        if decoded is None:
            return
        asker, body = decoded.signer, decoded.message.body
        if decoded.message.kind != "logreq" or not isinstance(body, dict):
            self._counters.dropped["malformed"] += 1
            return
        first, end = body.get("from"), body.get("to")
        if (body.get("log") != self._id or type(first) is not int or type(end) is not int
                or not 0 <= first < end):
            self._counters.dropped["malformed"] += 1
            return
        if end > self._head_length:
            # Entries no signed head covers yet (those it covers were made durable before
            # it went out): durable before they leave.
            self._log.flush()
        send_range(conn, codec=self._codec, scheme=self._scheme, counters=self._counters,
                   asker=asker, answers=range_bodies(
                       self._log, log_id=self._id, first=first, end=end,
                       request_id=body.get("id"), size=body.get("size"),
                       max_bytes=reply_budget(self._codec)))


def range_bodies(held: AppendLog, *, log_id: str, first: int, end: int, request_id: Any,
                 size: Any, max_bytes: int) -> Iterator[Answer]:
    """The ``logrange`` answers to a request for ``[first, end)`` of ``held``, each a body
    and its attachment (:mod:`pear_mqtt.history.frame`): consecutive chunks of at most
    :data:`REPLY_MAX_ENTRIES` entries and about ``max_bytes`` each, together at most
    :data:`REQUEST_MAX_BYTES` (``"more": true`` on all but the last). Each chunk carries a
    range proof against the tree of ``size`` entries when the asker named a signed head's
    length ``size`` that covers it; ``truncated`` is set when the asker wants entries
    retention dropped. Made one at a time, as they are sent (each one read from the disk
    then, its entries views of that read, copied once, into the payload by
    :func:`send_range`)."""
    held_from = held.start
    end = min(end, held.length)
    rid = request_id if isinstance(request_id, str) else None
    provable = type(size) is int and 0 < size <= held.length
    start = max(first, held_from)
    total, pos = 0, start
    while True:
        got: list[tuple[str, memoryview]] = []
        if pos < end:
            try:
                # One read per answer, of records that fill at most max_bytes: each is
                # longer than what the answer carries for its entry (length and topic).
                got = held.views(pos, min(end, pos + REPLY_MAX_ENTRIES), max_bytes=max_bytes)
            except (LogTruncated, HistoryError) as exc:
                log.warning("cannot answer a log request: %s", exc)
        topics = [topic for topic, _entry in got]
        entries = [entry for _topic, entry in got]
        chunk_bytes = sum(map(len, entries)) + sum(map(len, topics)) + 8 * len(entries)
        n = len(entries)
        body: dict[str, Any] = {"log": log_id, "id": rid, "length": held.length,
                                "held_from": held_from, "from": pos, "count": n,
                                "topics": topics}
        if n:
            body["digest"] = b64url_encode(leaves_digest(
                held.tree.leaves(pos, pos + n))).decode("ascii")
        if pos == start and first < held_from:
            body["truncated"] = True  # the asker learns at once, instead of waiting
        if n and provable and pos + n <= size:
            body["size"] = size
            body["proof"] = [b64url_encode(h).decode("ascii")
                             for h in held.tree.range_proof(pos, pos + n, size)]
        pos += n
        total += chunk_bytes
        last = not n or pos >= end or total >= REQUEST_MAX_BYTES
        if not last:
            body["more"] = True
        yield body, pack_entries(entries)
        if last:
            return


def send_range(conn: Connection, *, codec: EnvelopeCodec, scheme: TopicScheme,
               counters: Counters, asker: Identity, answers: Iterable[Answer]) -> None:
    """Publish ``logrange`` answers to the asker's own reply topic, which only it reads.
    Not encrypted: the entries are the exact envelopes the network already carried (their
    bodies sealed as they were), and the topics beside them are the ones they went on.
    The next answer is made when the last one is written to the socket: the first is on
    its way (and the asker at work on it) while the next is made, and no more than one
    waits in memory."""
    try:
        reply = TopicScheme(scheme.mode, scheme.network, asker.member).log_reply(asker.node)
    except TopicError:
        counters.dropped["bad_topic"] += 1
        return
    counters.log_requests_answered += 1
    todo = iter(answers)

    def publish_next() -> None:
        answer = next(todo, None)
        if answer is None:
            return
        body, parts = answer
        envelope = codec.encode(kind="logrange", body=body, encrypt=False)
        try:
            settle(conn.publish(reply, join(envelope, parts), qos=1))
        except TransportError:
            return  # the connection is gone: the asker asks again on the next one
        conn.when_sent(publish_next)
    publish_next()


def reply_budget(codec: EnvelopeCodec) -> int:
    """Bytes of entries per answer: what fits one message of the network's size limit
    beside its envelope."""
    return max(1024, min(REPLY_MAX_BYTES, codec.max_bytes * 3 // 4))


def settle(fut: asyncio.Future[None]) -> None:
    """A head or an answer lost with its connection is sent again later (the next head, the
    asker's next request): its outcome needs no one waiting on it."""
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())


def _log_id(path: Path) -> str:
    """The log's random id, kept in ``id`` beside it (made on first use)."""
    file = path / "id"
    try:
        if file.exists():
            text = file.read_text(encoding="ascii").strip()
            if text:
                return text
        new = secrets.token_urlsafe(9)
        atomic_write(file, new + "\n")
        return new
    except (OSError, UnicodeDecodeError) as exc:
        raise HistoryError(f"history log {path}: cannot read or write its id "
                           f"({exc}); check the directory") from exc
