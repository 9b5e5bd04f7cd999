"""Unit tests of :class:`pear_mqtt.node.checkpoints.CheckpointPages` with pages in parts, over
an in-memory connection whose PUBACKs the test gives: a state's outbox row is acknowledged
only once the part carrying it is, and a page that needs fewer parts clears the rest."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pear_mqtt.model.topics import CHECKPOINT_PAGES, TopicScheme, checkpoint_slot, parse_topic
from pear_mqtt.node.checkpoints import CheckpointPages
from pear_mqtt.node.counters import Counters
from pear_mqtt.node.history import NodeLog
from pear_mqtt.node.markers import Markers
from pear_mqtt.node.window import Window
from pear_mqtt.security import pki as pkimod
from pear_mqtt.security.envelope import EnvelopeCodec
from pear_mqtt.security.signing import Signer
from pear_mqtt.security.trust import TrustStore

pytestmark = pytest.mark.unit

PAGE = 0x33
SCHEME = TopicScheme("consortium", "grp", "acme")


class FakeConnection:
    """Records each publish; the test resolves its future (the broker's PUBACK)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, asyncio.Future[None]]] = []

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                **_: Any) -> asyncio.Future[None]:
        assert qos == 1 and retain
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sent.append((topic, payload, fut))
        return fut


@pytest.fixture
def make_codec(tmp_path: Path) -> Callable[[int], EnvelopeCodec]:
    pkimod.create_ca(directory=tmp_path / "ca", network="grp")
    node = pkimod.issue(ca_dir=tmp_path / "ca", out_dir=tmp_path / "out", role="node",
                        member="acme", node="store-1")

    def make(max_bytes: int) -> EnvelopeCodec:
        return EnvelopeCodec(signer=Signer.from_files(key_file=node.key, cert_file=node.cert),
                             trust=TrustStore.from_files(
                                 ca_files=[tmp_path / "ca" / pkimod.CA_CERT], network="grp"),
                             max_bytes=max_bytes)
    return make


def _topics(n: int) -> list[str]:
    """``n`` state topics of store-1 on page :data:`PAGE`."""
    out: list[str] = []
    i = 0
    while len(out) < n:
        topic = SCHEME.state("store-1", f"u/c{i}")
        if zlib.crc32(topic.encode()) % CHECKPOINT_PAGES == PAGE:
            out.append(topic)
        i += 1
    return out


class Hooks:
    """The outbox rows the pages acknowledge, and a signal on each acknowledgement or
    ``settled`` call (what the pages do once a PUBACK's callback ran)."""

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.called = asyncio.Event()

    def ack(self, rows: list[int]) -> None:
        self.acked.extend(rows)
        self.called.set()

    def settled(self) -> None:
        self.called.set()

    async def until(self, done: Callable[[], bool]) -> None:
        while not done():
            self.called.clear()
            await asyncio.wait_for(self.called.wait(), 5)


def _pages(hooks: Hooks, max_waiting: int | None = None) -> CheckpointPages:
    return CheckpointPages(node_id="store-1", counters=Counters(), seeded=True,
                           wake=lambda: None, wake_later=lambda _d: None,
                           settled=hooks.settled, ack=hooks.ack, state_topics=False,
                           max_waiting=max_waiting)


async def test_rows_are_acknowledged_with_the_part_carrying_them_and_parts_shrink(
        make_codec: Callable[[int], EnvelopeCodec]) -> None:
    hooks = Hooks()
    acked = hooks.acked
    pages = _pages(hooks)
    codec = make_codec(4096)
    pages.attach(codec=codec, topics=SCHEME, markers=Markers())
    topics = _topics(40)
    row_of = {}
    for row, topic in enumerate(topics, start=100):
        pages.keep_state(topic, b'{"iid":"i%d","insight":"%s"}' % (row, b"x" * 200), row=row)
        row_of[topic.rsplit("/", 1)[-1]] = row
    conn, window = FakeConnection(), Window(count=1000, nbytes=1 << 30)
    pages.forced = True
    assert await pages.send(conn, window, burst_end=True, limit=10)  # type: ignore[arg-type]
    parts = [parse_topic(topic) for topic, _p, _f in conn.sent]
    assert [(p.page, p.part) for p in parts] == [(PAGE, i) for i in range(len(parts))]
    assert len(parts) >= 3 and not acked and not pages.settled
    assert set(pages.logged) == {checkpoint_slot(PAGE, i) for i in range(len(parts))}
    # Each PUBACK releases the rows of the states in that part, and only those.
    for _topic, payload, fut in reversed(conn.sent):
        body = codec.decode(payload, check_replay=False).message.body
        carried = {row_of[category.rsplit("/", 1)[-1]] for category in body["states"]}
        before = len(acked)
        fut.set_result(None)
        await hooks.until(lambda: len(acked) >= before + len(carried))  # noqa: B023
        assert set(acked[-len(carried):]) == carried
    assert sorted(acked) == sorted(row_of.values()) and pages.settled

    # Next connection, a larger limit: the page fits one message again; the parts past it
    # are cleared with an empty retained message and no longer named for the head.
    pages.attach(codec=make_codec(64 * 1024), topics=SCHEME, markers=Markers())
    pages.keep_state(topics[0], b'{"iid":"i0","insight":"y"}', row=999)
    conn2 = FakeConnection()
    assert await pages.send(conn2, window, burst_end=True, limit=10)
    sent = [(parse_topic(t).part, len(p)) for t, p, _f in conn2.sent]
    assert sent[0][0] == 0 and sent[0][1] > 0
    assert sent[1:] == [(i, 0) for i in range(1, len(parts))]
    assert set(pages.logged) == {checkpoint_slot(PAGE, 0)}
    for _t, _p, fut in conn2.sent:
        fut.set_result(None)
    await hooks.until(lambda: pages.settled)
    assert 999 in acked and pages.settled


