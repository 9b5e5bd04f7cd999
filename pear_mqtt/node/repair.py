"""Repair of the gaps in other nodes' logs: ask a sender (or, when it does not answer, the
network's archive) for the first missing range, one request per sender at a time, after the
grace a gap gets to fill by itself, again when no answer comes, and not while proven entries
wait for delivery. Protocol: docs/HISTORY.md."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from typing import Any

from ..errors import TopicError
from ..model.topics import TopicScheme
from ..security.envelope import EnvelopeCodec
from .counters import Counters
from .replica import Replica

__all__ = ["GAP_GRACE", "Publish", "RepairRequests"]

_ASK_AGAIN = 5.0  # s before an unanswered request is sent again
# A gap is asked for only once the held prefix has not grown for this long: entries still in
# flight (a head outruns the stream it covers; retained and live messages interleave) are
# not missing, and asking for them would only double the traffic on a slow link.
GAP_GRACE = 1.0
_ASK_MAX = 1 << 16  # entries asked for at once (the answers stop after a few MB)
_HOLD_POLL = 0.05  # s between looks at a repair paused for delivery to catch up

# (topic, payload, response topic, correlation data): a request over MQTT 5's
# request/response properties; the signed body carries the same for 3.1.1 brokers.
Publish = Callable[[str, bytes, str, bytes], None]


class RepairRequests:
    """The requests of one node, in the network ``mode``/``network`` (``archive``: the
    (member, node) that keeps every log; ``hold``: true while delivery is behind)."""

    def __init__(self, *, counters: Counters, mode: str, network: str,
                 archive: tuple[str, str] | None, hold: Callable[[], bool]) -> None:
        self._counters = counters
        self._mode, self._network = mode, network
        self._archive = archive
        self._hold = hold
        self._codec: EnvelopeCodec | None = None
        self._reply_topic = ""
        self.publish: Publish | None = None
        """Where requests go (None while disconnected)."""

    def attach(self, *, codec: EnvelopeCodec, reply_topic: str) -> None:
        self._codec, self._reply_topic = codec, reply_topic

    def later(self, rep: Replica, delay: float, *, at_once: bool = False) -> None:
        """Look at ``rep``'s gap again after ``delay`` s (one timer per sender)."""
        if rep.timer is not None and not rep.timer.cancelled():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        def again() -> None:
            rep.timer = None
            self.ask(rep, at_once=at_once)
        rep.timer = loop.call_later(delay + 0.01, again)

    def ask(self, rep: Replica, *, at_once: bool = False) -> None:
        """Ask ``rep``'s sender (or the archive) for its first missing range, one request
        at a time; or look again later while entries may still be on their way."""
        if self.publish is None or self._codec is None or rep.fork is not None:
            return
        start = rep.tree.size
        if rep.pending:
            end = min(rep.pending)
        elif rep.head is not None and rep.head.length > start:
            end = rep.head.length
        else:
            return
        if rep.broken_from is not None and rep.head is not None:
            return  # what the sender still holds came with the truncated answer
        end = min(end, start + _ASK_MAX)
        now = time.monotonic()
        quiet = now - rep.progress_at
        # A node that holds nothing of the log yet (a newcomer) has nothing in flight worth
        # waiting for: what the head covers is history.
        newcomer = start == 0 and not rep.pending
        if quiet < GAP_GRACE and not at_once and not newcomer:
            self.later(rep, GAP_GRACE - quiet)
            return
        outstanding = rep.asked is not None and rep.asked[0] == start
        if not outstanding and self._hold():
            # Proven entries wait for delivery beyond the backlog bound: ask later.
            if rep.timer is not None:
                rep.timer.cancel()
                rep.timer = None
            self.later(rep, _HOLD_POLL, at_once=True)
            return
        if rep.asked is not None and rep.asked[0] == start:
            if now - rep.asked[2] < _ASK_AGAIN:
                self.later(rep, _ASK_AGAIN - (now - rep.asked[2]))
                return
            if self._archive is not None:
                # No answer: the sender may be offline; the archive holds its log too (and
                # the other way round, should the archive be the one away).
                rep.from_archive = not rep.from_archive
        elif not at_once:
            self._counters.log_gaps += 1  # a gap that did not fill by itself
        member, node = (self._archive if rep.from_archive and self._archive is not None
                        else (rep.owner.member, rep.owner.node))
        try:
            topic = TopicScheme(self._mode, self._network, member).log_request(node)
        except TopicError:
            return
        rep.request_id = secrets.token_urlsafe(9)
        rep.asked = (start, end, now)
        body: dict[str, Any] = {"log": rep.log_id, "from": start, "to": end,
                                "id": rep.request_id}
        if rep.head is not None and end <= rep.head.length:
            body["size"] = rep.head.length  # answer with range proofs against this head
        if rep.from_archive:
            body["sender"] = rep.owner.sender
        # Looked at again if no answer comes: an offline sender sends nothing else that would.
        self.later(rep, _ASK_AGAIN)
        self.publish(topic, self._codec.encode(kind="logreq", body=body), self._reply_topic,
                      rep.request_id.encode("ascii"))
