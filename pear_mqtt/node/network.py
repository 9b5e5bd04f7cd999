"""PearNetwork: a node's view of one network, over a real MQTT broker.

A facade over the node's collaborators: the sender (outbox, flusher, checkpoint pages), the
receiver (verification, de-duplication, delivery), the peer table, the streams, and the
connection supervisor. The path of an insight through them: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config.checks import identity_mismatch
from ..config.manager import NetworkConfigManager
from ..config.models import NetworkConfig
from ..errors import ConfigError, ConnectError, NotConnectedError, PearError, TransportError
from ..history.log import Retention
from ..market import feed as market_feed
from ..market.feed import MarketFeed
from ..market.store import MarketStore
from ..model.insight import Health, MarketInsight, NetworkMode, NetworkStatus, as_insight
from ..model.topics import TopicScheme
from ..privacy.filter import PrivacyFilter
from ..security.envelope import EnvelopeCodec
from ..security.identity import Identity
from .archive import Archive
from .counters import Counters
from .history import NodeLog
from .markers import Markers
from .memory_outbox import MemoryOutbox
from .outbox import Outbox
from .peers import PeerTable
from .producer import PreparedBatch, node_sealer, node_topics
from .receiver import Receiver
from .records import Peer, ReceivedAggregate, ReceivedInsight, SyncResult
from .replicas import Fork, LogView, Replicas
from .sender import Sender
from .snapshot import Snapshot
from .streams import Streams
from .supervisor import ConnectionSupervisor

if TYPE_CHECKING:
    from ..ops.metrics import MetricsServer
__all__ = ["PearNetwork", "Peer", "ReceivedAggregate", "ReceivedInsight", "SyncResult"]

log = logging.getLogger(__name__)


class PearNetwork:
    """One node's membership in a pear_mqtt network.

    ::

        async with PearNetwork(config) as net:
            await net.broadcast_market_insight(insight)
            state = await net.sync()
            async for received in net.insights():
                ...

    ``read_only=True`` makes a watcher: it receives and verifies as the config's node but
    publishes nothing and keeps nothing, on a session of its own (docs/OPERATIONS.md).
    """

    def __init__(self, config: NetworkConfig, *, outbox_path: Path | None = None,
                 clock: Callable[[], float] = time.time, read_only: bool = False) -> None:
        # What the code left out (the broker, the certificates) may come from PEAR_* variables.
        config = NetworkConfigManager.with_environment(config)
        self._read_only = read_only
        if read_only:
            config = _watcher_config(config)
            outbox_path = None
        self.config = config
        self._clock = clock
        self._outbox_path = outbox_path or config.reliability.outbox_path
        self._codec: EnvelopeCodec | None = None
        self._scheme: TopicScheme | None = None
        self._last_sync: float | None = None
        self._counters = Counters()
        self._privacy = privacy = PrivacyFilter(config=config)
        self._markers = Markers()
        self._streams = Streams(counters=self._counters)
        self._peers = PeerTable(counters=self._counters)
        self._sender = Sender(config=config, counters=self._counters, privacy=privacy)
        self._receiver = Receiver(config=config, clock=clock, counters=self._counters,
                                  streams=self._streams, peers=self._peers,
                                  markers=self._markers, pages=self._sender.pages)
        self._history: NodeLog | None = None
        self._replicas: Replicas | None = None
        self._market: MarketFeed | None = None
        self._archive: Archive | None = None
        self._metrics: MetricsServer | None = None
        self._supervisor = ConnectionSupervisor(
            config=config, clock=clock, counters=self._counters, privacy=privacy,
            receiver=self._receiver, sender=self._sender, pages=self._sender.pages,
            streams=self._streams, read_only=read_only)
        self._snapshot = Snapshot(config=config, supervisor=self._supervisor,
                                  markers=self._markers, receiver=self._receiver,
                                  counters=self._counters)

    # -- lifecycle -------------------------------------------------------------------------
    async def connect(self, *, timeout: float = 10.0, wait: bool = True) -> None:
        """Join the network.

        Checks the config (certificate paths present and readable, ``node_id`` the node its
        certificate names: :class:`ConfigError` naming both, before any traffic), opens the
        outbox, and connects. With ``wait`` (default) it returns once connected or raises
        :class:`ConnectError` after ``timeout``; with ``wait=False`` it returns at once and
        keeps trying in the background (insights queue in the outbox meanwhile).
        """
        if self._supervisor.running:
            return
        NetworkConfigManager.validate(self.config, for_connect=True)
        codec = EnvelopeCodec.from_config(self.config, clock=self._clock)
        mismatch = identity_mismatch(self.config, codec.signer.identity)
        if mismatch is not None:
            raise ConfigError(mismatch)
        self._codec = codec
        self._privacy.attach(codec.signer.identity)
        if self._outbox_path is not None:
            # Kept next to the durable outbox: the node's other state across restarts.
            codec.persist_sequence(self._outbox_path.with_name(self._outbox_path.name + ".seq"))
        me = codec.signer.identity
        if me.network != self.config.network_id:
            raise ConnectError(f"certificate {self.config.tls.cert_file} is for network "
                               f"{me.network!r}, config says {self.config.network_id!r}")
        self._scheme = topics = node_topics(self.config, me)
        sealer = node_sealer(self.config)
        rel = self.config.reliability
        outbox = (Outbox(path=self._outbox_path, max_bytes=rel.outbox_max_bytes,
                         max_age=rel.outbox_max_age)
                  if self._outbox_path is not None else MemoryOutbox())
        self._markers.attach(topics.sync_marker(self.config.node_id))
        self._peers.attach(codec)
        history, replicas = ((None, None) if self._read_only
                             else self._open_history(codec, topics))
        self._snapshot.attach(scheme=topics, replicas=replicas)
        market = self._open_market()
        if replicas is not None:
            replicas.on_verified = None if market is None else market.proven
        self._receiver.attach(codec, replicas=replicas, history=history, sink=market,
                              archive=self._archive)
        self._sender.attach(codec=codec, topics=topics, sealer=sealer, outbox=outbox,
                            markers=self._markers, history=history)
        self._supervisor.attach(codec=codec, topics=topics)
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._supervisor.start(first)
        if not wait:
            first.cancel()
            return
        try:
            await asyncio.wait_for(asyncio.shield(first), timeout)
        except TimeoutError:
            await self.disconnect()
            raise ConnectError(f"could not connect to {self.config.broker_url} within "
                               f"{timeout} s: {self._supervisor.last_error or 'no answer'}"
                               ) from None
        except PearError:
            await self.disconnect()
            raise

    def _open_history(self, codec: EnvelopeCodec, topics: TopicScheme
                      ) -> tuple[NodeLog | None, Replicas | None]:
        """This node's own log (when it keeps one) and its view of the others' logs (a
        public participant keeps none of its own, it publishes to the bridge only, but
        follows the bridge's)."""
        public = self.config.mode is NetworkMode.PUBLIC
        rel = self.config.reliability
        if self._history is None and rel.history_dir is not None and not public:
            self._history = NodeLog(
                path=rel.history_dir, node_id=self.config.node_id, counters=self._counters,
                retention=Retention(max_age_seconds=rel.history_max_age,
                                    max_bytes=rel.history_max_bytes))
        if self._history is not None:
            self._history.attach(codec=codec, topics=topics)
        if self._replicas is None:
            archive = rel.archive.split("/", 1) if rel.archive is not None else None
            if rel.archive_path is not None:
                self._archive = Archive(path=rel.archive_path, counters=self._counters)
            self._replicas = Replicas(
                counters=self._counters, mode=topics.mode, network=topics.network,
                archive=None if archive is None else (archive[0], archive[1]),
                keep=None if self._archive is None else self._archive.keep)
            if self._archive is not None:
                self._archive.open(self._replicas, topics.network)
        if self._archive is not None:
            self._archive.attach(codec=codec, topics=topics)
        self._replicas.attach(codec=codec, reply_topic=topics.log_reply(self.config.node_id))
        return self._history, self._replicas

    def _open_market(self) -> MarketFeed | None:
        """The market store this node keeps of what it receives (when enabled)."""
        cfg = self.config.market
        if not cfg.enabled:
            return None
        if self._market is None:
            retention = Retention(max_age_seconds=cfg.max_age, max_bytes=cfg.max_bytes)
            path = cfg.store_path(self._outbox_path)
            mode = self.config.mode.value
            store = (MarketStore.open(path, network=self.config.network_id, mode=mode,
                                      retention=retention) if path is not None else
                     MarketStore.temporary(network=self.config.network_id, mode=mode,
                                           retention=retention))
            self._market = MarketFeed(store)
            loop, loop_thread = asyncio.get_running_loop(), threading.get_ident()

            def hold(held: bool) -> None:
                apply = functools.partial(self._receiver.hold_reading, held,
                                          at_most=market_feed.HOLD_MAX)
                if threading.get_ident() == loop_thread:  # at once: mid-read, the next packet
                    apply()                               # already waits
                    return
                with contextlib.suppress(RuntimeError):  # a loop that closed meanwhile
                    loop.call_soon_threadsafe(apply)

            self._market.on_hold = hold
            self._market.start()
        return self._market

    @property
    def market(self) -> MarketStore:
        """The market store: what this node received and verified, queryable
        (docs/MARKET.md). Rows a moment old may still be on their way in: ``await
        net.market_settled()`` first to read everything received so far."""
        if self._market is None:
            raise NotConnectedError("no market store: call connect() first (and keep "
                                    "market.enabled)")
        return self._market.store

    async def market_settled(self, *, timeout: float = 10.0) -> None:
        """Wait until everything received so far is in the market store."""
        if self._market is not None and not await asyncio.to_thread(self._market.drain,
                                                                    timeout):
            raise TimeoutError(f"the market store did not catch up within {timeout} s")

    def logs(self) -> list[LogView]:
        """What this node holds of every other node's history log (held and verified
        length, the latest signed head's length, whether the sender forked)."""
        return [] if self._replicas is None else self._replicas.views()

    async def wait_logs(self, predicate: Callable[[], bool], *, timeout: float = 30.0) -> None:
        """Until ``predicate()`` holds, re-checked whenever what this node holds of the
        others' logs changes (an entry, a head, a repair, a fork); :class:`TimeoutError`
        after ``timeout`` s. E.g. ``await net.wait_logs(lambda: all(v.verified ==
        v.head_length for v in net.logs()))``."""
        if self._replicas is None:
            raise NotConnectedError("call connect() first")
        await self._replicas.wait(predicate, timeout)

    def archived(self) -> dict[str, int]:
        """An archive node's kept logs: entries per sender (empty for other nodes)."""
        return {} if self._archive is None else self._archive.logs()

    @property
    def forks(self) -> list[Fork]:
        """Evidence of every sender seen rewriting its history (both signed payloads)."""
        return [] if self._replicas is None else list(self._replicas.forks)

    async def disconnect(self, *, flush_timeout: float = 5.0) -> None:
        """Leave cleanly: wait up to ``flush_timeout`` s for unacknowledged insights, mark
        presence offline, and close. What is still unsent stays in the outbox (lost only when
        the outbox is in memory, i.e. no ``outbox_path`` is configured)."""
        if self._supervisor.connected and not self._sender.idle and flush_timeout > 0:
            self._sender.force()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sender.wait_idle(), flush_timeout)
        await self._supervisor.stop()
        self._streams.wake_all()
        self._sender.close_outbox()
        if self._history is not None:
            self._history.close()
            self._history = None
        if self._archive is not None:
            self._archive.close()
            self._archive = None
            self._replicas = None  # reopened from the archive's files on the next connect()
        if self._market is not None:
            await asyncio.to_thread(self._market.close)
            self._market.store.close()
            self._market = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def serve_metrics(self, *, port: int = 0, host: str = "127.0.0.1") -> str:
        """Serve this node's counters as Prometheus metrics at ``http://host:port/metrics``
        (port 0: a free one) until :meth:`disconnect`; returns the URL. The names are in
        docs/OPERATIONS.md."""
        from ..ops.metrics import NodeCollector, serve
        if self._metrics is None:
            self._metrics = serve(NodeCollector(self.status, cert_file=self.config.tls.cert_file),
                                  port=port, host=host)
        return self._metrics.url

    async def __aenter__(self) -> PearNetwork:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    @property
    def identity(self) -> Identity:
        """This node's identity as its certificate states it."""
        if self._codec is None:
            raise NotConnectedError("call connect() first")
        return self._codec.signer.identity

    @property
    def supervisor(self) -> ConnectionSupervisor:
        """The collaborator that owns the broker connection: its ``connection`` (and the
        negotiated ``protocol``), and ``crash()`` for tests of the last will."""
        return self._supervisor

    # -- publishing --------------------------------------------------------------------------
    async def broadcast_market_insight(self, insight: MarketInsight | dict[str, Any]) -> str:
        """Share ``insight`` as the privacy policy allows; returns its item id.

        Returns once the filtered insight is in the outbox (on disk when one is configured);
        delivery continues in the background. ``flush()`` waits for the broker's acks. The id
        is derived from what the insight describes: sending the same observation again (with
        the same or corrected values) reuses it. When the policy lets nothing of the insight
        leave the node, nothing is sent. A dict of the insight's fields is accepted too;
        anything invalid raises :class:`~pear_mqtt.errors.InsightError`.
        """
        self._writable()
        return await self._sender.broadcast(as_insight(insight))

    async def broadcast_many(self, insights: Sequence[MarketInsight | dict[str, Any]]
                             ) -> list[str]:
        """Share a batch of insights: like :meth:`broadcast_market_insight` for each, but
        stored in one outbox transaction and signed in as few envelopes as the batch limits
        allow; returns their item ids in order. All or nothing: when one insight is refused
        (the error names its position), none of the batch is stored."""
        self._writable()
        return await self._sender.broadcast_many([as_insight(i) for i in insights])

    async def broadcast_prepared(self, batch: PreparedBatch) -> list[str]:
        """Share a batch that :meth:`Preparer.prepare_many <pear_mqtt.node.producer.Preparer.
        prepare_many>` made for this node, possibly in another process (the agent's workers
        filter and seal there): stored in one outbox transaction like :meth:`broadcast_many`;
        returns its item ids. Raises :class:`ConfigError` for a batch prepared as another
        node."""
        self._writable()
        return await self._sender.broadcast_prepared(batch)

    def _writable(self) -> None:
        if self._read_only:
            raise ConfigError("this PearNetwork is read-only (a watcher): it publishes "
                              "nothing; open another without read_only=True to broadcast")

    async def flush(self, *, timeout: float | None = None) -> None:
        """Wait until the broker acknowledged everything broadcast so far, including the
        state checkpoint pages late joiners read."""
        self._sender.force()
        async with asyncio.timeout(timeout):
            await self._sender.wait_idle()
            conn = self._supervisor.connection
            if conn is not None and conn.connected:
                # Some brokers (amqtt) acknowledge a QoS 1 PUBLISH before they store or route
                # it; our own marker coming back proves the broker has processed everything
                # we sent before it.
                with contextlib.suppress(TransportError):
                    await self._markers.round_trip(conn)

    # -- receiving ---------------------------------------------------------------------------
    def insights(self) -> AsyncIterator[ReceivedInsight]:
        """Every verified insight from now on, until ``disconnect()``.

        Each call makes an independent iterator with its own bounded buffer (the oldest are
        dropped and counted as ``subscriber_overflow`` if it falls 100,000 behind).
        """
        return self._streams.insights()

    def aggregates(self) -> AsyncIterator[ReceivedAggregate]:
        """Every verified aggregate from now on, until ``disconnect()``: the public ones in
        public mode, the consortium's own (``consortium_output`` of the bridge) in
        consortium mode.

        Only the bridge may write aggregates (broker ACL); a receiver also checks that the
        signer's certificate is a bridge's (node ``bridge``) of this network, and that the
        body names the topic's network and category, before it believes one.
        """
        return self._streams.aggregates()

    def on_insight(self, callback: Callable[[ReceivedInsight], Any]) -> Callable[[], None]:
        """Call ``callback`` for each verified insight; returns a function that stops it."""
        return self._streams.on_insight(callback)

    # -- sync, peers, status ------------------------------------------------------------------
    async def sync(self, *, timeout: float = 60.0) -> SyncResult:
        """Collect the current retained state of everything this node may read (complete
        by a marker's round trip and by the pages each sender's signed head names: see
        :class:`~pear_mqtt.node.snapshot.Snapshot`)."""
        result = await self._snapshot.take(timeout=timeout)
        self._last_sync = self._clock()
        return result

    async def wait_connected(self, *, timeout: float) -> None:
        """Wait until the node is connected (again); :class:`TimeoutError` after ``timeout``."""
        await asyncio.wait_for(self._supervisor.wait_connected(), timeout)

    async def wait_disconnected(self, *, timeout: float) -> None:
        """Wait until the connection is down; :class:`TimeoutError` after ``timeout``."""
        await asyncio.wait_for(self._supervisor.wait_disconnected(), timeout)

    async def wait_peers(self, predicate: Callable[[list[Peer]], bool], *,
                         timeout: float) -> list[Peer]:
        """Wait until ``predicate(peers())`` holds; returns the peers then."""
        return await self._peers.wait(predicate, timeout=timeout)

    def peers(self) -> list[Peer]:
        """Other nodes whose retained presence says they are online."""
        return self._peers.online()

    def status(self) -> NetworkStatus:
        """Connection state, counters and health right now."""
        c = self._counters
        depth = self._sender.outbox_depth
        connected = self._supervisor.connected
        dropped = dict(c.dropped)
        feed = self._market
        if connected:
            health = (Health.OK if depth < 10_000 and (feed is None or feed.failing is None)
                      else Health.DEGRADED)
        else:
            health = Health.DEGRADED if self._supervisor.running else Health.DOWN
        latency = self._sender.latency
        since = self._supervisor.connected_since
        market = None if feed is None else feed.store.status()
        return NetworkStatus(
            connected=connected, broker=str(self._supervisor.broker), peers=len(self.peers()),
            last_sync=(None if self._last_sync is None else
                       datetime.fromtimestamp(self._last_sync, UTC)),
            log_gaps=c.log_gaps, log_repaired=c.log_repaired,
            log_unrepairable=c.log_unrepairable, log_forks=c.log_forks,
            log_refused=dict(c.log_refused), insights_in=c.insights_in,
            market_rows=0 if market is None else market.insights + market.aggregates,
            market_bytes=0 if market is None else market.bytes,
            market_oldest=None if market is None else market.oldest,
            market_failing=None if feed is None else feed.failing,
            market_backlog=0 if feed is None else feed.backlog,
            market_dropped=0 if feed is None else feed.dropped,
            messages_in=c.messages_in, messages_out=c.messages_out,
            insights_out=c.insights_out, insights_acknowledged=c.insights_acked, dropped=dropped,
            duplicates=c.duplicates, states_from_checkpoints=c.states_from_checkpoints,
            latency_ms=None if latency is None else round(latency, 3),
            outbox_depth=depth, reconnects=c.reconnects, health=health,
            outbox_oldest=_utc(self._sender.outbox_oldest()),
            connected_since=(datetime.fromtimestamp(since, UTC)
                             if connected and since is not None else None),
            last_error=self._supervisor.last_error,
            delivery_latency=c.delivery_latency.snapshot(),
            sync_duration=c.sync_duration.snapshot())


def _utc(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


def _watcher_config(config: NetworkConfig) -> NetworkConfig:
    """``config`` for a watcher: nothing kept on disk (no outbox, history log, archive or
    market store), nothing that writes to the broker."""
    rel = config.reliability.model_copy(update={"outbox_path": None, "history_dir": None,
                                                "archive_path": None, "archive": None})
    market = config.market.model_copy(update={"enabled": False})
    return config.model_copy(update={"reliability": rel, "market": market})
