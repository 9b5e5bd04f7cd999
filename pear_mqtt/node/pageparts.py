"""Cutting a checkpoint page into signed envelopes that each fit one message: the page as one
envelope while it fits (the body unchanged), else as parts that keep their states from one
version to the next, so that only a changed part is signed and sent again (docs/DESIGN.md,
Sync and presence)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..errors import OversizedMessage
from ..security.envelope import EnvelopeCodec

__all__ = ["Cut", "PageCutter", "PageLayout", "SignedPart"]

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


class PageLayout:
    """Which part of one page holds each state topic, kept from one version to the next: a
    state stays in its part, a new one goes into the last part while it has room (else a
    new part), and a part grown over ``cap`` moves its last states on (:meth:`fit`).
    ``parts[i]``: the topics of part i in order; ``sizes[i]``: their entries' bytes (each
    entry counted with its separator)."""

    __slots__ = ("part_of", "parts", "sizes")

    def __init__(self) -> None:
        self.parts: list[dict[str, None]] = []
        self.sizes: list[int] = []
        self.part_of: dict[str, int] = {}

    def place(self, topic: str, old: int, new: int, cap: int) -> int:
        """Put ``topic`` (its entry ``old`` bytes before, 0 if new; ``new`` bytes now) in
        its part and return that part."""
        part = self.part_of.get(topic)
        if part is not None:
            self.sizes[part] += new - old
            return part
        if not self.parts or (self.sizes[-1] + new > cap and self.parts[-1]):
            self.parts.append({})
            self.sizes.append(0)
        part = len(self.parts) - 1
        self.parts[part][topic] = None
        self.sizes[part] += new
        self.part_of[topic] = part
        return part

    def put(self, topic: str, part: int, old: int, new: int) -> None:
        """Put ``topic`` (its entry ``old`` bytes before, 0 if new; ``new`` bytes now) in
        ``part`` (read back from the node's own part), wherever it was."""
        self.drop(topic, old)
        while len(self.parts) <= part:
            self.parts.append({})
            self.sizes.append(0)
        self.parts[part][topic] = None
        self.sizes[part] += new
        self.part_of[topic] = part

    def drop(self, topic: str, size: int) -> None:
        """Take ``topic`` (its entry ``size`` bytes) out of its part, if it is in one."""
        part = self.part_of.pop(topic, None)
        if part is not None:
            del self.parts[part][topic]
            self.sizes[part] -= size

    def fit(self, size: Callable[[str], int], cap: int
            ) -> tuple[dict[str, tuple[int, int]], list[str]]:
        """Move the last states of each part over ``cap`` to the last part with room (or a
        new one); ``size``: a topic's entry bytes. Returns the moved topics (topic ->
        (from part, to part)) and those over ``cap`` alone (taken out of every part)."""
        moved: dict[str, tuple[int, int]] = {}
        oversized: list[str] = []
        part = 0
        while part < len(self.parts):
            topics = self.parts[part]
            while self.sizes[part] > cap and topics:
                topic = next(reversed(topics))
                n = size(topic)
                self.drop(topic, n)
                if n > cap:
                    oversized.append(topic)
                    moved.pop(topic, None)
                    continue
                to = self.place(topic, 0, n, cap)
                first = moved.get(topic, (part, to))[0]
                moved[topic] = (first, to)
            part += 1
        return moved, oversized

    def collapse(self) -> None:
        """Every topic into part 0 (the page goes as one envelope)."""
        topics = {t: None for part in self.parts for t in part}
        self.parts, self.sizes = [topics], [sum(self.sizes)]
        self.part_of = dict.fromkeys(topics, 0)

    def trim(self) -> None:
        """Drop empty parts at the end."""
        while self.parts and not self.parts[-1]:
            self.parts.pop()
            self.sizes.pop()

    @property
    def total(self) -> int:
        return sum(self.sizes)


class PageCutter:
    """Signs the pages of node ``node_id`` (with the codec set by :meth:`attach`)."""

    def __init__(self, *, node_id: str) -> None:
        self._node_json = json.dumps(node_id).encode()
        self._codec: EnvelopeCodec | None = None
        self._overhead: int | None = None

    def attach(self, codec: EnvelopeCodec) -> None:
        self._codec = codec

    def learn(self) -> None:
        """Learn the envelope's overhead by signing an empty page, unless a page signed
        since :meth:`attach` taught it: the parts read back were filled to the learnt size,
        and a guess might find them over."""
        if self._overhead is None:
            self._sign(b'{"node":%s,"page":0,"states":{}}' % self._node_json)

    @property
    def cap(self) -> int:
        """The bytes of state entries (each with its separator) one part's body may carry."""
        return self._body_room() - len(self._node_json) - _PART_FIELDS

    def may_fit(self, total: int) -> bool:
        """Whether a page whose entries take ``total`` bytes (with separators) may fit one
        envelope."""
        assert self._codec is not None
        return self._wire(total + len(self._node_json) + _PART_FIELDS) <= self._codec.max_bytes

    def whole(self, page: int, entries: Iterable[bytes]) -> tuple[SignedPart, int] | None:
        """``page`` signed as one envelope, with its body's bytes, if it fits a message."""
        codec = self._codec
        assert codec is not None
        body = b'{"node":%s,"page":%d,"states":{%s}}' % (self._node_json, page,
                                                           b",".join(entries))
        if self._wire(len(body)) > codec.max_bytes:
            return None
        try:
            return self._sign(body), len(body)
        except OversizedMessage:
            self._grow()
            return None

    def part(self, page: int, part: int, parts: int, topics: Iterable[str],
             entries: dict[str, bytes]) -> tuple[SignedPart, int]:
        """Part ``part`` (of ``parts``) of ``page`` with the entries of ``topics``, signed,
        with its body's bytes; :class:`OversizedMessage` if it did not fit (the estimate of
        the overhead grows: fit the layout to the smaller :attr:`cap` and sign again)."""
        chosen = list(topics)
        body = b'{"node":%s,"page":%d,"part":%d,"parts":%d,"states":{%s}}' % (
            self._node_json, page, part, parts, b",".join(entries[t] for t in chosen))
        try:
            signed = self._sign(body, part=part)
        except OversizedMessage:
            self._grow()
            raise
        return SignedPart(part=part, payload=signed.payload, sequence=signed.sequence,
                          topics=frozenset(chosen)), len(body)

    def cut(self, page: int, entries: dict[str, bytes]) -> Cut:
        """Sign ``page`` afresh (``entries``: state topic -> ``"<category>":<item JSON>``):
        as one envelope when it fits ``max_message_bytes``, else in as few parts as fit."""
        whole = self.whole(page, entries.values())
        if whole is not None:
            return Cut(parts=[whole[0]], body_bytes=whole[1])
        sizes = {t: len(e) + 1 for t, e in entries.items()}
        for _ in range(_ATTEMPTS):
            layout = PageLayout()
            oversized = [t for t, n in sizes.items() if n > self.cap]
            for topic, n in sizes.items():
                if n <= self.cap:
                    layout.place(topic, 0, n, self.cap)
            if len(layout.parts) == 1:
                whole = self.whole(page, (entries[t] for t in layout.parts[0]))
                if whole is not None:
                    return Cut(parts=[whole[0]], body_bytes=whole[1], oversized=oversized)
            try:
                signed = [self.part(page, i, len(layout.parts), topics, entries)
                          for i, topics in enumerate(layout.parts)]
            except OversizedMessage:
                continue
            return Cut(parts=[s for s, _n in signed], body_bytes=sum(n for _s, n in signed),
                       oversized=oversized)
        return Cut(parts=[], body_bytes=0, oversized=list(entries))

    def _sign(self, body: bytes, *, part: int = 0) -> SignedPart:
        codec = self._codec
        assert codec is not None
        payload = codec.encode_json(kind="checkpoint", body_json=body)
        sequence = codec.last_sequence
        self._overhead = len(payload) - self._expanded(len(body)) + _OVERHEAD_SLACK
        return SignedPart(part=part, payload=payload, sequence=sequence)

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
