"""The live path into a node's market store: the receiver hands each verified item to the
feed in the event loop, and a thread writes them in batches, so a commit never stalls the
socket. An item from a sender that keeps a history log waits until a signed head of that
log proves its entry (:meth:`MarketFeed.proven`); a forked sender's never does. A store
that cannot write keeps its backlog (bounded) and says so once."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

from ..errors import MarketError, ProofFailed
from ..history.head import parse_log_ref
from ..node.records import ReceivedAggregate, ReceivedInsight
from ..security.identity import Identity
from .store import MarketStore
from .writer import Row

__all__ = ["BACKLOG_MAX", "HOLD_AT", "HOLD_MAX", "LINGER", "LINGER_BUSY", "RELEASE_AT",
           "WRITER_NICE", "MarketFeed"]

log = logging.getLogger(__name__)

BACKLOG_MAX = 200_000
"""Items kept while the store cannot write (full disk) or falls behind; the oldest go
beyond this (a tenth at a time), counted in ``dropped``."""
_RETRY = 2.0  # s between attempts while the store refuses writes
# A trickle is gathered this long before it is written: one commit per few dozen items
# instead of one each, so the writer takes the interpreter from the receiver rarely.
LINGER = 0.05
# A stream of more than _BUSY items a second is gathered this long instead: a commit's cost
# is mostly per batch (the pages it touches, each sender's latest row, the roll-up cells),
# so fewer, larger batches take less of the CPU the receiver shares.
LINGER_BUSY = 0.25
_BUSY = 500.0
_FULL = 5000  # ... unless this many are waiting already
HOLD_AT = 50_000
"""Rows waiting for the writer at which the node stops reading its connection (``on_hold``),
so that the broker keeps the rest; reading goes on once :data:`RELEASE_AT` are left, or if the
store fails, and after :data:`HOLD_MAX` seconds whatever the writer does (the connection
ends a pause itself: it must answer its pings)."""
RELEASE_AT = 10_000
HOLD_MAX = 5.0
WRITER_NICE = 10
"""How much lower than its process the writer thread runs (Linux ``nice``, per thread): the
store catches up in the CPU the live stream leaves (docs/MARKET.md, "Layout and
engine")."""


def _lower_priority() -> None:
    """Run the calling thread :data:`WRITER_NICE` steps nicer (Linux: nice is per thread;
    elsewhere it would be the whole process's, so nothing changes)."""
    if sys.platform != "linux":
        return
    me = threading.get_native_id()
    with contextlib.suppress(OSError):  # a sandbox that forbids it: the store still works
        os.setpriority(os.PRIO_PROCESS, me,
                       min(19, os.getpriority(os.PRIO_PROCESS, me) + WRITER_NICE))


class MarketFeed:
    """Batches verified items into ``store`` on its own thread (start with :meth:`start`)."""

    def __init__(self, store: MarketStore) -> None:
        self.store = store
        # Rows, not the items: a row holds no object the garbage collector walks, so items
        # waiting for the writer do not make every collection in the process longer.
        self._pending: list[Row | ReceivedAggregate] = []
        # Rows made but not yet written (the store refused them: full disk), oldest first.
        self._unwritten: list[tuple[list[Row], list[ReceivedAggregate]]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._writing = False
        self._draining = 0  # callers of drain(): write at once, no lingering
        self._stop = False
        self._hurry = threading.Event()  # drain() or close(): no lingering
        self._thread = threading.Thread(target=self._run, name="pear-market", daemon=True)
        self.dropped = 0
        self.failing: str | None = None
        self.on_hold: Callable[[bool], None] | None = None
        """Called with True to stop reading the node's connection, False to read again
        (from either thread: it must be thread-safe)."""
        self.holds = 0  # times reading was stopped for the writer to catch up
        self._held_since: float | None = None
        self._in_flight = 0  # rows the writer took and has not written yet
        # Items waiting for their log entry to be proven, per sender: (log id, index, row).
        self._unproven: dict[tuple[str, str], list[tuple[str, int, Row]]] = {}
        self._proven: dict[tuple[str, str], tuple[str, int]] = {}  # sender -> (log, length)
        self.waiting = 0  # items held back until proven

    @property
    def backlog(self) -> int:
        """Items and rows waiting to be written (not those waiting for their proof)."""
        return len(self._pending) + sum(len(r) + len(a) for r, a in self._unwritten)

    def start(self) -> None:
        self._thread.start()

    def __call__(self, item: ReceivedInsight | ReceivedAggregate) -> None:
        """Take one verified item (called in the event loop, once per item)."""
        if isinstance(item, ReceivedAggregate):
            self._take(item)
            return
        try:
            row = self.store.row(item)
        except Exception:  # a bug here must not reach the receiver
            log.exception("market store %s: cannot read a received item; it is left out",
                          self.store.path)
            self.dropped += 1
            return
        if row is None:
            return  # counted as refused
        if item.log_ref is not None:
            try:
                log_id, index = parse_log_ref(item.log_ref)
            except ProofFailed:
                return  # the receiver counted it already
            key = (item.member, item.node)
            proven = self._proven.get(key)
            if proven is None or proven[0] != log_id or index >= proven[1]:
                if self.waiting >= BACKLOG_MAX:
                    self.dropped += 1
                    return
                self._unproven.setdefault(key, []).append((log_id, index, row))
                self.waiting += 1
                return
        self._take(row)

    def _take(self, pending: Row | ReceivedAggregate) -> None:
        with self._lock:
            self._pending.append(pending)
            waiting = len(self._pending)
            if waiting > BACKLOG_MAX:  # a writer that cannot keep up for long
                over = waiting - BACKLOG_MAX * 9 // 10
                del self._pending[:over]
                self.dropped += over
        if waiting + self._in_flight >= HOLD_AT and self._held_since is None \
                and self.failing is None and self.on_hold is not None:
            self._held_since = time.monotonic()
            self.holds += 1
            if self.holds == 1:
                log.info("market store %s: %d items behind; the node stops reading while it "
                         "catches up", self.store.path, waiting)
            self.on_hold(True)
        if not self._wake.is_set():  # set already: the writer takes this item with the rest
            self._wake.set()

    def _release(self) -> None:
        """Let the node read again once the writer caught up, a hold lasted long enough,
        or the store fails (called by the writer after each batch, and on close)."""
        since = self._held_since
        if since is None:
            return
        if (self.backlog <= RELEASE_AT or self.failing is not None or self._stop
                or time.monotonic() - since >= HOLD_MAX):
            self._held_since = None
            if self.on_hold is not None:
                self.on_hold(False)

    def proven(self, owner: Identity, log_id: str, length: int) -> None:
        """A signed head of ``owner``'s log ``log_id`` proved its first ``length`` entries:
        the items they carried go in."""
        key = (owner.member, owner.node)
        self._proven[key] = (log_id, length)
        held = self._unproven.get(key)
        if not held:
            return
        ready = [item for lid, index, item in held if lid == log_id and index < length]
        left = [h for h in held if h[0] == log_id and h[1] >= length]
        self.waiting -= len(held) - len(left)  # other logs' items: the sender moved on
        if left:
            self._unproven[key] = left
        else:
            del self._unproven[key]
        if ready:
            with self._lock:
                self._pending.extend(ready)
            self._wake.set()

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until everything taken so far is stored; False after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        self._draining += 1
        self._hurry.set()
        try:
            return self._wait_idle(deadline)
        finally:
            self._draining -= 1

    def _wait_idle(self, deadline: float) -> bool:
        with self._idle:
            while self._pending or self._writing or self._unwritten:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.set()
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending, then stop the thread."""
        if self._thread.is_alive():
            self.drain(timeout)
            self._stop = True
            self._hurry.set()
            self._wake.set()
            self._thread.join(timeout)
        self._release()

    def _run(self) -> None:
        _lower_priority()
        linger, taken = LINGER, time.monotonic()
        while not self._stop:
            self._wake.wait()
            self._wake.clear()
            if len(self._pending) < _FULL and not self._draining:
                self._hurry.wait(linger)
            if not self._draining and not self._stop:
                self._hurry.clear()
            with self._lock:
                batch, self._pending = self._pending, []
                self._writing = bool(batch) or bool(self._unwritten)
            now = time.monotonic()
            linger = LINGER_BUSY if len(batch) > _BUSY * (now - taken) else LINGER
            taken = now
            if batch or self._unwritten:
                self._write(batch)
            self._release()
            with self._idle:
                self._writing = False
                self._idle.notify_all()

    def _write(self, batch: list[Row | ReceivedAggregate]) -> None:
        if batch:
            rows: list[Row] = []
            aggregates: list[ReceivedAggregate] = []
            for item in batch:
                if isinstance(item, ReceivedAggregate):
                    aggregates.append(item)
                else:
                    rows.append(item)
            self._unwritten.append((rows, aggregates))
            self._recount()
        while self._unwritten:
            rows, aggregates = self._unwritten[0]
            try:
                self.store.add_rows(rows, aggregates)
            except Exception as exc:  # the thread must go on: nothing is lost
                if self.failing is None:
                    log.error("%s: the market store keeps the items in memory and retries",
                              exc, exc_info=not isinstance(exc, MarketError))
                self.failing = str(exc) or type(exc).__name__
                self._bound()
                # Retry later, not in a tight loop; a close() ends the wait at once.
                self._wake.wait(_RETRY)
                self._wake.set()
                return
            del self._unwritten[0]
            self._recount()
            self.store.changed()
        if self.failing is not None:
            log.info("market store %s writes again", self.store.path)
            self.failing = None

    def _bound(self) -> None:
        """Keep at most :data:`BACKLOG_MAX` unwritten rows; the oldest go first."""
        over = sum(len(r) + len(a) for r, a in self._unwritten) - BACKLOG_MAX
        while over > 0 and self._unwritten:
            rows, aggregates = self._unwritten[0]
            if len(rows) + len(aggregates) <= over:
                del self._unwritten[0]
                over -= len(rows) + len(aggregates)
                self.dropped += len(rows) + len(aggregates)
                continue
            del rows[:over]
            self.dropped += over
            over = 0
        self._recount()

    def _recount(self) -> None:
        # Read by the event loop's thread on every item: kept, not summed there.
        self._in_flight = sum(len(r) for r, _ in self._unwritten)
