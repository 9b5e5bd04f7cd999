"""What a node hands its application: received insights and aggregates, peers, sync results."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from ..model.aggregates import AggregateBody
from ..privacy.filter import SharedInsight

__all__ = ["Peer", "ReceivedAggregate", "ReceivedInsight", "SyncResult"]


@dataclass(frozen=True, slots=True)
class ReceivedInsight:
    """A verified insight as another node shared it."""

    item_id: str
    topic: str
    member: str  # the company as the topic and the signer's certificate name it
    node: str  # the signing node
    insight: SharedInsight
    retained: bool
    received_at: float
    sealed: str | None = None  # aggregated groups, sealed to the aggregator
    sequence: int = 0  # the envelope's: a newer version of an item has a higher one
    log_ref: str | None = None  # "<log id>:<index>" in the sender's history log


@dataclass(frozen=True, slots=True)
class ReceivedAggregate:
    """A public aggregate as the bridge signed it (see docs/BRIDGE.md for the fields)."""

    topic: str
    aggregate: AggregateBody
    retained: bool
    received_at: float


@dataclass(frozen=True, slots=True)
class Peer:
    """A node seen through its retained presence."""

    member: str
    node: str
    online: bool
    since: float
    session: str = ""  # one per connection: its will and its announcement share it


@dataclass(frozen=True, slots=True)
class SyncResult:
    """The retained state a ``sync()`` collected: one latest insight per (node, category)."""

    states: dict[str, ReceivedInsight]
    duration: float
    # Public and consortium modes: the bridge's retained aggregates, one per category.
    aggregates: dict[str, ReceivedAggregate] = field(default_factory=dict)
    # Per sender, checkpoint pages its latest signed head names that did not arrive (their
    # states are missing from this snapshot); empty when the snapshot is complete.
    missing_pages: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ReceivedInsight]:
        return iter(self.states.values())
