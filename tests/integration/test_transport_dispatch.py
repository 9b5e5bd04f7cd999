"""``Connection`` I/O against a real mosquitto: messages handed over in the socket callback
(``dispatch_to``), nothing lost or reordered across the switch from the queue, a failing
handler that costs one message, not the connection; a publish written at once; a slow
handler that lets other tasks run between messages; large messages (MQTT 5 properties, QoS 0
and 1) whole, ``when_sent`` telling a producer its messages are written, and a batch of
manual acks (``ack_many``) taken by the broker while the unacknowledged come again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable

from brokers import MosquittoBroker, NetworkPKI, probe

from pear_mqtt.config.models import NetworkConfig
from pear_mqtt.model.topics import TopicScheme
from pear_mqtt.transport import Connection, InboundMessage


@contextlib.asynccontextmanager
async def acme_connection(make_config: Callable[..., NetworkConfig], name: str, *,
                          subscribe: bool = True) -> AsyncIterator[tuple[Connection, str]]:
    """A connected ``Connection`` of acme's and a topic of its own (subscribed to)."""
    config = make_config("acme")
    topic = TopicScheme(mode="consortium", network=config.network_id,
                        member="acme").insights(f"transport/{name}")
    conn = Connection(broker=config.broker, client_id=f"transport-{name}", tls=config.tls)
    await conn.connect()
    try:
        if subscribe:
            await conn.subscribe([(topic, 1)])
        yield conn, topic
    finally:
        await conn.close()


async def test_dispatch_takes_over_from_the_queue_and_survives_a_failing_handler(
        make_config: Callable[..., NetworkConfig]) -> None:
    async with acme_connection(make_config, "dispatch") as (conn, topic):
        for i in range(3):
            await conn.publish(topic, b"queued-%d" % i, qos=1)
        seen: list[bytes] = []
        done = asyncio.Event()

        def handler(msg: InboundMessage) -> None:
            seen.append(msg.payload)
            if len(seen) == 6:
                done.set()
            if msg.payload == b"live-0":
                raise RuntimeError("a handler bug")

        # Some of the first three are queued by now, some still on their way: across the
        # switch every message reaches the handler once, in order.
        conn.dispatch_to(handler)
        for i in range(3):
            await conn.publish(topic, b"live-%d" % i, qos=1)
        await asyncio.wait_for(done.wait(), 10)
        assert seen == [b"queued-0", b"queued-1", b"queued-2", b"live-0", b"live-1", b"live-2"]
        assert conn.connected


async def test_a_publish_leaves_without_waiting_for_the_event_loop(
        make_config: Callable[..., NetworkConfig], pki: NetworkPKI,
        mosquitto: MosquittoBroker) -> None:
    async with acme_connection(make_config, "direct", subscribe=False) as (conn, topic):
        with probe(mosquitto, pki.node("globex", "observer"), subscribe=[topic]) as p:
            ack = conn.publish(topic, b"now", qos=1)
            # The event loop is blocked from here on: only a publish written inside the
            # call reaches the broker (deferred to the next loop iteration, it never would).
            got = p.messages.get(True, 10)
            assert got.payload == b"now"
            await asyncio.wait_for(ack, 10)


async def test_a_slow_handler_lets_other_tasks_run_between_messages(
        make_config: Callable[..., NetworkConfig], pki: NetworkPKI,
        mosquitto: MosquittoBroker) -> None:
    async with acme_connection(make_config, "slow") as (conn, topic):
        handled: list[bytes] = []
        first, last = asyncio.Event(), asyncio.Event()

        def handler(msg: InboundMessage) -> None:
            # A handler doing ~2 ms of CPU work per message (verifying, validating, ...).
            until = time.perf_counter() + 0.002
            while time.perf_counter() < until:
                pass
            handled.append(msg.payload)
            first.set()
            if len(handled) == 40:
                last.set()

        async def waiter() -> int:
            await first.wait()
            return len(handled)

        woke = asyncio.create_task(waiter())
        conn.dispatch_to(handler)
        with probe(mosquitto, pki.node("acme", "observer")) as p:
            # Each publish waits for its PUBACK with the event loop blocked: all 40 are in
            # the socket before the handler sees the first.
            for i in range(40):
                p.publish(topic, b"m%02d" % i, qos=1)
            await asyncio.wait_for(last.wait(), 20)
        # The task waiting for the first message runs long before the backlog is drained,
        # not after all 40.
        assert await woke < 10
        assert handled == [b"m%02d" % i for i in range(40)]


