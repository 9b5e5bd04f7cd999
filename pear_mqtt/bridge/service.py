"""The running bridge (:class:`Bridge`): verified inputs in, k-anonymous aggregates out.

A facade over its collaborators: the input links (:mod:`.links`) feed the
:class:`~.ingest.Ingestor`, which counts items into the store (:mod:`.state`); a clock
closes due windows (:mod:`.closing`), and the :class:`~.publisher.Publisher` sends the
outbox through :class:`~.output.PublicOutput`, the only writer to the public broker (and,
with ``consortium_output``, a second pair writes the consortium's own aggregates).
The contract is in docs/BRIDGE.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from ..errors import ConfigError, ConnectError, OutboxError, PearError
from ..history.log import Retention
from ..model.insight import Health
from ..model.topics import TopicScheme
from ..security.envelope import EnvelopeCodec
from ..transport import InboundMessage, stop_task
from .closing import WindowCloser, due_windows
from .config import BridgeConfig, BridgeRole
from .endpoints import bridge_codec
from .history import BridgeLog
from .ingest import Ingestor
from .links import InputLink, input_links, read_input
from .noise import NoiseMechanism
from .output import LEDGER_PERIODS, Audience, PublicOutput
from .partials import PartialExchange, owner_of
from .publisher import Publisher
from .state import BridgeStore, OutgoingRow, WindowInfo
from .status import BridgeCounters, BridgeStatus

__all__ = ["Bridge"]

log = logging.getLogger(__name__)


@dataclass(slots=True, kw_only=True)
class _Parts:
    """What :meth:`Bridge.start` opens and :meth:`Bridge.stop` closes."""

    store: BridgeStore
    output: PublicOutput
    ingestor: Ingestor
    closer: WindowCloser
    publisher: Publisher
    consortium: Publisher | None = None  # the consortium's own aggregates (consortium_output)
    consortium_output: PublicOutput | None = None
    exchange: PartialExchange | None = None  # scale-out: the partials (worker and merge roles)
    history: BridgeLog | None = None  # the log of what goes to the public (docs/HISTORY.md)
    consortium_history: BridgeLog | None = None  # ... and to the consortium (consortium_output)


class Bridge:
    """The running bridge.

    ::

        async with Bridge(BridgeConfigManager.load(file="bridge.toml")) as bridge:
            await stop_event.wait()

    ``clock`` drives the window decisions (when a window is due; tests move it); envelope
    checks always use real time. ``rng`` seeds the noise (tests only).

    ``role`` (default: ``single``, or ``worker`` when ``config.instances > 1``): a scale-out
    ``worker`` counts its share of the senders and hands each closed window to the merger as
    a sealed partial on the consortium broker; ``merge`` counts the partials and closes and
    publishes the windows (docs/BRIDGE.md, "Scale-out").
    """

    def __init__(self, config: BridgeConfig, *, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, role: BridgeRole | None = None) -> None:
        if role is None:
            role = "single" if config.instances == 1 else "worker"
        if role == "single" and config.instances > 1:
            raise ConfigError(f"a bridge of {config.instances} instances runs as 'worker' or "
                              "'merge', not 'single'")
        if role != "single" and config.instances == 1:
            raise ConfigError(f"role {role!r} is for a scaled-out bridge: set instances > 1")
        self.config = config
        self.role: BridgeRole = role
        self._tag = {"single": config.bridge_id, "worker": f"{config.bridge_id}-w{config.instance}",
                     "merge": f"{config.bridge_id}-merge"}[role]
        self._clock = clock
        self._noise = NoiseMechanism(config.dp, rng=rng) if config.dp.enabled else None
        self._links: list[InputLink] = []
        self._parts: _Parts | None = None
        self._out_task: asyncio.Task[None] | None = None
        self._cout_task: asyncio.Task[None] | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._closing = False
        self._changed = asyncio.Event()
        self._work = asyncio.Event()
        self._counters = BridgeCounters()
        self._started_at: datetime | None = None
        self._policy_version = config.policy_version()
        self._fatal: str | None = None

    @property
    def inputs(self) -> Sequence[InputLink]:
        """The input links (after :meth:`start`): names, connection state, presences seen."""
        return tuple(self._links)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, *, timeout: float = 10.0) -> None:
        """Open the state, connect every input and the public broker (a scale-out worker:
        the consortium broker, where its partials go), start the clock.

        Raises :class:`ConfigError`/:class:`~pear_mqtt.errors.PKIError` for bad material and
        :class:`ConnectError` when that broker cannot be reached within ``timeout``;
        inputs that are down are retried in the background.
        """
        cfg = self.config
        role = self.role
        self._closing = False
        links = input_links(cfg)
        codec = bridge_codec(tls=cfg.public.tls, network=cfg.public.network_id,
                             encryption=None, crl=cfg.public.crl_file,
                             rel=cfg.public.reliability, what="public")
        store = BridgeStore(cfg.role_state_path(role))
        history = self._open_history(store.pending, codec, "public")
        output = PublicOutput(config=cfg, codec=codec, history=history)
        previous = store.get_meta("policy_version")
        if previous is not None and previous != self._policy_version:
            log.warning("the disclosure policy changed since the last run (%s -> %s); open "
                        "windows are published under the new one", previous,
                        self._policy_version)
        store.set_meta("policy_version", self._policy_version)
        counters = self._counters
        cout: PublicOutput | None = None
        chistory: BridgeLog | None = None
        if cfg.consortium_output or role != "single":
            src = cfg.consortium
            assert src is not None
            ccodec = bridge_codec(tls=src.tls, network=src.network_id,
                                  encryption=src.encryption, crl=src.crl_file,
                                  rel=src.reliability, what=f"consortium {src.network_id}")
            chistory = self._open_history(store.consortium_pending, ccodec, "consortium")
            cout = PublicOutput(config=cfg, audience="consortium", codec=ccodec,
                                history=chistory)
        exchange: PartialExchange | None = None
        if role != "single":
            consortium = links[0]  # instances > 1 needs the consortium source (the first)
            assert consortium.opener is not None
            exchange = PartialExchange(config=cfg, role=role, store=store, counters=counters,
                                       codec=consortium.codec, opener=consortium.opener,
                                       clock=self._clock)
            links = [*(links if role == "worker" else ()), exchange.link(consortium)]
        if role == "worker":
            # A worker writes only its partials, on the consortium broker.
            assert cout is not None
            output, cout = cout, None
        self._links = links
        share = cfg.instance, cfg.instances
        parts = self._parts = _Parts(
            store=store, output=output,
            ingestor=Ingestor(config=cfg, store=store, counters=counters, clock=self._clock,
                              owner=None if role != "worker" else
                              (lambda key: owner_of(key, share[1]) == share[0])),
            closer=WindowCloser(config=cfg, store=store, output=output, noise=self._noise,
                                counters=counters,
                                consortium=cout if cfg.consortium_output else None),
            publisher=Publisher(config=cfg, output=output, store=store, counters=counters,
                                clock=self._clock, tag=self._tag,
                                audience="consortium" if role == "worker" else "public",
                                history=history),
            consortium=None if cout is None else Publisher(
                config=cfg, output=cout, store=store, counters=counters, clock=self._clock,
                audience="consortium", tag=self._tag, history=chistory),
            consortium_output=cout, exchange=exchange, history=history,
            consortium_history=chistory)
        self._started_at = datetime.now(UTC)
        loop = asyncio.get_running_loop()
        first: asyncio.Future[None] = loop.create_future()
        self._out_task = asyncio.create_task(parts.publisher.run(
            first=first, closing=self._is_closing, changed=self._changed, work=self._work))
        if parts.consortium is not None:
            # The consortium output connects in the background: the bridge starts without it.
            self._cout_task = asyncio.create_task(parts.consortium.run(
                first=loop.create_future(), closing=self._is_closing, changed=self._changed,
                work=self._work))
        for link in self._links:
            ingest = (parts.exchange.receive if parts.exchange is not None
                      and link.name == "partials" else parts.ingestor.ingest)
            link.task = asyncio.create_task(self._read(link, ingest))
        self._tick_task = asyncio.create_task(self._run_ticks())
        try:
            await asyncio.wait_for(asyncio.shield(first), timeout)
        except TimeoutError:
            await self.stop(drain=False)
            url = cfg.consortium.broker_url if role == "worker" and cfg.consortium \
                else cfg.public.broker_url
            raise ConnectError(f"bridge could not reach its output broker {url} within "
                               f"{timeout} s") from None

    def _open_history(self, pending: Callable[[], Sequence[OutgoingRow]], codec: EnvelopeCodec,
                      audience: Audience) -> BridgeLog | None:
        """The log of the aggregates and receipts this role publishes to ``audience``
        (``pending``: that broker's outbox)."""
        path = self.config.history_dir(self.role, audience)
        source = self.config.public if audience == "public" else self.config.consortium
        if path is None or source is None:
            return None
        rel = source.reliability
        history = BridgeLog(path=path, pending=pending, retention=Retention(
            max_age_seconds=rel.history_max_age, max_bytes=rel.history_max_bytes))
        history.attach(codec=codec, topics=TopicScheme(
            mode=audience, network=source.network_id, member=codec.signer.identity.member))
        return history

    async def stop(self, *, drain: bool = True, timeout: float = 10.0) -> None:
        """Stop: disconnect the inputs and count what they already received (``drain``),
        send what the outbox holds while the public broker is up, and close the state."""
        self._closing = True
        if self._tick_task is not None:
            await stop_task(self._tick_task)
            self._tick_task = None
        for link in self._links:
            task, conn = link.task, link.conn
            if conn is not None and drain:
                # DISCONNECT, then the reader goes on until the inbox is empty: what the
                # broker already delivered (and we acknowledged) is counted, not lost.
                await conn.close()
            elif conn is not None:
                conn.abort()
            if task is None:
                continue
            if conn is None or not drain:
                task.cancel()
            await asyncio.wait((task,), timeout=timeout)
            if not task.done():
                await stop_task(task)
            elif not task.cancelled() and task.exception() is not None:
                log.error("input %s failed while stopping: %r", link.name, task.exception())
            link.task = None
        parts = self._parts
        publishers = [] if parts is None else [
            p for p in (parts.publisher, parts.consortium) if p is not None]
        if drain:
            for publisher in publishers:
                with contextlib.suppress(PearError, TimeoutError):
                    await asyncio.wait_for(publisher.flush(), timeout)
        for attr in ("_out_task", "_cout_task"):
            task = getattr(self, attr)
            if task is not None:
                await stop_task(task)
                setattr(self, attr, None)
        if parts is not None:
            for out in (parts.output, parts.consortium_output):
                out_conn = out.detach() if out is not None else None
                if out_conn is not None:
                    if drain:
                        await out_conn.close()
                    else:
                        out_conn.abort()
            parts.store.close()
            for held in (parts.history, parts.consortium_history):
                if held is not None:
                    held.close()
            self._parts = None
        self._changed.set()

    async def __aenter__(self) -> Bridge:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _is_closing(self) -> bool:
        return self._closing

    async def _read(self, link: InputLink,
                    ingest: Callable[[InputLink, Sequence[InboundMessage]], None]) -> None:
        try:
            await read_input(link, client_id=f"pear-bridge-{self._tag}-"
                                             f"{link.name.replace(':', '-')}",
                             ingest=ingest, closing=self._is_closing,
                             changed=self._changed)
        except OutboxError as exc:
            # The state cannot record what was counted: stop counting rather than count
            # what a restart would count again.
            self._fail(f"input {link.name}: {exc}")

    # -- closing windows -------------------------------------------------------------------
    async def _run_ticks(self) -> None:
        while not self._closing:
            try:
                await self.tick()
            except OutboxError as exc:
                self._fail(f"closing windows: {exc}")
                return
            except Exception:
                log.exception("bridge tick failed")
            self._work.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._work.wait(), self.config.tick_seconds)

    def due_windows(self, now: float | None = None) -> list[int]:
        """Open windows that may be published at ``now`` (default: the bridge clock)."""
        assert self._parts is not None
        windows = self._parts.store.open_windows()
        if self._parts.exchange is not None and self.role == "merge":
            windows = self._merged(windows, self._parts.exchange)
        return due_windows(windows, config=self.config,
                           now=self._clock() if now is None else now)

    async def tick(self) -> None:
        """One round: close the windows that are due, then send what the outbox holds."""
        parts = self._parts
        if parts is None:
            return
        now = self._clock()
        if parts.exchange is not None and self.role == "worker":
            cfg = self.config
            # A worker's window closes when the single bridge's first close would (for the
            # consortium when it has an output, else for the public): its items are fixed
            # from then on, as they would be in one bridge.
            lag = (cfg.consortium_lag_seconds if cfg.consortium_output
                   else cfg.publication_lag_seconds)
            for start in due_windows(parts.store.open_windows(), config=cfg, now=now, lag=lag):
                parts.exchange.close(start, now)
        else:
            windows = parts.store.open_windows()
            if parts.exchange is not None:
                windows = self._merged(windows, parts.exchange)
            # Consortium first: a window due for both in one tick reaches the consortium
            # first.
            for start in parts.closer.consortium_due(windows, now):
                parts.closer.close_consortium(start, now)
            for start in due_windows(windows, config=self.config, now=now):
                parts.closer.close(start, now)
                if parts.exchange is not None:
                    parts.exchange.clear(start)
        if parts.consortium is not None:
            await parts.consortium.flush()
        await parts.publisher.flush()
        self._counters.ticks += 1
        self._changed.set()

    @staticmethod
    def _merged(windows: Sequence[WindowInfo], exchange: PartialExchange) -> list[WindowInfo]:
        """The merger's open windows whose every partial arrived, already settled (the
        workers waited for their inputs to settle before they closed them)."""
        waiting = exchange.waiting()
        return [WindowInfo(start=w.start, first_input=w.first_input,
                           last_input=float("-inf"), items=w.items)
                for w in windows if waiting.get(w.start) == []]

    def poke(self) -> None:
        """Run a tick now instead of waiting for ``tick_seconds`` (after moving the clock)."""
        self._work.set()

    # -- status ----------------------------------------------------------------------------
    def status(self) -> BridgeStatus:
        """Connections, counters and the ledger right now."""
        store = self._parts.store if self._parts is not None else None
        counts = store.counts() if store is not None else {}
        sources = {link.name: link.connected for link in self._links}
        public = self._parts is not None and self._parts.publisher.connected
        connected = public and all(sources.values())
        if store is None or self._fatal is not None:
            health = Health.DOWN
        elif connected:
            health = Health.OK
        else:
            health = Health.DEGRADED if public or any(sources.values()) else Health.DOWN
        eps: dict[str, float] = {}
        if store is not None and self.config.dp.enabled:
            for e in store.ledger()[-LEDGER_PERIODS:]:
                eps[datetime.fromtimestamp(e.period_start, UTC).isoformat()] = e.epsilon
        c = self._counters
        history = self._parts.history if self._parts is not None else None
        chistory = self._parts.consortium_history if self._parts is not None else None
        return BridgeStatus(
            health=health, connected=connected, public_connected=public, sources=sources,
            policy_version=self._policy_version, items_received=c.items_received,
            items_counted=c.items_counted, duplicates=c.duplicates, replaced=c.replaced,
            ignored=c.ignored,
            dropped=dict(c.dropped), suppressed=c.all_suppressed(),
            windows_open=counts.get("open", 0), windows_published=counts.get("published", 0),
            open_items=counts.get("open_items", 0), cells_published=c.cells_published,
            messages_published=c.messages_published,
            outbox_depth=store.outbox_depth if store is not None else 0, epsilon_spent=eps,
            consortium_outbox_depth=store.consortium_outbox_depth if store is not None else 0,
            consortium_connected=(self._parts.consortium.connected
                                  if self._parts is not None
                                  and self._parts.consortium is not None else None),
            ticks=c.ticks, items_per_second=c.items_per_second(),
            started_at=self._started_at, last_publish=c.last_publish, error=self._fatal,
            role=self.role, other_instances=c.other_instances,
            partials_missing=self._partials_missing(),
            log_id=None if history is None else history.log_id,
            log_length=None if history is None else history.length,
            consortium_log_length=None if chistory is None else chistory.length,
            log_requests_answered=sum(h.counters.log_requests_answered
                                      for h in (history, chistory) if h is not None))

    def _partials_missing(self) -> dict[str, list[int]]:
        exchange = self._parts.exchange if self._parts is not None else None
        if exchange is None or self.role != "merge":
            return {}
        return {datetime.fromtimestamp(w, UTC).isoformat(): missing
                for w, missing in sorted(exchange.waiting().items()) if missing}

    async def wait_for(self, predicate: Callable[[BridgeStatus], bool], *,
                       timeout: float) -> BridgeStatus:
        """Wait until ``predicate(status())`` holds; :class:`TimeoutError` after ``timeout``."""
        async with asyncio.timeout(timeout):
            while True:
                self._changed.clear()
                current = self.status()
                if predicate(current):
                    return current
                await self._changed.wait()

    def _fail(self, why: str) -> None:
        log.error("bridge state failed, the bridge stops counting and publishing: %s", why)
        self._fatal = why
        self._changed.set()
