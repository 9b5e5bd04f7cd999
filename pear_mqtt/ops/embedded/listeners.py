"""The embedded broker's sockets: accept, screen the CONNECT, hand the stream to amqtt.

amqtt's own listeners take no ``ssl.SSLContext`` (so no CRL and no required client
certificate) and set a session up before any plugin may object; an ``external`` amqtt
listener lets these servers own the sockets and decide before amqtt sees the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.connect import ConnectPacket

from .admission import CONNECTING, Admission, Gatekeeper, Refusal, principal_of

__all__ = ["Listeners"]

log = logging.getLogger(__name__)

_MQTT_311 = 4  # the only protocol level amqtt speaks; it refuses the others itself


class _Replay(ReaderAdapter):  # type: ignore[misc]  # amqtt is untyped
    """Records what is read until :meth:`replay`, then serves it again before the stream."""

    def __init__(self, inner: ReaderAdapter) -> None:
        self._inner = inner
        self._seen = bytearray()
        self._recording = True

    def replay(self) -> None:
        self._recording = False

    async def read(self, n: int = -1) -> bytes:
        if self._recording:
            data: bytes = await self._inner.read(n)
            self._seen += data
            return data
        if not self._seen:
            return bytes(await self._inner.read(n))
        if n < 0 or n > len(self._seen):
            head, self._seen = bytes(self._seen), bytearray()
            rest = await self._inner.read(n if n < 0 else n - len(head))
            return head + bytes(rest)
        head, self._seen = bytes(self._seen[:n]), self._seen[n:]
        return head

    def feed_eof(self) -> None:
        self._inner.feed_eof()


class _OneAtATime:
    """Screens one CONNECT per client id at a time, until amqtt has set its session up:
    a check of who owns a session must not race another connection taking it."""

    def __init__(self) -> None:
        self._busy: dict[str, asyncio.Event] = {}

    async def turn(self, key: str) -> Callable[[], None]:
        """Wait for ``key``'s turn; return what ends it (idempotent)."""
        while (busy := self._busy.get(key)) is not None:
            await busy.wait()
        mine = self._busy[key] = asyncio.Event()

        def end() -> None:
            if self._busy.get(key) is mine:
                del self._busy[key]
            mine.set()

        return end


class Listeners:
    """The plain and mutual-TLS servers of one embedded broker (amqtt ``external`` listeners)."""

    def __init__(self, *, broker: Any, gatekeeper: Gatekeeper) -> None:
        self._broker = broker
        self._gate = gatekeeper
        self._servers: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._turns = _OneAtATime()

    async def open(self, *, name: str, host: str, port: int,
                   context: ssl.SSLContext | None) -> int:
        """Listen on ``host:port`` for amqtt's listener ``name``; return the bound port."""

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(name, reader, writer)

        server = await asyncio.start_server(serve, host, port, reuse_address=True, ssl=context)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    def stop_listening(self) -> None:
        """Accept no new connection (the open ones carry on)."""
        for server in self._servers:
            server.close()

    async def close(self) -> None:
        """Stop listening and drop the connections still open (after amqtt closed its own)."""
        self.stop_listening()
        for writer in list(self._writers):
            writer.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()

    async def _serve(self, name: str, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        stream = _Replay(StreamReaderAdapter(reader))
        adapter = StreamWriterAdapter(writer)
        peer = writer.get_extra_info("peername")
        remote = (str(peer[0]), int(peer[1])) if peer and len(peer) >= 2 else None
        ssl_object = writer.get_extra_info("ssl_object")
        verdict = self._gate.identify(ssl_object)
        end_turn: Callable[[], None] = _nothing
        token = None
        try:
            try:
                connect = await ConnectPacket.from_stream(stream)
            except Exception:  # amqtt reads the same bytes again and reports the error
                connect = None
            stream.replay()
            if connect is not None and connect.proto_level == _MQTT_311 \
                    and connect.proto_name == "MQTT":
                client_id = connect.client_id or ""
                if client_id:
                    end_turn = await self._turns.turn(client_id)
                existing = self._broker.sessions.get(client_id) if client_id else None
                decision = self._gate.admit(
                    verdict, client_id=client_id,
                    owner=principal_of(existing[0]) if existing else None,
                    will_topic=(connect.will_topic or "") if connect.will_flag else None)
                if isinstance(decision, Refusal):
                    await _refuse(adapter, remote, decision.reason)
                    return
                token = CONNECTING.set(Admission(decision, ssl_object, remote, release=end_turn))
            await self._broker.external_connected(stream, adapter, name)
        finally:
            if token is not None:
                CONNECTING.reset(token)
            end_turn()
            self._writers.discard(writer)
            writer.close()  # amqtt is done with it (a no-op when amqtt closed it already)


def _nothing() -> None:
    pass


async def _refuse(writer: StreamWriterAdapter, remote: tuple[str, int] | None,
                  reason: str) -> None:
    where = remote[0] if remote else "?"
    log.warning("refused MQTT connection from %s: %s", where, reason)
    with contextlib.suppress(Exception):  # the peer may already be gone
        await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
    with contextlib.suppress(Exception):
        await writer.close()
