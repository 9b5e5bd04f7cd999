"""A TCP fault proxy for the fault scenarios: node <-> proxy <-> broker, loopback only.

The proxy forwards bytes, so mutual TLS passes through untouched: a node pointed at
``mqtts://127.0.0.1:<proxy.port>`` verifies the broker's certificate (it names 127.0.0.1) and
the broker verifies the node's, exactly as without the proxy. At runtime the test can inject:

- :meth:`FaultProxy.drop`: reset every open connection (RST, as a crashed middlebox does);
- :meth:`FaultProxy.delay`: add latency to every chunk in both directions (order is kept,
  throughput is not limited: a delay line, not a sleep per chunk);
- :meth:`FaultProxy.stall`: stop forwarding on the open connections in both directions
  without closing them (half-open: neither side learns anything until its keepalive fires);
- :meth:`FaultProxy.partition`: stall the open connections and refuse (accept + RST) or
  blackhole (accept, never forward) every new one;
- :meth:`FaultProxy.heal`: back to normal; stalled connections resume with what they had
  buffered (a healed network does not lose in-flight segments), blackholed ones are reset.

The proxy runs its own asyncio loop in a daemon thread, so a test whose own loop is busy
(200 nodes reconnecting) does not slow the network down, and the same proxy serves
subprocesses (agents). Every method is thread-safe and returns once the change is in effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

__all__ = ["FaultProxy", "ProxyStats"]

_T = TypeVar("_T")
_CHUNK = 64 * 1024


@dataclass
class ProxyStats:
    """What the proxy did, for the report and for assertions."""

    accepted: int = 0
    refused: int = 0
    blackholed: int = 0
    reset: int = 0
    bytes_up: int = 0  # node -> broker
    bytes_down: int = 0  # broker -> node
    accept_times: list[float] = field(default_factory=list)  # monotonic, every connect


@dataclass(eq=False)
class _Link:
    """One proxied connection: the node's side and the broker's side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closed: bool = False


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with RST (SO_LINGER 0): the peer sees ECONNRESET, not an orderly FIN."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port`` with injectable faults."""

    host = "127.0.0.1"

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.stats = ProxyStats()
        self._delay = 0.0
        self._new: Literal["forward", "refuse", "blackhole"] = "forward"
        self._links: set[_Link] = set()
        self._holes: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy",
                                        daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, self.host, 0))
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            tasks = [t for link in self._links for t in link.tasks]
            self._kill_all()
            for hole in list(self._holes):
                _reset(hole)
            self._holes.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self._call(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``mqtts://127.0.0.1:<port>``: the broker certificate names 127.0.0.1."""
        return f"mqtts://{self.host}:{self.port}"

    @property
    def open_links(self) -> int:
        return self._call_sync(lambda: sum(1 for link in self._links if not link.closed))

    # -- faults (thread-safe) ----------------------------------------------------------------
    def drop(self) -> int:
        """Reset every open connection; returns how many. New ones are still forwarded."""
        return self._call_sync(self._kill_all)

    def delay(self, seconds: float) -> None:
        """Hold every chunk ``seconds`` before forwarding it (each direction)."""
        self._call_sync(lambda: setattr(self, "_delay", max(0.0, seconds)))

    def stall(self) -> None:
        """Half-open: the open connections stop forwarding both ways, without closing."""
        self._call_sync(self._stall_all)

    def partition(self, new: Literal["refuse", "blackhole"] = "refuse") -> None:
        """Stall the open connections; refuse (RST) or blackhole every new connection."""
        def apply() -> None:
            self._stall_all()
            self._new = new
        self._call_sync(apply)

    def heal(self) -> None:
        """Normal forwarding again: no delay, stalled links resume, blackholed ones reset."""
        def apply() -> None:
            self._delay = 0.0
            self._new = "forward"
            for link in self._links:
                link.flowing.set()
            for hole in list(self._holes):
                _reset(hole)
            self._holes.clear()
        self._call_sync(apply)

    # -- internals (proxy loop) ----------------------------------------------------------------
    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def _call_sync(self, fn: Callable[[], _T]) -> _T:
        async def run() -> _T:
            return fn()
        return self._call(run())

    def _stall_all(self) -> None:
        # Only the links open now: a stall is a middlebox losing these flows' state, and a
        # client that gives up on one must be able to open a fresh connection.
        for link in self._links:
            link.flowing.clear()

    def _kill_all(self) -> int:
        n = 0
        for link in list(self._links):
            if not link.closed:
                n += 1
                self.stats.reset += 1
            self._close(link, rst=True)
        return n

    def _close(self, link: _Link, *, rst: bool) -> None:
        if link.closed:
            return
        link.closed = True
        link.flowing.set()  # wake stalled pumps so they notice and end
        for writer in (link.client, link.upstream):
            if writer is None:
                continue
            if rst:
                _reset(writer)
            else:
                writer.close()
        for task in link.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._links.discard(link)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.accept_times.append(time.monotonic())
        if self._new == "refuse":
            self.stats.refused += 1
            _reset(writer)
            return
        if self._new == "blackhole":
            # Accepted and then silence: the client's TLS handshake waits for its own timeout.
            self.stats.blackholed += 1
            self._holes.add(writer)
            return
        self.stats.accepted += 1
        link = _Link(client=writer)
        link.flowing.set()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)  # broker down: the node sees its connection reset
            return
        link.upstream = up_writer
        self._links.add(link)
        for sock_writer in (writer, up_writer):
            s = sock_writer.get_extra_info("socket")
            if s is not None:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link.tasks = [asyncio.create_task(self._pump(link, reader, up_writer, up=True)),
                      asyncio.create_task(self._pump(link, up_reader, writer, up=False))]

    async def _pump(self, link: _Link, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    *, up: bool) -> None:
        # A delay line: the reader stamps each chunk, the writer forwards it when due, so
        # latency is added without limiting throughput and order is kept.
        line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:
            while True:
                due, data = await line.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await link.flowing.wait()
                if link.closed:
                    return
                if not data:
                    with contextlib.suppress(OSError):
                        dst.write_eof()
                    return
                dst.write(data)
                await dst.drain()

        writer = asyncio.create_task(forward())
        try:
            while not link.closed:
                await link.flowing.wait()  # stalled: read nothing, so TCP fills up too
                if link.closed:
                    break
                data = await src.read(_CHUNK)
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
                line.put_nowait((time.monotonic() + self._delay, data))
                if not data:
                    break
            await writer
        except asyncio.CancelledError:
            writer.cancel()
            raise
        except OSError:
            # One side reset (or vanished): pass the reset on, as a router would.
            self._close(link, rst=True)
            return
        finally:
            if not writer.done():
                writer.cancel()
        # This direction ended cleanly (EOF passed on); the link is over once both have.
        me = asyncio.current_task()
        if all(t.done() for t in link.tasks if t is not me):
            self._close(link, rst=False)
