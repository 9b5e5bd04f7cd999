"""One asyncio MQTT connection over paho-mqtt, driven by the event loop (no paho thread).

A dropped :class:`Connection` fails its pending futures and is spent: reconnecting is the
caller's policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from ..config.models import BrokerURL, TLSConfig
from ..errors import ConnectError, NotConnectedError, PublishRefused, TransportError
from .inbox import InboundMessage, Inbox
from .paho_io import install
from .pump import SocketPump

__all__ = ["Connection", "InboundMessage", "Will", "build_tls_context", "stop_task"]

log = logging.getLogger(__name__)

# Messages handed out by messages() before it lets other tasks run (writes, keep-alive, ...).
_YIELD_EVERY = 256


@dataclass(frozen=True, slots=True)
class Will:
    """The last will the broker publishes when the connection dies uncleanly."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def build_tls_context(tls: TLSConfig) -> ssl.SSLContext:
    """A client TLS context: verify the broker against ``ca_file``, present our certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=str(tls.ca_file) if tls.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = tls.check_hostname
    if tls.cert_file is not None and tls.key_file is not None:
        try:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"cannot load client certificate {tls.cert_file} / key "
                               f"{tls.key_file}: {exc}") from exc
    return ctx


class Connection:
    """One MQTT connection driven by the running asyncio loop.

    Create, ``await connect()``, use, ``await close()``. After the connection drops,
    :attr:`closed` is set and the object is spent; make a new one to reconnect.

    ``max_inflight`` 0 leaves the window to the caller: paho rescans every queued message on
    each PUBACK, which made its own window 2-3x slower than bounding in-flight work above it
    (PearNetwork keeps at most 256 envelopes in flight).
    """

    def __init__(self, *, broker: BrokerURL, client_id: str, tls: TLSConfig | None = None,
                 keepalive: int = 30, clean_start: bool = False, session_expiry: int = 3600,
                 will: Will | None = None, max_inflight: int = 0,
                 protocol: int | None = None, manual_ack: bool = False) -> None:
        self.broker = broker
        self.client_id = client_id
        self._tls = tls
        self._keepalive = keepalive
        self._clean_start = clean_start
        self._session_expiry = session_expiry
        self._will = will
        self._max_inflight = max_inflight
        # With manual_ack a QoS 1 message is acknowledged only when the consumer calls ack():
        # one that crashes before storing it gets it again from its persistent session.
        self._manual_ack = manual_ack
        # None: MQTT 5 first, 3.1.1 when the broker refuses it.
        self._protocol_pref = protocol
        self.protocol: int = 5
        self.session_present = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._connack: asyncio.Future[None] | None = None
        self._pubs: dict[int, asyncio.Future[None]] = {}
        self._subs: dict[int, asyncio.Future[list[int]]] = {}
        self._unsubs: dict[int, asyncio.Future[None]] = {}
        self._handler: Callable[[InboundMessage], None] | None = None
        self._misc_task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self._pump = SocketPump(closed=self.closed)
        self._inbox = Inbox(pause=self._pump.pause_reading, resume=self._pump.resume_reading)
        self._pause_timer: asyncio.TimerHandle | None = None  # ends a pause_reading()
        self.close_reason: str = ""

    # -- lifecycle -------------------------------------------------------------------------
    async def connect(self, *, timeout: float = 10.0) -> None:
        """Connect and wait for a successful CONNACK; :class:`ConnectError` otherwise."""
        self._loop = asyncio.get_running_loop()
        if self._protocol_pref:
            attempts = [(self._protocol_pref, timeout)]
        else:
            # Some 3.1.1-only brokers (amqtt) neither refuse nor answer an MQTT 5 CONNECT:
            # they wait for bytes that never come. Give MQTT 5 part of the time, then fall back.
            attempts = [(5, min(3.0, timeout / 2)), (4, timeout)]
        last: Exception | None = None
        for version, limit in attempts:
            try:
                await asyncio.wait_for(self._connect_once(version), limit)
                self.protocol = version
                self._misc_task = self._loop.create_task(self._misc_loop())
                return
            except _ProtocolRefused as exc:
                last = exc
                self._teardown("protocol refused")
                self.closed.clear()
            except TimeoutError:
                self._teardown("connect timed out")
                if version == 5 and len(attempts) > 1:
                    last = ConnectError(f"no CONNACK to MQTT 5 within {limit} s")
                    self.closed.clear()
                    continue
                raise ConnectError(f"no CONNACK from {self.broker} within {limit} s") from None
            except ConnectError:
                self._teardown("connect failed")
                raise
        raise ConnectError(f"{self.broker} refused MQTT 5 and 3.1.1: {last}")

    async def _connect_once(self, version: int) -> None:
        assert self._loop is not None
        loop = self._loop
        proto = MQTTProtocolVersion.MQTTv5 if version == 5 else MQTTProtocolVersion.MQTTv311
        # MQTT 3.1.1 has no session expiry: a session that is to end with the connection is a
        # clean session there, or the broker keeps (and fills) it for ever.
        clean = self._clean_start or self._session_expiry == 0
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=self.client_id, protocol=proto,
                             clean_session=None if version == 5 else clean,
                             reconnect_on_failure=False)
        self._client = client
        install(client)
        self._pump.attach(client, loop)
        client.max_inflight_messages_set(self._max_inflight)
        client.max_queued_messages_set(0)
        client.manual_ack_set(self._manual_ack)
        if self.broker.tls:
            if self._tls is None:
                raise ConnectError(f"{self.broker} needs TLS material (tls.ca_file, ...)")
            client.tls_set_context(build_tls_context(self._tls))
        if self._will is not None:
            client.will_set(self._will.topic, self._will.payload, qos=self._will.qos,
                            retain=self._will.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_message = self._on_message
        self._connack = loop.create_future()
        props: Properties | None = None
        if version == 5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self._session_expiry
        try:
            await loop.run_in_executor(None, lambda: client.connect(
                self.broker.host, self.broker.port, keepalive=self._keepalive,
                clean_start=self._clean_start if version == 5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props))
        except ssl.SSLError as exc:
            raise ConnectError(f"TLS handshake with {self.broker} failed: {exc}") from exc
        except OSError as exc:
            raise ConnectError(f"cannot reach {self.broker}: {exc}") from exc
        except ValueError as exc:
            raise ConnectError(f"invalid connection settings for {self.broker}: {exc}") from exc
        await self._connack

    async def close(self) -> None:
        """Send DISCONNECT (the will is not published) and release the socket."""
        client = self._client
        if client is not None and not self.closed.is_set():
            client.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closed.wait(), 2.0)
        self._teardown("closed by us")

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, as a crash would (the will fires)."""
        if self._pump.sock is not None:
            with contextlib.suppress(OSError):
                self._pump.sock.shutdown(socket.SHUT_RDWR)
        self._teardown("aborted")

    def _teardown(self, reason: str) -> None:
        if self._misc_task is not None:
            self._misc_task.cancel()
            self._misc_task = None
        client = self._client
        self._pump.detach()
        if client is not None:
            with contextlib.suppress(Exception):
                client._sock_close()
        self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        if not self.closed.is_set():
            self.close_reason = reason
            self.closed.set()
        err = NotConnectedError(f"connection to {self.broker} lost: {reason}")
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(ConnectError(f"{self.broker}: {reason}"))
            # connect() reports its own error; nobody else awaits this future.
            self._connack.exception()
        for table in (self._pubs, self._subs, self._unsubs):
            for fut in table.values():
                if not fut.done():
                    fut.set_exception(err)
            table.clear()
        self._inbox.event.set()

    @property
    def connected(self) -> bool:
        return self._client is not None and not self.closed.is_set() and \
            self._connack is not None and self._connack.done() and \
            self._connack.exception() is None

    # -- operations ------------------------------------------------------------------------
    def ack(self, msg: InboundMessage) -> None:
        """Acknowledge ``msg`` (a QoS 1 message of a ``manual_ack`` connection) now that it is
        safely processed. A no-op otherwise, and after this connection closed: the broker
        then delivers the message again on the next connection of the session."""
        self.ack_many((msg,))

    def ack_many(self, msgs: Iterable[InboundMessage]) -> None:
        """:meth:`ack` each of ``msgs``, all in one write to the socket (one send instead of
        one per message)."""
        client = self._client
        if not self._manual_ack or client is None or self.closed.is_set():
            return
        with self._pump.hold():
            for msg in msgs:
                if msg.qos:
                    client.ack(msg.mid, msg.qos)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                expiry: int | None = None, response_topic: str | None = None,
                correlation: bytes | None = None) -> asyncio.Future[None]:
        """Queue a publish; the future resolves on PUBACK (at once for QoS 0).

        Many publishes may be in flight at once; do not await each before the next.
        ``response_topic`` and ``correlation`` are MQTT 5's request/response properties
        (left out over 3.1.1, where the payload must carry them).
        """
        client = self._require()
        assert self._loop is not None
        props: Properties | None = None
        if self.protocol == 5 and (expiry is not None or response_topic or correlation):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if expiry is not None:
                props.MessageExpiryInterval = expiry
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation:
                props.CorrelationData = correlation
        fut: asyncio.Future[None] = self._loop.create_future()
        info = client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_QUEUE_SIZE):
            raise TransportError(f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}")
        if qos == 0 or info.is_published():
            fut.set_result(None)
        else:
            self._pubs[info.mid] = fut
        return fut

    def when_sent(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, on the event loop, when what was published so far is
        written to the socket (at once if it is): a producer of many large messages paces
        itself by it instead of queueing them all in memory. Never called if the connection
        closes first."""
        self._pump.when_sent(callback)

    async def subscribe(self, filters: Sequence[tuple[str, int]], *,
                        no_local: bool = False) -> list[int]:
        """Subscribe and return the granted QoS per filter (128 and above: refused).

        One SUBSCRIBE per filter, all sent before the first SUBACK is awaited: every broker
        takes that, while some (aedes with persistent sessions) never acknowledge a SUBSCRIBE
        that carries several. ``no_local`` (MQTT 5 only) asks the broker not to echo our own
        publishes back.
        """
        client = self._require()
        assert self._loop is not None
        futures: list[asyncio.Future[list[int]]] = []
        for topic, qos in filters:
            option: Any = qos
            if self.protocol == 5:
                option = SubscribeOptions(qos=qos, noLocal=no_local)
            rc, mid = client.subscribe([(topic, option)])
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                raise TransportError(f"subscribe to {topic} failed: {mqtt.error_string(rc)}")
            fut: asyncio.Future[list[int]] = self._loop.create_future()
            self._subs[mid] = fut
            futures.append(fut)
        self._pump.resume_reading()
        granted = await asyncio.gather(*futures)
        return [g for answer in granted for g in answer]

    async def unsubscribe(self, filters: Sequence[str]) -> None:
        client = self._require()
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        rc, mid = client.unsubscribe(list(filters))
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise TransportError(f"unsubscribe failed: {mqtt.error_string(rc)}")
        self._unsubs[mid] = fut
        self._pump.resume_reading()
        await fut

    async def messages(self) -> AsyncIterator[InboundMessage]:
        """Received messages in arrival order, until the connection closes."""
        handed = 0
        while True:
            while self._inbox:
                yield self._inbox.pop()
                handed += 1
                if handed % _YIELD_EVERY == 0:
                    # A backlog must not starve the loop: acks, writes and keep-alives wait.
                    await asyncio.sleep(0)
            if self.closed.is_set():
                return
            self._inbox.event.clear()
            await self._inbox.event.wait()

    def dispatch_to(self, handler: Callable[[InboundMessage], None]) -> None:
        """Hand every message to ``handler`` as soon as it is read, instead of queueing it
        for :meth:`messages` (what is queued already goes first).

        Saves a task switch per message, which is most of a receiver's latency besides the
        cryptography. ``handler`` runs inside the socket callback, so reading waits while it
        works (back-pressure without a queue); it must not block, and an exception it raises
        is logged and the message dropped.
        """
        self._handler = handler
        for msg in self._inbox.take():
            self._dispatch(handler, msg)

    def _dispatch(self, handler: Callable[[InboundMessage], None], msg: InboundMessage) -> None:
        try:
            handler(msg)
        except Exception:  # a receiver must never die on one message
            log.exception("message handler failed on %r", msg.topic)

    def pause_reading(self, *, at_most: float) -> None:
        """Stop reading the socket until :meth:`resume_reading`, or ``at_most`` seconds, for
        a handler whose own consumer fell behind: the broker keeps what is not read (a
        subscribe meanwhile waits for its acknowledgement until then).
        Acknowledgements and ping replies wait too, hence the bound (keep it well under the
        keepalive)."""
        self._pump.hold_reading(True)
        if self._pause_timer is not None:
            self._pause_timer.cancel()
        self._pause_timer = asyncio.get_running_loop().call_later(at_most,
                                                                  self.resume_reading)

    def resume_reading(self) -> None:
        """Read the socket again after :meth:`pause_reading`."""
        if self._pause_timer is not None:
            self._pause_timer.cancel()
            self._pause_timer = None
        self._pump.hold_reading(False)

    def drain_inbox(self, *, limit: int | None = None) -> list[InboundMessage]:
        """Take the messages received so far (the oldest ``limit`` of them, if given)
        without waiting."""
        return self._inbox.take(limit)

    @property
    def queued(self) -> int:
        """Messages received and not yet taken (by :meth:`messages` or :meth:`drain_inbox`)."""
        return len(self._inbox)

    def _require(self) -> mqtt.Client:
        if self._client is None or self.closed.is_set():
            raise NotConnectedError(f"not connected to {self.broker}")
        return self._client

    # -- paho callbacks (run on the loop thread, except socket open/write during connect) ---
    async def _misc_loop(self) -> None:
        while not self.closed.is_set():
            await asyncio.sleep(1.0)
            if self._client is not None:
                self._client.loop_misc()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        fut = self._connack
        if fut is None or fut.done():
            return
        if reason.is_failure:
            code = reason.value
            # 1 (3.1.1) and 132 (5) mean "unsupported protocol version".
            if code in (1, 132):
                fut.set_exception(_ProtocolRefused(str(reason)))
            else:
                fut.set_exception(ConnectError(f"{self.broker} refused the connection: {reason}"))
            return
        self.session_present = bool(getattr(flags, "session_present", False))
        fut.set_result(None)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason: ReasonCode, properties: Properties | None) -> None:
        if self._connack is not None and not self._connack.done() and self.protocol_is_5(client):
            # A 3.1.1-only broker may just close the socket on an MQTT 5 CONNECT.
            self._connack.set_exception(_ProtocolRefused(f"closed before CONNACK: {reason}"))
        # paho holds its callback lock here and has closed the socket already; tearing down
        # from inside would take that lock again (deadlock), so do it on the next loop turn.
        self._fail_all(f"disconnected ({reason})")
        loop = self._loop
        if loop is not None:
            if self._pump.on_loop_thread():
                loop.call_soon(self._teardown, f"disconnected ({reason})")
            else:
                loop.call_soon_threadsafe(self._teardown, f"disconnected ({reason})")

    @staticmethod
    def protocol_is_5(client: mqtt.Client) -> bool:
        return client.protocol == MQTTProtocolVersion.MQTTv5

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        fut = self._pubs.pop(mid, None)
        if fut is None or fut.done():
            return
        if reason.is_failure:
            fut.set_exception(PublishRefused(f"broker refused publish (mid {mid}): {reason}",
                                             reason=str(reason)))
        else:
            fut.set_result(None)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reasons: list[ReasonCode], properties: Properties | None) -> None:
        fut = self._subs.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result([r.value for r in reasons])

    def _on_unsubscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                        reasons: list[ReasonCode], properties: Properties | None) -> None:
        fut = self._unsubs.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        if self._handler is not None:
            self._dispatch(self._handler, InboundMessage(
                topic=msg.topic, payload=payload, qos=msg.qos, retain=bool(msg.retain),
                mid=msg.mid))
            return
        # Never pause while a SUBACK/UNSUBACK is awaited: it sits behind the backlog, and the
        # caller may only start consuming once the subscribe returns.
        self._inbox.put(InboundMessage(topic=msg.topic, payload=payload, qos=msg.qos,
                                       retain=bool(msg.retain), mid=msg.mid),
                        may_pause=not self._subs and not self._unsubs)


async def stop_task(task: asyncio.Task[Any], *, every: float = 1.0) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling again every ``every`` s.

    Once is not always enough on Python 3.11: ``asyncio.wait_for`` loses a cancellation that
    arrives as its inner future completes (a refused connection, say), and the task then
    carries on (a reconnect loop forever). What the task raised is logged, not raised here.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait((task,), timeout=every)
    if not task.cancelled() and task.exception() is not None:
        log.debug("%r ended with %r", task, task.exception())


class _ProtocolRefused(ConnectError):
    """The broker does not speak the MQTT version we offered."""
