"""A node's receiving side: verify each message, check that its signer is the member (and
node) its topic names, de-duplicate items by sender and id, and deliver them. Anything wrong
is dropped and counted by reason, never raised."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from ..config.models import NetworkConfig
from ..errors import EnvelopeError, TopicError, TransportError
from ..history.frame import split
from ..model.aggregates import AggregateBody
from ..model.mixed import item_categories
from ..model.topics import MIXED, ParsedTopic, parse_topic
from ..privacy.filter import SharedInsight
from ..security.envelope import Decoded, EnvelopeCodec
from ..security.identity import Identity
from ..transport import Connection, InboundMessage
from .archive import Archive
from .checkpoints import CheckpointPages
from .counters import Counters, open_counted
from .history import NodeLog, settle
from .markers import Markers
from .pagereader import PageReader, state_body
from .peers import PeerTable
from .records import ReceivedAggregate, ReceivedInsight
from .replicas import Replicas, Reply
from .streams import Streams

__all__ = ["Receiver"]

log = logging.getLogger(__name__)

_DEDUP_MEMORY = 200_000  # (sender, item id) pairs remembered for de-duplication
BACKLOG_MAX_BYTES = 64 * 1024 * 1024
"""Proven entries held for delivery at most (the repair pauses beyond it)."""
_DRAIN_SLICE = 32  # entries delivered per turn of the event loop
# While a repair request is outstanding and its answers keep coming (the last one less than
# this many seconds ago), their items wait: the repair (fetch, prove, hold) runs at network
# speed and delivery catches up behind it.
_STREAMING = 0.25
_DEFER_POLL = 0.005

Sink = Callable[[ReceivedInsight | ReceivedAggregate], None]
"""Where verified insights, states and aggregates go besides the streams (the market store)."""

# SharedInsight.model_validate without the wrapper's own per-call cost (once per item).
_validate_shared = SharedInsight.__pydantic_validator__.validate_python


class Receiver:
    """Handles every inbound message of a node inside the socket's read callback (:meth:`run`)
    and keeps what sync() returns: the latest retained state per topic and aggregate."""

    def __init__(self, *, config: NetworkConfig, clock: Callable[[], float],
                 counters: Counters, streams: Streams, peers: PeerTable, markers: Markers,
                 pages: CheckpointPages) -> None:
        self.config = config
        self._clock = clock
        self._counters = counters
        self._pages = pages
        self._codec: EnvelopeCodec | None = None
        self._me: Identity | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._states: dict[str, ReceivedInsight] = {}
        self._aggregates: dict[str, ReceivedAggregate] = {}
        # The collaborators' lists and methods, bound once: no lookups per message.
        self._insight_streams = streams.insight_streams
        self._aggregate_streams = streams.aggregate_streams
        self._callbacks = streams.callbacks
        self._fan_out = streams.fan_out
        self._handle_presence = peers.handle
        self._marker_arrived = markers.arrived
        self._replicas: Replicas | None = None
        self._history: NodeLog | None = None
        self._conn: Connection | None = None
        self._sink: Sink | None = None
        self._archive: Archive | None = None
        # Proven entries whose items are not delivered yet: (answer, next record).
        self._backlog: deque[tuple[Reply, int]] = deque()
        self._backlog_bytes = 0
        self._last_proven = 0.0
        self._drain_handle: asyncio.Handle | None = None
        self._page_reader = PageReader(config=config, clock=clock, counters=counters,
                                       pages=pages, states=self._states,
                                       deliver=self._deliver, logged=self._logged)
        self._read_page = self._page_reader.handle

    def attach(self, codec: EnvelopeCodec, *, replicas: Replicas | None = None,
               history: NodeLog | None = None, sink: Sink | None = None,
               archive: Archive | None = None) -> None:
        """Verify with ``codec``, track senders' logs in ``replicas``, answer requests for
        our own ``history`` and hand every verified insight, state and aggregate to ``sink``
        (the market store's feed) (set on each ``connect()``)."""
        self._codec = codec
        self._me = codec.signer.identity
        self._replicas = replicas
        if replicas is not None:
            replicas.hold = self.holding_back
        self._history = history
        self._sink = sink
        self._archive = archive
        self._page_reader.attach(codec, replicas=replicas)

    @property
    def states(self) -> dict[str, ReceivedInsight]:
        """The latest retained state per state topic (live: copy it to keep it)."""
        return self._states

    @property
    def aggregates(self) -> dict[str, ReceivedAggregate]:
        """The latest aggregate per topic (live: copy it to keep it)."""
        return self._aggregates

    def hold_reading(self, held: bool, *, at_most: float) -> None:
        """Stop (``held``, for ``at_most`` seconds at most) or restart reading the current
        connection: the market store fell behind and catches up meanwhile (docs/MARKET.md)."""
        if self._conn is not None:
            if held:
                self._conn.pause_reading(at_most=at_most)
            else:
                self._conn.resume_reading()

    async def run(self, conn: Connection) -> None:
        """Handle what ``conn`` receives until it closes."""
        self._conn = conn
        if self._replicas is not None:
            self._replicas.connected(functools.partial(_request, conn))
        # Handled in the socket callback as each message is read: no queue, no task switch.
        conn.dispatch_to(self._handle_guarded)
        try:
            await conn.closed.wait()
        finally:
            self._conn = None
            if self._replicas is not None:
                self._replicas.connected(None)

    def _handle_guarded(self, msg: InboundMessage) -> None:
        try:
            self._handle(msg)
        except Exception:  # a receiver must never die on one message
            log.exception("unexpected error handling a message on %r", msg.topic)
            self._counters.dropped["internal_error"] += 1

    def _handle(self, msg: InboundMessage, *, repaired: bool = False) -> None:
        self._counters.messages_in += 1
        try:
            parsed = parse_topic(msg.topic)
        except TopicError:
            self._counters.dropped["bad_topic"] += 1
            return
        if parsed.kind in ("log_head", "log_req", "log_reply"):
            self._handle_log(parsed, msg)
            return
        if parsed.kind == "sync":
            self._marker_arrived(msg.payload)
            return
        if parsed.kind == "nodes":
            self._handle_presence(parsed, msg)
            return
        if parsed.kind == "checkpoint":
            self._read_page(parsed, msg)
            return
        if not msg.payload:
            if not msg.retain:  # a cleared retained message is legitimate; this is not
                self._counters.dropped["malformed"] += 1
            return
        assert self._codec is not None
        try:
            # A repaired entry is an old message on purpose: its log index, not its
            # sequence number, says it is new to us.
            decoded = self._codec.decode(msg.payload,
                                         check_replay=not msg.retain and not repaired)
        except EnvelopeError as exc:
            self._counters.dropped[exc.reason] += 1
            if repaired:
                self._counters.log_refused["forged_entry"] += 1
            log.debug("dropped message on %s: %s", msg.topic, exc)
            return
        self._accept(parsed, msg, decoded, repaired=repaired)

    def _accept(self, parsed: ParsedTopic, msg: InboundMessage, decoded: Decoded, *,
                repaired: bool, proven: bool = False) -> None:
        """Deliver a verified envelope (``proven``: an entry a range proof already placed
        in its sender's log)."""
        signer = decoded.signer
        # Identity first: our own envelope replayed into another member's subtree is a
        # mismatch to count, not an echo to ignore.
        if parsed.company is not None and parsed.company != signer.member:
            self._counters.dropped["identity_mismatch"] += 1
            return
        if parsed.kind == "state" and parsed.node != signer.node:
            self._counters.dropped["identity_mismatch"] += 1
            return
        if (parsed.kind == "state" and msg.retain and self._clock()
                - decoded.message.timestamp > self.config.reliability.message_expiry):
            # An MQTT 5 broker drops a retained state message_expiry after it was sent; a
            # 3.1.1 broker keeps it, so the receiver holds it to the same lifetime.
            self._counters.dropped["state_expired"] += 1
            return
        if signer == self._me:
            state = state_body(decoded) if parsed.kind == "state" else None
            if self._pages.seeding and state is not None:
                self._pages.keep_state(msg.topic, json.dumps(state,
                                                             separators=(",", ":")).encode(),
                                       only_new=True)
            return  # our own message echoed by a broker without no-local
        if not proven and not self._logged(signer, decoded.message.log_ref, msg.payload,
                                           msg.topic):
            return
        kind = decoded.message.kind
        body = decoded.message.body
        if kind == "insights" and parsed.kind in ("insights", "contrib"):
            items = body.get("items") if isinstance(body, dict) else None
            if not isinstance(items, list):
                self._counters.dropped["malformed"] += 1
                return
            now = self._clock()
            if not msg.retain and not repaired:
                self._counters.delivery_latency.observe(now - decoded.message.timestamp)
            seq, ref = decoded.message.sequence, decoded.message.log_ref
            if parsed.category is not None:
                for raw in items:
                    self._deliver(raw, msg.topic, msg.retain, signer, dedup=True, now=now,
                                  sequence=seq, log_ref=ref, category=parsed.category)
                return
            # Several categories: each item is delivered as if on its own category's topic.
            categories = item_categories(body, len(items))
            if categories is None:
                self._counters.dropped["malformed"] += 1
                return
            prefix = msg.topic[:-len(MIXED)]
            for raw, category in zip(items, categories, strict=True):
                self._deliver(raw, prefix + category, msg.retain, signer, dedup=True,
                              now=now, sequence=seq, log_ref=ref, category=category)
        elif kind == "aggregate" and parsed.kind == "aggregates":
            self._deliver_aggregate(body, msg, parsed, signer)
        elif kind == "receipt" and parsed.kind == "bridge_receipt":
            pass  # an entry of the bridge's log (docs/HISTORY.md): verified, nothing to hand on
        elif parsed.kind == "state" and (state := state_body(decoded)) is not None:
            received = self._deliver(state, msg.topic, msg.retain, signer, dedup=False,
                                     sequence=decoded.message.sequence,
                                     log_ref=decoded.message.log_ref)
            if received is not None:
                self._states[msg.topic] = received
        else:
            self._counters.dropped["unexpected_kind"] += 1

    # -- verified history ---------------------------------------------------------------------
    def _logged(self, signer: Identity, log_ref: str | None, payload: bytes,
                topic: str) -> bool:
        """Record a sender's logged envelope; false if it must be dropped (a forked sender)."""
        replicas = self._replicas
        if replicas is None:
            return True
        if log_ref is None:
            if replicas.refused(signer):
                self._counters.dropped["forked_sender"] += 1
                return False
            return True
        return replicas.observe(signer, log_ref, payload, topic)

    def _handle_log(self, parsed: ParsedTopic, msg: InboundMessage) -> None:
        me = self._me
        if parsed.kind == "log_req":
            if self._conn is None or me is None or not _names(parsed, me):
                return
            if self._archive is not None and self._archive.answer(self._conn, msg):
                return  # a request for another node's log, which this archive keeps
            if self._history is not None:
                self._history.answer(self._conn, msg, parsed)
            return
        if not msg.payload or self._replicas is None:
            return
        envelope, blob = (split(msg.payload) if parsed.kind == "log_reply"
                          else (msg.payload, b""))
        decoded = open_counted(self._codec, envelope, self._counters)
        if decoded is None:
            return
        signer, message = decoded.signer, decoded.message
        if signer == me:
            return
        if parsed.kind == "log_head":
            if not _names(parsed, signer):
                self._counters.dropped["identity_mismatch"] += 1
                self._replicas.count_refused("foreign_head")  # a head signed by another
            elif message.kind != "loghead":
                self._counters.dropped["unexpected_kind"] += 1
            else:
                self._replicas.on_head(signer, message.body, msg.payload)
            return
        if me is None or not _names(parsed, me):
            return  # a reply to another node (a broker that let us read it)
        if message.kind != "logrange":
            self._counters.dropped["unexpected_kind"] += 1
            return
        reply = self._replicas.on_reply(signer, message.body, blob)
        if reply.proven:
            self._backlog.append((reply, 0))
            self._backlog_bytes += sum(len(payload) for _topic, payload in reply.records)
            self._last_proven = time.monotonic()
            self._schedule_drain(0.0)
        else:
            for topic, payload in reply.records:
                self._handle(InboundMessage(topic=topic, payload=bytes(payload), qos=1,
                                            retain=False),
                             repaired=True)
        self._replicas.repaired(len(reply.records))

    # -- the items of proven entries, behind the repair ----------------------------------------
    def holding_back(self) -> bool:
        """Whether proven entries wait for delivery beyond the backlog bound: the repair
        asks for no more until they are delivered."""
        return self._backlog_bytes >= BACKLOG_MAX_BYTES

    def _schedule_drain(self, delay: float) -> None:
        if self._drain_handle is not None or not self._backlog:
            return
        loop = asyncio.get_running_loop()
        self._drain_handle = (loop.call_soon(self._drain) if delay <= 0
                              else loop.call_later(delay, self._drain))

    def _drain(self) -> None:
        """Deliver a slice of the backlog, then yield to the event loop. While answers
        stream in, the repair goes first: their items wait (up to the backlog bound)."""
        self._drain_handle = None
        quiet = time.monotonic() - self._last_proven
        if self._backlog_bytes < BACKLOG_MAX_BYTES and (quiet < _DEFER_POLL or (
                quiet < _STREAMING and self._replicas is not None
                and self._replicas.awaiting())):
            # (Also just after the last answer: what waits on the repair runs first.)
            self._schedule_drain(_DEFER_POLL)
            return
        budget = _DRAIN_SLICE
        while self._backlog and budget > 0:
            reply, at = self._backlog[0]
            end = min(len(reply.records), at + budget)
            try:
                self._deliver_proven(reply, at, end)
            except Exception:  # a receiver must never die on one message
                log.exception("unexpected error delivering repaired entries")
                self._counters.dropped["internal_error"] += end - at
            budget -= end - at
            self._backlog_bytes -= sum(len(p) for _t, p in reply.records[at:end])
            if end >= len(reply.records):
                self._backlog.popleft()
            else:
                self._backlog[0] = (reply, end)
        self._schedule_drain(0.0)

    def _deliver_proven(self, reply: Reply, start: int, end: int) -> None:
        """The items of entries a range proof tied to their owner's signed head: their
        bytes are the owner's, so they are opened without verifying each signature again."""
        assert self._codec is not None and reply.owner is not None
        owner = reply.owner
        for i in range(start, end):
            topic, view = reply.records[i]
            payload = bytes(view)  # the one copy of a proven entry, as it is delivered
            self._counters.messages_in += 1
            try:
                parsed = parse_topic(topic)
                decoded = self._codec.open_proven(payload, owner)
            except TopicError:
                self._counters.dropped["bad_topic"] += 1
                continue
            except EnvelopeError as exc:
                self._counters.dropped[exc.reason] += 1
                continue
            if decoded.message.log_ref != f"{reply.log_id}:{reply.first + i}":
                self._counters.dropped["malformed"] += 1
                continue
            if parsed.kind in ("insights", "contrib", "state", "aggregates", "bridge_receipt"):
                self._accept(parsed, InboundMessage(topic=topic, payload=payload, qos=1,
                                                    retain=False),
                             decoded, repaired=True, proven=True)
            else:
                self._counters.dropped["unexpected_kind"] += 1

    def _deliver(self, raw: Any, topic: str, retained: bool, signer: Identity, *,
                 dedup: bool, now: float | None = None, sequence: int = 0,
                 log_ref: str | None = None,
                 category: str | None = None) -> ReceivedInsight | None:
        """Validate and hand on one item; ``category``: the one its message names for it
        (an item of another is dropped as a ``mismatch``)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("iid"), str):
            self._counters.dropped["malformed"] += 1
            return None
        iid: str = raw["iid"]
        # Ids are derived from what an item describes: one sender's repeat of an observation
        # has the same id, and only that sender's own items can be repeats of it.
        key = f"{signer.sender}\x00{iid}"
        if dedup and key in self._seen:
            # Only ids of items that passed validation are remembered, so skipping the
            # validation of a repeat cannot let anything new through.
            self._counters.duplicates += 1
            return None
        body = raw.get("insight")
        sealed = raw.get("sealed")
        if body is None and isinstance(sealed, str):
            return None  # only a sealed part, for the aggregator: nothing a peer can read
        try:
            shared = _validate_shared(body)
        except ValidationError:
            self._counters.dropped["malformed"] += 1
            return None
        if category is not None and shared.category != category:
            self._counters.dropped["mismatch"] += 1
            return None
        received = ReceivedInsight(item_id=iid, topic=topic, member=signer.member,
                                   node=signer.node, insight=shared, retained=retained,
                                   received_at=self._clock() if now is None else now,
                                   sealed=sealed if isinstance(sealed, str) else None,
                                   sequence=sequence, log_ref=log_ref)
        if self._sink is not None:
            self._sink(received)  # states too: the store keeps one row per item
        if dedup:
            self._seen[key] = None
            if len(self._seen) > _DEDUP_MEMORY:
                self._seen.popitem(last=False)
            self._counters.insights_in += 1
            self._fan_out(self._insight_streams, received)
            for cb in list(self._callbacks):
                try:
                    cb(received)
                except Exception:
                    log.exception("insight callback %r failed", cb)
        return received

    def _deliver_aggregate(self, body: Any, msg: InboundMessage, parsed: ParsedTopic,
                           signer: Identity) -> None:
        if signer.node != "bridge":
            self._counters.dropped["identity_mismatch"] += 1
            return
        try:
            aggregate = AggregateBody.model_validate(body)
        except ValidationError:
            self._counters.dropped["malformed"] += 1
            return
        if (aggregate.network, aggregate.category) != (parsed.network, parsed.category):
            self._counters.dropped["mismatch"] += 1  # a bridge message moved to another topic
            return
        received = ReceivedAggregate(topic=msg.topic, aggregate=aggregate, retained=msg.retain,
                                     received_at=self._clock())
        previous = self._aggregates.get(msg.topic)
        if previous is None or aggregate.window_start >= previous.aggregate.window_start:
            # (an older window repaired from the bridge's log is history, not the latest)
            self._aggregates[msg.topic] = received
        if previous is not None and previous.aggregate == aggregate:
            self._counters.duplicates += 1  # the same retained aggregate seen again
            return
        if self._sink is not None:
            self._sink(received)
        self._fan_out(self._aggregate_streams, received)


def _request(conn: Connection, topic: str, payload: bytes, response_topic: str,
             correlation: bytes) -> None:
    """Send a log request; a failure only means it is asked again after reconnecting."""
    try:
        fut = conn.publish(topic, payload, qos=1, response_topic=response_topic,
                           correlation=correlation)
    except TransportError as exc:
        log.info("log request not sent: %s", exc)
        return
    settle(fut)


def _names(parsed: ParsedTopic, who: Identity) -> bool:
    """Whether a log topic is ``who``'s (public topics name the member alone)."""
    return parsed.company == who.member and parsed.node in (None, who.node)

