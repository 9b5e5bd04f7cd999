"""Reading checkpoint pages as they arrive: a peer's page is verified, checked against the
node its topic names and loaded state by state; this node's own page, read back when it
starts, seeds the pages it will send (docs/DESIGN.md, Sync and presence)."""

from __future__ import annotations

import gc
import json
import zlib
from collections.abc import Callable
from typing import Any

from ..config.models import NetworkConfig
from ..errors import TopicError
from ..model.topics import CHECKPOINT_PAGES, ParsedTopic, TopicScheme
from ..security.envelope import Decoded, EnvelopeCodec
from ..security.identity import Identity
from ..transport import InboundMessage
from .checkpoints import CheckpointPages
from .counters import Counters, open_counted
from .records import ReceivedInsight
from .replicas import Replicas

__all__ = ["Deliver", "Logged", "PageReader", "state_body"]

Deliver = Callable[..., ReceivedInsight | None]
"""The receiver's delivery of one verified state item (validate, feed the store)."""
Logged = Callable[[Identity, str | None, bytes, str], bool]
"""The receiver's record of a sender's logged envelope; false if it must be dropped."""


class PageReader:
    """Handles the checkpoint pages a node receives: others' into ``states`` (the map sync()
    returns, shared with the receiver), its own into ``pages`` while they are seeded."""

    def __init__(self, *, config: NetworkConfig, clock: Callable[[], float],
                 counters: Counters, pages: CheckpointPages,
                 states: dict[str, ReceivedInsight], deliver: Deliver,
                 logged: Logged) -> None:
        self.config = config
        self._clock = clock
        self._counters = counters
        self._pages = pages
        self._states = states
        self._deliver = deliver
        self._logged = logged
        self._codec: EnvelopeCodec | None = None
        self._me: Identity | None = None
        self._replicas: Replicas | None = None

    def attach(self, codec: EnvelopeCodec, *, replicas: Replicas | None) -> None:
        """Verify with ``codec``; tell ``replicas`` which page versions arrived."""
        self._codec = codec
        self._me = codec.signer.identity
        self._replicas = replicas

    def handle(self, parsed: ParsedTopic, msg: InboundMessage) -> None:
        """A message on a checkpoint topic (``parsed``)."""
        if not msg.payload:
            return  # a cleared page
        # A page brings hundreds of acyclic objects at once (its JSON, then its states);
        # without pausing the cyclic collector it would rescan the growing state map many
        # times per page.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._handle(parsed, msg)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _handle(self, parsed: ParsedTopic, msg: InboundMessage) -> None:
        decoded = open_counted(self._codec, msg.payload, self._counters)
        if decoded is None:
            return
        signer = decoded.signer
        if signer == self._me:
            if self._pages.seeding and parsed.node == signer.node:
                self._seed_page(parsed, decoded)
            return
        if signer.member != parsed.company or signer.node != parsed.node:
            self._counters.dropped["identity_mismatch"] += 1
            return
        if not self._logged(signer, decoded.message.log_ref, msg.payload, msg.topic):
            return
        body = decoded.message.body
        if self._replicas is not None and parsed.page is not None:
            parts = body.get("parts", 1) if isinstance(body, dict) else 1
            self._replicas.page_seen(signer, decoded.message.sequence, parsed.page,
                                     part=parsed.part,
                                     parts=parts if type(parts) is int else parsed.part + 1)
        states = body.get("states") if isinstance(body, dict) else None
        if (decoded.message.kind != "checkpoint" or not isinstance(states, dict)
                or body.get("page") != parsed.page or body.get("part", 0) != parsed.part
                or parsed.company is None):
            self._counters.dropped["malformed"] += 1
            return
        # The topic each state would have on its own: built (and its category checked) by the
        # topic scheme of the signer's member, so a page can only speak for its own node.
        scheme = TopicScheme(parsed.mode, parsed.network or self.config.network_id,
                             parsed.company)
        self._load_page(parsed, scheme, signer, states, sequence=decoded.message.sequence,
                        log_ref=decoded.message.log_ref)

    def _seed_page(self, parsed: ParsedTopic, decoded: Decoded) -> None:
        """This node's own page, read back when it starts: its states go into the pages it
        will send (none replacing one this run has recorded), unless the page is older than
        ``message_expiry``."""
        body = decoded.message.body
        states = body.get("states") if isinstance(body, dict) else None
        if decoded.message.kind != "checkpoint" or not isinstance(states, dict) \
                or parsed.company is None:
            return
        parts = body.get("parts", 1)
        if parsed.page is None or body.get("page") != parsed.page \
                or body.get("part", 0) != parsed.part or type(parts) is not int:
            return
        if self._clock() - decoded.message.timestamp > self.config.reliability.message_expiry:
            # Sent that long ago, every state in it is older still: past the lifetime a
            # retained state has (the broker's expiry of a per-category state message).
            self._counters.dropped["state_expired"] += len(states)
            return
        scheme = TopicScheme(parsed.mode, parsed.network or self.config.network_id,
                             parsed.company)
        own: dict[str, bytes] = {}
        for category, raw in states.items():
            try:
                topic = scheme.state(decoded.signer.node, category)
            except TopicError:
                continue
            own[topic] = json.dumps(raw, separators=(",", ":")).encode()
        self._pages.seed_page(parsed.page, own, sequence=decoded.message.sequence,
                              part=parsed.part, parts=parts)

    def _load_page(self, parsed: ParsedTopic, scheme: TopicScheme, signer: Identity,
                   states: dict[str, Any], *, sequence: int, log_ref: str | None) -> None:
        held = self._states
        for category, raw in states.items():
            try:
                topic = scheme.state(signer.node, category)
            except TopicError:
                self._counters.dropped["bad_topic"] += 1
                continue
            if zlib.crc32(topic.encode()) % CHECKPOINT_PAGES != parsed.page:
                self._counters.dropped["malformed"] += 1  # not a state this page may carry
                continue
            current = held.get(topic)
            if current is not None and current.sequence > sequence:
                # The topic names the signer, so both are its: an older version of the page
                # (a part a larger one left, or a replay) does not replace what it signed since.
                continue
            received = self._deliver(raw, topic, True, signer, dedup=False,
                                     sequence=sequence, log_ref=log_ref)
            if received is not None:
                self._states[topic] = received
                self._counters.states_from_checkpoints += 1


def state_body(decoded: Decoded) -> Any | None:
    """The state item a message on a state topic carries: a ``state`` envelope's body, or
    the one item of an ``insights`` envelope (a sender publishes the signed envelope of an
    insight that went out alone as its retained state too); None for anything else."""
    message = decoded.message
    if message.kind == "state":
        return message.body
    if message.kind == "insights" and isinstance(message.body, dict):
        items = message.body.get("items")
        if isinstance(items, list) and len(items) == 1:
            return items[0]
    return None
