"""A node's view of another node's log (node/replicas.py): signed heads checked against the
entries held, including after a head that already verified."""

from __future__ import annotations

import time

import pytest

from pear_mqtt.history.head import TreeHead, head_body
from pear_mqtt.history.merkle import MerkleTree, leaf_hash
from pear_mqtt.node.counters import Counters
from pear_mqtt.node.replicas import Replicas
from pear_mqtt.security.identity import Identity

SENDER = Identity(network="net", member="acme", node="store-1")
LOG = "log0"


@pytest.fixture
def replicas() -> Replicas:
    return Replicas(counters=Counters(), mode="consortium", network="net")


def _entries(n: int, salt: bytes = b"") -> list[bytes]:
    return [b"envelope %d %s" % (i, salt) for i in range(n)]


def _head(entries: list[bytes], length: int, *, root: bytes | None = None) -> dict[str, object]:
    tree = MerkleTree([leaf_hash(e) for e in entries[:length]])
    return head_body(TreeHead(log=LOG, length=length, root=root or tree.root(),
                              time=time.time()))


def _observe(replicas: Replicas, entries: list[bytes], first: int, end: int) -> None:
    for i in range(first, end):
        assert replicas.observe(SENDER, f"{LOG}:{i}", entries[i])


def test_entries_after_a_verified_head_keep_it_verified(replicas: Replicas) -> None:
    entries = _entries(40)
    _observe(replicas, entries, 0, 10)
    replicas.on_head(SENDER, _head(entries, 10), b"head 10")
    _observe(replicas, entries, 10, 30)  # each one checks the held log against the head
    [view] = replicas.views()
    assert (view.held, view.verified, view.head_length, view.forked) == (30, 10, 10, False)
    replicas.on_head(SENDER, _head(entries, 30), b"head 30")
    [view] = replicas.views()
    assert view.verified == 30 and not replicas.forks


def test_a_later_head_that_contradicts_the_entries_is_a_fork(replicas: Replicas) -> None:
    entries = _entries(30)
    _observe(replicas, entries, 0, 10)
    replicas.on_head(SENDER, _head(entries, 10), b"head 10")
    _observe(replicas, entries, 10, 20)
    # The sender signs a head over 20 entries whose root is not that of what it sent.
    forged = _head(_entries(30, b"other"), 20)
    replicas.on_head(SENDER, forged, b"head 20")
    [view] = replicas.views()
    assert view.forked and view.verified == 10
    assert [f.sender for f in replicas.forks] == [SENDER.sender]
    assert "signed head of length 20" in replicas.forks[0].reason


def test_a_head_ahead_of_the_entries_is_checked_when_they_arrive(replicas: Replicas) -> None:
    entries = _entries(20)
    replicas.on_head(SENDER, _head(_entries(20, b"other"), 15), b"head 15")
    _observe(replicas, entries, 0, 14)
    assert not replicas.forks  # not all of it held yet: nothing to compare
    replicas.observe(SENDER, f"{LOG}:14", entries[14])
    assert len(replicas.forks) == 1 and replicas.views()[0].forked
