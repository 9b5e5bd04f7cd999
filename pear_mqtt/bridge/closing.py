"""Closing windows: which open windows are due, and closing one — aggregate it, build its
signed messages, and hand them to the store's outbox in the transaction that closes the
window and spends its budget (so a restart re-sends the same bytes, never fresh noise)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime

from ..errors import PrivacyError
from .aggregation import aggregate_window
from .config import BridgeConfig
from .noise import NoiseMechanism
from .output import PublicOutput, merged_ledger
from .state import BridgeStore, LedgerEntry, WindowInfo
from .status import BridgeCounters

__all__ = ["WindowCloser", "due_windows"]

log = logging.getLogger(__name__)


def due_windows(windows: Iterable[WindowInfo], *, config: BridgeConfig,
                now: float) -> list[int]:
    """The starts of the open ``windows`` that may be published at ``now``: ended at least
    the publication lag ago, and settled (see :class:`~pear_mqtt.bridge.config.BridgeConfig`)."""
    due: list[int] = []
    for w in windows:
        due_at = w.start + config.window_seconds + config.publication_lag_seconds
        if now < due_at:
            continue
        # A backfilled window (first seen after it was due) gets its settling time from its
        # first input, not from a due time long past.
        hold_until = max(due_at, w.first_input) + config.max_settle_seconds
        if now < w.last_input + config.settle_seconds and now < hold_until:
            continue
        due.append(w.start)
    return due


class WindowCloser:
    """Closes one window at a time into ``store``, with messages built by ``output``."""

    def __init__(self, *, config: BridgeConfig, store: BridgeStore, output: PublicOutput,
                 noise: NoiseMechanism | None, counters: BridgeCounters) -> None:
        self._config = config
        self._store = store
        self._output = output
        self._noise = noise
        self._counters = counters

    def close(self, start: int, now: float) -> None:
        """Aggregate the window starting at ``start`` and close it with its messages."""
        cfg = self._config
        store, counters = self._store, self._counters
        rows = store.contributions(start)
        period_start = cfg.dp.period_of(start)
        spent = store.spent(period_start) if period_start is not None else 0.0
        result = aggregate_window(start, rows, window_seconds=cfg.window_seconds,
                                  min_companies=cfg.min_companies,
                                  dominance_cap=cfg.dominance_cap, dp=cfg.dp,
                                  noise=self._noise, budget_spent=spent,
                                  counter=counters.privacy)
        for cell in result.cells:
            for reason, n in cell.suppressed.items():
                if reason not in ("below_k", "dominance"):
                    counters.suppressed[reason] += n  # counters.privacy has the others
        ledger_rows: list[LedgerEntry] = []
        charged = sum(1 for c in result.cells if c.epsilon > 0)
        if period_start is not None and charged:
            ledger_rows.append(LedgerEntry(period_start=period_start, epsilon=result.epsilon,
                                           delta=result.delta, cells=charged))
        ledger = merged_ledger(store.ledger(), ledger_rows)
        try:
            outgoing, receipts = self._output.build(result, now=now, ledger=ledger)
        except PrivacyError as exc:
            # Defence in depth: aggregate_window never yields such a cell; if it ever did,
            # nothing of this window is published and the error is loud.
            log.error("window %s not published: %s", start, exc)
            counters.drop("publisher_refused")
            outgoing, receipts = [], []
        store.close_window(start, now=now, outgoing=outgoing, receipts=receipts,
                           ledger=ledger_rows)
        published = sum(1 for c in result.cells if c.published)
        counters.cells_published += published
        log.info("window %s closed: %d items, %d of %d cells published, suppressed %s",
                 datetime.fromtimestamp(start, UTC).isoformat(), len(rows), published,
                 len(result.cells), result.suppressed or "nothing")
