"""What ``broadcast()`` does before the flusher: an insight filtered by the node's privacy
policy, its aggregated groups sealed for the aggregator and spliced into the outbox item under
its derived id (:class:`Preparer`, which may run in another process: docs/DESIGN.md, "Edge
agent"), then stored with its retained state in one outbox transaction (:class:`Producer`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from ..config.models import NetworkConfig
from ..errors import ConfigError, OutboxError
from ..model.insight import MarketInsight
from ..model.topics import TopicScheme
from ..privacy.filter import EncodedResult, PrivacyFilter
from ..security.identity import Identity
from ..security.seal import Sealer, load_x25519_public_key
from ..security.signing import Signer
from .counters import Counters
from .item_ids import ItemIds
from .memory_outbox import MemoryOutbox
from .outbox import NewItem, Outbox

__all__ = ["Prepared", "PreparedBatch", "Preparer", "Producer", "node_sealer", "node_topics"]

_TOPIC_CACHE = 4096  # categories whose topic strings are kept


Prepared = tuple[str, bytes, str | None]
"""One filtered insight ready for the outbox: (live topic, payload, state topic or None when
it has no retained state). A plain tuple: batches of them cross from the agent's worker
processes, and pickle copies a tuple several times faster than a named one."""


class PreparedBatch(NamedTuple):
    """A batch made ready by :meth:`Preparer.prepare_many`, for
    :meth:`~pear_mqtt.node.network.PearNetwork.broadcast_prepared`: every insight's item id
    in order, the items that go into the outbox, and how many aggregated parts were dropped
    for want of the aggregator's key. ``origin`` is the certificate identity the batch was
    prepared as (``network/member/node``): a node stores only its own."""

    origin: str
    ids: list[str]
    items: list[Prepared]
    unsealed: int


def node_topics(config: NetworkConfig, identity: Identity) -> TopicScheme:
    """The topics of the node ``identity`` names, in ``config``'s mode and network."""
    return TopicScheme(mode=config.mode.value, network=config.network_id,
                       member=identity.member)


def node_sealer(config: NetworkConfig) -> Sealer | None:
    """A sealer to the aggregator's key of ``config`` (None when it names none)."""
    key_file = config.privacy.aggregator_key_file
    return Sealer(load_x25519_public_key(key_file)) if key_file is not None else None


def _origin(identity: Identity) -> str:
    return f"{identity.network}/{identity.member}/{identity.node}"


class Preparer:
    """Filters, seals and names insights the way one node sends them; needs no connection
    and no outbox, so a worker process can run one (:meth:`from_config`)."""

    def __init__(self, *, config: NetworkConfig, privacy: PrivacyFilter, topics: TopicScheme,
                 sealer: Sealer | None, item_ids: ItemIds, identity: Identity) -> None:
        self._config = config
        self._filter = privacy
        self._scheme = topics
        self._sealer = sealer
        self._item_ids = item_ids
        self.origin = _origin(identity)
        self._category_topics: dict[str, tuple[str, str | None]] = {}

    @classmethod
    def from_config(cls, config: NetworkConfig) -> Preparer:
        """The preparer of the node ``config`` describes, its key and certificate read from
        ``tls`` (raises :class:`~pear_mqtt.errors.PKIError` when they cannot be)."""
        tls = config.tls
        if tls.key_file is None or tls.cert_file is None:
            raise ConfigError("preparing insights needs tls.key_file and tls.cert_file (the "
                              "node's identity names its pseudonyms and item ids)")
        signer = Signer.from_files(key_file=tls.key_file, cert_file=tls.cert_file)
        privacy = PrivacyFilter(config=config)
        privacy.attach(signer.identity)
        return cls(config=config, privacy=privacy, topics=node_topics(config, signer.identity),
                   sealer=node_sealer(config), item_ids=ItemIds(signer),
                   identity=signer.identity)

    def prepare(self, insight: MarketInsight) -> tuple[str, Prepared | None, bool]:
        """The item id of ``insight``, what goes into the outbox for it (None: nothing), and
        whether an aggregated part was dropped for want of the aggregator's key.

        The id is derived from what the insight describes (:class:`ItemIds`). An insight of
        which nothing is published and nothing sealed gives nothing; one of which only the
        sealed part goes out gives that part alone, with no state.
        """
        return self._finish(insight, self._filter.encode(insight))

    def prepare_many(self, insights: Sequence[MarketInsight]) -> PreparedBatch:
        """:meth:`prepare` for a batch, filtered in one go (``PrivacyFilter.encode_many``).
        Raises :class:`~pear_mqtt.errors.PrivacyError` naming the first refused insight's
        position."""
        ids: list[str] = []
        items: list[Prepared] = []
        unsealed = 0
        for insight, result in zip(insights, self._filter.encode_many(insights), strict=True):
            item_id, item, dropped = self._finish(insight, result)
            ids.append(item_id)
            unsealed += dropped
            if item is not None:
                items.append(item)
        return PreparedBatch(self.origin, ids, items, unsealed)

    def _finish(self, insight: MarketInsight, result: EncodedResult
                ) -> tuple[str, Prepared | None, bool]:
        """The filtered ``result`` of ``insight``: sealed, spliced under its item id."""
        item_id = self._item_ids.of(insight)
        token: str | None = None
        unsealed = False
        if result.contribution is not None:
            if self._sealer is not None:
                token = self._sealer.seal(result.contribution)
            else:
                unsealed = True
        if result.shared is None and token is None:
            return item_id, None, unsealed  # the policy lets nothing of it leave the node
        # The item is spliced from the filter's JSON (one serialisation, no dict round trip);
        # the id is hex and the sealed token base64url, so neither needs escaping.
        parts = [b'{"iid":"', item_id.encode(), b'"']
        if result.shared is not None:
            parts += [b',"insight":', result.shared]
        if token is not None:
            parts += [b',"sealed":"', token.encode(), b'"']
        parts.append(b"}")
        topics = self._category_topics.get(insight.category)
        if topics is None:
            topics = self._topics_for(insight.category)
        live_topic, state_topic = topics
        if result.shared is None:
            state_topic = None  # a sealed part alone tells peers nothing worth keeping
        return item_id, (live_topic, b"".join(parts), state_topic), unsealed

    def _topics_for(self, category: str) -> tuple[str, str | None]:
        """(live topic, state topic or None in public mode) of ``category``, remembered."""
        live, state = self._scheme.live_and_state(self._config.node_id, category)
        if len(self._category_topics) >= _TOPIC_CACHE:
            self._category_topics.clear()
        self._category_topics[category] = (live, state)
        return live, state


