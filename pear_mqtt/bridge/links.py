"""The bridge's inputs: one :class:`InputLink` per broker subscription it reads (the
consortium, each opted-in private broker, public contributions), built from the
configuration, and the loop that keeps a link connected and hands its messages on."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..backoff import Backoff
from ..config.models import ReliabilityConfig, TLSConfig
from ..errors import ConnectError, TransportError
from ..failover import BrokerRing
from ..model.insight import SharingLevel
from ..model.topics import TopicScheme
from ..security.envelope import EnvelopeCodec
from ..security.seal import SealOpener
from ..transport import Connection, InboundMessage
from .config import BridgeConfig
from .endpoints import bridge_codec, bridge_connection

__all__ = ["InputLink", "input_links", "read_input"]

log = logging.getLogger(__name__)

# Messages whose items go into one store transaction (one commit, then their acks): a
# backlog is written in large batches, while a trickle still commits message by message.
# A commit's cost grows with the index pages it rewrites, not with its items, so larger
# groups are cheaper per item (docs/BRIDGE.md, "Cost per insight").
_INGEST_MESSAGES = 256


@dataclass(slots=True)
class InputLink:
    """One broker subscription the bridge reads, and what it learned on it.

    ``presence`` holds the sharing levels each (member, node) announced; ``connected`` says
    whether the link is up right now.
    """

    name: str
    kind: Literal["consortium", "private", "public"]
    network: str
    broker_url: str
    tls: TLSConfig
    reliability: ReliabilityConfig
    codec: EnvelopeCodec
    opener: SealOpener | None
    policy: dict[str, SharingLevel]
    domain: str
    filters: list[str]
    company_id: str | None = None  # private: the only member allowed to write here
    member_alias: str | None = None  # private: the company's identity in ``domain``
    include_full: bool = False
    presence: dict[tuple[str, str], dict[str, SharingLevel]] = field(default_factory=dict)
    conn: Connection | None = None
    connected: bool = False
    task: asyncio.Task[None] | None = None


def input_links(config: BridgeConfig) -> list[InputLink]:
    """The links ``config`` asks for, with their codecs and seal openers loaded.

    Raises :class:`~pear_mqtt.errors.ConfigError` or :class:`~pear_mqtt.errors.PKIError`
    for missing or wrong key material.
    """
    links: list[InputLink] = []
    for _, src in config.sources():
        what = (f"consortium {src.network_id}" if src.mode == "consortium"
                else f"private {src.company_id}")
        codec = bridge_codec(tls=src.tls, network=src.network_id, encryption=src.encryption,
                             crl=src.crl_file, rel=src.reliability, what=what)
        scheme = TopicScheme(mode=src.mode, network=src.network_id,
                             member=src.company_id or codec.signer.identity.member)
        opener = (SealOpener.from_file(src.aggregator_key_file)
                  if src.aggregator_key_file else None)
        links.append(InputLink(
            name=what.replace(" ", ":"), kind=src.mode, network=src.network_id,
            broker_url=src.broker_url, tls=src.tls, reliability=src.reliability,
            codec=codec, opener=opener, policy=src.policy(), domain=src.identity_domain,
            filters=[scheme.live_filter(), scheme.presence_filter()],
            company_id=src.company_id, member_alias=src.member,
            include_full=src.aggregate_full))
    pub = config.public
    if pub.contributions:
        codec = bridge_codec(tls=pub.tls, network=pub.network_id, encryption=None,
                             crl=pub.crl_file, rel=pub.reliability, what="public contributions")
        scheme = TopicScheme(mode="public", network=pub.network_id,
                             member=codec.signer.identity.member)
        links.append(InputLink(
            name=f"public:{pub.network_id}", kind="public", network=pub.network_id,
            broker_url=pub.broker_url, tls=pub.tls, reliability=pub.reliability,
            codec=codec,
            opener=SealOpener.from_file(pub.aggregator_key_file)
            if pub.aggregator_key_file else None,
            policy=pub.policy(), domain=pub.network_id,
            filters=[scheme.contrib_filter()]))
    return links


async def read_input(link: InputLink, *, client_id: str,
                     ingest: Callable[[InputLink, Sequence[InboundMessage]], None],
                     closing: Callable[[], bool], changed: asyncio.Event) -> None:
    """Keep ``link`` connected until ``closing()``, and hand what arrives to ``ingest``.

    Messages are acknowledged only after ``ingest`` returned (it has stored them, or refused
    them for good). An exception from ``ingest`` (the state cannot record what was counted)
    ends the loop unacknowledged: the broker keeps the messages for the next run.
    """
    backoff = Backoff(minimum=link.reliability.reconnect_min_delay,
                      maximum=link.reliability.reconnect_max_delay)
    ring = BrokerRing.of(link.broker_url)
    while not closing():
        # A stable client id with a persistent session: the broker queues what arrives
        # while the bridge is down and delivers it on reconnect.
        conn = bridge_connection(url=ring.current, tls=link.tls, rel=link.reliability,
                                 client_id=client_id)
        try:
            await conn.connect()
            granted = await conn.subscribe([(f, 1) for f in link.filters])
            if any(g >= 128 for g in granted):
                raise ConnectError(f"{link.name}: broker refused subscriptions {granted}")
        except (ConnectError, TransportError) as exc:
            conn.abort()
            log.info("bridge input %s: %s", link.name, exc)
            ring.failed()
            await asyncio.sleep(backoff.next_delay())
            continue
        backoff.reset()
        link.conn, link.connected = conn, True
        changed.set()
        log.info("bridge input %s connected to %s", link.name, ring.current)
        try:
            async for msg in conn.messages():
                # What else already arrived is taken along (up to _INGEST_MESSAGES), so that
                # a backlog costs one store transaction per group instead of one per message;
                # the rest stays in the transport's bounded inbox.
                group = [msg, *conn.drain_inbox(limit=_INGEST_MESSAGES - 1)]
                ingest(link, group)
                # After the commit, and in one send: a scale-out instance acknowledges
                # every message it leaves to the others too (docs/BRIDGE.md, "Scale-out").
                conn.ack_many(group)
                changed.set()
                if conn.queued:
                    await asyncio.sleep(0)  # acks, writes and keep-alives go on
        finally:
            link.connected = False
            link.conn = None
            changed.set()
        if not closing():
            await asyncio.sleep(backoff.next_delay())
