"""The bridge's own history log: every aggregate and receipt it publishes to the public is an
entry of a :class:`~pear_mqtt.node.history.NodeLog` (the nodes' log, head and answers, reused
as they are), so public receivers verify and repair it like any sender's. The place of each
message is fixed when it is built (its ``log`` member is signed, and its receipt hashes its
exact bytes), and it is appended when it is sent, in outbox order. Contract: docs/HISTORY.md,
"The bridge's log"."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import ProofFailed, TopicError, TransportError
from ..history.head import parse_log_ref
from ..history.log import Retention
from ..model.topics import TopicScheme, parse_topic
from ..node.counters import Counters
from ..node.history import NodeLog
from ..security.envelope import EnvelopeCodec
from ..transport import Connection, InboundMessage
from .endpoints import BRIDGE_NODE
from .state import OutgoingRow

__all__ = ["BridgeLog", "LogRefs"]

log = logging.getLogger(__name__)


class LogRefs:
    """The places of the messages one window close builds, from the first free one on."""

    def __init__(self, log_id: str, first: int) -> None:
        self._id = log_id
        self.next = first

    def peek(self) -> str:
        """The ``log`` member of the next message (taken with :meth:`take` once it is
        built: a message that could not be built takes no place)."""
        return f"{self._id}:{self.next}"

    def take(self) -> None:
        self.next += 1


class BridgeLog:
    """The log at ``path``; ``pending`` reads the outbox (the messages built, not yet sent)."""

    def __init__(self, *, path: Path, retention: Retention | None,
                 pending: Callable[[], Sequence[OutgoingRow]]) -> None:
        self.counters = Counters()
        self._log = NodeLog(path=path, retention=retention, node_id=BRIDGE_NODE,
                            counters=self.counters)
        self._pending = pending
        self._topics: TopicScheme | None = None
        self._warned_old = False

    def attach(self, *, codec: EnvelopeCodec, topics: TopicScheme) -> None:
        self._log.attach(codec=codec, topics=topics)
        self._topics = topics

    @property
    def log_id(self) -> str:
        return self._log.log_id

    @property
    def length(self) -> int:
        return self._log.length

    def close(self) -> None:
        self._log.close()

    # -- building and sending -----------------------------------------------------------------
    def refs(self) -> LogRefs:
        """Places for the next messages built: after the log and after every message of
        this log still in the outbox (built before, not yet sent). Read from both each
        time, so places a build that was never committed reserved are used again."""
        first = self._log.length
        for row in reversed(self._pending()):
            ref = _ref_of(row.payload)
            if ref is not None and ref[0] == self._log.log_id:
                # Places grow with the outbox order: the newest such row has the highest.
                first = max(first, ref[1] + 1)
                break
        return LogRefs(self._log.log_id, first)

    def record(self, topic: str, payload: bytes) -> bool:
        """Append an outbox message at its place before it is published; False when it
        must wait (a message before it has not been appended: sending it would leave a
        hole in the log)."""
        ref = _ref_of(payload)
        if ref is None:
            return True  # not an entry (the ledger)
        log_id, index = ref
        if log_id != self._log.log_id:
            if not self._warned_old:
                log.warning("bridge log: the outbox holds messages of an earlier log (%s); "
                            "they are sent, but not logged in this one (%s)", log_id,
                            self._log.log_id)
                self._warned_old = True
            return True
        if index < self._log.length:
            return True  # appended before, sent again (its acknowledgement was lost)
        if index > self._log.length:
            log.error("bridge log: message at place %d is next to send, but the log holds %d "
                      "entries; it waits", index, self._log.length)
            return False
        self._log.append(topic, payload)
        return True

    # -- the head and requests on the public broker ---------------------------------------------
    async def connected(self, conn: Connection) -> None:
        """Answer requests for the log that arrive on ``conn`` and publish the head."""
        assert self._topics is not None
        conn.dispatch_to(lambda msg: self._request(conn, msg))
        try:
            granted = await conn.subscribe([(self._topics.log_request(BRIDGE_NODE), 1)])
        except TransportError as exc:
            log.info("bridge log: %s", exc)
            return
        if any(g >= 128 for g in granted):
            log.error("bridge log: the public broker refused the request topic %s (its ACL "
                      "lacks the bridge's log rules: regenerate it)",
                      self._topics.log_request(BRIDGE_NODE))
        await self.publish_head(conn, forced=True)

    async def publish_head(self, conn: Connection, *, forced: bool = False) -> None:
        """Sign and publish the head (retained) when the log grew since the last one
        (``forced``: also when it did not, e.g. on a new connection)."""
        if not conn.connected:
            return
        if self._log.head_wait(forced=True) is None and not forced:
            return
        try:
            await self._log.publish_head(conn, pages={})
        except TransportError as exc:
            log.info("bridge log head: %s", exc)  # sent again after the reconnect

    def _request(self, conn: Connection, msg: InboundMessage) -> None:
        try:
            parsed = parse_topic(msg.topic)
            if parsed.kind != "log_req":
                self.counters.dropped["unexpected_topic"] += 1
            elif msg.payload:
                self._log.answer(conn, msg, parsed)
        except TopicError:
            self.counters.dropped["bad_topic"] += 1
        except TransportError as exc:
            log.info("bridge log: answer not sent: %s", exc)  # the asker asks again
        conn.ack(msg)


_LOG_MEMBER = b',"log":"'
_HEADER = 512  # the envelope's flat header, before its body, holds the member


def _ref_of(payload: bytes) -> tuple[str, int] | None:
    """The (log id, index) an envelope's signed ``log`` member names, or None. Read from
    the header without parsing the body: outbox rows are whole aggregates."""
    at = payload.find(_LOG_MEMBER, 0, _HEADER)
    if at < 0:
        return None
    at += len(_LOG_MEMBER)
    end = payload.find(b'"', at, at + 64)
    try:
        return parse_log_ref(payload[at:end].decode("ascii")) if end > 0 else None
    except (UnicodeDecodeError, ProofFailed):
        return None
