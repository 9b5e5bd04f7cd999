"""Unit tests of pear_mqtt.node.outbox: order, acks, coalescing, bounds, expiry, crashes,
bad files."""

from __future__ import annotations

import copy
import math
import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pear_mqtt.errors import OutboxError
from pear_mqtt.node import outbox as outbox_mod
from pear_mqtt.node import outboxfile
from pear_mqtt.node.outbox import Kind, NewItem, Outbox, OutboxItem, outbox_error

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _open(path: Path, *, max_bytes: int = 1 << 20, max_age: float = 3600.0,
          clock: FakeClock | None = None, **seams: Any) -> Outbox:
    return Outbox(path=path, max_bytes=max_bytes, max_age=max_age, clock=clock or FakeClock(),
                  **seams)


def _all(box: Outbox) -> list[OutboxItem]:
    return box.pending(limit=1 << 30)


def _topics(box: Outbox) -> list[str]:
    return [r.topic for r in _all(box)]


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Outbox]:
    with _open(tmp_path / "outbox.db") as b:
        yield b


# -- order, paging, ack --------------------------------------------------------------------

def test_put_and_pending_keep_insertion_order(box: Outbox) -> None:
    ids = [box.put(topic=f"t/{i}", payload=bytes([i]) * i, kind="insight") for i in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    rows = _all(box)
    assert [r.id for r in rows] == ids
    assert [r.payload for r in rows] == [bytes([i]) * i for i in range(5)]
    assert rows[2] == OutboxItem(id=ids[2], topic="t/2", payload=b"\x02\x02", kind="insight",
                                 key=None, retain=False, created=1_000.0, size=2)
    assert box.depth == 5 and box.size_bytes == sum(range(5))


def test_put_many_returns_ids_in_order_and_pages_with_after_id(box: Outbox) -> None:
    ids = box.put_many([NewItem(topic=f"t/{i}", payload=b"p", kind="contrib", retain=i == 1)
                        for i in range(7)])
    assert len(ids) == 7 and ids == sorted(ids)
    page1 = box.pending(limit=3)
    page2 = box.pending(limit=3, after_id=page1[-1].id)
    page3 = box.pending(limit=3, after_id=page2[-1].id)
    assert [r.id for r in page1 + page2 + page3] == ids
    assert box.pending(limit=3, after_id=ids[-1]) == []
    assert box.pending(limit=0) == []
    assert [r.retain for r in page1] == [False, True, False]
    assert box.put_many([]) == []


def test_ack_deletes_only_the_given_rows(box: Outbox) -> None:
    ids = box.put_many([NewItem(topic=f"t/{i}", payload=b"xy", kind="insight")
                        for i in range(6)])
    box.ack([ids[1], ids[3], ids[3], 999_999])  # duplicates and unknown ids are ignored
    assert [r.id for r in _all(box)] == [ids[0], ids[2], ids[4], ids[5]]
    assert box.depth == 4 and box.size_bytes == 8
    box.ack(iter([]))
    box.ack(r.id for r in _all(box))
    assert _all(box) == [] and box.depth == 0 and box.size_bytes == 0
    assert box.stats()["acked"] == 6


def test_oldest_is_when_the_first_pending_row_was_stored(tmp_path: Path) -> None:
    clock = FakeClock(100.0)
    with _open(tmp_path / "outbox.db", clock=clock) as box:
        assert box.oldest() is None
        first = box.put(topic="t/a", payload=b"a", kind="insight")
        clock.now = 160.0
        box.put(topic="t/b", payload=b"b", kind="insight")
        assert box.oldest() == 100.0
        box.ack([first])
        assert box.oldest() == 160.0


def test_ack_of_many_ids_spans_statement_chunks(box: Outbox) -> None:
    ids = box.put_many([NewItem(topic="t", payload=b"z", kind="insight") for _ in range(1234)])
    box.ack(ids[:1200])
    assert [r.id for r in _all(box)] == ids[1200:]
    assert box.depth == 34


# -- state coalescing ----------------------------------------------------------------------

def test_state_with_a_key_replaces_the_pending_one(box: Outbox) -> None:
    box.put(topic="state/a", payload=b"v1", kind="state", key="a", retain=True)
    box.put(topic="ins", payload=b"i1", kind="insight", key="a")  # keys of insights: no effect
    box.put(topic="state/b", payload=b"b1", kind="state", key="b", retain=True)
    newest = box.put(topic="state/a", payload=b"v2-longer", kind="state", key="a", retain=True)
    box.put(topic="state/none", payload=b"n1", kind="state")  # no key: never coalesced
    box.put(topic="state/none", payload=b"n2", kind="state")
    rows = _all(box)
    assert [(r.topic, r.payload) for r in rows] == [
        ("ins", b"i1"), ("state/b", b"b1"), ("state/a", b"v2-longer"),
        ("state/none", b"n1"), ("state/none", b"n2")]
    assert rows[2].id == newest  # the replacement is queued at the end, in order
    assert box.superseded == 1
    assert box.dropped == {"overflow": 0, "expired": 0}  # coalescing is not a loss
    assert box.size_bytes == sum(r.size for r in rows) and box.depth == 5


def test_a_state_superseded_within_one_call_is_not_written(box: Outbox) -> None:
    ids = box.put_many([
        NewItem(topic="ins/1", payload=b"i1", kind="insight"),
        NewItem(topic="state/a", payload=b"a1", kind="state", key="a", retain=True),
        NewItem(topic="ins/2", payload=b"i2", kind="insight"),
        NewItem(topic="state/a", payload=b"a2", kind="state", key="a", retain=True),
        NewItem(topic="state/b", payload=b"b1", kind="state", key="b", retain=True)])
    rows = _all(box)
    assert [(r.topic, r.payload) for r in rows] == [
        ("ins/1", b"i1"), ("ins/2", b"i2"), ("state/a", b"a2"), ("state/b", b"b1")]
    assert ids[1] == 0 and [i for i in ids if i] == [r.id for r in rows]
    assert box.superseded == 1 and box.depth == 4
    assert box.stats()["stored"] == 5
    box.ack([0])  # the id of the state never written: nothing happens
    assert box.depth == 4


def test_a_large_batch_is_stored_whole_in_order_with_its_states_replacing_pending_ones(
        tmp_path: Path) -> None:
    # 301 rows: more than one multi-row statement, and a tail of several lengths.
    with _open(tmp_path / "o.db") as box:
        box.put_many([NewItem(topic=f"state/{k}", payload=b"old", kind="state", key=f"k{k}")
                      for k in range(40)])
        items = [NewItem(topic=f"ins/{i}", payload=bytes([i % 256]) * (i % 7), kind="insight")
                 if i % 3 else
                 NewItem(topic=f"state/{i % 60}", payload=b"new%d" % i, kind="state",
                         key=f"k{i % 60}", retain=True)
                 for i in range(301)]
        ids = box.put_many(items)
        written = [i for i in ids if i]
        assert written == sorted(written) and len(set(written)) == len(written)
        rows = _all(box)
        fresh = {it.key for it in items if it.kind == "state"}
        kept_old = [f"state/{k}" for k in range(40) if f"k{k}" not in fresh]
        assert [r.topic for r in rows] == kept_old + [
            it.topic for it, i in zip(items, ids, strict=True) if i]
        assert [r.id for r in rows][len(kept_old):] == written
        assert [r.payload for r in rows][len(kept_old):] == [
            it.payload for it, i in zip(items, ids, strict=True) if i]
        assert all(r.retain == (r.kind == "state") for r in rows[len(kept_old):])
        counters = (box.depth, box.size_bytes, box.state_bytes)
        assert counters == (len(rows), sum(r.size for r in rows),
                            sum(r.size for r in rows if r.kind == "state"))
        # 101 state items over 20 keys: 81 replaced within the call, and 14 pending ones.
        assert len(fresh) == 20 and len(kept_old) == 26
        assert box.superseded == 81 + 14
    with _open(tmp_path / "o.db") as box:  # the counters are the table's
        assert (box.depth, box.size_bytes, box.state_bytes) == counters


def test_ack_of_a_superseded_state_id_is_a_no_op(box: Outbox) -> None:
    old = box.put(topic="s", payload=b"1", kind="state", key="k")
    new = box.put(topic="s", payload=b"2", kind="state", key="k")
    box.ack([old])  # the flusher had the old row in flight
    assert [r.id for r in _all(box)] == [new]


# -- bounds ----------------------------------------------------------------------------------

def test_overflow_drops_oldest_insights_and_keeps_state(tmp_path: Path) -> None:
    with _open(tmp_path / "o.db", max_bytes=1000) as box:
        box.put(topic="s", payload=b"s" * 100, kind="state", key="k")
        for i in range(4):
            box.put(topic=f"i{i}", payload=b"i" * 200, kind="insight")
        box.put(topic="c4", payload=b"c" * 200, kind="contrib")  # 1100 > 1000: drops i0
        assert _topics(box) == ["s", "i1", "i2", "i3", "c4"]
        assert box.dropped == {"overflow": 1, "expired": 0}
        box.put(topic="big", payload=b"b" * 700, kind="insight")  # needs 600: i1, i2, i3
        assert _topics(box) == ["s", "c4", "big"]
        assert box.dropped["overflow"] == 4
        assert box.size_bytes == 1000 and box.depth == 3
        box.put(topic="s2", payload=b"t" * 300, kind="state", key="k2")  # drops c4, then big
        assert _topics(box) == ["s", "s2"]
        assert box.dropped["overflow"] == 6 and box.size_bytes == 400


def test_outbox_full_when_state_rows_leave_no_room(tmp_path: Path) -> None:
    with _open(tmp_path / "o.db", max_bytes=1000) as box:
        box.put(topic="s1", payload=b"1" * 600, kind="state", key="k1")
        box.put(topic="s2", payload=b"2" * 300, kind="state", key="k2")
        box.put(topic="i", payload=b"i" * 50, kind="insight")
        before = _all(box)
        with pytest.raises(OutboxError, match=r"^outbox full: .*o\.db.*NOT stored"):
            box.put(topic="i2", payload=b"x" * 200, kind="insight")
        with pytest.raises(OutboxError, match="outbox full"):
            box.put(topic="s3", payload=b"3" * 200, kind="state", key="k3")
        with pytest.raises(OutboxError, match="outbox full"):
            box.put(topic="huge", payload=b"h" * 1001, kind="insight")
        assert _all(box) == before  # the refused item cost no stored row
        assert box.dropped["overflow"] == 0
        # Replacing a state row frees its bytes first, so this fits (300 + 650 + 50).
        box.put(topic="s1", payload=b"n" * 650, kind="state", key="k1")
        assert _topics(box) == ["s2", "i", "s1"] and box.size_bytes == 1000


def test_put_many_is_all_or_nothing(tmp_path: Path) -> None:
    with _open(tmp_path / "o.db", max_bytes=1000) as box:
        first = box.put(topic="s", payload=b"s" * 900, kind="state", key="k")
        box.put(topic="old", payload=b"o" * 50, kind="insight")
        with pytest.raises(OutboxError, match="outbox full"):
            box.put_many([
                NewItem(topic="s", payload=b"t" * 100, kind="state", key="k"),  # supersedes
                NewItem(topic="i", payload=b"i" * 100, kind="insight"),  # would drop "old"
                NewItem(topic="s9", payload=b"9" * 950, kind="state", key="k9"),  # cannot fit
            ])
        assert [(r.id, r.topic) for r in _all(box)] == [(first, "s"), (first + 1, "old")]
        assert box.superseded == 0 and box.dropped["overflow"] == 0
        assert box.stats()["stored"] == 2
        # The failed call used no ids: numbering continues where it was.
        assert box.put(topic="n", payload=b"", kind="insight") == first + 2


def test_put_many_may_drop_its_own_earlier_items(tmp_path: Path) -> None:
    with _open(tmp_path / "o.db", max_bytes=100) as box:
        ids = box.put_many([NewItem(topic=f"t{i}", payload=b"x" * 40, kind="insight")
                            for i in range(4)])
        assert len(ids) == 4
        assert [r.id for r in _all(box)] == ids[2:]
        assert box.dropped["overflow"] == 2
        box.ack(ids)  # acking the dropped ids is harmless
        assert box.depth == 0


# -- expiry ----------------------------------------------------------------------------------

def test_expire_deletes_old_insights_and_never_state(tmp_path: Path) -> None:
    clock = FakeClock(0.0)
    with _open(tmp_path / "o.db", max_age=10.0, clock=clock) as box:
        box.put(topic="i0", payload=b"a", kind="insight")
        box.put(topic="c0", payload=b"b", kind="contrib")
        box.put(topic="s0", payload=b"c", kind="state", key="k")
        clock.now = 5.0
        box.put(topic="i5", payload=b"d", kind="insight")
        clock.now = 10.0
        assert box.expire() == 0  # exactly max_age old is not older than max_age
        clock.now = 14.0
        assert box.expire() == 2
        assert _topics(box) == ["s0", "i5"]
        clock.now = 1e6
        assert box.expire() == 1
        assert _topics(box) == ["s0"]
        assert box.dropped == {"overflow": 0, "expired": 3}
        assert box.depth == 1 and box.size_bytes == 1


def test_put_and_pending_expire_at_most_once_per_second(tmp_path: Path) -> None:
    clock = FakeClock(0.0)
    with _open(tmp_path / "o.db", max_age=10.0, clock=clock) as box:
        box.put(topic="a", payload=b"a", kind="insight")  # expiry ran at t=0
        clock.now = 1.0
        box.put(topic="b", payload=b"b", kind="insight")
        clock.now = 10.7
        box.put(topic="c", payload=b"c", kind="insight")  # due: "a" (age 10.7) goes
        assert _topics(box) == ["b", "c"]
        clock.now = 11.2
        # "b" is now 10.2 s old, but expiry ran 0.5 s ago: it stays until the next run.
        box.put(topic="d", payload=b"d", kind="insight")
        assert "b" in _topics(box)  # pending ran at 11.2 as well: still not due
        clock.now = 11.8
        assert _topics(box) == ["c", "d"]  # pending() expired it (1.1 s after the last run)
        assert box.dropped["expired"] == 2


def test_expiry_survives_a_clock_stepped_backwards(tmp_path: Path) -> None:
    clock = FakeClock(1_000.0)
    with _open(tmp_path / "o.db", max_age=10.0, clock=clock) as box:
        box.put(topic="a", payload=b"a", kind="insight")  # expiry ran at t=1000
        clock.now = 100.0  # NTP stepped back 900 s, and time goes on from there
        box.put(topic="b", payload=b"b", kind="insight")
        clock.now = 111.0
        box.put(topic="c", payload=b"c", kind="insight")
        # Expiry keeps running ("a" now looks like it is from the future, so it waits).
        assert _topics(box) == ["a", "c"]
        assert box.dropped["expired"] == 1


# -- persistence -------------------------------------------------------------------------------

def test_reopen_returns_the_same_rows_and_counters(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "o.db"  # parent directories are created
    with _open(path) as box:
        box.put_many([NewItem(topic="i", payload=b"1" * 10, kind="insight"),
                      NewItem(topic="s", payload=b"2" * 20, kind="state", key="k",
                              retain=True)])
        box.put(topic="c", payload=b"3" * 30, kind="contrib")
        before = _all(box)
    with _open(path) as box:
        assert _all(box) == before
        assert box.depth == 3 and box.size_bytes == 60
        assert box.stats()["state_bytes"] == 20
        # Coalescing works across a restart too.
        box.put(topic="s", payload=b"4", kind="state", key="k")
        assert _topics(box) == ["i", "c", "s"] and box.size_bytes == 41


def test_ids_are_never_reused_even_after_emptying_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with _open(path) as box:
        ids = [box.put(topic="t", payload=b"x", kind="insight") for _ in range(3)]
        box.ack(ids)
    with _open(path) as box:
        assert box.put(topic="t", payload=b"y", kind="insight") == ids[-1] + 1


_CHILD = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from pear_mqtt.node.outbox import NewItem, Outbox

    box = Outbox(path=Path(sys.argv[1]), max_bytes=1 << 30, max_age=1e9)
    stop = int(sys.argv[2])
    i = 0
    while True:
        ids = box.put_many([
            NewItem(topic=f"t/{i}", payload=b"%d" % i * 50, kind="insight"),
            NewItem(topic="state", payload=b"%d" % i, kind="state", key="s", retain=True),
        ])
        print(i, *ids, flush=True)
        i += 1
        if i == stop:
            os._exit(0)  # no close(), no checkpoint, no atexit
""")


def _crash_child(path: Path, *, stop: int, kill_after: int | None) -> list[list[int]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(stop)],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    reported: list[list[int]] = []
    try:
        for line in proc.stdout:
            reported.append([int(x) for x in line.split()])
            if kill_after is not None and len(reported) == kill_after:
                proc.kill()  # SIGKILL while it keeps writing
                break
    finally:
        proc.stdout.close()
        proc.wait(timeout=30)
    return reported


@pytest.mark.parametrize("how", ["os._exit", "SIGKILL"])
def test_committed_rows_survive_a_crashed_process(tmp_path: Path, how: str) -> None:
    path = tmp_path / "o.db"
    if how == "os._exit":
        reported = _crash_child(path, stop=150, kill_after=None)
        assert len(reported) == 150
    else:
        reported = _crash_child(path, stop=-1, kill_after=300)
    with _open(path) as box:
        rows = _all(box)
        insights = [r for r in rows if r.kind == "insight"]
        states = [r for r in rows if r.kind == "state"]
        # Every batch whose put_many returned is there; a batch in flight at the kill is
        # either wholly there or wholly missing.
        n = len(insights)
        assert n >= len(reported)
        assert [r.topic for r in insights] == [f"t/{i}" for i in range(n)]
        assert [r.id for r in insights[:len(reported)]] == [ids[1] for ids in reported]
        assert all(r.payload == b"%d" % i * 50 for i, r in enumerate(insights))
        assert len(states) == 1 and states[0].payload == b"%d" % (n - 1)
        assert box.depth == len(rows)
        assert box.size_bytes == sum(r.size for r in rows)


# -- bad files, locks ----------------------------------------------------------------------------

def test_garbage_file_is_not_an_outbox(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not sqlite at all\n" * 400)
    with pytest.raises(OutboxError, match=r"o\.db is not an outbox database"):
        _open(path)
    assert path.read_bytes() == b"this is not sqlite at all\n" * 400  # left untouched


def test_other_sqlite_database_is_not_an_outbox(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(OutboxError, match=r"is not an outbox database .*customers"):
        _open(path)


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with _open(path) as box:
        box.put(topic="t", payload=b"x", kind="insight")
    conn = sqlite3.connect(path)
    conn.execute("UPDATE pear_outbox_schema SET version = ?", (outbox_mod.SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(OutboxError, match=r"schema version 2, written by a newer pear_mqtt"):
        _open(path)


def test_a_second_owner_is_refused_while_the_first_is_open(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with _open(path) as first:
        first.put(topic="t", payload=b"x", kind="insight")
        with pytest.raises(OutboxError, match=r"o\.db is locked by another process"):
            _open(path, busy_timeout=0.05)
        first.put(topic="t", payload=b"y", kind="insight")  # the owner is unaffected
    with _open(path) as second:
        assert second.depth == 2


def test_closed_outbox_raises_and_close_is_idempotent(tmp_path: Path) -> None:
    box = _open(tmp_path / "o.db")
    box.close()
    box.close()
    with pytest.raises(OutboxError, match="is closed"):
        box.put(topic="t", payload=b"x", kind="insight")
    with pytest.raises(OutboxError, match="is closed"):
        box.pending(limit=1)


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind"):
        NewItem(topic="t", payload=b"x", kind="bogus")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="payload"):
        NewItem(topic="t", payload="text", kind="insight")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="topic"):
        NewItem(topic="", payload=b"x", kind="insight")
    with pytest.raises(ValueError, match="max_bytes"):
        Outbox(path=tmp_path / "o.db", max_bytes=0, max_age=1.0)
    with pytest.raises(ValueError, match="max_age"):
        Outbox(path=tmp_path / "o.db", max_bytes=1, max_age=math.nan)
    with _open(tmp_path / "o.db") as box, pytest.raises(ValueError, match="limit"):
        box.pending(limit=-1)


def test_stats_snapshot(box: Outbox) -> None:
    box.put(topic="s", payload=b"abc", kind="state", key="k")
    box.put(topic="s", payload=b"abcd", kind="state", key="k")
    s = box.stats()
    assert s["depth"] == 1 and s["size_bytes"] == 4 and s["state_bytes"] == 4
    assert s["stored"] == 2 and s["superseded"] == 1 and s["acked"] == 0
    assert s["dropped"] == {"overflow": 0, "expired": 0} and s["disk_full"] is False
    assert s["path"].endswith("outbox.db") and s["max_bytes"] == 1 << 20
    s["dropped"]["overflow"] = 99  # a snapshot: changing it changes nothing
    assert box.dropped["overflow"] == 0


# -- full disk -----------------------------------------------------------------------------------

@pytest.fixture
def tiny_fs(tmpfs: Callable[[int], Path]) -> Path:
    """A 24 MiB tmpfs: the 8 MiB reserve and room for rows."""
    return tmpfs(24)


def test_a_new_file_has_the_outbox_page_size_and_an_old_one_keeps_its_own(
        tmp_path: Path) -> None:
    with _open(tmp_path / "new.db") as box:
        box.put(topic="t", payload=b"x" * 1000, kind="insight")
    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)  # a file with SQLite's default pages, as earlier builds made
    conn.execute("PRAGMA page_size=4096")
    conn.execute("VACUUM")  # writes the header: the size is fixed from here on
    conn.close()
    with _open(old) as box:
        ids = [box.put(topic=f"t/{i}", payload=b"y" * 1000, kind="insight") for i in range(20)]
        box.ack(ids[:10])
        assert [r.id for r in box.pending(limit=100)] == ids[10:]
    for path, size in ((tmp_path / "new.db", outboxfile.PAGE_SIZE), (old, 4096)):
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA page_size").fetchone()[0] == size
        finally:
            conn.close()


def test_reserve_covers_a_checkpoint() -> None:
    # On a full disk the WAL can still grow to the checkpoint interval and the checkpoint
    # can grow the database file by as much: the released reserve must hold both.
    wal = outboxfile.WAL_AUTOCHECKPOINT_PAGES * outboxfile.PAGE_SIZE
    assert wal >= 4 << 20  # a short interval copies rows that are soon acknowledged again
    assert 2 * wal <= outbox_mod.RESERVE_BYTES


def _fill(box: Outbox, payload_size: int) -> list[int]:
    ids: list[int] = []
    for i in range(10_000):
        try:
            ids.append(box.put(topic=f"t/{i}", payload=bytes([i % 256]) * payload_size,
                               kind="insight"))
        except OutboxError as exc:
            assert "disk full" in str(exc) and str(box.path) in str(exc)
            return ids
    raise AssertionError("the disk never filled up")


def test_full_disk_keeps_stored_rows_and_acks_and_reads_working(tiny_fs: Path) -> None:
    path = tiny_fs / "node" / "outbox.db"
    clock_offset = [0.0]
    with _open(path, max_bytes=1 << 30, monotonic=lambda: 1e6 + clock_offset[0]) as box:
        assert (tiny_fs / "node" / "outbox.db-reserve").stat().st_size == outbox_mod.RESERVE_BYTES
        ids = _fill(box, 20_000)
        assert len(ids) > 50
        assert box.stats()["disk_full"] is True
        # New items are refused (quickly, without touching the disk) ...
        with pytest.raises(OutboxError, match=r"outbox\.db: disk full; new items are refused"):
            box.put(topic="late", payload=b"x", kind="insight")
        # ... but nothing stored was lost, and reads and acks work.
        rows = _all(box)
        assert [r.id for r in rows] == ids
        assert all(r.payload == bytes([i % 256]) * 20_000 for i, r in enumerate(rows))
        # One transaction deleting everything: it must cost little WAL space (no re-writing
        # of freed pages), since the disk holds the rows and not much more.
        box.ack(ids)
        assert box.depth == 0 and _all(box) == []
        # Once the recovery interval passed, freed pages go back to the disk, the reserve is
        # re-created and new items are accepted again.
        clock_offset[0] = outbox_mod.RECOVER_INTERVAL + 1
        new = box.put(topic="again", payload=b"ok", kind="insight")
        assert box.stats()["disk_full"] is False
        assert (tiny_fs / "node" / "outbox.db-reserve").exists()
    with _open(path, max_bytes=1 << 30) as box:
        assert [(r.id, r.payload) for r in _all(box)] == [(new, b"ok")]


_FILL_CHILD = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from pear_mqtt.errors import OutboxError
    from pear_mqtt.node.outbox import Outbox

    box = Outbox(path=Path(sys.argv[1]), max_bytes=1 << 30, max_age=1e9)
    for i in range(10_000):
        try:
            print(box.put(topic=f"t/{i}", payload=bytes([i % 256]) * 30_000, kind="insight"),
                  flush=True)
        except OutboxError as exc:
            print("refused:", exc, flush=True)
            break
    os._exit(0)  # no close(), no checkpoint, no atexit
""")


def test_full_disk_error_leaves_earlier_rows_intact_after_a_crash(tiny_fs: Path) -> None:
    path = tiny_fs / "outbox.db"
    # Filled by a process that then dies without closing: the next open must recover
    # everything from the WAL on the full disk.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _FILL_CHILD, str(path)], capture_output=True,
                         text=True, env=env, timeout=120, check=True).stdout.splitlines()
    assert out and out[-1].startswith("refused:"), "the disk never filled up"
    assert "disk full" in out[-1] and str(path) in out[-1]
    ids = [int(line) for line in out[:-1]]
    assert ids
    with _open(path, max_bytes=1 << 30) as again:
        assert [r.id for r in _all(again)] == ids


