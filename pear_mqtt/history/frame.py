"""A ``logrange`` answer on the wire: its signed envelope, a newline, then the entries it
carries as raw bytes (each after its 4-byte length), bound to the envelope by the digest of
their leaf hashes. Entries stay the exact bytes first published, with no base64 or JSON
around them and nothing to sign twice. Format and rationale: docs/HISTORY.md."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from ..errors import MalformedMessage

__all__ = ["join", "leaves_digest", "pack_entries", "split", "unpack_entries"]

_LEN = struct.Struct(">I")
_SEP = b"\n"  # never inside an envelope: its JSON holds no raw newline


def pack_entries(entries: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
    """The attachment's parts: every entry after its length (joined once, by :func:`join`,
    which copies views of a read buffer straight into the payload)."""
    pack = _LEN.pack
    return [part for e in entries for part in (pack(len(e)), e)]


def unpack_entries(blob: bytes | memoryview, count: int) -> list[memoryview]:
    """Exactly ``count`` entries filling ``blob``, as views of it (not copies: a receiver
    hashes them where they arrived and copies each only when it delivers it);
    :class:`MalformedMessage` otherwise."""
    out: list[memoryview] = []
    pos, size = 0, len(blob)
    view = memoryview(blob)
    unpack, step = _LEN.unpack_from, _LEN.size
    while pos < size and len(out) < count:
        if pos + step > size:
            break
        (n,) = unpack(view, pos)
        pos += step
        if pos + n > size:
            break
        out.append(view[pos:pos + n])
        pos += n
    if len(out) != count or pos != size:
        raise MalformedMessage(f"the answer's attachment does not hold the {count} entries "
                               "its envelope names")
    return out


def leaves_digest(leaves: Sequence[bytes] | bytes) -> bytes:
    """SHA-256 over the entries' leaf hashes, in order: what the signed envelope states."""
    return hashlib.sha256(leaves if isinstance(leaves, bytes) else b"".join(leaves)).digest()


def join(envelope: bytes, parts: Sequence[bytes | memoryview]) -> bytes:
    """The answer's payload: ``envelope``, the separator, the attachment ``parts``."""
    return b"".join((envelope, _SEP, *parts))


def split(payload: bytes) -> tuple[bytes, memoryview]:
    """(envelope, attachment), the attachment a view of ``payload`` (not a copy of a few
    hundred kB); an answer without attachment has an empty one."""
    at = payload.find(_SEP)
    if at < 0:
        return payload, memoryview(b"")
    return payload[:at], memoryview(payload)[at + 1:]
