"""The tallies a node's collaborators share, read out by ``PearNetwork.status()``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..errors import EnvelopeError
from ..security.envelope import Decoded, EnvelopeCodec

__all__ = ["Counters", "open_counted"]


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
    dropped: Counter[str] = field(default_factory=Counter)


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