def test_full_database_via_max_page_count(tmp_path: Path) -> None:
    # The same SQLITE_FULL, for hosts where mounting a tmpfs is not allowed.
    with _open(tmp_path / "o.db", max_bytes=1 << 30, max_pages=64) as box:
        ids = _fill(box, 3_000)
        assert ids and box.depth == len(ids)
        with pytest.raises(OutboxError, match="disk full; new items are refused"):
            box.put(topic="x", payload=b"x", kind="insight")
        assert [r.id for r in _all(box)] == ids
        box.ack(ids[:3])
        assert [r.id for r in _all(box)] == ids[3:]


def test_read_only_file_is_reported(tiny_fs: Path) -> None:
    path = tiny_fs / "o.db"
    with _open(path) as box:
        box.put(topic="t", payload=b"x", kind="insight")
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    with pytest.raises(OutboxError, match=r"o\.db is read-only"):
        _open(path)
    with pytest.raises(OutboxError, match=r"new\.db: its directory is read-only"):
        _open(tiny_fs / "new.db")


def test_sqlite_errors_map_to_clear_messages() -> None:
    path = Path("/x/o.db")

    def err(msg: str, code: int) -> sqlite3.Error:
        exc = sqlite3.OperationalError(msg)
        exc.sqlite_errorcode = code
        return exc

    cases = [("database or disk is full", 13, "disk full while writing"),
             ("attempt to write a readonly database", 8, "is read-only"),
             ("file is not a database", 26, "is not an outbox database"),
             ("database disk image is malformed", 11, "is corrupt"),
             ("database is locked", 5, "is locked by another process"),
             ("disk I/O error", 10, "I/O error while writing")]
    for msg, code, expected in cases:
        text = str(outbox_error(path, err(msg, code), "writing"))
        assert expected in text and "/x/o.db" in text and msg in text


