"""The tallies a node's collaborators share, read out by ``PearNetwork.status()``."""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from ..errors import EnvelopeError
from ..model.insight import Histogram
from ..security.envelope import Decoded, EnvelopeCodec

__all__ = ["Counters", "Tally", "open_counted"]

# Seconds: from a loopback millisecond to a minute-long outage (Prometheus-style buckets).
SECONDS_BOUNDS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                         2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(slots=True)
class Tally:
    """A histogram filled in place; :meth:`snapshot` gives the frozen :class:`Histogram`."""

    bounds: tuple[float, ...] = SECONDS_BOUNDS
    counts: list[int] = field(default_factory=lambda: [0] * (len(SECONDS_BOUNDS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        value = max(0.0, value)  # a sender's clock a little ahead of ours
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def snapshot(self) -> Histogram:
        return Histogram(bounds=self.bounds, counts=tuple(self.counts), total=self.total)


@dataclass(slots=True)
class Counters:
    """Messages and insights in and out, and what was dropped, by reason."""

    messages_in: int = 0
    messages_out: int = 0
    insights_in: int = 0
    insights_out: int = 0
    insights_acked: int = 0  # of insights_out, acknowledged by the broker
    duplicates: int = 0
    reconnects: int = 0
    states_from_checkpoints: int = 0
    # Verified history (node/history.py, node/replicas.py).
    log_gaps: int = 0  # gaps seen in senders' logs (an index jump, or a head past what we hold)
    log_repaired: int = 0  # entries fetched to fill them
    log_unrepairable: int = 0  # entries no holder could supply (dropped by retention)
    log_forks: int = 0  # senders whose signed history contradicted itself
    log_requests_answered: int = 0
    log_refused: Counter[str] = field(default_factory=Counter)  # hostile log traffic, by reason
    dropped: Counter[str] = field(default_factory=Counter)
    delivery_latency: Tally = field(default_factory=Tally)
    sync_duration: Tally = field(default_factory=Tally)


def open_counted(codec: EnvelopeCodec | None, payload: bytes,
                 counters: Counters) -> Decoded | None:
    """Verify a retained or control message (no replay check: it may come again); None,
    with the drop counted by its reason, when it does not verify."""
    assert codec is not None
    try:
        return codec.decode(payload, check_replay=False)
    except EnvelopeError as exc:
        counters.dropped[exc.reason] += 1
        return None
