"""A ``logrange`` answer read and checked as far as it can be on its own: its fields, its
entries against the digest its signer vouched for, the place of each record in its log, the
hashes of its range proof. What it means for the log a node holds is :mod:`.replicas`'
business; the protocol is in docs/HISTORY.md."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from ..errors import EnvelopeError, MalformedMessage, ProofFailed
from ..history.frame import leaves_digest, unpack_entries
from ..history.head import parse_log_ref
from ..history.merkle import HASH_SIZE, leaf_hashes
from ..security.base64url import b64url_decode, b64url_encode
from ..security.envelope import EnvelopeCodec
from ..security.identity import Identity

__all__ = ["Answer", "Record", "misplaced", "proof_hashes", "read_answer", "why_unproven"]

# (topic, entry): a proven answer's entries are views of the payload they came in (hashed
# there, copied once when delivered); every other record holds bytes.
Record = tuple[str, bytes | memoryview]


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """The parts of a well-formed answer. ``records`` are copies when it carries no range
    proof (held until verified, they must not keep the whole answer alive), else views."""

    first: int
    held_from: int
    length: object  # the log's length the answerer claims (an int when it says)
    records: list[Record]
    leaves: list[bytes]
    proof: object  # the range proof as sent (None: none)
    size: object  # the head length the proof is against (an int when it says)
    truncated: bool
    more: bool


def read_answer(body: dict[str, Any], blob: bytes | memoryview) -> Answer | str:
    """The answer of ``body`` with the entries of ``blob``, or why it is refused:
    ``malformed`` (fields of the wrong kind, entries that do not unpack) or
    ``forged_entry`` (entries other than those its signed digest names)."""
    topics, count = body.get("topics"), body.get("count")
    first, held_from = body.get("from"), body.get("held_from")
    if not isinstance(topics, list) or type(count) is not int or count != len(topics) \
            or not all(isinstance(t, str) for t in topics) or type(first) is not int \
            or type(held_from) is not int or first < 0:
        return "malformed"
    try:
        entries = unpack_entries(blob, count)
    except MalformedMessage:
        return "malformed"
    records: list[Record] = list(zip(topics, entries, strict=True))
    leaves = leaf_hashes(entries)
    digest = body.get("digest")
    if records and (not isinstance(digest, str) or not secrets.compare_digest(
            digest, b64url_encode(leaves_digest(leaves)).decode("ascii"))):
        return "forged_entry"
    proof = body.get("proof")
    if proof is None:
        records = [(topic, bytes(entry)) for topic, entry in records]
    return Answer(first=first, held_from=held_from, length=body.get("length"),
                  records=records, leaves=leaves, proof=proof, size=body.get("size"),
                  truncated=bool(body.get("truncated")), more=body.get("more") is True)


_LOG_MEMBER = b',"log":"'


def _entry_index(payload: bytes | memoryview, log_id: str) -> int | None:
    """The index an envelope's signed ``log`` member gives it in log ``log_id`` (None: not
    an entry of that log). The member sits in the flat header before the body."""
    # Records held for later checks are bytes already; only a view is copied (its head).
    data = payload if isinstance(payload, bytes) else bytes(payload[:600])
    at = data.find(_LOG_MEMBER, 0, 512)
    if at < 0:
        return None
    at += len(_LOG_MEMBER)
    end = data.find(b'"', at, at + 64)
    ref = data[at:end].decode("ascii", "replace") if end > 0 else ""
    try:
        got_id, index = parse_log_ref(ref)
    except ProofFailed:
        return None
    return index if got_id == log_id else None


def misplaced(records: list[Record], log_id: str, first: int) -> int | None:
    """The first record that is not the entry of ``log_id`` at its place (None: all are)."""
    for i, (_topic, payload) in enumerate(records):
        if _entry_index(payload, log_id) != first + i:
            return i
    return None


def why_unproven(codec: EnvelopeCodec | None, owner: Identity, log_id: str,
                 records: list[Record], root: bytes | None, first: int) -> str:
    """Why records fail their range proof (hostile traffic only, so each is checked in
    full): records out of their places are reordered; one not signed by the log's
    ``owner`` is forged; else the range does not cover what its proof does."""
    if misplaced(records, log_id, first) is not None:
        return "reordered_range"
    if root is None:
        return "cut_range"  # a proof against a head this node never saw signed
    assert codec is not None
    for _topic, payload in records:
        try:
            decoded = codec.decode(bytes(payload), check_replay=False, max_age=float("inf"))
        except EnvelopeError:
            return "forged_entry"
        if decoded.signer != owner:
            return "forged_entry"
    return "cut_range"


def proof_hashes(proof: Any) -> list[bytes] | None:
    """A range proof's hashes from their base64url text (None: not a proof)."""
    if not isinstance(proof, list) or len(proof) > 256:
        return None
    out: list[bytes] = []
    for text in proof:
        if not isinstance(text, str):
            return None
        try:
            h = b64url_decode(text.encode("ascii"), "proof")
        except (MalformedMessage, UnicodeEncodeError):
            return None
        if len(h) != HASH_SIZE:
            return None
        out.append(h)
    return out
