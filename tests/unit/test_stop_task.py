"""``transport.stop_task``: a task that loses a cancellation is cancelled again."""

from __future__ import annotations

import asyncio

from pear_mqtt.transport import stop_task


async def test_a_swallowed_cancellation_is_repeated_until_the_task_ends() -> None:
    started, swallowed, never = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def stubborn() -> None:
        started.set()
        try:
            await never.wait()
        except asyncio.CancelledError:
            # What asyncio.wait_for does on Python 3.11 when the cancellation arrives as its
            # inner future completes: the task carries on as if never cancelled.
            swallowed.set()
        await never.wait()

    task = asyncio.create_task(stubborn())
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.wait_for(stop_task(task, every=0.05), 5)
    assert swallowed.is_set()
    assert task.cancelled()


async def test_a_task_that_failed_is_stopped_without_raising() -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(broken())
    await asyncio.wait((task,), timeout=5)
    await stop_task(task)
    assert task.done() and isinstance(task.exception(), RuntimeError)
