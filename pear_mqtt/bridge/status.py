"""What the bridge reports about itself (metrics for its operator, never published): the
counters its tasks keep, and the :class:`BridgeStatus` snapshot built from them."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from ..model.insight import Health
from .state import AddResult

__all__ = ["BridgeCounters", "BridgeStatus"]


class BridgeStatus(BaseModel):
    """A snapshot of the bridge's connections and counters (metrics, never published)."""

    model_config = ConfigDict(frozen=True)

    health: Health
    connected: bool
    public_connected: bool
    sources: dict[str, bool]
    policy_version: str
    items_received: int = 0
    items_counted: int = 0
    duplicates: int = 0
    replaced: int = 0  # counted items a later copy of the same observation replaced
    ignored: int = 0
    dropped: dict[str, int] = Field(default_factory=dict)
    suppressed: dict[str, int] = Field(default_factory=dict)
    windows_open: int = 0
    windows_published: int = 0
    open_items: int = 0
    cells_published: int = 0
    messages_published: int = 0
    outbox_depth: int = 0
    consortium_outbox_depth: int = 0  # the consortium's own aggregates not yet acknowledged
    consortium_connected: bool | None = None  # None: consortium_output is off
    epsilon_spent: dict[str, float] = Field(default_factory=dict)
    ticks: int = 0
    items_per_second: float | None = None
    started_at: datetime | None = None
    last_publish: datetime | None = None
    error: str | None = None  # why the bridge stopped counting (its state failed)
    # Scale-out (docs/BRIDGE.md): this process's role, the messages a worker left to other
    # instances, and per window (ISO start) the instances whose partial the merger awaits.
    role: str = "single"
    other_instances: int = 0
    partials_missing: dict[str, list[int]] = Field(default_factory=dict)
    # The bridge's history log (docs/HISTORY.md, "The bridge's log"): its id and entries
    # (None: it keeps none), the consortium's log's entries (consortium_output), and the
    # repair requests both answered.
    log_id: str | None = None
    log_length: int | None = None
    consortium_log_length: int | None = None
    log_requests_answered: int = 0


@dataclass(slots=True)
class BridgeCounters:
    """What the bridge's tasks counted since it was created.

    ``suppressed`` counts withheld statistics and histograms per reason (``below_k``,
    ``dominance``, ``unbounded``, ``budget``, ...), over both outputs.
    """

    items_received: int = 0
    items_counted: int = 0
    duplicates: int = 0
    replaced: int = 0
    ignored: int = 0
    other_instances: int = 0
    ticks: int = 0
    cells_published: int = 0
    messages_published: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    suppressed: Counter[str] = field(default_factory=Counter)
    first_count: float | None = None  # time.monotonic() of the first and latest counted item
    last_count: float | None = None
    last_publish: datetime | None = None

    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` items (or messages) dropped for ``reason``."""
        self.dropped[reason] += n

    def add(self, result: AddResult) -> None:
        """Count what the store did with a batch."""
        self.items_counted += result.counted
        self.duplicates += result.duplicates
        self.replaced += result.replaced
        if result.copied:
            self.drop("copied_token", result.copied)
        if result.counted:
            mono = time.monotonic()
            self.first_count = self.first_count or mono
            self.last_count = mono

    def items_per_second(self) -> float | None:
        """Items counted per second between the first and the latest counted item."""
        if self.first_count is None or self.last_count is None \
                or self.last_count <= self.first_count:
            return None
        return round(self.items_counted / (self.last_count - self.first_count), 1)

    def all_suppressed(self) -> dict[str, int]:
        """Suppressed statistics per reason."""
        return dict(self.suppressed)
