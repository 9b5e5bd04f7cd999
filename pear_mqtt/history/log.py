"""A node's append-only log on disk: every message it published, in order, as the leaves of a
Merkle tree (:mod:`.merkle`). Retention drops a prefix of the entries but keeps every leaf
hash, so the tree, its heads and its proofs stay whole. Format: docs/HISTORY.md."""

from __future__ import annotations

import bisect
import os
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, BinaryIO

from pydantic import BaseModel, ConfigDict, Field

from ..errors import HistoryError, LogTruncated
from ..files import atomic_write
from .merkle import HASH_SIZE, MerkleTree, leaf_hash

__all__ = ["AppendLog", "Retention"]

_HEADER = struct.Struct(">IdH")  # entry length, append time (epoch seconds), tag length
_MAX_ENTRY = 64 * 1024 * 1024
_FILE_HEADER = struct.Struct(">8sQ")  # magic, index of the first entry in the file
_MAGIC = b"PEARLOG1"
_ENTRIES, _HASHES = "entries.bin", "hashes.bin"


class Retention(BaseModel):
    """How much of a log's entries is kept: by age and by bytes (None: no bound). The leaf
    hashes are always kept (32 bytes per entry)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_age_seconds: Annotated[float, Field(gt=0)] | None = None
    max_bytes: Annotated[int, Field(gt=0)] | None = None


class AppendLog:
    """One log in a directory: ``entries.bin`` (the index of its first entry, then length,
    time and bytes of each entry still held) and ``hashes.bin`` (every leaf hash).

    Appends reach the OS at once (a killed process loses nothing); :meth:`flush` is the
    durability point against a power cut (one fsync per file). A record torn by a crash is
    dropped when the log is opened again.
    """

    def __init__(self, path: Path, *, retention: Retention | None = None) -> None:
        self.path = Path(path)
        self.retention = retention or Retention()
        self._tree = MerkleTree()
        self._start = 0
        self._offsets: list[int] = []  # file offset of each held entry (index start + i)
        self._times: list[float] = []
        self._size = 0  # bytes of entries.bin after its header
        self._entries: BinaryIO | None = None
        self._hashes: BinaryIO | None = None
        self._open()

    @classmethod
    def open(cls, path: Path | str, *, retention: Retention | None = None) -> AppendLog:
        """Open (or create) the log in directory ``path``."""
        return cls(Path(path), retention=retention)

    # -- reading ------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Entries ever appended: the next entry's index."""
        return self._tree.size

    @property
    def start(self) -> int:
        """Index of the first entry still held (0 until retention dropped some)."""
        return self._start

    @property
    def held_bytes(self) -> int:
        return self._size

    @property
    def tree(self) -> MerkleTree:
        return self._tree

    def root(self, size: int | None = None) -> bytes:
        return self._tree.root(size)

    def get(self, index: int) -> bytes:
        return self.range(index, index + 1)[0]

    def range(self, start: int, end: int) -> list[bytes]:
        """Entries [start, end); :class:`LogTruncated` if some lie before :attr:`start`."""
        return [entry for _tag, entry in self.records(start, end)]

    def records(self, start: int, end: int) -> list[tuple[str, bytes]]:
        """(tag, entry) of entries [start, end): the tag is what the writer kept beside the
        entry, outside the tree (a node keeps the topic it published the entry on)."""
        return [(tag, bytes(entry)) for tag, entry in self.views(start, end)]

    def views(self, start: int, end: int, *, max_bytes: int | None = None
              ) -> list[tuple[str, memoryview]]:
        """:meth:`records` without a copy of each entry: views into one read of the file
        (what an answer to a log request frames and sends). With ``max_bytes``, only the
        first entries whose records fill at most that many bytes (at least one)."""
        if not 0 <= start <= end <= self.length:
            raise HistoryError(f"log {self.path}: entries [{start}, {end}) are not within "
                               f"0..{self.length}")
        if start < self._start:
            raise LogTruncated(f"log {self.path}: entries before {self._start} were dropped "
                               f"by retention; ask from {self._start} on")
        if start == end:
            return []
        self._flush_buffers()
        first = self._offsets[start - self._start]
        if max_bytes is not None and self._size - first > max_bytes:
            # Entry i fits when the next one starts within the bound.
            fits = bisect.bisect_right(self._offsets, first + max_bytes, start - self._start)
            end = max(start + 1, min(end, self._start + fits - 1))
        last = (self._offsets[end - self._start] if end - self._start < len(self._offsets)
                else self._size)
        data = memoryview(self._read(_FILE_HEADER.size + first, last - first))
        out: list[tuple[str, memoryview]] = []
        tags: dict[bytes, str] = {}  # a log's entries share a few topics
        unpack, size = _HEADER.unpack_from, _HEADER.size
        pos = 0
        for _ in range(end - start):
            n, _t, tn = unpack(data, pos)
            pos += size
            raw = data[pos:pos + tn].tobytes()
            tag = tags.get(raw)
            if tag is None:
                tag = tags[raw] = raw.decode("utf-8", "replace")
            pos += tn
            out.append((tag, data[pos:pos + n]))
            pos += n
        return out

    # -- writing ------------------------------------------------------------------------------
    def append(self, entry: bytes, *, tag: str = "", now: float | None = None) -> int:
        """Add ``entry`` (with ``tag`` beside it); returns its index. Durable after
        :meth:`flush`."""
        return self.append_many([entry], tags=[tag], now=now)

    def append_many(self, entries: Sequence[bytes | memoryview], *,
                    tags: Sequence[str] | None = None,
                    now: float | None = None) -> int:
        """Add ``entries`` in order; returns the index of the first."""
        fh, hh = self._files()
        first = self.length
        t = time.time() if now is None else now
        for i, entry in enumerate(entries):
            tag = tags[i].encode() if tags is not None else b""
            if len(entry) > _MAX_ENTRY:
                raise HistoryError(f"log {self.path}: an entry of {len(entry)} bytes is over "
                                   f"the {_MAX_ENTRY} byte limit")
            record = _HEADER.pack(len(entry), t, len(tag)) + tag + entry
            leaf = leaf_hash(entry)
            try:
                fh.write(record)
                hh.write(leaf)
            except OSError as exc:
                raise HistoryError(f"log {self.path}: cannot append ({exc.strerror or exc}); "
                                   "free disk space and restart the node") from exc
            self._offsets.append(self._size)
            self._times.append(t)
            self._size += len(record)
            self._tree.append(leaf)
        try:
            # Into the OS at once, so a killed process loses nothing it published; flush()
            # adds the fsync that a power cut needs.
            fh.flush()
            hh.flush()
        except OSError as exc:
            raise HistoryError(f"log {self.path}: cannot append ({exc.strerror or exc}); "
                               "free disk space and restart the node") from exc
        return first

    def flush(self) -> None:
        """Write what was appended through to the disk (fsync)."""
        self.syncer()()

    def syncer(self) -> Callable[[], None]:
        """What was appended is handed to the OS now; the returned call makes it durable
        (fsync). It holds duplicates of the files' descriptors, so it may run on another
        thread while the log goes on or is closed; run it exactly once."""
        fds: list[int] = []
        try:
            for fh in (self._entries, self._hashes):
                if fh is not None:
                    fh.flush()
                    fds.append(os.dup(fh.fileno()))
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise self._unwritable(exc) from exc

        def sync() -> None:
            try:
                for fd in fds:
                    os.fsync(fd)
            except OSError as exc:
                raise self._unwritable(exc) from exc
            finally:
                for fd in fds:
                    os.close(fd)
        return sync

    def _unwritable(self, exc: OSError) -> HistoryError:
        return HistoryError(f"log {self.path}: cannot write to disk ({exc.strerror or exc}); "
                            "free disk space")

    def enforce_retention(self, now: float | None = None) -> int:
        """Drop the oldest entries beyond the age and byte bounds; returns how many. The
        leaf hashes stay, so heads and proofs are unchanged; :attr:`start` moves on."""
        r = self.retention
        t = time.time() if now is None else now
        drop = 0
        if r.max_age_seconds is not None:
            while drop < len(self._times) and t - self._times[drop] > r.max_age_seconds:
                drop += 1
        if r.max_bytes is not None:
            while drop < len(self._offsets) and self._size - self._offsets[drop] > r.max_bytes:
                drop += 1
        if drop:
            self._drop(drop)
        return drop

    def close(self) -> None:
        for fh in (self._entries, self._hashes):
            if fh is not None:
                try:
                    fh.flush()
                    os.fsync(fh.fileno())
                finally:
                    fh.close()
        self._entries = self._hashes = None

    def __enter__(self) -> AppendLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------
    def _files(self) -> tuple[BinaryIO, BinaryIO]:
        if self._entries is None or self._hashes is None:
            raise HistoryError(f"log {self.path} is closed")
        return self._entries, self._hashes

    def _read(self, offset: int, size: int) -> bytes:
        """``size`` bytes of entries.bin from ``offset``, read through the handle appends
        go to (it is opened for reading too): an answer's read, without opening the file
        for each answer."""
        if self._entries is None:
            with (self.path / _ENTRIES).open("rb") as fh:
                fh.seek(offset)
                return fh.read(size)
        fd, parts, got = self._entries.fileno(), [], 0
        while got < size:
            part = os.pread(fd, size - got, offset + got)
            if not part:
                break  # the file ends early: what there is, as a plain read gives it
            parts.append(part)
            got += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _flush_buffers(self) -> None:
        if self._entries is not None:
            self._entries.flush()

    def _open(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            src = self.path / _ENTRIES
            if not src.exists() or src.stat().st_size < _FILE_HEADER.size:
                atomic_write(src, _FILE_HEADER.pack(_MAGIC, 0))
            data = src.read_bytes()
            hashes = (self.path / _HASHES).read_bytes() \
                if (self.path / _HASHES).exists() else b""
        except OSError as exc:
            raise HistoryError(f"log {self.path}: cannot open ({exc.strerror or exc}); check "
                               "the directory and its permissions") from exc
        magic, self._start = _FILE_HEADER.unpack_from(data, 0)
        if magic != _MAGIC:
            raise HistoryError(f"log {self.path}: {_ENTRIES} is not a pear_mqtt log; move it "
                               "away or point the history path elsewhere")
        entries = memoryview(data)[_FILE_HEADER.size:]
        # Complete records only: a crash may have torn the last one (or its hash).
        pos, complete = 0, 0
        while pos + _HEADER.size <= len(entries):
            n, t, tn = _HEADER.unpack_from(entries, pos)
            if pos + _HEADER.size + tn + n > len(entries):
                break
            self._offsets.append(pos)
            self._times.append(t)
            pos += _HEADER.size + tn + n
            complete += 1
        held_hashes = len(hashes) // HASH_SIZE - self._start
        keep = min(complete, max(held_hashes, 0))
        self._size = self._offsets[keep] if keep < complete else pos
        del self._offsets[keep:], self._times[keep:]
        total = self._start + keep
        for i in range(total):
            self._tree.append(hashes[i * HASH_SIZE:(i + 1) * HASH_SIZE])
        try:
            self._entries = (self.path / _ENTRIES).open("a+b")
            self._entries.truncate(_FILE_HEADER.size + self._size)
            self._hashes = (self.path / _HASHES).open("ab")
            self._hashes.truncate(total * HASH_SIZE)
        except OSError as exc:
            raise HistoryError(f"log {self.path}: cannot open for appending "
                               f"({exc.strerror or exc})") from exc

    def _drop(self, count: int) -> None:
        """Rewrite entries.bin without its first ``count`` records."""
        self.flush()
        cut = self._offsets[count] if count < len(self._offsets) else self._size
        src = self.path / _ENTRIES
        tmp = self.path / (_ENTRIES + ".tmp")
        try:
            # The new file names its own first index, so one rename switches both at once.
            with src.open("rb") as fin, tmp.open("wb") as fout:
                fout.write(_FILE_HEADER.pack(_MAGIC, self._start + count))
                fin.seek(_FILE_HEADER.size + cut)
                while chunk := fin.read(1 << 20):
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            assert self._entries is not None
            self._entries.close()
            os.replace(tmp, src)
            self._entries = src.open("a+b")
        except OSError as exc:
            raise HistoryError(f"log {self.path}: retention could not rewrite the entries "
                               f"({exc.strerror or exc})") from exc
        self._start += count
        self._offsets = [o - cut for o in self._offsets[count:]]
        del self._times[:count]
        self._size -= cut
