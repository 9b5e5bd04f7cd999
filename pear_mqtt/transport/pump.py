"""The socket pump of one connection: reads and writes paho's socket from the asyncio loop.

It reads in bounded bursts, pauses and resumes reading for the inbox's back-pressure, writes
what paho queued (at once, once per loop iteration while reading, or at the end of a batch)
and tells producers when their publishes are on the socket. Why: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

__all__ = ["SocketPump"]

# Packets read per readable event before yielding to other tasks.
_READ_BURST = 2000
# Seconds of reading (and of handling, with dispatch_to) per readable event. A receiver that
# falls behind a sender finds the socket never dry; without a time bound the tasks reading
# what its handler delivered would wait for the whole backlog (tens of ms in a trace).
_READ_SLICE = 0.001


class SocketPump:
    """Moves bytes between one paho client and its socket, driven by the running loop.

    :meth:`attach` binds it to a client (one per connection attempt); the ``socket_*`` and
    ``register_write`` methods are that client's socket callbacks. ``closed`` is the
    connection's: nothing is written once it is set.
    """

    def __init__(self, *, closed: asyncio.Event) -> None:
        self._closed = closed
        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self.sock: Any = None
        self._reading_paused = False
        self._held = False  # hold_reading(): only its release resumes
        self._flush_scheduled = False
        self._writer_armed = False
        self._sent_waiters: list[Callable[[], None]] = []
        self._in_io = False  # inside a read or a write of paho's: publishes wait for a flush
        self._holding = False  # inside hold(): writes wait for its end

    def attach(self, client: mqtt.Client, loop: asyncio.AbstractEventLoop) -> None:
        """Pump for ``client`` from now on, on ``loop`` (the running loop's thread)."""
        self._client = client
        self._loop = loop
        self._loop_thread = threading.get_ident()
        client.on_socket_open = self.socket_opened
        client.on_socket_close = self.socket_closed
        client.on_socket_register_write = self.register_write
        client.on_socket_unregister_write = self.unregister_write

    def detach(self) -> None:
        """Stop watching the socket and forget the producers waiting on it (nothing more
        will be sent on this connection)."""
        if self.sock is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.sock)
                self._loop.remove_writer(self.sock)
        self.sock = None
        self._writer_armed = False
        self._sent_waiters.clear()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Queue what is written inside the block and write it in one go at its end.

        paho queues packets one by one; written one by one, each is a send (and a TLS
        record) of its own. The packet queue merges consecutive acknowledgements
        (:mod:`.paho_io`), so a batch of acks queued here leaves in one send.
        """
        held, self._holding = self._holding, True
        try:
            yield
        finally:
            self._holding = held
            client = self._client
            if not held and client is not None and client.want_write():
                if self.on_loop_thread() and not self._writer_armed and not self._in_io:
                    self.flush()
                else:
                    self._schedule_flush()

    def when_sent(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, on the loop, when what was queued so far is written to
        the socket (at once if it is). Never called if the connection closes first."""
        assert self._loop is not None
        client = self._client
        if client is None or not client.want_write():
            self._loop.call_soon(callback)
        else:
            self._sent_waiters.append(callback)

    # -- paho's socket callbacks (on the loop thread, except open/write during connect) -----
    def socket_opened(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError):
            # Without NODELAY a small QoS 0 publish over TLS waits for Nagle (p99 ~80 ms).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.add_reader, sock, self.readable)

    def socket_closed(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if sock is self.sock:
            # A flush scheduled before the close must not arm a writer on a dead descriptor.
            self.sock = None
            self._writer_armed = False
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(sock)
                self._loop.remove_writer(sock)

    def register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # paho asks for a write after each queued packet. A publish from application code is
        # written at once: deferring it to the next loop iteration adds that iteration to every
        # message's latency. What is queued while reading (PUBACKs of a burst) or while the
        # kernel buffer is full waits for one flush per loop iteration; what is queued while
        # held, for the end of hold().
        if self._loop is None or (self._holding and self.on_loop_thread()):
            return
        if (not self._in_io and not self._writer_armed and self.sock is not None
                and self.on_loop_thread()):
            self.flush()
            return
        self._schedule_flush()

    def unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        pass  # flush decides whether the selector must watch for writability

    # -- the pump ----------------------------------------------------------------------------
    def on_loop_thread(self) -> bool:
        """Whether the caller runs on the loop's thread (paho calls back from its own thread
        while it connects)."""
        return threading.get_ident() == self._loop_thread

    def _schedule_flush(self) -> None:
        if self._flush_scheduled or self._loop is None:
            return
        self._flush_scheduled = True
        if self.on_loop_thread():
            self._loop.call_soon(self.flush)
        else:
            self._loop.call_soon_threadsafe(self.flush)

    def flush(self) -> None:
        """Write what paho queued, as far as the socket takes it; watch for writability
        while it does not."""
        self._flush_scheduled = False
        client, sock, loop = self._client, self.sock, self._loop
        if client is None or sock is None or loop is None or self._closed.is_set() \
                or sock.fileno() < 0:
            return
        in_io, self._in_io = self._in_io, True  # loop_write asks for a write again when full
        try:
            client.loop_write()
        finally:
            self._in_io = in_io
        if self.sock is not sock:
            return
        if client.want_write():
            # The socket buffer is full: continue when the kernel can take more.
            if not self._writer_armed:
                self._writer_armed = True
                loop.add_writer(sock, self.flush)
            return
        if self._writer_armed:
            self._writer_armed = False
            loop.remove_writer(sock)
        if self._sent_waiters:
            waiters, self._sent_waiters = self._sent_waiters, []
            for callback in waiters:
                loop.call_soon(callback)

    def readable(self) -> None:
        """Read what the socket has, in a burst bounded by count and time."""
        client = self._client
        if client is None or self._reading_paused:  # a read scheduled before a pause
            return
        # paho's loop_read() handles one packet per wake-up when nothing is in flight, so a
        # subscriber would pay a selector round trip per message. Read until the socket (and
        # any TLS records already decrypted) is dry, bounded so other tasks still run.
        in_io, self._in_io = self._in_io, True
        until = time.monotonic() + _READ_SLICE
        try:
            for _ in range(_READ_BURST):
                rc = client._packet_read()
                if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                    return
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    client._loop_rc_handle(rc)
                    return
                if self._reading_paused or self._client is not client:
                    return
                if time.monotonic() > until:
                    break
        finally:
            self._in_io = in_io
        if self._loop is not None:
            # More may be buffered inside TLS where the selector cannot see it.
            self._loop.call_soon(self.readable)

    def pause_reading(self) -> None:
        if not self._reading_paused and self.sock is not None and self._loop is not None:
            self._reading_paused = True
            self._loop.remove_reader(self.sock)

    def hold_reading(self, held: bool) -> None:
        """Pause reading (``held``) until released here: unlike :meth:`pause_reading`, a
        :meth:`resume_reading` meanwhile (the inbox draining, a subscribe) does not end it."""
        self._held = held
        if held:
            self.pause_reading()
        else:
            self.resume_reading()

    def resume_reading(self) -> None:
        if self._held:
            return
        if self._reading_paused and self.sock is not None and self._loop is not None:
            self._reading_paused = False
            self._loop.add_reader(self.sock, self.readable)
            self._loop.call_soon(self.readable)
