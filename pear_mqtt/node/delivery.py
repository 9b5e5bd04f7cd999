"""A node's delivery of outbox rows: sign them into envelopes, publish them at QoS 1, delete
them from the outbox on PUBACK, and dead-letter what the broker refuses. What goes when is
the :class:`~.sender.Sender`'s pacing (docs/DESIGN.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Container, Iterator

from ..config.models import NetworkConfig
from ..errors import OutboxError, OversizedMessage, PublishRefused, TransportError
from ..model.mixed import mixed_body
from ..model.topics import MIXED
from ..security.envelope import EnvelopeCodec
from ..transport import Connection
from .counters import Counters
from .history import NodeLog
from .memory_outbox import MemoryOutbox
from .outbox import Outbox, OutboxItem
from .suspects import Suspects
from .window import Window

__all__ = ["MIX_BELOW", "Delivery", "batches"]

log = logging.getLogger(__name__)

MIX_BELOW = 4
"""A round's live batches of fewer items than this go together in envelopes of several
categories (when there are two or more of them): each envelope costs a signature, a
publish and a PUBACK, which a handful of items do not share enough."""


class Delivery:
    """Signs and publishes batches of outbox rows and settles each on its PUBACK.

    ``keep_state`` puts a sent state into the checkpoint pages; ``share`` says whether a held
    state row may go on its live envelope's signed bytes (see :meth:`send_batch`);
    ``settled`` is called once acknowledged rows left the outbox.
    """

    def __init__(self, *, config: NetworkConfig, counters: Counters,
                 keep_state: Callable[[str, bytes], None], share: Callable[[OutboxItem], bool],
                 settled: Callable[[], None]) -> None:
        rel = config.reliability
        self._qos, self._expiry = rel.qos, rel.message_expiry
        self._counters = counters
        self._keep_state, self._share, self._settled = keep_state, share, settled
        self._codec: EnvelopeCodec | None = None
        self._mixed_topic = ""  # this member's topic of several categories
        self._history: NodeLog | None = None
        self._outbox: Outbox | MemoryOutbox | None = None
        self._inflight_ids: set[int] = set()
        self._suspects = Suspects()  # rows in flight when a connection closed
        self._acks: list[int] = []  # acknowledged rows not yet deleted (see ack_rows)
        self._ack_scheduled = False
        self._refused_topics: set[str] = set()  # said once each (see _dead_letter)
        self.latency: float | None = None
        """Smoothed PUBACK round trip in ms (None before the first)."""

    def attach(self, *, codec: EnvelopeCodec, outbox: Outbox | MemoryOutbox,
               history: NodeLog | None, mixed_topic: str) -> None:
        self._codec, self._outbox, self._history = codec, outbox, history
        self._mixed_topic = mixed_topic

    @property
    def category_prefix(self) -> str:
        """What a live row's topic starts with before its category (see :func:`batches`)."""
        return self._mixed_topic[:-len(MIXED)]

    def detach(self) -> None:
        """Record the acknowledgements still pending, then forget the outbox (its owner
        closes it)."""
        self.flush_acks()
        self._outbox = None

    @property
    def in_flight(self) -> bool:
        return bool(self._inflight_ids)

    def connection_lost(self) -> None:
        """Forget what was in flight: it is still in the outbox and is fetched again."""
        self._inflight_ids.clear()

    async def send_batch(self, conn: Connection, window: Window, batch: list[OutboxItem],
                         *, shared: dict[int, OutboxItem] | None = None) -> bool:
        """Sign and publish ``batch``; False if the connection broke.

        ``shared`` maps a live row to its held-back state row: when that row's envelope
        carries it alone, the same signed bytes are published as the retained state too
        (one signature for both), unless a newer state of the category is held by now.
        """
        if self._suspects:
            batch = await self._send_suspects(conn, window, batch)
            if not batch:
                return not conn.closed.is_set()
        for topic, payload, ids in self._encode(batch):
            rows = [(topic, batch[0], ids)]
            state = shared.get(ids[0]) if shared and len(ids) == 1 else None
            if state is not None and self._share(state):
                self._keep_state(state.topic, state.payload)
                rows.append((state.topic, state, [state.id]))
            for row_topic, first, row_ids in rows:
                await window.acquire(len(payload))
                try:
                    self._publish(conn, row_topic, first, payload, row_ids, window)
                except TransportError as exc:  # includes NotConnectedError
                    window.release(len(payload))
                    log.info("publish stopped: %s", exc)
                    return False
        return True

    async def _send_suspects(self, conn: Connection, window: Window,
                             batch: list[OutboxItem]) -> list[OutboxItem]:
        """Dead-letter the rows of ``batch`` the broker refused by closing the connection,
        send those suspected of it alone (each PUBACK awaited); return the rest."""
        rest: list[OutboxItem] = []
        for row in batch:
            if self._suspects.refused(row.id):
                self._dead_letter(row.topic, "connection closed", [row.id])
            elif not self._suspects.alone(row.id):
                rest.append(row)
            else:
                for topic, payload, ids in self._encode([row]):
                    await window.acquire(len(payload))
                    try:
                        sent = self._publish(conn, topic, row, payload, ids, window)
                    except TransportError:
                        window.release(len(payload))
                        return []
                    await _settled_or_closed(sent, conn)
                    if conn.closed.is_set():
                        return []
        return rest

    def _encode(self, batch: list[OutboxItem]) -> list[tuple[str, bytes, list[int]]]:
        """Sign ``batch`` as one envelope, or as several when it is over the size limit:
        (topic, envelope, row ids) each. A batch of several topics (see :func:`batches`) goes
        on the topic of several categories."""
        assert self._codec is not None
        topic = batch[0].topic
        try:
            # Rows hold each item's JSON as the outbox stored it: join, don't re-serialise.
            # The live stream is the log; a retained state repeats one of its items.
            history = self._history if batch[0].kind != "state" else None
            ref = history.next_ref() if history is not None else None
            if batch[0].kind == "state":
                payload = self._codec.encode_json(kind="state", body_json=batch[-1].payload)
                self._keep_state(batch[-1].topic, batch[-1].payload)
            elif batch[-1].topic != topic:
                topic = self._mixed_topic
                payload = self._codec.encode_json(
                    kind="insights", body_json=mixed_body(self._runs(batch)), log_ref=ref)
            else:
                payload = self._codec.encode_json(
                    kind="insights",
                    body_json=b'{"items":[' + b",".join(r.payload for r in batch) + b"]}",
                    log_ref=ref)
            if history is not None:
                history.append(topic, payload)
        except OversizedMessage:
            if len(batch) == 1:
                # One insight larger than the envelope limit can never be sent.
                self._counters.dropped["oversized_outgoing"] += 1
                self.ack_rows([batch[0].id])
                return []
            half = len(batch) // 2
            return self._encode(batch[:half]) + self._encode(batch[half:])
        return [(topic, payload, [r.id for r in batch])]

    def _runs(self, batch: list[OutboxItem]) -> list[tuple[str, list[bytes]]]:
        """A mixed batch's rows as runs of one category each (their topics' last levels)."""
        skip = len(self.category_prefix)
        runs: list[tuple[str, list[bytes]]] = []
        last = ""
        for row in batch:
            if row.topic != last:
                last = row.topic
                runs.append((last[skip:], []))
            runs[-1][1].append(row.payload)
        return runs

    def _publish(self, conn: Connection, topic: str, first: OutboxItem, payload: bytes,
                 ids: list[int], window: Window) -> asyncio.Future[None]:
        fut = conn.publish(topic, payload, qos=self._qos, retain=first.retain,
                           expiry=self._expiry if first.retain else None)
        self._inflight_ids.update(ids)
        self._counters.messages_out += 1
        sent_at = time.perf_counter()

        nbytes = len(payload)
        live = first.kind != "state"  # one row per insight (or sealed part)

        def done(f: asyncio.Future[None]) -> None:
            window.release(nbytes)
            self._inflight_ids.difference_update(ids)
            exc = None if f.cancelled() else f.exception()
            if isinstance(exc, PublishRefused):
                self._dead_letter(topic, exc.reason, ids)
                return
            if f.cancelled() or exc is not None:
                # The connection went with it unacknowledged: the rows stay in the outbox
                # and are sent again after reconnecting, alone if this keeps happening.
                self._suspects.closed(ids)
                return
            rtt = (time.perf_counter() - sent_at) * 1000
            self.latency = rtt if self.latency is None else 0.9 * self.latency + 0.1 * rtt
            if live:
                self._counters.insights_acked += len(ids)
            self._suspects.acked(ids)
            self.ack_rows(ids)

        fut.add_done_callback(done)
        return fut

    def _dead_letter(self, topic: str, reason: str, ids: list[int]) -> None:
        """The broker's rules refuse these rows: sending them again cannot help. Dropped from
        the outbox, counted by the reason and said once per topic, never retried forever."""
        why = "_".join(reason.lower().split())
        self._counters.dropped[f"refused_{why}"] += len(ids)
        if topic not in self._refused_topics:
            self._refused_topics.add(topic)
            log.warning("broker refused a publish on %s (%s): %d item(s) dropped from the "
                        "outbox; check this node's identity and the broker's ACL", topic,
                        reason, len(ids))
        self.ack_rows(ids)

    def ack_rows(self, ids: list[int]) -> None:
        """Delete these rows from the outbox soon (they are acknowledged or given up)."""
        # The PUBACKs one read of the socket brings are deleted in one outbox transaction:
        # their callbacks all run before the flush scheduled by the first of them.
        self._acks.extend(ids)
        if not self._ack_scheduled:
            self._ack_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush_acks)

    def flush_acks(self) -> None:
        self._ack_scheduled = False
        ids, self._acks = self._acks, []
        if self._outbox is None or not ids:
            return
        try:
            self._outbox.ack(ids)
        except OutboxError as exc:
            # The rows stay and are sent again: receivers de-duplicate by item id.
            log.error("outbox could not record acknowledgements: %s", exc)
            self._counters.dropped["outbox_ack_failed"] += 1
            return
        self._settled()


