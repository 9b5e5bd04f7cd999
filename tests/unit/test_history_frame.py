"""A ``logrange`` answer's attachment: entries framed after the envelope, read back as views
of the payload that hash and prove like the entries themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

from pear_mqtt.errors import MalformedMessage
from pear_mqtt.history import frame
from pear_mqtt.history.log import AppendLog
from pear_mqtt.history.merkle import leaf_hashes, verify_range


def test_an_answer_reads_back_as_views_that_prove_against_the_log(tmp_path: Path) -> None:
    held = AppendLog.open(tmp_path / "log")
    data = [f"entry {i} ".encode() * (1 + i % 7) for i in range(40)]
    held.append_many(data, tags=["t"] * len(data))
    got = [entry for _tag, entry in held.views(10, 30)]
    payload = frame.join(b'{"envelope":1}', frame.pack_entries(got))

    envelope, blob = frame.split(payload)
    entries = frame.unpack_entries(blob, 20)

    assert envelope == b'{"envelope":1}'
    assert all(isinstance(e, memoryview) for e in entries)
    assert [bytes(e) for e in entries] == data[10:30]
    leaves = leaf_hashes(entries)
    assert leaves == leaf_hashes(data[10:30])
    assert frame.leaves_digest(leaves) == frame.leaves_digest(held.tree.leaves(10, 30))
    assert verify_range(leaves=leaves, start=10, size=40, proof=held.tree.range_proof(10, 30),
                        root=held.root())
    held.close()


@pytest.mark.parametrize("count", [19, 21])
def test_an_attachment_that_does_not_hold_the_named_count_is_refused(count: int) -> None:
    payload = frame.join(b"{}", frame.pack_entries([b"x" * n for n in range(1, 21)]))
    _envelope, blob = frame.split(payload)
    with pytest.raises(MalformedMessage):
        frame.unpack_entries(blob, count)
