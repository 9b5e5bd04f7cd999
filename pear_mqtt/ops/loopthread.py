"""An asyncio loop on a daemon thread of its own, for the parts of a synchronous process (the
dashboard's HTTP server) that keep MQTT sessions: started once, stopped from any thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["LoopThread"]


class LoopThread:
    """Runs ``main(stopping)`` in a new event loop on a thread named ``name``; ``main`` is to
    return once ``stopping`` is set, which :meth:`close` does."""

    def __init__(self, name: str,
                 main: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
        self._name = name
        self._main = main
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=lambda: asyncio.run(self._run()),
                                            name=self._name, daemon=True)
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(timeout)

    async def _run(self) -> None:
        self._stopping = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        await self._main(self._stopping)
