"""What a node holds of every other node's history log: the leaf hashes it received in order,
the sender's latest signed head, and the repair of gaps by asking the sender for the missing
range. A sender whose signed history contradicts itself is reported with the evidence and
its later data refused. Protocol: docs/HISTORY.md."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ProofFailed
from ..history.head import parse_head, parse_log_ref
from ..history.merkle import MerkleTree, leaf_hash, verify_range
from ..security.envelope import EnvelopeCodec
from ..security.identity import Identity
from .answers import Record, misplaced, proof_hashes, read_answer, why_unproven
from .counters import Counters
from .pagesseen import PagesSeen
from .repair import Publish, RepairRequests
from .replica import Fork, Replica

__all__ = ["Fork", "LogView", "Replicas", "Reply"]

log = logging.getLogger(__name__)

_ROOTS_KEPT = 16  # signed heads (length -> root) a range proof may be checked against

# (sender, log id, index of the first record, [(topic, payload)]): entries a signed head just
# verified, in order, handed to an archive that keeps them.
Keep = Callable[[Identity, str, int, list[Record]], None]


@dataclass(frozen=True, slots=True)
class LogView:
    """What this node holds of one sender's log."""

    sender: str
    log_id: str
    held: int  # entries 0..held-1 received, in order
    verified: int  # ... of which a signed head's root confirmed this many
    head_length: int | None
    forked: bool
    # Entries [from, to) no holder had any more (retention): reported, verified around.
    lost: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """What a ``logrange`` answer brought: (topic, entry) records to receive and whose
    log they are; ``proven`` when a range proof tied them to a signed head of ``owner``
    (already in the tree: only their items are left to deliver)."""

    records: list[Record]
    owner: Identity | None = None
    log_id: str = ""
    first: int = 0
    proven: bool = False


