"""Raw paho-mqtt clients for the baselines: no paho thread, no pear_mqtt code in the path.

The publisher keeps a large window of QoS 1 messages in flight and drives the socket with
``Client.loop()`` on its own thread. Two ways of keeping the window are offered because paho's
own window (``max_inflight_messages_set``) rescans every in-flight message on each PUBACK:

- ``paho``: paho keeps the window; everything is handed to ``publish()`` up front;
- ``app``: paho's window is unlimited and the benchmark never lets more than ``window``
  messages be unacknowledged, publishing the next ones as PUBACKs arrive.

The subscriber uses ``Client.loop()`` too; ``drain`` additionally reads every packet already
received in one wake-up (paho reads one packet per ``loop()`` when nothing is in flight).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from .env import BenchEnv

__all__ = ["PubWindow", "RawClient", "SubRead"]

PubWindow = Literal["paho", "app"]
SubRead = Literal["loop", "drain"]


def tls_context(env: BenchEnv, member: str) -> ssl.SSLContext:
    """Client context: verify the broker with the network CA, present ``member``'s cert."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(env.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, key = env.cert(member)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


@dataclass
class RawClient:
    """A connected paho client (MQTT 5, mutual TLS, TCP_NODELAY) driven without a thread."""

    env: BenchEnv
    member: str
    client_id: str
    window: int = 0  # QoS 1 messages in flight at most when publishing (0: not a publisher)
    mode: PubWindow = "app"
    protocol: int = 5  # 5 (MQTT 5, as pear_mqtt speaks) or 4 (MQTT 3.1.1)
    client: mqtt.Client = field(init=False)
    acked: int = 0
    received: int = 0
    received_bytes: int = 0
    retained: int = 0
    first_rx: float = 0.0
    last_rx: float = 0.0
    expect: int = 0  # messages after which last_rx is taken
    # Called with (payload, arrival time) for every message (the latency subscriber).
    on_payload: Callable[[bytes | bytearray, float], None] | None = None
    _connected: bool = False
    _subacked: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        proto = MQTTProtocolVersion.MQTTv5 if self.protocol == 5 else \
            MQTTProtocolVersion.MQTTv311
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=proto,
                        reconnect_on_failure=False)
        c.tls_set_context(tls_context(self.env, self.member))
        # paho only accepts these before connecting. "app" keeps paho's window unlimited and
        # bounds what is in flight itself (see publish_all).
        c.max_inflight_messages_set(self.window if self.mode == "paho" else 0)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self.client = c

    # -- callbacks -----------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode,
                    props: Any) -> None:
        if rc.is_failure:
            raise ConnectionError(f"CONNACK refused: {rc}")
        self._connected = True

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: ReasonCode,
                    props: Any) -> None:
        if rc.is_failure:
            raise RuntimeError(f"broker refused publish {mid}: {rc}")
        self.acked += 1

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      rcs: list[ReasonCode], props: Any) -> None:
        if any(r.is_failure for r in rcs):  # (3.1.1 codes are wrapped as ReasonCode too)
            raise RuntimeError(f"subscription refused: {rcs}")
        self._subacked.add(mid)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        if self.received == 0:
            self.first_rx = now
        self.received += 1
        self.received_bytes += len(msg.payload)
        if msg.retain:
            self.retained += 1
        if self.received == self.expect:
            self.last_rx = now
        if self.on_payload is not None:
            self.on_payload(msg.payload, now)

    # -- operations ----------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> None:
        """Connect (blocking TLS handshake) and run the loop until CONNACK."""
        self.client.connect(self.env.host, self.env.port, keepalive=60)
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._run_until(lambda: self._connected, timeout, "CONNACK")

    def service(self) -> None:
        """Read whatever arrived and send a keep-alive PINGREQ when one is due."""
        rc = self.client.loop(timeout=0.0)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"connection lost: {mqtt.error_string(rc)}")

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 10.0) -> None:
        """Subscribe and run the loop until the SUBACK."""
        rc, mid = self.client.subscribe(topic, qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise RuntimeError(f"subscribe failed: {mqtt.error_string(rc)}")
        self._run_until(lambda: mid in self._subacked, timeout, "SUBACK")

    def _run_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} within {timeout} s")
            rc = self.client.loop(timeout=0.5)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise ConnectionError(f"connection lost: {mqtt.error_string(rc)}")

    def publish_all(self, topics: Sequence[str], payloads: Sequence[bytes], *,
                    retain: bool = False, timeout: float = 600.0) -> None:
        """Publish ``payloads[i]`` to ``topics[i % len(topics)]`` at QoS 1 with at most
        :attr:`window` unacknowledged; return after the last PUBACK."""
        c, n, nt, window = self.client, len(payloads), len(topics), self.window
        if window < 1:
            raise ValueError("a publisher needs window >= 1")
        self.acked = 0
        deadline = time.monotonic() + timeout
        if self.mode == "paho":
            for i in range(n):
                c.publish(topics[i % nt], payloads[i], qos=1, retain=retain)
            self._run_until(lambda: self.acked >= n, timeout, "last PUBACK")
            return
        sent = 0
        while self.acked < n:
            while sent < n and sent - self.acked < window:
                c.publish(topics[sent % nt], payloads[sent], qos=1, retain=retain)
                sent += 1
            rc = c.loop(timeout=1.0)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise ConnectionError(f"connection lost: {mqtt.error_string(rc)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n - self.acked} PUBACKs missing after {timeout} s")

    def receive(self, total: int, *, read: SubRead, timeout: float = 600.0) -> None:
        """Run the loop until ``total`` messages arrived since connecting.

        Set :attr:`expect` to ``total`` before subscribing when messages may arrive while
        the subscription is still being acknowledged (retained ones do).
        """
        c = self.client
        self.expect = total
        deadline = time.monotonic() + timeout
        if read == "loop":
            while self.received < self.expect:
                rc = c.loop(timeout=1.0)
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    raise ConnectionError(f"connection lost: {mqtt.error_string(rc)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.expect - self.received} messages missing")
            return
        while self.received < self.expect:
            rc = c.loop(timeout=1.0)
            while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self.received < self.expect:
                before = self.received
                # paho's private packet reader: one call per packet, no select() in between.
                rc = c._packet_read()
                if self.received == before and rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    continue  # a non-PUBLISH packet (e.g. PINGRESP)
            if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
                raise ConnectionError(f"connection lost: {mqtt.error_string(rc)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.expect - self.received} messages missing")

    def close(self) -> None:
        """Send DISCONNECT and close the socket."""
        self.client.disconnect()
        sock = self.client.socket()
        if sock is not None:
            sock.close()