async def test_large_messages_arrive_whole_and_when_sent_paces_their_producer(
        make_config: Callable[..., NetworkConfig]) -> None:
    async with acme_connection(make_config, "large") as (conn, topic):
        got: list[InboundMessage] = []
        all_in = asyncio.Event()
        sizes = [900 * 1024, 1, 700 * 1024, 0]  # within the broker's packet limit

        def handler(msg: InboundMessage) -> None:
            got.append(msg)
            if len(got) == len(sizes):
                all_in.set()

        conn.dispatch_to(handler)
        payloads = [os.urandom(n) for n in sizes]
        sent = 0
        written = asyncio.Event()

        def publish_next() -> None:
            # One message at a time, the next once the last is in the socket.
            nonlocal sent
            if sent == len(payloads):
                written.set()
                return
            qos = sent % 2  # QoS 0 and 1, with and without MQTT 5 properties
            conn.publish(topic, payloads[sent], qos=qos, response_topic=f"{topic}/re" if qos
                         else None, correlation=b"id-%d" % sent if qos else None)
            sent += 1
            conn.when_sent(publish_next)

        publish_next()
        await asyncio.wait_for(written.wait(), 20)
        await asyncio.wait_for(all_in.wait(), 20)
        assert [m.payload for m in got] == payloads
        assert all(type(m.payload) is bytes for m in got)
        assert [m.qos for m in got] == [0, 1, 0, 1]
        assert [m.topic for m in got] == [topic] * len(sizes)
        assert not any(m.retain for m in got)
        assert conn.connected
        # Nothing queued: at once (on the event loop).
        idle = asyncio.Event()
        conn.when_sent(idle.set)
        await asyncio.wait_for(idle.wait(), 5)


async def test_acks_of_a_batch_reach_the_broker_and_the_unacked_come_again(
        make_config: Callable[..., NetworkConfig], unique_id: str) -> None:
    config = make_config("acme")
    topic = TopicScheme(mode="consortium", network=config.network_id,
                        member="acme").insights(f"transport/acks-{unique_id}")
    client_id = f"transport-acks-{unique_id}"

    def consumer() -> Connection:
        # A persistent session whose QoS 1 messages are acknowledged by the consumer.
        return Connection(broker=config.broker, client_id=client_id, tls=config.tls,
                          session_expiry=60, manual_ack=True)

    async def receive(conn: Connection, n: int) -> list[InboundMessage]:
        got: list[InboundMessage] = []
        async for msg in conn.messages():
            got.append(msg)
            if len(got) == n:
                break
        return got

    conn = consumer()
    await conn.connect()
    await conn.subscribe([(topic, 1)])
    payloads = [b"m%02d" % i for i in range(12)]
    async with acme_connection(make_config, f"acks-pub-{unique_id}", subscribe=False) as (
            pub, _):
        for p in payloads:
            await pub.publish(topic, p, qos=1)
    got = await asyncio.wait_for(receive(conn, len(payloads)), 10)
    assert [m.payload for m in got] == payloads
    # Every other message acknowledged, each one's PUBACK in one write of several.
    conn.ack_many(got[0::2])
    acked = asyncio.Event()
    conn.when_sent(acked.set)
    await asyncio.wait_for(acked.wait(), 5)
    await conn.close()

    again = consumer()
    await again.connect()
    try:
        assert again.session_present
        redelivered = await asyncio.wait_for(receive(again, len(payloads) // 2), 10)
        assert [m.payload for m in redelivered] == payloads[1::2]
        again.ack_many(redelivered)
    finally:
        await again.close()
    # Acknowledged, all of them: a third connection of the session gets nothing back.
    last = consumer()
    await last.connect()
    try:
        marker = b"marker"
        async with acme_connection(make_config, f"acks-mark-{unique_id}",
                                   subscribe=False) as (pub, _):
            await pub.publish(topic, marker, qos=1)
        (first,) = await asyncio.wait_for(receive(last, 1), 10)
        assert first.payload == marker
    finally:
        await last.close()