async def _settled_or_closed(sent: asyncio.Future[None], conn: Connection) -> None:
    """Until ``sent`` has its PUBACK (or failed), or ``conn`` closed."""
    async def settled() -> None:
        with contextlib.suppress(Exception):
            await asyncio.shield(sent)

    async def closed() -> None:
        await conn.closed.wait()

    waiting = [asyncio.ensure_future(settled()), asyncio.ensure_future(closed())]
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waiting:
            task.cancel()


def batches(rows: list[OutboxItem], limit: int, *, prefix: str = "",
            alone: Container[int] = ()) -> Iterator[list[OutboxItem]]:
    """Group a page of rows by (topic, kind), in order, at most ``limit`` per batch.

    Order is kept per topic, which is all MQTT promises anyway. A state row is its own batch:
    each retained state is one message. Live insights go first and states after them: a
    reader waits for the insight, while the retained state only has to be there eventually
    (signing it first would add its cost to every insight's latency).

    With a ``prefix`` (what a live topic holds before its category), groups of fewer than
    :data:`MIX_BELOW` rows of one kind are joined into batches of several topics, one
    group after another, when there are two or more of them; a row in ``alone`` (its
    envelope is to serve as its retained state too) is never joined.
    """
    groups: dict[tuple[str, str], list[OutboxItem]] = {}
    states: list[OutboxItem] = []
    for row in rows:
        if row.kind == "state":
            states.append(row)
            continue
        key = (row.topic, row.kind)
        batch = groups.setdefault(key, [])
        batch.append(row)
        if len(batch) >= limit:
            yield batch
            groups[key] = []
    small: dict[str, list[list[OutboxItem]]] = {}
    for (topic, kind), batch in groups.items():
        if not batch:
            continue
        if (prefix and len(batch) < MIX_BELOW and topic.startswith(prefix)
                and not (len(batch) == 1 and batch[0].id in alone)):
            small.setdefault(kind, []).append(batch)
        else:
            yield batch
    for few in small.values():
        if len(few) == 1:
            yield few[0]
            continue
        mixed: list[OutboxItem] = []
        for batch in few:
            if mixed and len(mixed) + len(batch) > limit:
                yield mixed
                mixed = []
            mixed.extend(batch)
        yield mixed
    for row in states:
        yield [row]
