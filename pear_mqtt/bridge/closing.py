"""Closing windows: which open windows are due, and closing one — aggregate it, build its
signed messages, and hand them to the store's outbox in the transaction that closes the
window and spends its budget (so a restart re-sends the same bytes, never fresh noise).
With the consortium output on, each window is first closed for the consortium (after the
consortium lag: its items are fixed from then on), and later for the public."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime

from ..errors import PrivacyError
from .aggregation import aggregate_window
from .config import BridgeConfig, DPConfig
from .noise import NoiseMechanism
from .output import PublicOutput, merged_ledger
from .state import BridgeStore, LedgerEntry, WindowInfo
from .status import BridgeCounters

__all__ = ["WindowCloser", "due_windows"]

log = logging.getLogger(__name__)

_NO_NOISE = DPConfig()


def due_windows(windows: Iterable[WindowInfo], *, config: BridgeConfig,
                now: float, lag: int | None = None) -> list[int]:
    """The starts of the open ``windows`` that may be published at ``now``: ended at least
    ``lag`` (default: the publication lag) ago, and settled (see
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
    """Closes one window at a time into ``store``, with messages built by ``output``."""

    def __init__(self, *, config: BridgeConfig, store: BridgeStore, output: PublicOutput,
                 noise: NoiseMechanism | None, counters: BridgeCounters,
                 consortium: PublicOutput | None = None) -> None:
        self._config = config
        self._store = store
        self._output = output
        self._consortium = consortium
        self._noise = noise
        self._counters = counters

    def consortium_due(self, windows: Iterable[WindowInfo], now: float) -> list[int]:
        """The open windows not yet closed for the consortium whose consortium lag passed."""
        if self._consortium is None:
            return []
        store = self._store
        return due_windows([w for w in windows if not store.frozen(w.start)],
                           config=self._config, now=now,
                           lag=self._config.consortium_lag_seconds)

    def close_consortium(self, start: int, now: float) -> None:
        """Aggregate the window starting at ``start`` for the consortium and fix its items.

        No noise and no budget: without noise the public later gets the same statistics
        over the same items; with noise on, the consortium gets only what carries none (the
        price histograms, which the public gets exactly too), so the ledger is charged once,
        by the public close.

        Only cells made of the consortium's own items: a private source and a public
        participant agreed to the public lag, not to the members' shorter one, so a cell
        holding any of their items goes to the public alone (``other_sources``).
        """
        assert self._consortium is not None
        cfg = self._config
        rows = self._store.contributions(start)
        mixed = {(r.category, r.region) for r in rows if r.source != "consortium"}
        if mixed:
            self._counters.suppressed["other_sources"] += len(mixed)
            rows = [r for r in rows if (r.category, r.region) not in mixed]
        result = aggregate_window(start, rows, window_seconds=cfg.window_seconds,
                                  min_companies=cfg.min_companies,
                                  dominance_cap=cfg.dominance_cap, dp=_NO_NOISE,
                                  statistics=not cfg.dp.enabled)
        for cell in result.cells:
            self._counters.suppressed.update(cell.suppressed)
        try:
            outgoing, receipts = self._consortium.build(result, now=now)
        except PrivacyError as exc:
            log.error("window %s not published to the consortium: %s", start, exc)
            self._counters.drop("publisher_refused")
            outgoing, receipts = [], []
        self._store.close_consortium(start, now=now, outgoing=outgoing, receipts=receipts)
        log.info("window %s closed for the consortium: %d items, %d of %d cells published",
                 datetime.fromtimestamp(start, UTC).isoformat(), len(rows),
                 sum(1 for c in result.cells if c.published), len(result.cells))

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
                                  noise=self._noise, budget_spent=spent)
        for cell in result.cells:
            counters.suppressed.update(cell.suppressed)
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