# -- property: the outbox behaves like a simple list -------------------------------------------

MAX_BYTES = 1_500
MAX_AGE = 10.0


class Full(Exception):
    pass


@dataclass
class Model:
    """The outbox as a list, with the same bounds, coalescing and expiry rules."""

    rows: list[OutboxItem] = field(default_factory=list)
    next_id: int = 1
    overflow: int = 0
    expired: int = 0
    superseded: int = 0
    last_expire: float = -math.inf

    def _expire_if_due(self, now: float) -> None:
        if now - self.last_expire >= 1.0 or now < self.last_expire:
            self.expire(now)

    def expire(self, now: float) -> None:
        keep = [r for r in self.rows if r.kind == "state" or r.created >= now - MAX_AGE]
        self.expired += len(self.rows) - len(keep)
        self.rows = keep
        self.last_expire = now

    def put_many(self, items: list[NewItem], now: float) -> list[int]:
        saved = copy.deepcopy(self.__dict__)
        try:
            self._expire_if_due(now)
            last = {it.key: i for i, it in enumerate(items)
                    if it.kind == "state" and it.key is not None}
            ids = []
            for i, it in enumerate(items):
                if it.kind == "state" and it.key is not None and last[it.key] != i:
                    self.superseded += 1  # replaced within the call: never written
                    ids.append(0)
                else:
                    ids.append(self._put(it, now))
            return ids
        except Full:
            self.__dict__.update(saved)
            raise

    def _put(self, it: NewItem, now: float) -> int:
        size = len(it.payload)
        if it.kind == "state" and it.key is not None:
            before = len(self.rows)
            self.rows = [r for r in self.rows if not (r.kind == "state" and r.key == it.key)]
            self.superseded += before - len(self.rows)
        if sum(r.size for r in self.rows if r.kind == "state") + size > MAX_BYTES:
            raise Full
        while sum(r.size for r in self.rows) + size > MAX_BYTES:
            oldest = next(r for r in self.rows if r.kind != "state")
            self.rows.remove(oldest)
            self.overflow += 1
        row = OutboxItem(id=self.next_id, topic=it.topic, payload=it.payload, kind=it.kind,
                         key=it.key, retain=it.retain, created=now, size=size)
        self.next_id += 1
        self.rows.append(row)
        return row.id

    def pending(self, now: float, *, limit: int = 1 << 30, after_id: int = 0
                ) -> list[OutboxItem]:
        self._expire_if_due(now)
        return [r for r in self.rows if r.id > after_id][:limit]

    def ack(self, ids: set[int]) -> None:
        self.rows = [r for r in self.rows if r.id not in ids]

    def reopen(self) -> None:
        self.overflow = self.expired = self.superseded = 0
        self.last_expire = -math.inf


