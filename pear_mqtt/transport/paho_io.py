"""Stand-ins for three of paho's ``Client`` internals, for speed on large and many messages.

:func:`install` puts them on a client: reading from a buffer instead of a syscall per header
byte, decoding a PUBLISH with one copy of its payload, and queueing packets as views (and
consecutive acknowledgements as one). They keep paho's contracts (errors, return codes, QoS 2
left to paho); why: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import ssl
import struct
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MessageType, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket, MQTTException

__all__ = ["install"]

# A packet body read of at least this many bytes goes straight into a buffer (of at most the
# second), not through the 64 KiB one.
_DIRECT_READ = 64 * 1024
_DIRECT_READ_MAX = 1024 * 1024
# What a malformed PUBLISH raises while it is decoded (paho's own list, in its _packet).
_DECODE_ERRORS = (IndexError, KeyError, MQTTException, ValueError, struct.error)
# Acknowledgements: packets of a packet id alone, of which paho's writer does nothing more
# once they are written (it does for a PUBLISH of QoS 0 and for a DISCONNECT).
_ACKS = frozenset({MessageType.PUBACK, MessageType.PUBREC, MessageType.PUBREL,
                   MessageType.PUBCOMP})


def install(client: mqtt.Client) -> None:
    """Replace ``client``'s socket read, PUBLISH decoder and packet queue."""
    client._sock_recv = _BufferedRecv(client)  # type: ignore[method-assign, assignment]
    client._handle_publish = _PublishReader(client)  # type: ignore[method-assign]
    client._packet_queue = _ViewQueue(client)  # type: ignore[method-assign]


class _BufferedRecv:
    """Stands in for paho's ``Client._sock_recv`` with one large read per wake-up.

    paho reads a packet with a syscall per header byte and another for the body; on a stream
    of small messages that is most of a subscriber's time. This serves those reads from a
    buffer filled 64 KiB at a time, with the same error contract as paho's method. The body
    of a large packet is read straight into a buffer of its own, all the TLS records there
    are at once, instead of one record (16 KiB) per round of paho's read loop.
    """

    __slots__ = ("_big", "_buf", "_client", "_pos")

    def __init__(self, client: mqtt.Client) -> None:
        self._client = client
        self._buf = b""
        self._pos = 0
        self._big: bytearray | None = None

    def __call__(self, bufsize: int) -> bytes | memoryview:
        if self._pos >= len(self._buf):
            sock = self._client._sock
            if sock is None:
                raise ConnectionError("socket closed")
            if bufsize >= _DIRECT_READ:
                return self._read_into(sock, min(bufsize, _DIRECT_READ_MAX))
            try:
                data = sock.recv(65536)
            except ssl.SSLWantReadError as err:
                raise BlockingIOError() from err
            except ssl.SSLWantWriteError as err:
                raise BlockingIOError() from err
            if not data:
                return b""
            self._buf, self._pos = data, 0
        end = min(self._pos + bufsize, len(self._buf))
        chunk = self._buf[self._pos:end]
        self._pos = end
        return chunk

    def _read_into(self, sock: Any, want: int) -> memoryview:
        """Up to ``want`` bytes, as many as the socket has now (a view paho copies at once:
        the buffer is used again by the next read)."""
        if self._big is None:
            self._big = bytearray(_DIRECT_READ_MAX)
        view = memoryview(self._big)
        got = 0
        while got < want:
            try:
                n = sock.recv_into(view[got:want])
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError) as err:
                if got:
                    break
                raise BlockingIOError() from err
            if not n:
                break  # closed: what came before it first, then b"" on the next call
            got += n
        return view[:got]


class _PublishReader:
    """Stands in for paho's ``Client._handle_publish``: the same for QoS 0 and 1, with one
    copy of the payload out of the packet, and MQTT 5 properties skipped (left ``None``).

    paho's decoder peels the topic, the packet id and the properties off with a
    ``struct.unpack`` each, every one a copy of the rest of the packet, and the payload is a
    ``bytearray`` that :meth:`Connection._on_message` copies once more: four copies of each
    byte of a large message (a log answer: most of the time spent receiving it)."""

    __slots__ = ("_client",)

    def __init__(self, client: mqtt.Client) -> None:
        self._client = client

    def __call__(self) -> MQTTErrorCode:
        client = self._client
        header: int = client._in_packet["command"]
        qos = (header & 0x06) >> 1
        if qos == 2:
            return mqtt.Client._handle_publish(client)  # its own state machine: paho's
        try:
            message = self._decode(memoryview(client._in_packet["packet"]), header, qos,
                                   client.protocol)
        except _DECODE_ERRORS as exc:
            raise MalformedPacket(str(exc)) from exc
        client._handle_on_message(message)
        if qos == 0 or client._manual_ack:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return client._send_puback(message.mid)

    @staticmethod
    def _decode(view: memoryview, header: int, qos: int, protocol: int) -> mqtt.MQTTMessage:
        size = len(view)
        pos = 2 + int.from_bytes(view[0:2], "big")
        if size < 2 or pos > size:
            raise ValueError("PUBLISH shorter than its topic")
        topic = view[2:pos].tobytes()
        if protocol != MQTTProtocolVersion.MQTTv5 and not topic:
            raise ValueError("topic can't be empty in MQTTv3")
        mid = 0
        if qos:
            if pos + 2 > size:
                raise ValueError("PUBLISH shorter than its packet id")
            mid = int.from_bytes(view[pos:pos + 2], "big")
            pos += 2
        if protocol == MQTTProtocolVersion.MQTTv5:
            # Skipped, not decoded: no consumer reads them (an InboundMessage carries none),
            # and paho's Properties costs ~20 µs a message, more than the rest of a PUBLISH.
            length = shift = 0
            while True:
                if pos >= size or shift > 21:
                    raise ValueError("PUBLISH with a malformed property length")
                byte = view[pos]
                pos += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
            if pos + length > size:
                raise ValueError("PUBLISH shorter than its properties")
            pos += length
        message = mqtt.MQTTMessage(mid=mid, topic=topic)
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.payload = view[pos:].tobytes()
        message.timestamp = time.monotonic()
        return message


class _ViewQueue:
    """Wraps paho's ``Client._packet_queue`` so that a queued packet is a ``memoryview``: paho
    sends what is left of a packet as ``packet[pos:]``, a copy of a ``bytearray`` (the whole
    packet, on the first try), a zero-copy slice of a view.

    An acknowledgement queued right behind another joins it: paho writes each queued packet
    with a send of its own (a TLS record and a syscall each), so a consumer acknowledging a
    batch, or a subscriber whose read burst acknowledged many, paid one send per message.
    """

    __slots__ = ("_client",)

    def __init__(self, client: mqtt.Client) -> None:
        self._client = client

    def __call__(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                 info: mqtt.MQTTMessageInfo | None = None) -> MQTTErrorCode:
        client = self._client
        if command & 0xF0 not in _ACKS:
            return mqtt.Client._packet_queue(client, command, memoryview(packet),  # type: ignore[arg-type]
                                             mid, qos, info)
        queue = client._out_packet
        if queue:
            last = queue[-1]
            # Only an entry made here is a bytearray: paho sends what is left of it,
            # packet[pos:], so it may grow even while partly written.
            if last["command"] & 0xF0 in _ACKS and type(last["packet"]) is bytearray:
                last["packet"] += packet
                last["to_process"] += len(packet)
                client._call_socket_register_write()
                return MQTTErrorCode.MQTT_ERR_SUCCESS
        return mqtt.Client._packet_queue(client, command, bytearray(packet), mid, qos, info)