class Replicas:
    """Per sender: the in-order leaf hashes, the latest head, gaps and their repair."""

    def __init__(self, *, counters: Counters, mode: str, network: str,
                 archive: tuple[str, str] | None = None, keep: Keep | None = None) -> None:
        self._counters = counters
        self._archive = archive  # (member, node) of the node that keeps every log
        self._requests = RepairRequests(counters=counters, mode=mode, network=network,
                                        archive=archive,
                                        hold=lambda: self.hold is not None and self.hold())
        self._keep = keep
        self._mode, self._network = mode, network
        self._replicas: dict[str, Replica] = {}
        self._pages = PagesSeen()
        self._codec: EnvelopeCodec | None = None
        self._me: Identity | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self.forks: list[Fork] = []
        # Told (sender, log id, verified length) whenever a signed head verifies more of a
        # sender's log: the market store admits logged items only then.
        self.on_verified: Callable[[Identity, str, int], None] | None = None
        # True while entries proven by repair wait for delivery beyond its bound (the
        # receiver's backlog): no new request goes out meanwhile.
        self.hold: Callable[[], bool] | None = None

    def attach(self, *, codec: EnvelopeCodec, reply_topic: str) -> None:
        self._codec, self._me = codec, codec.signer.identity
        self._requests.attach(codec=codec, reply_topic=reply_topic)

    def connected(self, publish: Publish | None) -> None:
        """Where requests go (None while disconnected); outstanding ones are asked again."""
        self._requests.publish = publish
        for rep in self._replicas.values():
            rep.asked = None
            if publish is not None:
                self._requests.ask(rep)

    def seed(self, owner: Identity, log_id: str, leaves: list[bytes]) -> None:
        """Start from entries verified before a restart (an archive's logs on disk)."""
        rep = self._replicas[owner.sender] = Replica(owner=owner, log_id=log_id,
                                                       tree=MerkleTree(leaves))
        rep.verified = len(leaves)

    def awaiting(self) -> bool:
        """Whether a repair request is outstanding."""
        return any(rep.asked is not None for rep in self._replicas.values())

    def views(self) -> list[LogView]:
        return [LogView(sender=k, log_id=r.log_id, held=r.tree.size, verified=r.verified,
                        head_length=None if r.head is None else r.head.length,
                        forked=r.fork is not None, lost=r.lost)
                for k, r in self._replicas.items()]

    async def wait(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Until ``predicate()`` holds, re-checked whenever a log view changes;
        :class:`TimeoutError` after ``timeout`` s."""
        async with asyncio.timeout(timeout):
            while not predicate():
                fut = asyncio.get_running_loop().create_future()
                self._waiters.append(fut)
                await fut

    def _changed(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def page_seen(self, signer: Identity, sequence: int, page: int, *, part: int = 0,
                  parts: int = 1) -> None:
        """Part ``part`` of a checkpoint page of ``signer`` arrived, in the version of
        envelope ``sequence``, which has ``parts`` parts."""
        self._pages.seen(signer.sender, sequence, page, part=part, parts=parts)
        self._changed()

    def missing_pages(self) -> dict[str, int]:
        """Per sender, the checkpoint pages its latest signed head names that have not
        arrived in that (or a newer) version, and 1 for a sender that keeps a log and whose
        pages came but whose head has not (it names how many there are): what sync() still
        waits for."""
        out: dict[str, int] = {}
        for sender in self._pages.senders():
            rep = self._replicas.get(sender)
            if rep is not None and rep.head is None and rep.fork is None:
                out[sender] = 1
        for sender, rep in self._replicas.items():
            if rep.head is None or rep.fork is not None:
                continue
            missing = self._pages.missing(sender, rep.head.pages)
            if missing:
                out[sender] = missing
        return out

    def seen(self) -> tuple[int, int]:
        """How many senders' signed heads and how many distinct pages have arrived (sync()
        is done once a round trip to the broker brings no more)."""
        return (sum(1 for rep in self._replicas.values() if rep.head is not None),
                self._pages.count())

    def refused(self, signer: Identity) -> bool:
        rep = self._replicas.get(signer.sender)
        if rep is None or rep.fork is None:
            return False
        self._changed()  # the caller counts the drop
        return True

    # -- what arrives -------------------------------------------------------------------------
    def observe(self, signer: Identity, log_ref: str, payload: bytes, topic: str = "") -> bool:
        """An envelope of ``signer`` carrying ``log_ref``, received on ``topic``; false if it
        must be dropped (the sender forked, or this payload contradicts what it signed
        before)."""
        try:
            return self._observe(signer, log_ref, payload, topic)
        finally:
            self._changed()

    def _observe(self, signer: Identity, log_ref: str, payload: bytes, topic: str) -> bool:
        try:
            log_id, index = parse_log_ref(log_ref)
        except ProofFailed:
            self._counters.dropped["malformed"] += 1
            return False
        rep = self._replica(signer, log_id)
        if rep.fork is not None:
            self._counters.dropped["forked_sender"] += 1
            return False
        if index < rep.tree.start:
            return True  # in a prefix lost everywhere: nothing left to check it against
        leaf = leaf_hash(payload)
        committed = 0 if rep.head is None else rep.head.length
        if index >= committed and (
                (index < rep.tree.size and rep.tree.leaf(index) != leaf)
                or rep.pending.get(index, leaf) != leaf):
            # Past the latest signed head nothing was promised: a sender that crashed before
            # making those entries durable reuses their places. Follow the new ones.
            rep.rewind(index)
        if index < rep.tree.size:
            if rep.tree.leaf(index) != leaf:
                # Evidence: the entry first seen there or, once verified (only its hash is
                # kept), the signed head whose root commits to that other entry.
                self._forked(rep, f"two different entries signed as {log_ref}",
                             rep.payloads.get(index) or rep.head_payload, payload)
                return False
            return True
        if index in rep.pending:
            if rep.pending[index] != leaf:
                self._forked(rep, f"two different entries signed as {log_ref}",
                             rep.payloads.get(index, b""), payload)
                return False
            return True
        rep.pending[index] = leaf
        if index not in rep.payloads:
            rep.payloads[index], rep.topics[index] = payload, topic
        self._advance(rep)
        if rep.pending:
            self._requests.ask(rep)
        return True

    def on_head(self, signer: Identity, body: Any, payload: bytes) -> None:
        """A signed ``loghead`` of ``signer``."""
        try:
            self._on_head(signer, body, payload)
        finally:
            self._changed()

    def _on_head(self, signer: Identity, body: Any, payload: bytes) -> None:
        try:
            head = parse_head(body)
        except ProofFailed:
            self._counters.dropped["malformed"] += 1
            return
        rep = self._replica(signer, head.log)
        if rep.fork is not None:
            return
        old = rep.head
        if old is not None and head.length < old.length:
            return  # an older head delivered late (retained, or re-sent): nothing new
        if old is not None and head.length == old.length and head.root != old.root:
            self._forked(rep, f"two heads of length {head.length} with different roots",
                         rep.head_payload, payload, kind="forked_head")
            return
        rep.head, rep.head_payload = head, payload
        rep.roots[head.length] = head.root
        if len(rep.roots) > _ROOTS_KEPT:
            del rep.roots[min(rep.roots)]
        self._check(rep)
        self._requests.ask(rep)

    def on_reply(self, signer: Identity, body: Any, blob: bytes | memoryview) -> Reply:
        """A ``logrange`` answer (of the sender, or of the archive for a sender it names)
        with the entries of its attachment ``blob``.
        Refused, and counted in ``log_refused`` by reason, when it is hostile: an answer
        about a log this node does not follow or from a node that may not answer for it
        (``unrequested``), records out of their places (``reordered_range``), a log said
        to be shorter than its signed head (``cut_range``), or records that a range proof
        does not tie to a signed head (``forged_entry``, ``cut_range``)."""
        if not isinstance(body, dict) or not isinstance(body.get("log"), str):
            self._counters.dropped["malformed"] += 1
            return Reply([])
        names = body.get("sender")
        archived = (self._archive is not None
                    and (signer.member, signer.node) == self._archive
                    and isinstance(names, str))
        if names is not None and not archived:
            # Only the network's archive answers for another node's log.
            return self._refuse("unrequested", signer, f"an answer for {names!r}'s log")
        # An archive's records are the senders' own signed envelopes: they verify like live
        # ones, so trusting it changes nothing but where they come from.
        rep = self._replicas.get(names if isinstance(names, str) else signer.sender)
        if rep is None:
            return self._refuse("unrequested", signer, "an answer for a log never asked for")
        if rep.log_id != body["log"]:
            # An answer about a log this node no longer follows (the sender started a new
            # one meanwhile): nothing to use, nothing hostile either.
            return Reply([])
        if rep.fork is not None:
            self._counters.dropped["forked_sender"] += 1
            return Reply([])
        # An answer to an earlier request (asked again after a reconnect) is as good as one to
        # the latest: every entry in it is verified like a live one.
        got = read_answer(body, blob)
        if got == "malformed":
            self._counters.dropped["malformed"] += 1
            return Reply([])
        if isinstance(got, str):
            # The envelope's signer vouched for other entries than these.
            return self._refuse(got, signer, "entries that are not the ones its signed "
                                "answer names")
        out, first, held_from = got.records, got.first, got.held_from
        if got.proof is None and (i := misplaced(out, rep.log_id, first)) is not None:
            # (A range proof places its entries itself; a misplaced one fails it.)
            return self._refuse("reordered_range", signer,
                                f"record {i} is not entry {first + i} of its log")
        length = got.length
        if (not archived and type(length) is int and rep.head is not None
                and length < rep.head.length):
            return self._refuse("cut_range", signer, f"a log of {length} entries, signed "
                                f"as {rep.head.length}")
        proven = False
        if out and got.proof is not None:
            size = got.size
            root = rep.roots.get(size) if type(size) is int else None
            hashes = proof_hashes(got.proof)
            if root is None or hashes is None or type(size) is not int or not verify_range(
                    leaves=got.leaves, start=first, size=size, proof=hashes, root=root):
                why = why_unproven(self._codec, rep.owner, rep.log_id, out, root, first)
                return self._refuse(why, signer, f"entries {first}..{first + len(out) - 1} "
                                    "do not match its signed head")
            if (got.truncated and first == held_from > rep.tree.size
                    and (archived or self._archive is None)):
                # No holder has what lies before: verify from here on, against the head.
                self._rebase(rep, first, hashes[:first.bit_count()], archived)
            self._take(rep, first, got.leaves, out)
            proven = True
            # Waiters on the views first: the delivery of these entries' items, which the
            # caller schedules next, can wait a turn of the event loop.
            self._changed()
        rep.answered, rep.more = True, got.more
        if not got.more:
            rep.asked = None
        if (got.truncated and not archived and self._archive is not None
                and held_from > rep.tree.size):
            rep.from_archive = True  # the sender's retention dropped them: the archive may not
        elif got.truncated and rep.broken_from is None and held_from > rep.tree.size:
            # Dropped by the sender's retention: say so once, with the range, never hang.
            lost = held_from - rep.tree.size
            rep.broken_from = rep.tree.size
            self._counters.log_unrepairable += lost
            log.warning("%s: entries %d..%d of its log are gone (retention%s); %d entries "
                        "cannot be repaired", rep.owner.sender, rep.tree.size, held_from - 1,
                        ", the archive's too" if archived else "", lost)
        if archived and not out and not got.truncated:
            rep.from_archive = False  # the archive holds no more of it: back to the sender
        return Reply(out, owner=rep.owner, log_id=rep.log_id, first=first, proven=proven)

    def _rebase(self, rep: Replica, start: int, frontier: list[bytes],
                archived: bool) -> None:
        """Entries before ``start`` are gone everywhere: count and report them once, and
        hold the log from ``start`` on, the subtrees left of it (from a verified range
        proof) standing in for them, so that what follows still verifies against heads."""
        lost_from = rep.tree.size
        rep.lost, rep.frontier = (lost_from, start), list(frontier)
        rep.tree = MerkleTree.from_frontier(start, frontier)
        rep.pending = {i: h for i, h in rep.pending.items() if i >= start}
        for i in [i for i in rep.payloads if i < start]:
            del rep.payloads[i]
            rep.topics.pop(i, None)
        if rep.broken_from is None:
            self._counters.log_unrepairable += start - lost_from
        rep.broken_from = None
        log.warning("%s: entries %d..%d of its log are gone (retention%s); %d entries cannot "
                    "be repaired, the rest is verified from entry %d on", rep.owner.sender,
                    lost_from, start - 1, ", the archive's too" if archived else "",
                    start - lost_from, start)

    def count_refused(self, reason: str) -> None:
        """Hostile log traffic refused for ``reason`` (``status().log_refused``)."""
        self._counters.log_refused[reason] += 1
        self._changed()

    def _refuse(self, reason: str, signer: Identity, what: str) -> Reply:
        self.count_refused(reason)
        log.warning("refused a log answer of %s (%s): %s", signer.sender, reason, what)
        return Reply([])

    def _take(self, rep: Replica, first: int, leaves: list[bytes],
              records: list[Record]) -> None:
        """Entries a range proof tied to a signed head: into the held prefix at once."""
        if first == rep.tree.size and (not rep.pending or not any(
                first + i in rep.pending for i in range(len(leaves)))):
            rep.tree.extend(leaves)  # the common case: the range extends what is held
            rep.progress_at = time.monotonic()
            if first == rep.verified:
                # Everything before was verified and the proof ties these to a signed
                # root: verified as they come, so a long repair holds only leaf hashes and
                # the market store admits their items as they arrive.
                if self._keep is not None:
                    self._keep(rep.owner, rep.log_id, first, records)
                rep.verified = rep.tree.size
                if self.on_verified is not None:
                    self.on_verified(rep.owner, rep.log_id, rep.verified)
            else:
                for i, (topic, payload) in enumerate(records):
                    rep.payloads[first + i], rep.topics[first + i] = bytes(payload), topic
            self._advance(rep)
            return
        for i, leaf in enumerate(leaves):
            index = first + i
            if index < rep.tree.start:
                continue  # lost everywhere before: proven all the same, nothing to hold
            held = (rep.tree.leaf(index) if index < rep.tree.size
                    else rep.pending.get(index))
            if held is not None:
                if held != leaf:
                    self._forked(rep, f"two different entries signed at {index}",
                                 rep.payloads.get(index) or rep.head_payload,
                                 bytes(records[i][1]))
                    return
                continue
            rep.pending[index] = leaf
            rep.payloads[index], rep.topics[index] = bytes(records[i][1]), records[i][0]
        self._advance(rep)

    def repaired(self, count: int) -> None:
        self._counters.log_repaired += count
        self._changed()
        for rep in self._replicas.values():
            answered, rep.answered = rep.answered, False
            if answered and rep.more:
                # The rest of the answer is on its way: no new request; a silence from here
                # counts from now.
                if rep.asked is not None:
                    rep.asked = (rep.tree.size, rep.asked[1], time.monotonic())
                continue
            if answered and (rep.pending or (rep.head is not None
                                             and rep.tree.size < rep.head.length)):
                # An answer came: ask for the next range at once (the grace is for gaps
                # that may still fill by themselves, not for a repair under way).
                if rep.timer is not None:
                    rep.timer.cancel()
                    rep.timer = None
                self._requests.ask(rep, at_once=True)
            elif rep.pending or (rep.head is not None and rep.tree.size < rep.head.length):
                self._requests.ask(rep)

    # -- internals ----------------------------------------------------------------------------
    def _replica(self, signer: Identity, log_id: str) -> Replica:
        rep = self._replicas.get(signer.sender)
        if rep is None or (rep.log_id != log_id and rep.fork is None):
            if rep is not None:
                log.info("%s started a new history log (%s, was %s)", signer.sender, log_id,
                         rep.log_id)
            rep = self._replicas[signer.sender] = Replica(owner=signer, log_id=log_id)
        return rep

    def _advance(self, rep: Replica) -> None:
        size = rep.tree.size
        while rep.tree.size in rep.pending:
            rep.tree.append(rep.pending.pop(rep.tree.size))
        if rep.tree.size > size:
            rep.progress_at = time.monotonic()
        self._check(rep)

    def _check(self, rep: Replica) -> None:
        head = rep.head
        if head is None or rep.broken_from is not None or rep.tree.size < head.length:
            return
        checked = rep.checked
        if checked is not None and checked[0] is head and checked[1] is rep.tree:
            return  # every envelope after a head calls this; the root is its cost
        if rep.tree.root(head.length) != head.root:
            self._forked(rep, f"the entries held do not hash to its signed head of length "
                              f"{head.length}", rep.head_payload,
                         rep.payloads.get(head.length - 1, b""), kind="forked_head")
            return
        rep.checked = (head, rep.tree)
        kept_from = max(rep.verified, rep.tree.start)
        if self._keep is not None and head.length > kept_from:
            self._keep(rep.owner, rep.log_id, kept_from,
                       [(rep.topics.get(i, ""), rep.payloads[i])
                        for i in range(kept_from, head.length)])
        grew = head.length > rep.verified
        rep.verified = max(rep.verified, head.length)
        if grew and self.on_verified is not None:
            self.on_verified(rep.owner, rep.log_id, rep.verified)
        # Verified: only the leaf hashes are needed from here on.
        for i in [i for i in rep.payloads if i < rep.verified]:
            del rep.payloads[i]
            rep.topics.pop(i, None)

    def _forked(self, rep: Replica, reason: str, first: bytes, second: bytes, *,
                kind: str = "forked_entry") -> None:
        rep.fork = Fork(sender=rep.owner.sender, reason=reason, first=first, second=second)
        self.forks.append(rep.fork)
        self._counters.log_forks += 1
        self._counters.log_refused[kind] += 1  # the caller's on_head/observe notifies
        log.error("%s rewrote its history (%s): its later data is refused", rep.owner.sender,
                  reason)
