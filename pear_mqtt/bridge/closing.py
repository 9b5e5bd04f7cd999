"""Closing windows: which open windows are due, and closing one — aggregate it, build its
signed messages, and hand them to the store's outbox in the transaction that closes the
window and spends its budget (so a restart re-sends the same bytes, never fresh noise).
With the consortium output on, a window is first closed for the consortium's members (over
their items only, after their shorter lag), then for the public."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from ..errors import PrivacyError
from .aggregation import aggregate_window
from .config import BridgeConfig
from .noise import NoiseMechanism
from .output import BridgeOutput, merged_ledger
from .state import BridgeStore, LedgerEntry, StoredContribution, WindowInfo
from .status import BridgeCounters

__all__ = ["WindowCloser", "due_windows"]

log = logging.getLogger(__name__)


def due_windows(windows: Iterable[WindowInfo], *, config: BridgeConfig,
                now: float, lag: float | None = None) -> list[int]:
    """The starts of the open ``windows`` that may be published at ``now``: ended at least
    the publication lag (or ``lag``) ago, and settled (see
    :class:`~pear_mqtt.bridge.config.BridgeConfig`)."""
    lag = config.publication_lag_seconds if lag is None else lag
    due: list[int] = []
    for w in windows:
        due_at = w.start + config.window_seconds + lag
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
    """Closes one window at a time into ``store``, with messages built by ``output`` (and,
    for the consortium's members, by ``consortium``)."""

    def __init__(self, *, config: BridgeConfig, store: BridgeStore, output: BridgeOutput,
                 noise: NoiseMechanism | None, counters: BridgeCounters,
                 consortium: BridgeOutput | None = None) -> None:
        self._config = config
        self._store = store
        self._output = output
        self._consortium = consortium
        self._noise = noise
        self._counters = counters

    def due(self, now: float) -> list[tuple[int, bool]]:
        """``(start, for_consortium)`` of every close due at ``now``, in the order to make
        them: a window's consortium close before its public one."""
        store, cfg = self._store, self._config
        windows = store.open_windows()
        out: list[tuple[int, bool]] = []
        if self._consortium is not None:
            lag = cfg.consortium_output.publication_lag_seconds
            out += [(w, True) for w in due_windows(windows, config=cfg, now=now, lag=lag)
                    if not store.consortium_closed(w)]
        out += [(w, False) for w in due_windows(windows, config=cfg, now=now)]
        return out

    def close(self, start: int, now: float) -> None:
        """Aggregate the window starting at ``start`` and close it with its messages (its
        consortium items were released to the members if it was closed for them first)."""
        store = self._store
        earlier = store.consortium_closed(start)
        self._close(start, now, output=self._output, rows=store.contributions(start),
                    released=_from_consortium if earlier else None)

    def close_for_consortium(self, start: int, now: float) -> None:
        """Aggregate the consortium's items of the open window ``start`` for its members."""
        assert self._consortium is not None
        rows = [c for c in self._store.contributions(start) if _from_consortium(c)]
        self._close(start, now, output=self._consortium, rows=rows, released=None)

    def _close(self, start: int, now: float, *, output: BridgeOutput,
               rows: list[StoredContribution],
               released: Callable[[StoredContribution], bool] | None) -> None:
        cfg = self._config
        store, counters = self._store, self._counters
        period_start = cfg.dp.period_of(start)
        spent = store.spent(period_start) if period_start is not None else 0.0
        result = aggregate_window(start, rows, window_seconds=cfg.window_seconds,
                                  min_companies=cfg.min_companies,
                                  dominance_cap=cfg.dominance_cap, dp=cfg.dp,
                                  noise=self._noise, budget_spent=spent,
                                  released=released)
        for cell in result.cells:
            counters.suppressed.update(cell.suppressed)
        ledger_rows: list[LedgerEntry] = []
        charged = sum(1 for c in result.cells if c.epsilon > 0)
        if period_start is not None and charged:
            ledger_rows.append(LedgerEntry(period_start=period_start, epsilon=result.epsilon,
                                           delta=result.delta, cells=charged))
        ledger = merged_ledger(store.ledger(), ledger_rows)
        try:
            outgoing, receipts = output.build(result, now=now, ledger=ledger)
        except PrivacyError as exc:
            # Defence in depth: aggregate_window never yields such a cell; if it ever did,
            # nothing of this window is published and the error is loud.
            log.error("window %s not published (%s): %s", start, output.audience, exc)
            counters.drop("publisher_refused")
            outgoing, receipts = [], []
        published = sum(1 for c in result.cells if c.published)
        if output.audience == "consortium":
            store.close_for_consortium(start, now=now, outgoing=outgoing, receipts=receipts,
                                       ledger=ledger_rows)
            counters.consortium_cells_published += published
        else:
            store.close_window(start, now=now, outgoing=outgoing, receipts=receipts,
                               ledger=ledger_rows)
            counters.cells_published += published
        log.info("window %s closed for the %s: %d items, %d of %d cells published, "
                 "suppressed %s", datetime.fromtimestamp(start, UTC).isoformat(),
                 output.audience, len(rows), published, len(result.cells),
                 result.suppressed or "nothing")


def _from_consortium(item: StoredContribution) -> bool:
    return item.source == "consortium"
