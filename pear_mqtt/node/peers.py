"""The peer table: which nodes are online, from their signed retained presence."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..model.topics import ParsedTopic
from ..security.envelope import EnvelopeCodec
from ..transport import InboundMessage
from .counters import Counters, open_counted
from .records import Peer

__all__ = ["PeerTable"]


class PeerTable:
    """Every node's latest presence, as verified presence messages (and wills) tell it."""

    def __init__(self, *, counters: Counters) -> None:
        self._counters = counters
        self._codec: EnvelopeCodec | None = None
        self._peers: dict[tuple[str, str], Peer] = {}
        self._changed = asyncio.Event()

    def attach(self, codec: EnvelopeCodec) -> None:
        """Verify presence with ``codec`` (set on each ``connect()``)."""
        self._codec = codec

    def handle(self, parsed: ParsedTopic, msg: InboundMessage) -> None:
        """Take one presence message (an empty one clears that node)."""
        key = (parsed.company or "", parsed.node or "")
        if not msg.payload:
            self._peers.pop(key, None)
            self._changed.set()
            return
        decoded = open_counted(self._codec, msg.payload, self._counters)
        if decoded is None:
            return
        signer = decoded.signer
        body = decoded.message.body
        if (parsed.company is not None and parsed.company != signer.member) or (
                parsed.mode != "public" and parsed.node != signer.node):
            self._counters.dropped["identity_mismatch"] += 1
            return
        if not isinstance(body, dict) or not isinstance(body.get("online"), bool):
            self._counters.dropped["malformed"] += 1
            return
        previous = self._peers.get(key)
        ts = decoded.message.timestamp
        raw_session = body.get("session")
        session = raw_session if isinstance(raw_session, str) else ""
        if previous is not None:
            if previous.session == session:
                # The will was signed when the connection opened, before the announcement it
                # ends: within one session "offline" is final whatever the timestamps say.
                if previous.online is False and body["online"]:
                    return
            elif previous.since > ts:
                return  # a presence from an older session delivered late
        self._peers[key] = Peer(member=signer.member, node=signer.node,
                                online=body["online"], since=ts, session=session)
        self._changed.set()

    def online(self) -> list[Peer]:
        """Other nodes whose retained presence says they are online."""
        if self._codec:
            me = self._codec.signer.identity
            mine: tuple[str, str] | None = (me.member, me.node)
        else:
            mine = None
        return [p for k, p in self._peers.items() if p.online and k != mine]

    async def wait(self, predicate: Callable[[list[Peer]], bool], *,
                   timeout: float) -> list[Peer]:
        """Wait until ``predicate(online())`` holds; returns the peers then."""
        async with asyncio.timeout(timeout):
            while True:
                peers = self.online()
                if predicate(peers):
                    return peers
                self._changed.clear()
                await self._changed.wait()
