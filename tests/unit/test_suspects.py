"""Which outbox rows a broker refused by closing the connection (node/suspects.py)."""

from __future__ import annotations

import pytest

from pear_mqtt.node.suspects import Suspects

pytestmark = pytest.mark.unit


def test_a_row_the_broker_keeps_closing_on_is_sent_alone_then_refused() -> None:
    s = Suspects()
    s.closed([1, 2, 3])  # the forged row 2 closed the connection with 1 and 3 in flight
    assert not any(s.alone(r) for r in (1, 2, 3)) and not s.refused(2)
    s.acked([1, 3])  # sent again: 1 and 3 go through, 2 closes it again
    s.closed([2])
    assert s.alone(2) and not s.refused(2)
    s.closed([2])  # alone, and the broker closed the connection
    assert not s.refused(2)
    assert s.alone(2)
    s.closed([2])
    assert s.refused(2) and not s  # dead-lettered, forgotten


def test_rows_caught_in_ordinary_closes_are_never_refused() -> None:
    s = Suspects()
    for _ in range(10):  # a flapping network: in flight at every close, never alone
        s.closed([7])
    assert not s.refused(7)
    assert s.alone(7)
    s.acked([7])  # alone, it got its PUBACK
    assert not s and not s.refused(7)
