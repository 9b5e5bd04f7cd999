"""node/delivery.py against an in-memory connection, codec and outbox: rows leave the outbox
on PUBACK, refused rows are dead-lettered, oversized batches are split, and a page of rows is
grouped into batches per topic with states last, small ones of several topics together."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from pear_mqtt.config.models import NetworkConfig
from pear_mqtt.errors import NotConnectedError, OversizedMessage, PublishRefused
from pear_mqtt.model.insight import NetworkMode
from pear_mqtt.model.mixed import item_categories
from pear_mqtt.node.counters import Counters
from pear_mqtt.node.delivery import Delivery, batches
from pear_mqtt.node.outbox import OutboxItem
from pear_mqtt.node.suspects import ALONE_AFTER, REFUSED_AFTER
from pear_mqtt.node.window import Window


class _Codec:
    """Wraps the body unsigned; a body over ``limit`` bytes is oversized."""

    def __init__(self, limit: int = 1 << 20) -> None:
        self.limit = limit
        self.bodies: list[bytes] = []

    def encode_json(self, *, kind: str, body_json: bytes, log_ref: str | None = None) -> bytes:
        if len(body_json) > self.limit:
            raise OversizedMessage(f"{len(body_json)} bytes")
        self.bodies.append(body_json)
        return kind.encode() + b":" + body_json


class _Conn:
    """Answers every publish with ``refuse`` (a negative PUBACK), a lost connection before
    its PUBACK when the payload holds ``lost``, or a PUBACK."""

    def __init__(self, refuse: str | None = None, *, lost: bytes | None = None) -> None:
        self.closed = asyncio.Event()
        self.refuse, self.lost = refuse, lost
        self.published: list[tuple[str, bytes, bool]] = []

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool,
                expiry: int | None) -> asyncio.Future[None]:
        self.published.append((topic, payload, retain))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.lost is not None and self.lost in payload:
            fut.set_exception(NotConnectedError("connection lost"))
        elif self.refuse is None:
            fut.set_result(None)
        else:
            fut.set_exception(PublishRefused("refused", reason=self.refuse))
        return fut


class _Outbox:
    def __init__(self) -> None:
        self.acked: list[list[int]] = []
        self.changed = asyncio.Event()

    def ack(self, ids: list[int]) -> None:
        self.acked.append(list(ids))
        self.changed.set()

    async def holding(self, n: int) -> None:
        """Until ``n`` rows were acknowledged (deleted) in all."""
        while sum(map(len, self.acked)) < n:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 5)


def _row(i: int, topic: str = "t/a", kind: str = "insight", payload: bytes = b'{"n":1}',
         ) -> OutboxItem:
    return OutboxItem(id=i, topic=topic, payload=payload, kind=kind,  # type: ignore[arg-type]
                      key=None, retain=kind == "state", created=0.0, size=len(payload))


def _delivery(codec: _Codec, outbox: _Outbox, counters: Counters,
              settled: list[int]) -> Delivery:
    config = NetworkConfig(mode=NetworkMode.CONSORTIUM, company_id="Co-ACME",
                           network_id="net-1", node_id="St-ONE",
                           broker_url="mqtt://localhost:1883", allow_insecure_transport=True)
    delivery = Delivery(config=config, counters=counters, keep_state=lambda _t, _j: None,
                        share=lambda _s: False, settled=lambda: settled.append(1))
    delivery.attach(codec=codec, outbox=outbox,  # type: ignore[arg-type]
                    history=None, mixed_topic="m/$mixed")
    return delivery


async def _answered(window: Window) -> None:
    """Until the last publish got its answer (its callback released the window of one)."""
    await asyncio.wait_for(window.acquire(0), 5)
    window.release(0)


async def test_acknowledged_rows_leave_the_outbox_in_one_transaction() -> None:
    codec, outbox, counters = _Codec(), _Outbox(), Counters()
    settled: list[int] = []
    delivery = _delivery(codec, outbox, counters, settled)
    conn, window = _Conn(), Window(count=8, nbytes=1 << 20)
    assert await delivery.send_batch(conn, window, [_row(1), _row(2)])  # type: ignore[arg-type]
    assert await delivery.send_batch(conn, window, [_row(3)])  # type: ignore[arg-type]
    assert delivery.in_flight
    await outbox.holding(3)
    assert outbox.acked == [[1, 2, 3]]
    assert not delivery.in_flight and settled
    assert counters.messages_out == 2 and counters.insights_acked == 3
    assert delivery.latency is not None
    assert codec.bodies[0] == b'{"items":[{"n":1},{"n":1}]}'


async def test_a_refused_publish_is_dead_lettered_and_said_once_per_topic(
        caplog: pytest.LogCaptureFixture) -> None:
    outbox, counters = _Outbox(), Counters()
    delivery = _delivery(_Codec(), outbox, counters, [])
    conn, window = _Conn(refuse="Not authorized"), Window(count=8, nbytes=1 << 20)
    with caplog.at_level(logging.WARNING, logger="pear_mqtt.node.delivery"):
        for i in (1, 2):
            assert await delivery.send_batch(conn, window, [_row(i)])  # type: ignore[arg-type]
        await outbox.holding(2)
    assert counters.dropped["refused_not_authorized"] == 2
    assert outbox.acked == [[1, 2]]
    assert counters.insights_acked == 0
    assert len([r for r in caplog.records if "broker refused" in r.message]) == 1


async def test_an_oversized_batch_is_split_and_an_oversized_row_dropped() -> None:
    codec, outbox, counters = _Codec(limit=40), _Outbox(), Counters()
    delivery = _delivery(codec, outbox, counters, [])
    conn, window = _Conn(), Window(count=8, nbytes=1 << 20)
    big = _row(3, payload=b'{"n":"' + b"x" * 64 + b'"}')
    rows = [_row(1), _row(2), big, _row(4)]
    assert await delivery.send_batch(conn, window, rows)  # type: ignore[arg-type]
    await outbox.holding(4)
    assert len(conn.published) == 2  # [1, 2] and [4]: the halves that fit
    assert counters.dropped["oversized_outgoing"] == 1
    assert sorted(i for ids in outbox.acked for i in ids) == [1, 2, 3, 4]


async def test_a_row_in_flight_at_every_close_goes_alone_then_is_dead_lettered() -> None:
    # What a 3.1.1 broker does to a forbidden publish: it closes the connection.
    outbox, counters = _Outbox(), Counters()
    delivery = _delivery(_Codec(), outbox, counters, [])
    conn, window = _Conn(lost=b"bad"), Window(count=1, nbytes=1 << 20)
    bad = _row(1, payload=b'{"n":"bad"}')
    envelopes = []
    for i in range(ALONE_AFTER + REFUSED_AFTER + 1):
        before = len(conn.published)
        batch = [bad, _row(10 + i)]
        assert await delivery.send_batch(conn, window, batch)  # type: ignore[arg-type]
        await _answered(window)
        envelopes.append([p.count(b'{"n"') for _t, p, _r in conn.published[before:]])
    # In its batch until it was in flight at ALONE_AFTER closes, then alone (the other row
    # in an envelope of its own) until REFUSED_AFTER closes, then dead-lettered.
    assert envelopes == [[2]] * ALONE_AFTER + [[1, 1]] * REFUSED_AFTER + [[1]]
    assert counters.dropped["refused_connection_closed"] == 1
    await outbox.holding(REFUSED_AFTER + 2)
    acked = [i for ids in outbox.acked for i in ids]
    assert 1 in acked and sorted(acked)[1:] == [10 + ALONE_AFTER + j
                                                 for j in range(REFUSED_AFTER + 1)]


def test_rows_are_batched_per_topic_in_order_with_states_last() -> None:
    rows = [_row(1, "t/a"), _row(2, "t/s", kind="state"), _row(3, "t/b"), _row(4, "t/a"),
            _row(5, "t/a"), _row(6, "t/s", kind="state")]
    got = [[r.id for r in batch] for batch in batches(rows, limit=2)]
    assert got == [[1, 4], [5], [3], [2], [6]]



def test_small_batches_of_several_topics_go_together_and_large_ones_alone() -> None:
    rows = ([_row(1, "m/a"), _row(2, "m/b"), _row(3, "m/a")]
            + [_row(10 + i, "m/big") for i in range(5)]
            + [_row(20, "m/c"), _row(21, "m/s", kind="state"), _row(22, "x/other")])
    got = [[r.id for r in batch] for batch in batches(rows, limit=256, prefix="m/")]
    # The groups of m/a, m/b and m/c go in one batch, each group whole and in order; m/big
    # is large enough for its own envelope; x/other is not under the prefix; states last.
    assert got == [[10, 11, 12, 13, 14], [22], [1, 3, 2, 20], [21]]
    # A mixed batch keeps to the limit without splitting a group.
    got = [[r.id for r in batch] for batch in batches([*rows[:3], rows[8]], limit=3,
                                                     prefix="m/")]
    assert got == [[1, 3, 2], [20]]
    # One small group alone, or a row whose envelope is to be its retained state too, stays
    # on its own topic.
    assert [[r.id for r in b] for b in batches(rows[:1], limit=256, prefix="m/")] == [[1]]
    assert [[r.id for r in b] for b in batches(rows[:2], limit=256, prefix="m/",
                                               alone={2})] == [[2], [1]]


async def test_a_mixed_batch_goes_on_the_mixed_topic_naming_each_items_category() -> None:
    codec, outbox, counters = _Codec(), _Outbox(), Counters()
    delivery = _delivery(codec, outbox, counters, [])
    conn, window = _Conn(), Window(count=8, nbytes=1 << 20)
    batch = [_row(1, "m/a", payload=b'{"i":1}'), _row(2, "m/a", payload=b'{"i":2}'),
             _row(3, "m/b/c", payload=b'{"i":3}')]
    assert await delivery.send_batch(conn, window, batch)  # type: ignore[arg-type]
    await outbox.holding(3)
    assert [t for t, _p, _r in conn.published] == ["m/$mixed"]
    assert json.loads(codec.bodies[0]) == {"items": [{"i": 1}, {"i": 2}, {"i": 3}],
                                           "categories": [["a", 2], ["b/c", 1]]}
    assert item_categories(json.loads(codec.bodies[0]), 3) == ["a", "a", "b/c"]


@pytest.mark.parametrize("categories", [
    None, "a", [["a", 1]], [["a", 2], ["b", 2]], [["a", 0], ["b", 3]], [["a", "3"]],
    [["a", True], ["b", 2]], [["$bad", 3]], [["a", 1, 2], ["b", 2]], [["a", -1], ["b", 4]]])
def test_a_body_that_does_not_name_each_items_category_is_refused(categories: object) -> None:
    assert item_categories({"items": [1, 2, 3], "categories": categories}, 3) is None