_kinds: st.SearchStrategy[Kind] = st.sampled_from(["insight", "state", "contrib"])
_item = st.tuples(_kinds, st.sampled_from([None, "a", "b"]), st.integers(0, 700), st.booleans())
_put = st.tuples(st.just("put"), st.lists(_item, min_size=1, max_size=9))
_tick = st.tuples(st.just("tick"), st.sampled_from([0.4, 0.7, 1.5, 6.0, 9.8, 11.0]))
_op = st.one_of(
    _put, _put, _tick, _tick,
    st.tuples(st.just("ack"), st.lists(st.integers(0, 60), max_size=6)),
    st.tuples(st.just("page"), st.integers(1, 4), st.integers(0, 40)),
    st.tuples(st.just("expire")),
    st.tuples(st.just("reopen")),
)


@settings(max_examples=120, deadline=None)
@given(ops=st.lists(_op, max_size=40))
def test_outbox_matches_a_reference_model(ops: list[tuple[Any, ...]]) -> None:
    clock = FakeClock(0.0)
    model = Model()
    seq = 0
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "o.db"
        box = _open(path, max_bytes=MAX_BYTES, max_age=MAX_AGE, clock=clock)
        try:
            for op in ops:
                if op[0] == "put":
                    items = []
                    for kind, key, size, retain in op[1]:
                        seq += 1
                        items.append(NewItem(topic=f"t/{seq}", payload=bytes([seq % 256]) * size,
                                             kind=kind, key=key, retain=retain))
                    try:
                        expected = model.put_many(items, clock.now)
                    except Full:
                        with pytest.raises(OutboxError, match="outbox full"):
                            box.put_many(items)
                    else:
                        assert box.put_many(items) == expected
                elif op[0] == "ack":
                    box.ack(op[1])
                    model.ack(set(op[1]))
                elif op[0] == "tick":
                    clock.now += op[1]
                elif op[0] == "page":
                    assert (box.pending(limit=op[1], after_id=op[2])
                            == model.pending(clock.now, limit=op[1], after_id=op[2]))
                elif op[0] == "expire":
                    box.expire()
                    model.expire(clock.now)
                else:
                    box.close()
                    box = _open(path, max_bytes=MAX_BYTES, max_age=MAX_AGE, clock=clock)
                    model.reopen()
                assert _all(box) == model.pending(clock.now)
                assert box.depth == len(model.rows)
                assert box.size_bytes == sum(r.size for r in model.rows)
                assert box.dropped == {"overflow": model.overflow, "expired": model.expired}
                assert box.superseded == model.superseded
        finally:
            box.close()
