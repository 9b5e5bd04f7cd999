"""Unit tests of :class:`pear_mqtt.node.pageparts.PageCutter`: a checkpoint page signed as one
envelope while it fits ``max_message_bytes`` (the body as before parts existed), else in
parts that each fit and together carry every state once (docs/DESIGN.md, Sync and presence).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from brokers import GROUP_KEY

from pear_mqtt.config.models import EncryptionConfig
from pear_mqtt.node.pageparts import PageCutter, PageLayout
from pear_mqtt.security import pki as pkimod
from pear_mqtt.security.envelope import EnvelopeCodec
from pear_mqtt.security.signing import Signer
from pear_mqtt.security.trust import TrustStore

pytestmark = pytest.mark.unit


@pytest.fixture(params=[False, True], ids=["signed", "encrypted"])
def make_codec(request: pytest.FixtureRequest, tmp_path: Path
               ) -> Callable[[int], EnvelopeCodec]:
    pkimod.create_ca(directory=tmp_path / "ca", network="grp")
    node = pkimod.issue(ca_dir=tmp_path / "ca", out_dir=tmp_path / "out", role="node",
                        member="acme", node="store-1")
    encryption = (EncryptionConfig(keys={"k1": GROUP_KEY}, active="k1") if request.param
                  else None)

    def make(max_bytes: int) -> EnvelopeCodec:
        return EnvelopeCodec(signer=Signer.from_files(key_file=node.key, cert_file=node.cert),
                             trust=TrustStore.from_files(
                                 ca_files=[tmp_path / "ca" / pkimod.CA_CERT], network="grp"),
                             encryption=encryption, max_bytes=max_bytes)
    return make


def _entries(n: int, size: int = 300) -> dict[str, bytes]:
    """``n`` page entries (``"<category>":<item JSON>``) of about ``size`` bytes each."""
    return {f"t/c{i}": b'"c%d":{"iid":"i%d","insight":"%s"}' % (i, i, b"x" * size)
            for i in range(n)}


def test_a_page_that_fits_is_one_envelope_with_the_body_as_before(
        make_codec: Callable[[int], EnvelopeCodec]) -> None:
    codec = make_codec(64 * 1024)
    cutter = PageCutter(node_id="store-1")
    cutter.attach(codec)
    entries = _entries(20)
    cut = cutter.cut(7, entries)
    assert len(cut.parts) == 1 and not cut.oversized
    (part,) = cut.parts
    assert part.part == 0 and part.topics is None and part.sequence == codec.last_sequence
    body = codec.decode(part.payload, check_replay=False).message.body
    assert set(body) == {"node", "page", "states"}  # no part fields: the wire is unchanged
    assert body["page"] == 7 and len(body["states"]) == 20


@pytest.mark.parametrize("max_bytes", [4096, 16 * 1024, 64 * 1024])
def test_a_page_over_one_message_goes_in_parts_that_each_fit(
        make_codec: Callable[[int], EnvelopeCodec], max_bytes: int) -> None:
    codec = make_codec(max_bytes)
    cutter = PageCutter(node_id="store-1")
    cutter.attach(codec)
    entries = _entries(2000)  # ~700 kB
    cut = cutter.cut(0x2a, entries)
    assert not cut.oversized and len(cut.parts) > 1
    seen: dict[str, int] = {}
    sequences = []
    for i, part in enumerate(cut.parts):
        assert part.part == i and len(part.payload) <= max_bytes
        message = codec.decode(part.payload, check_replay=False).message
        sequences.append(message.sequence)
        assert message.sequence == part.sequence
        body = message.body
        assert (body["page"], body["part"], body["parts"]) == (0x2a, i, len(cut.parts))
        assert part.topics is not None and len(part.topics) == len(body["states"])
        for category in body["states"]:
            seen[category] = seen.get(category, 0) + 1
    assert sequences == sorted(sequences)
    assert seen == {f"c{i}": 1 for i in range(2000)}  # every state in exactly one part
    # Not wasteful: the parts are filled (all but the last at least half).
    assert all(len(p.payload) > max_bytes // 2 for p in cut.parts[:-1])


def test_a_page_of_a_million_state_node_fits_in_parts_at_the_default_limit(
        make_codec: Callable[[int], EnvelopeCodec]) -> None:
    # The issue's chain: 1,000,000 states over 256 pages is ~3,900 a page, ~1,050 bytes each
    # once encrypted: ~4 MB, four times the default max_message_bytes.
    codec = make_codec(1024 * 1024)
    cutter = PageCutter(node_id="store-1")
    cutter.attach(codec)
    cut = cutter.cut(0, _entries(3900, size=760))
    assert not cut.oversized and 3 <= len(cut.parts) <= 6
    assert all(len(p.payload) <= 1024 * 1024 for p in cut.parts)
    assert sum(len(p.topics or ()) for p in cut.parts) == 3900


def test_a_state_over_a_message_alone_is_left_out_and_named(
        make_codec: Callable[[int], EnvelopeCodec]) -> None:
    codec = make_codec(4096)
    cutter = PageCutter(node_id="store-1")
    cutter.attach(codec)
    entries = {**_entries(3, size=100), "t/big": b'"big":"%s"' % (b"y" * 8000)}
    cut = cutter.cut(1, entries)
    assert cut.oversized == ["t/big"]
    (part,) = cut.parts  # what is left fits one envelope, in the one-message form
    body = codec.decode(part.payload, check_replay=False).message.body
    assert set(body) == {"node", "page", "states"} and sorted(body["states"]) == \
        ["c0", "c1", "c2"]


def _layout(sizes: dict[str, int], cap: int) -> PageLayout:
    layout = PageLayout()
    for topic, n in sizes.items():
        layout.place(topic, 0, n, cap)
    return layout


def test_new_states_fill_the_last_part_then_open_a_new_one() -> None:
    layout = _layout({f"t{i}": 100 for i in range(10)}, cap=350)
    assert [list(p) for p in layout.parts] == [
        ["t0", "t1", "t2"], ["t3", "t4", "t5"], ["t6", "t7", "t8"], ["t9"]]
    assert layout.sizes == [300, 300, 300, 100] and layout.total == 1000
    assert layout.place("t10", 0, 200, 350) == 3  # room left in the last part
    assert layout.place("t11", 0, 100, 350) == 4  # none: a new part


def test_an_update_in_place_keeps_the_state_in_its_part() -> None:
    layout = _layout({f"t{i}": 100 for i in range(7)}, cap=350)
    assert layout.place("t1", 100, 120, 350) == 0
    assert layout.sizes[0] == 320 and layout.part_of["t1"] == 0
    assert [list(p) for p in layout.parts][1:] == [["t3", "t4", "t5"], ["t6"]]


def test_a_part_grown_over_the_cap_moves_its_last_states_on_and_no_other() -> None:
    sizes = {f"t{i}": 100 for i in range(7)}
    layout = _layout(sizes, cap=350)
    sizes["t0"] = sizes["t1"] = 150
    layout.place("t0", 100, 150, 350)
    layout.place("t1", 100, 150, 350)
    moved, oversized = layout.fit(sizes.__getitem__, 350)
    assert not oversized
    assert moved == {"t2": (0, 2)}  # to the last part, which had room
    assert [list(p) for p in layout.parts] == [["t0", "t1"], ["t3", "t4", "t5"], ["t6", "t2"]]
    assert layout.sizes == [300, 300, 200]
    assert all(layout.part_of[t] == i for i, p in enumerate(layout.parts) for t in p)


def test_a_state_over_the_cap_alone_is_taken_out() -> None:
    sizes = {f"t{i}": 100 for i in range(4)}
    layout = _layout(sizes, cap=350)
    sizes["t1"] = 500
    layout.place("t1", 100, 500, 350)
    layout.place("t2", 100, 100, 350)
    moved, oversized = layout.fit(sizes.__getitem__, 350)
    assert oversized == ["t1"]
    assert "t1" not in layout.part_of and all(s <= 350 for s in layout.sizes)
    assert sum(len(p) for p in layout.parts) == 3 and "t1" not in moved


def test_parts_read_back_keep_their_states_and_the_later_copy_wins() -> None:
    layout = PageLayout()
    layout.put("a", 2, 0, 100)  # part 2 read first
    layout.put("b", 0, 0, 100)
    layout.put("a", 0, 100, 100)  # a later-signed copy of "a" in part 0
    assert layout.part_of == {"a": 0, "b": 0}
    assert layout.sizes == [200, 0, 0]
    layout.trim()
    assert len(layout.parts) == 1
    layout.collapse()
    assert layout.parts == [{"b": None, "a": None}] and layout.sizes == [200]
