"""``Connection.dispatch_to`` against a real mosquitto: messages handed over in the socket
callback, nothing lost or reordered across the switch from the queue, and a failing handler
that costs one message, not the connection."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pear_mqtt.topics import TopicScheme
from pear_mqtt.transport import Connection, InboundMessage
from pear_mqtt.types import NetworkConfig


async def test_dispatch_takes_over_from_the_queue_and_survives_a_failing_handler(
        make_config: Callable[..., NetworkConfig]) -> None:
    config = make_config("acme")
    topic = TopicScheme(mode="consortium", network=config.network_id,
                        member="acme").insights("dispatch/test")
    conn = Connection(broker=config.broker, client_id="dispatch-test", tls=config.tls)
    await conn.connect()
    try:
        await conn.subscribe([(topic, 1)])
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
    finally:
        await conn.close()
