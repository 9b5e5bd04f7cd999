"""The bridge's log without brokers: where the next message's place comes from, and which
outbox messages are appended when sent (docs/HISTORY.md, "The bridge's log")."""

from __future__ import annotations

from pathlib import Path

import pytest

from pear_mqtt.bridge.history import BridgeLog
from pear_mqtt.bridge.state import OutgoingRow
from pear_mqtt.history.log import AppendLog

pytestmark = pytest.mark.unit

TOPIC = "pear/v1/public/net/aggregates/dairy"


def _row(i: int, payload: bytes) -> OutgoingRow:
    return OutgoingRow(id=i, window_start=0, topic=TOPIC, payload=payload, retain=True)


def _envelope(ref: str | None, n: int = 0) -> bytes:
    log = f',"log":"{ref}"' if ref is not None else ""
    return f'{{"v":1,"kind":"aggregate"{log},"body":{{"n":{n}}}}}'.encode()


def test_places_follow_the_log_and_the_outbox_and_are_reused_after_a_lost_build(
        tmp_path: Path) -> None:
    outbox: list[OutgoingRow] = []
    held = BridgeLog(path=tmp_path / "log", retention=None, pending=lambda: outbox)
    refs = held.refs()
    assert refs.peek() == f"{held.log_id}:0"
    refs.take()
    assert refs.peek() == f"{held.log_id}:1"
    # A build whose transaction never committed left nothing in the outbox: its places
    # are the next build's.
    assert held.refs().peek() == f"{held.log_id}:0"
    outbox += [_row(1, _envelope(f"{held.log_id}:0")), _row(2, _envelope(f"{held.log_id}:1")),
               _row(3, _envelope(None)), _row(4, _envelope("otherlog:9"))]
    assert held.refs().peek() == f"{held.log_id}:2"
    held.close()


def test_sending_appends_in_place_once_and_never_leaves_a_hole(tmp_path: Path) -> None:
    outbox: list[OutgoingRow] = []
    held = BridgeLog(path=tmp_path / "log", retention=None, pending=lambda: outbox)
    first, second, third = (_envelope(f"{held.log_id}:{i}", i) for i in range(3))
    assert held.record(TOPIC, first) and held.length == 1
    assert held.record(TOPIC, first) and held.length == 1  # sent again: not appended again
    assert not held.record(TOPIC, third) and held.length == 1  # its place is past the end
    assert held.record(TOPIC, _envelope(None)) and held.length == 1  # the ledger: no entry
    assert held.record(TOPIC, _envelope("otherlog:1")) and held.length == 1  # earlier log
    assert held.record(TOPIC, second) and held.record(TOPIC, third) and held.length == 3
    log_id = held.log_id
    held.close()
    with AppendLog.open(tmp_path / "log") as log:
        assert [entry for _, entry in log.records(0, 3)] == [first, second, third]
        assert {topic for topic, _ in log.records(0, 3)} == {TOPIC}
    again = BridgeLog(path=tmp_path / "log", retention=None, pending=lambda: outbox)
    assert (again.log_id, again.length) == (log_id, 3)  # a restart continues the same log
    assert again.refs().peek() == f"{log_id}:3"
    again.close()
