"""One sender's log as this node holds it (:class:`Replica`), and the evidence of a sender
that rewrote its history (:class:`Fork`). The state :mod:`.replicas` and :mod:`.repair` share."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from ..history.head import TreeHead
from ..history.merkle import MerkleTree
from ..security.identity import Identity

__all__ = ["Fork", "Replica"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Fork:
    """Evidence that a sender rewrote its history: two signed payloads (envelopes or heads)
    that cannot both be true, and what they disagree about."""

    sender: str
    reason: str
    first: bytes
    second: bytes


@dataclass(slots=True)
class Replica:
    """What this node holds of one sender's log, and where its repair stands."""

    owner: Identity
    log_id: str
    tree: MerkleTree = field(default_factory=MerkleTree)
    payloads: dict[int, bytes] = field(default_factory=dict)  # index -> the first one seen
    topics: dict[int, str] = field(default_factory=dict)  # ... and its topic
    pending: dict[int, bytes] = field(default_factory=dict)  # leaf hashes past tree.size
    head: TreeHead | None = None
    head_payload: bytes = b""
    verified: int = 0
    asked: tuple[int, int, float] | None = None  # (from, to, when)
    request_id: str = ""
    broken_from: int | None = None  # entries before the sender's retention start: lost
    lost: tuple[int, int] | None = None  # [from, to): dropped everywhere, verified past them
    frontier: list[bytes] = field(default_factory=list)  # ... the subtrees that stand in
    fork: Fork | None = None
    progress_at: float = field(default_factory=time.monotonic)  # when the prefix last grew
    timer: asyncio.TimerHandle | None = None
    from_archive: bool = False  # ask the network's archive (the sender did not answer)
    answered: bool = False  # an answer just came: the next range is asked for at once
    more: bool = False  # ... and it said more answers to the same request follow
    roots: dict[int, bytes] = field(default_factory=dict)  # signed heads' roots by length
    # The head and tree last found to agree: the tree only grows past the head (or is
    # replaced), so while both are these the agreement stands and is not computed again.
    checked: tuple[TreeHead, MerkleTree] | None = None

    def rewind(self, index: int) -> None:
        """Forget what is held from ``index`` on (entries no signed head covered)."""
        log.info("%s replaced its uncommitted log entries from %d on (a restart)",
                 self.owner.sender, index)
        if index < self.tree.size:
            start = self.tree.start
            tree = MerkleTree.from_frontier(start, self.frontier) if start else MerkleTree()
            tree.extend([self.tree.leaf(i) for i in range(start, index)])
            self.tree = tree
        self.pending = {i: h for i, h in self.pending.items() if i < index}
        for i in [i for i in self.payloads if i >= index]:
            del self.payloads[i]
            self.topics.pop(i, None)
        self.asked = None
