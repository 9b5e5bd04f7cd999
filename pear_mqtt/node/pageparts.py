"""Cutting a checkpoint page into signed envelopes that each fit one message: the page as one
envelope while it fits (the body unchanged), else as parts (docs/DESIGN.md, Sync and
presence)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import OversizedMessage
from ..security.envelope import EnvelopeCodec

__all__ = ["Cut", "PageCutter", "SignedPart"]

# An envelope's bytes besides its body (header, certificate or key reference, signature) are
# learnt from each page signed; until then this much is assumed (a quarter of a small limit).
_OVERHEAD_GUESS = 4096
_OVERHEAD_SLACK = 64  # the header's numbers (sequence, time) vary in length
_PART_FIELDS = 64  # '{"node":,"page":255,"part":65535,"parts":65535,"states":{}}' (59)
_ATTEMPTS = 4  # cuts tried with a larger overhead when a part still did not fit


@dataclass(frozen=True, slots=True)
class SignedPart:
    """One signed envelope of a page: ``topics`` are the state topics it carries (None: the
    whole page, in one envelope)."""

    part: int
    payload: bytes
    sequence: int
    topics: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Cut:
    """A page as signed: its envelopes in part order, their bodies' bytes, and the state
    topics whose item alone is over a message (in no part)."""

    parts: list[SignedPart]
    body_bytes: int
    oversized: list[str] = field(default_factory=list)


class PageCutter:
    """Signs the pages of node ``node_id`` (with the codec set by :meth:`attach`)."""

    def __init__(self, *, node_id: str) -> None:
        self._node_json = json.dumps(node_id).encode()
        self._codec: EnvelopeCodec | None = None
        self._overhead: int | None = None

    def attach(self, codec: EnvelopeCodec) -> None:
        self._codec = codec

    def cut(self, page: int, entries: dict[str, bytes]) -> Cut:
        """Sign ``page`` (``entries``: state topic -> ``"<category>":<item JSON>``): as one
        envelope when it fits ``max_message_bytes``, else in as few parts as fit."""
        codec = self._codec
        assert codec is not None
        body = b'{"node":%s,"page":%d,"states":{%s}}' % (self._node_json, page,
                                                           b",".join(entries.values()))
        if self._wire(len(body)) <= codec.max_bytes:
            try:
                return Cut(parts=[self._sign(body)], body_bytes=len(body))
            except OversizedMessage:
                self._grow()
        for _ in range(_ATTEMPTS):
            chunks, oversized = self._chunks(entries)
            if len(chunks) == 1:  # what did not fit was the oversized states alone
                body = b'{"node":%s,"page":%d,"states":{%s}}' % (
                    self._node_json, page, b",".join(e for _t, e in chunks[0]))
                bodies = [body]
            else:
                bodies = [b'{"node":%s,"page":%d,"part":%d,"parts":%d,"states":{%s}}' % (
                    self._node_json, page, i, len(chunks), b",".join(e for _t, e in chunk))
                    for i, chunk in enumerate(chunks)]
            try:
                signed = [self._sign(b, part=i) for i, b in enumerate(bodies)]
            except OversizedMessage:
                self._grow()
                continue
            parts = [SignedPart(part=s.part, payload=s.payload, sequence=s.sequence,
                                topics=frozenset(t for t, _e in chunk))
                     for s, chunk in zip(signed, chunks, strict=True)]
            return Cut(parts=parts, body_bytes=sum(map(len, bodies)), oversized=oversized)
        return Cut(parts=[], body_bytes=0, oversized=list(entries))

    def _sign(self, body: bytes, *, part: int = 0) -> SignedPart:
        codec = self._codec
        assert codec is not None
        payload = codec.encode_json(kind="checkpoint", body_json=body)
        sequence = codec.last_sequence
        self._overhead = len(payload) - self._expanded(len(body)) + _OVERHEAD_SLACK
        return SignedPart(part=part, payload=payload, sequence=sequence)

    def _chunks(self, entries: dict[str, bytes]
                ) -> tuple[list[list[tuple[str, bytes]]], list[str]]:
        """``entries`` in order, cut where a part's body would outgrow a message; and the
        topics of entries that fit in no message."""
        cap = self._body_room() - len(self._node_json) - _PART_FIELDS
        chunks: list[list[tuple[str, bytes]]] = []
        oversized: list[str] = []
        size = cap + 1
        for topic, entry in entries.items():
            n = len(entry) + 1
            if n > cap:
                oversized.append(topic)
                continue
            if size + n > cap:
                chunks.append([])
                size = 0
            chunks[-1].append((topic, entry))
            size += n
        return chunks, oversized

    def _expanded(self, body: int) -> int:
        """What a body of ``body`` bytes takes in the envelope (encrypted: tag, base64)."""
        assert self._codec is not None
        if self._codec.active_key_id is None:
            return body
        return (4 * (body + 16) + 2) // 3

    def _wire(self, body: int) -> int:
        """The envelope's estimated size for a body of ``body`` bytes."""
        return self._expanded(body) + self._guess()

    def _body_room(self) -> int:
        """The body bytes one envelope may carry."""
        assert self._codec is not None
        room = self._codec.max_bytes - self._guess()
        if self._codec.active_key_id is None:
            return room
        return room * 3 // 4 - 16

    def _guess(self) -> int:
        if self._overhead is not None:
            return self._overhead
        assert self._codec is not None
        return min(_OVERHEAD_GUESS, self._codec.max_bytes // 4)

    def _grow(self) -> None:
        """An envelope did not fit as estimated: assume more overhead from now on."""
        assert self._codec is not None
        self._overhead = min(self._codec.max_bytes, 2 * self._guess())