async def test_an_update_re_signs_only_its_part_and_the_fullest_part_relieves_the_outbox(
        make_codec: Callable[[int], EnvelopeCodec]) -> None:
    hooks = Hooks()
    acked = hooks.acked
    pages = _pages(hooks, max_waiting=1)  # 256 bytes of rows may wait in all
    codec = make_codec(4096)
    pages.attach(codec=codec, topics=SCHEME, markers=Markers())
    topics = _topics(40)
    for row, topic in enumerate(topics):
        pages.keep_state(topic, b'{"iid":"i%d","insight":"%s"}' % (row, b"x" * 200))
    conn, window = FakeConnection(), Window(count=1000, nbytes=1 << 30)
    pages.forced = True
    assert await pages.send(conn, window, burst_end=True, limit=100)  # type: ignore[arg-type]
    first = {parse_topic(t).part: codec.decode(p, check_replay=False).message.body["states"]
             for t, p, _f in conn.sent}
    assert len(first) >= 3
    for _t, _p, fut in conn.sent:
        fut.set_result(None)
    await hooks.until(lambda: pages.settled)

    # One state updated in place: only its part goes, with the same states.
    category = SCHEME.category_of_state("store-1", topics[5])
    part = next(i for i, states in first.items() if category in states)
    pages.keep_state(topics[5], b'{"iid":"j5","insight":"%s"}' % (b"z" * 200), row=500)
    conn2 = FakeConnection()
    assert await pages.send(conn2, window, burst_end=True, limit=100)  # type: ignore[arg-type]
    ((topic, payload, fut),) = conn2.sent
    assert parse_topic(topic).part == part
    assert set(codec.decode(payload, check_replay=False).message.body["states"]) == set(
        first[part])
    fut.set_result(None)
    await hooks.until(lambda: bool(acked))
    assert acked == [500]

    # Mid-stream, rows over the bound in all: the part keeping the most goes, not the page.
    pages.forced = False
    last = max(first)
    for row, topic in enumerate(topics[:3], start=600):
        pages.keep_state(topic, b'{"iid":"k%d","insight":"%s"}' % (row, b"w" * 200), row=row)
    conn3 = FakeConnection()
    assert await pages.send(conn3, window, burst_end=False, limit=100)  # type: ignore[arg-type]
    assert [parse_topic(t).part for t, _p, _f in conn3.sent] == [0] and last > 0


async def test_a_head_over_one_message_is_counted_not_raised(tmp_path: Path,
        make_codec: Callable[[int], EnvelopeCodec]) -> None:
    counters = Counters()
    history = NodeLog(path=tmp_path / "log", retention=None, node_id="store-1",
                      counters=counters)
    history.attach(codec=make_codec(4096), topics=SCHEME)
    conn = FakeConnection()
    slots = {checkpoint_slot(i % CHECKPOINT_PAGES, i // CHECKPOINT_PAGES): 1_733_243_231_000_812
             for i in range(1000)}
    await history.publish_head(conn, pages=slots, slots=1)  # type: ignore[arg-type]
    await history.publish_head(conn, pages=slots, slots=2)  # type: ignore[arg-type]
    assert not conn.sent and counters.dropped["head_oversized"] == 2
    assert history.head_wait(forced=True, slots=2) is None
    await history.publish_head(conn, pages={checkpoint_slot(0, 0): 1}, slots=3)  # type: ignore[arg-type]
    assert len(conn.sent) == 1
    history.close()