class Producer:
    """Turns insights into outbox rows for one connected node (:meth:`attach`)."""

    def __init__(self, *, config: NetworkConfig, counters: Counters,
                 privacy: PrivacyFilter) -> None:
        self._config = config
        self._counters = counters
        self._filter = privacy
        self._preparer: Preparer | None = None
        self._outbox: Outbox | MemoryOutbox | None = None

    def attach(self, *, topics: TopicScheme, sealer: Sealer | None, signer: Signer,
               outbox: Outbox | MemoryOutbox) -> None:
        self._preparer = Preparer(config=self._config, privacy=self._filter, topics=topics,
                                  sealer=sealer, item_ids=ItemIds(signer),
                                  identity=signer.identity)
        self._outbox = outbox

    @property
    def attached(self) -> bool:
        return self._outbox is not None and self._preparer is not None

    def prepare(self, insight: MarketInsight) -> tuple[str, Prepared | None]:
        """:meth:`Preparer.prepare`, counting an aggregated part dropped for want of a key."""
        assert self._preparer is not None
        item_id, item, unsealed = self._preparer.prepare(insight)
        if unsealed:
            self._counters.dropped["aggregated_without_aggregator_key"] += 1
        return item_id, item

    def prepare_many(self, insights: Sequence[MarketInsight]) -> PreparedBatch:
        """:meth:`Preparer.prepare_many` (counted by :meth:`accept`)."""
        assert self._preparer is not None
        return self._preparer.prepare_many(insights)

    def accept(self, batch: PreparedBatch) -> None:
        """Check that ``batch`` was prepared as this node, and count what it dropped."""
        assert self._preparer is not None
        if batch.origin != self._preparer.origin:
            raise ConfigError(f"a batch prepared as {batch.origin} cannot be sent by "
                              f"{self._preparer.origin}: prepare it with this node's config")
        if batch.unsealed:
            self._counters.dropped["aggregated_without_aggregator_key"] += batch.unsealed

    def store(self, items: Sequence[Prepared]) -> None:
        """Put ``items`` (and their states) into the outbox: one transaction on disk."""
        outbox = self._outbox
        try:
            if isinstance(outbox, MemoryOutbox):
                for topic, payload, state_topic in items:
                    outbox.put_insight(topic=topic, payload=payload, state_topic=state_topic)
            else:
                assert outbox is not None
                # Only a category's newest state of the batch is stored (the outbox would
                # skip the others as superseded within the call): no item made for them.
                newest = {state_topic: i for i, (_, _, state_topic) in enumerate(items)}
                new: list[NewItem] = []
                for i, (topic, payload, state_topic) in enumerate(items):
                    new.append(NewItem(topic=topic, payload=payload,
                                       kind="contrib" if state_topic is None else "insight"))
                    if state_topic is not None and newest[state_topic] == i:
                        new.append(NewItem(topic=state_topic, payload=payload, kind="state",
                                           key=state_topic, retain=True))
                outbox.put_many(new)
        except OutboxError:
            self._counters.dropped["outbox_refused"] += len(items)  # the caller gets it too
            raise
