"""The on-disk append-only log: durable appends, a torn tail after a crash, retention."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pear_mqtt.errors import HistoryError, LogTruncated
from pear_mqtt.history.log import AppendLog, Retention
from pear_mqtt.history.merkle import MerkleTree, leaf_hash, verify_range


def entries(n: int, start: int = 0) -> list[bytes]:
    return [f"message {i} ".encode() * (1 + i % 5) for i in range(start, start + n)]


def test_appends_read_back_and_survive_reopening(tmp_path: Path) -> None:
    data = entries(50)
    with AppendLog.open(tmp_path / "log") as log:
        assert log.append_many(data[:30]) == 0
        assert log.append(data[30]) == 30
        log.append_many(data[31:])
        log.flush()
        root = log.root()
        assert log.range(10, 20) == data[10:20] and log.get(49) == data[49]
        log.append(b"tagged", tag="pear/v1/x")
        assert log.records(50, 51) == [("pear/v1/x", b"tagged")]
    with AppendLog.open(tmp_path / "log") as again:
        assert (again.length, again.start) == (51, 0)
        assert again.root(50) == root == MerkleTree([leaf_hash(e) for e in data]).root()
        assert again.range(0, 50) == data
        assert again.append(b"more") == 51


def test_a_syncer_works_after_the_log_closed(tmp_path: Path) -> None:
    # The head's fsyncs run on another thread: the log may close before they do.
    log = AppendLog.open(tmp_path / "log")
    log.append_many(entries(5))
    sync = log.syncer()
    log.close()
    before = len(os.listdir("/proc/self/fd"))
    sync()  # its own descriptors: nothing raised, and they are closed after
    assert len(os.listdir("/proc/self/fd")) == before - 2
    with AppendLog.open(tmp_path / "log") as again:
        assert again.range(0, 5) == entries(5)


def test_a_torn_tail_is_dropped_on_open(tmp_path: Path) -> None:
    data = entries(10)
    with AppendLog.open(tmp_path / "log") as log:
        log.append_many(data)
    entries_file = tmp_path / "log" / "entries.bin"
    size = entries_file.stat().st_size
    with entries_file.open("r+b") as fh:  # a crash in the middle of the last record
        fh.truncate(size - 3)
    with AppendLog.open(tmp_path / "log") as log:
        assert log.length == 9 and log.range(0, 9) == data[:9]
        assert log.root() == MerkleTree([leaf_hash(e) for e in data[:9]]).root()
        assert log.append(b"after the crash") == 9
    # ... and a hash written without its entry is dropped too
    with (tmp_path / "log" / "hashes.bin").open("ab") as fh:
        fh.write(os.urandom(32))
    with AppendLog.open(tmp_path / "log") as log:
        assert log.length == 10 and log.get(9) == b"after the crash"


def test_retention_drops_a_prefix_but_keeps_the_tree(tmp_path: Path) -> None:
    data = entries(100)
    path = tmp_path / "log"
    with AppendLog.open(path, retention=Retention(max_age_seconds=60)) as log:
        log.append_many(data[:40], now=1000.0)
        log.append_many(data[40:], now=1100.0)
        root = log.root()
        assert log.enforce_retention(now=1120.0) == 40
        assert (log.start, log.length, log.root()) == (40, 100, root)
        with pytest.raises(LogTruncated, match="dropped by retention; ask from 40 on"):
            log.range(39, 41)
        # what is held still proves itself against the whole tree's head
        got = log.range(40, 100)
        proof = log.tree.range_proof(40, 100)
        assert verify_range(leaves=[leaf_hash(e) for e in got], start=40, size=100,
                            proof=proof, root=root)
    with AppendLog.open(path, retention=Retention(max_bytes=500)) as log:
        assert (log.start, log.length) == (40, 100)
        dropped = log.enforce_retention()
        assert dropped > 0 and log.held_bytes <= 500 and log.start == 40 + dropped
        assert log.range(log.start, 100) == data[log.start:]
    with AppendLog.open(path) as log:
        assert log.start == 40 + dropped and log.root() == root


def test_bad_input_gets_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "notalog").mkdir()
    (tmp_path / "notalog" / "entries.bin").write_bytes(b"something else entirely")
    with pytest.raises(HistoryError, match="is not a pear_mqtt log"):
        AppendLog.open(tmp_path / "notalog")
    with AppendLog.open(tmp_path / "log") as log:
        log.append(b"x")
        with pytest.raises(HistoryError, match="not within"):
            log.range(0, 5)
    with pytest.raises(HistoryError, match="is closed"):
        log.append(b"y")
