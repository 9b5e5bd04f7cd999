"""The market store's writer process (docs/MARKET.md, "Writer process"): a writer that is
killed is replaced and its batch written again, it ends with the node's process, and a full
disk keeps the rows in memory until space returns."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pear_mqtt.market import MarketFeed, MarketStore
from pear_mqtt.node.records import ReceivedInsight
from pear_mqtt.privacy.filter import SharedInsight

T0 = datetime(2026, 11, 2, tzinfo=UTC)


def _items(n: int, *, first: int = 0) -> list[ReceivedInsight]:
    out = []
    for k in range(first, first + n):
        start = T0 + timedelta(minutes=k % 600)
        shared = SharedInsight.model_validate({
            "category": f"cat{k % 8}", "region": "eu", "window_start": start,
            "window_end": start + timedelta(hours=1), "company": "acme", "store": "s1",
            "levels": {"price_data": "ranges_only"},
            "groups": {"price_data": {"currency": "EUR",
                                      "price": {"lo": float(k % 9), "hi": k % 9 + 1.0}}}})
        out.append(ReceivedInsight(item_id=f"i{k}", topic="t", member="acme", node="s1",
                                   insight=shared, retained=False,
                                   received_at=start.timestamp(), sequence=k))
    return out


def _ended(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_a_killed_writer_is_replaced_and_its_batch_written_again(tmp_path: Path) -> None:
    with MarketStore.open(tmp_path / "m.db", network="net", mode="consortium") as store:
        feed = MarketFeed(store)
        feed.start()
        try:
            for item in _items(500):
                feed(item)
            assert feed.drain(30)
            first = feed.writer_pid
            assert first is not None and store.status().insights == 500
            os.kill(first, signal.SIGKILL)
            for item in _items(700, first=300):  # 300 of them stored already
                feed(item)
            assert feed.drain(30)
            assert feed.writer_pid not in (None, first)
            assert store.status().insights == 1000
            assert feed.failing is None and feed.dropped == 0
        finally:
            feed.close()


@pytest.mark.parametrize("end", ["os._exit(0)", "sys.exit(0)"])
def test_the_writer_ends_with_the_node_process(tmp_path: Path, end: str) -> None:
    # The node's process ends without closing its store: killed, or a script that forgot
    # to (its interpreter's exit must not wait for the writer forever).
    script = textwrap.dedent(f"""
        import os, pickle, sys
        from pear_mqtt.market import MarketFeed, MarketStore
        store = MarketStore.open({str(tmp_path / "m.db")!r}, network="net", mode="consortium")
        feed = MarketFeed(store)
        feed.start()
        for item in pickle.loads(sys.stdin.buffer.read()):
            feed(item)
        assert feed.drain(30)
        print(feed.writer_pid, flush=True)
        {end}
    """)
    out = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(_items(50)),
                         capture_output=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr.decode()
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 20
    while not _ended(pid):  # a process's end is no message: polled, with a deadline
        assert time.monotonic() < deadline, f"writer process {pid} outlived its node"
        time.sleep(0.05)
    with MarketStore.open(tmp_path / "m.db", readonly=True) as store:
        assert store.status().insights == 50


def test_a_full_disk_keeps_the_rows_until_space_returns(small_disk: Path) -> None:
    with MarketStore.open(small_disk / "m.db", network="net", mode="consortium") as store:
        feed = MarketFeed(store)
        feed.start()
        filler = small_disk / "filler"
        try:
            with filler.open("wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            for item in _items(3000):
                feed(item)
            deadline = time.monotonic() + 30
            while feed.failing is None:  # the writer's refusal: polled, with a deadline
                assert time.monotonic() < deadline, "the full disk was never noticed"
                time.sleep(0.05)
            assert "full" in feed.failing and str(small_disk / "m.db") in feed.failing
            assert store.status().insights == 0
            filler.unlink()
            assert feed.drain(30), feed.failing
            assert feed.failing is None and feed.dropped == 0
            assert store.status().insights == 3000
        finally:
            feed.close()


def test_a_node_in_a_daemonic_process_writes_its_store_itself(tmp_path: Path) -> None:
    # A daemonic multiprocessing worker may not start processes: one warning, then the
    # feed's thread writes (as with market.writer_process = false).
    script = textwrap.dedent(f"""
        import multiprocessing, pickle, sys
        from pear_mqtt.market import MarketFeed, MarketStore
        items = pickle.loads(sys.stdin.buffer.read())

        def node():
            store = MarketStore.open({str(tmp_path / "m.db")!r}, network="net",
                                     mode="consortium")
            feed = MarketFeed(store)
            feed.start()
            for item in items:
                feed(item)
            assert feed.drain(30) and feed.failing is None
            assert feed.writer_pid is None
            feed.close()
            sys.exit(0 if store.status().insights == len(items) else 3)

        worker = multiprocessing.get_context("fork").Process(target=node, daemon=True)
        worker.start()
        worker.join(60)
        sys.exit(worker.exitcode)
    """)
    out = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(_items(200)),
                         capture_output=True, timeout=90, check=False)
    assert out.returncode == 0, out.stderr.decode()
    assert b"cannot start its writer process" in out.stderr
    assert b"the node writes its market store itself" in out.stderr
