"""The project's one retry policy: exponential backoff with full jitter, from tenacity.

Nodes, the bridge and the agent reconnect (or retry a refused write) through these two
functions, so a fleet that loses its broker at the same instant spreads out the same way
everywhere. Rationale: docs/DESIGN.md (reconnect storms).
"""

from __future__ import annotations

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_random_exponential,
)
from tenacity.wait import wait_base

__all__ = ["Backoff", "retrying"]


def _wait(*, minimum: float, maximum: float) -> wait_base:
    return wait_random_exponential(multiplier=minimum, max=maximum)


def retrying(*, minimum: float, maximum: float,
             on: type[BaseException] | tuple[type[BaseException], ...]) -> AsyncRetrying:
    """``async for attempt in retrying(...): with attempt: ...`` retries while the body
    raises ``on``, waiting a random time up to ``minimum * 2**n`` (capped at ``maximum``)."""
    return AsyncRetrying(wait=_wait(minimum=minimum, maximum=maximum),
                         retry=retry_if_exception_type(on), reraise=True)


class Backoff:
    """The same policy one wait at a time, for loops that sleep on their own terms (on a
    stop event rather than ``asyncio.sleep``)."""

    def __init__(self, *, minimum: float, maximum: float) -> None:
        self._policy = retrying(minimum=minimum, maximum=maximum, on=Exception)
        self._attempt = 0

    def next_delay(self) -> float:
        """How long to wait before the next attempt (grows until :meth:`reset`)."""
        self._attempt += 1
        state = RetryCallState(retry_object=self._policy, fn=None, args=(), kwargs={})
        state.attempt_number = self._attempt
        return float(self._policy.wait(state))

    def reset(self) -> None:
        """Start again from the shortest wait (after a success)."""
        self._attempt = 0
