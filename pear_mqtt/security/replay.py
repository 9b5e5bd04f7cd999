"""Replay protection: per sender, the highest sequence number seen and a bitmap window below
it (:class:`ReplayGuard`)."""

from __future__ import annotations

import threading

from ..errors import ReplayedMessage
from .identity import Identity
from .lru import LRU

__all__ = ["ReplayGuard"]


class ReplayGuard:
    """Per-sender highest sequence number plus a bitmap of the ``window`` below it.

    Bit ``i`` of the bitmap stands for ``high - i``. Senders are tracked in an LRU of
    ``max_senders``; a sender pushed out of it starts afresh, so its old messages are then only
    held off by the age limit.
    """

    __slots__ = ("_lock", "_mask", "_senders", "_window")

    def __init__(self, *, window: int, max_senders: int) -> None:
        self._window = window
        self._mask = (1 << window) - 1
        self._senders: LRU[Identity, list[int]] = LRU(max_senders)
        self._lock = threading.Lock()

    def admit(self, sender: Identity, seq: int, *, check: bool, record: bool) -> None:
        """With ``check``, raise :class:`ReplayedMessage` unless ``seq`` is new; with
        ``record``, remember it."""
        with self._lock:
            state = self._senders.get(sender)
            if state is None:
                if record:
                    self._senders.put(sender, [seq, 1])
                return
            high, bits = state
            if not record:
                if check and (high - seq >= self._window
                              or (seq <= high and bits >> (high - seq) & 1)):
                    raise ReplayedMessage(f"sequence {seq} of {sender.sender} is not new")
                return
            if seq > high:
                shift = seq - high
                state[0] = seq
                state[1] = ((bits << shift) | 1) & self._mask if shift < self._window else 1
                return
            offset = high - seq
            if offset >= self._window:
                if check:
                    raise ReplayedMessage(
                        f"sequence {seq} of {sender.sender} is {offset} behind the newest; the "
                        f"replay window holds {self._window}")
                return
            bit = 1 << offset
            if bits & bit:
                if check:
                    raise ReplayedMessage(f"sequence {seq} of {sender.sender} was already seen")
                return
            state[1] = bits | bit

    def __len__(self) -> int:
        return len(self._senders)
