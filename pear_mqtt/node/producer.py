"""What ``broadcast()`` does before the flusher: an insight filtered by the node's privacy
policy, its aggregated groups sealed for the aggregator, spliced into the outbox item under
its derived id, and stored with its retained state in one outbox transaction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from ..config.models import NetworkConfig
from ..errors import OutboxError
from ..model.insight import MarketInsight
from ..model.topics import TopicScheme
from ..privacy.filter import EncodedResult, PrivacyFilter
from ..security.seal import Sealer
from .counters import Counters
from .item_ids import ItemIds
from .memory_outbox import MemoryOutbox
from .outbox import NewItem, Outbox

__all__ = ["Prepared", "Producer"]

_TOPIC_CACHE = 4096  # categories whose topic strings are kept


class Prepared(NamedTuple):
    """One filtered insight ready for the outbox: its live topic, payload and state topic
    (None when it has no retained state)."""

    topic: str
    payload: bytes
    state_topic: str | None


class Producer:
    """Turns insights into outbox rows for one connected node (:meth:`attach`)."""

    def __init__(self, *, config: NetworkConfig, counters: Counters,
                 privacy: PrivacyFilter) -> None:
        self._config = config
        self._counters = counters
        self._filter = privacy
        self._scheme: TopicScheme | None = None
        self._sealer: Sealer | None = None
        self._item_ids: ItemIds | None = None
        self._outbox: Outbox | MemoryOutbox | None = None
        self._category_topics: dict[str, tuple[str, str | None]] = {}

    def attach(self, *, topics: TopicScheme, sealer: Sealer | None, item_ids: ItemIds,
               outbox: Outbox | MemoryOutbox) -> None:
        self._scheme, self._sealer, self._item_ids = topics, sealer, item_ids
        self._outbox = outbox

    @property
    def attached(self) -> bool:
        return self._outbox is not None and self._scheme is not None \
            and self._item_ids is not None

    def prepare(self, insight: MarketInsight) -> tuple[str, Prepared | None]:
        """The item id of ``insight`` and what goes into the outbox for it (None: nothing).

        The id is derived from what the insight describes (:class:`ItemIds`). An insight of
        which nothing is published and nothing sealed gives nothing; one of which only the
        sealed part goes out gives that part alone, with no state.
        """
        return self._finish(insight, self._filter.encode(insight))

    def prepare_many(self, insights: Sequence[MarketInsight]
                     ) -> tuple[list[str], list[Prepared]]:
        """:meth:`prepare` for a batch, filtered in one go (``PrivacyFilter.encode_many``):
        every insight's id in order, and the items that go into the outbox. Raises
        :class:`~pear_mqtt.errors.PrivacyError` naming the first refused insight's position."""
        ids: list[str] = []
        items: list[Prepared] = []
        for insight, result in zip(insights, self._filter.encode_many(insights), strict=True):
            item_id, item = self._finish(insight, result)
            ids.append(item_id)
            if item is not None:
                items.append(item)
        return ids, items

    def _finish(self, insight: MarketInsight, result: EncodedResult
                ) -> tuple[str, Prepared | None]:
        """The filtered ``result`` of ``insight``: sealed, spliced under its item id."""
        assert self._item_ids is not None
        item_id = self._item_ids.of(insight)
        token: str | None = None
        if result.contribution is not None:
            if self._sealer is not None:
                token = self._sealer.seal(result.contribution)
            else:
                self._counters.dropped["aggregated_without_aggregator_key"] += 1
        if result.shared is None and token is None:
            return item_id, None  # the policy lets nothing of it leave the node
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
        return item_id, Prepared(live_topic, b"".join(parts), state_topic)

    def store(self, items: Sequence[Prepared]) -> None:
        """Put ``items`` (and their states) into the outbox: one transaction on disk."""
        outbox = self._outbox
        try:
            if isinstance(outbox, MemoryOutbox):
                for it in items:
                    outbox.put_insight(topic=it.topic, payload=it.payload,
                                       state_topic=it.state_topic)
            else:
                assert outbox is not None
                # Only a category's newest state of the batch is stored (the outbox would
                # skip the others as superseded within the call): no item made for them.
                newest = {it.state_topic: i for i, it in enumerate(items)}
                new: list[NewItem] = []
                for i, it in enumerate(items):
                    new.append(NewItem(topic=it.topic, payload=it.payload,
                                       kind="contrib" if it.state_topic is None else "insight"))
                    if it.state_topic is not None and newest[it.state_topic] == i:
                        new.append(NewItem(topic=it.state_topic, payload=it.payload,
                                           kind="state", key=it.state_topic, retain=True))
                outbox.put_many(new)
        except OutboxError:
            self._counters.dropped["outbox_refused"] += len(items)  # the caller gets it too
            raise

    def _topics_for(self, category: str) -> tuple[str, str | None]:
        """(live topic, state topic or None in public mode) of ``category``, remembered."""
        assert self._scheme is not None
        live, state = self._scheme.live_and_state(self._config.node_id, category)
        if len(self._category_topics) >= _TOPIC_CACHE:
            self._category_topics.clear()
        self._category_topics[category] = (live, state)
        return live, state
