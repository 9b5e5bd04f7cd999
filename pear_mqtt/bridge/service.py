"""The public bridge: verified inputs in, k-anonymous aggregates out.

``pear-mqtt bridge --config FILE`` runs a :class:`Bridge`. It reads

- the consortium broker (``pear/v1/consortium/<network>/+/insights/#`` and presence),
- the private brokers of companies that opt in (``pear/v1/private/<company>/...``),
- public participants' contributions (``pear/v1/public/<network>/contrib/#``),

each with its own certificate, verifies every envelope (signature, certificate, replay,
group-key decryption), checks every item against the network's sharing policy and the levels
its node announced, opens the sealed contribution with the aggregator's X25519 key, and counts
it in a fixed time window (SQLite, :mod:`pear_mqtt.bridge_state`). Once a window is older
than the publication lag (and its inputs have settled), the bridge aggregates each cell —
(category, region, window) — with :func:`pear_mqtt.privacy.aggregate`, keeps only statistics
of at least ``min_companies`` distinct companies with no company above the dominance cap,
optionally adds Laplace or Gaussian noise against a per-period ε budget, and publishes, as
retained messages signed with its own certificate:

``pear/v1/public/<network>/aggregates/<category>``
    the category's cells of the latest published window (:class:`AggregateBody`);
``pear/v1/public/<network>/state/bridge/receipts/<category>``
    the disclosure receipt of that message (:class:`ReceiptBody`): contributors, inputs and
    their hash, policy version, k, cap, ε spent per cell, and the SHA-256 of the aggregate;
``pear/v1/public/<network>/state/bridge/ledger``
    the ε ledger per budget period (:class:`LedgerBody`), when noise is on.

Fail closed, by construction:

- Only :class:`PublicOutput` holds the connection that writes to the public broker, and it
  sends only messages it built itself from :class:`CellResult` statistics, after checking
  again that every statistic covers at least k companies. Inputs are read over other
  connections that never publish.
- A suppressed statistic is simply absent. Suppressions are counted in :class:`BridgeStatus`
  (metrics), never published per cell.
- An item that discloses more than the policy allows (an exact number where the policy says
  ``ranges_only``, ``aggregated`` or ``none``; a level its node's presence announced
  differently; a sealed group the policy does not aggregate) is dropped and counted.
- A window is aggregated once. Its messages are written to the outbox in the transaction that
  closes it and spends its budget, so a restart re-sends the same bytes instead of drawing
  fresh noise, and anything arriving for a closed window is dropped as late.

Companies are counted by the identity their certificate names (the broker enforces that a
member writes only its own subtree), not by anything inside a sealed token. Identities of
different networks are unlinkable by design (per-network pseudonyms), so when one cell mixes
identity *domains* the bridge assumes the worst: the same company may appear once per domain.
k then counts the largest domain alone and the dominance test adds up each domain's largest
share. A private source declares its company's identity in the consortium's domain
(``domain``/``member``) so it merges instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config.models import (
    ReliabilityConfig,
    TLSConfig,
)
from ..errors import (
    ConnectError,
    DecryptionError,
    EnvelopeError,
    OutboxError,
    PearError,
    PrivacyError,
    TopicError,
    TransportError,
)
from ..model.aggregates import (
    AggregateBody,
    LedgerBody,
    LedgerPeriod,
    NoiseInfo,
    PublishedCell,
    PublishedGroupBody,
    PublishedStatistic,
    ReceiptBody,
    ReceiptCell,
)
from ..model.insight import (
    FIELD_GROUPS,
    Health,
    SharingLevel,
)
from ..model.topics import ParsedTopic, TopicScheme, parse_topic
from ..privacy.filter import (
    Contribution,
    SharedInsight,
    SuppressionCounter,
)
from ..security.envelope import EnvelopeCodec, SealOpener
from ..security.identity import Identity
from ..transport import Connection, InboundMessage, stop_task
from .admission import check_item, input_hash, item_digest, window_of
from .aggregation import CellResult, PublishedGroup, WindowResult, aggregate_window
from .config import (
    DEFAULT_BOUNDS,
    BridgeConfig,
    BridgeConfigManager,
    DPConfig,
    PublicConfig,
    SourceConfig,
)
from .endpoints import bridge_codec, bridge_connection
from .noise import NoiseMechanism
from .output import LEDGER_PERIODS, PublicOutput, merged_ledger, verify_publication
from .state import BridgeStore, LedgerEntry, NewContribution

__all__ = [
    "DEFAULT_BOUNDS",
    "AggregateBody",
    "Bridge",
    "BridgeConfig",
    "BridgeConfigManager",
    "BridgeStatus",
    "CellResult",
    "DPConfig",
    "LedgerBody",
    "LedgerPeriod",
    "NoiseInfo",
    "NoiseMechanism",
    "PublicConfig",
    "PublicOutput",
    "PublishedCell",
    "PublishedGroup",
    "PublishedGroupBody",
    "PublishedStatistic",
    "ReceiptBody",
    "ReceiptCell",
    "SourceConfig",
    "WindowResult",
    "aggregate_window",
    "check_item",
    "input_hash",
    "item_digest",
    "verify_publication",
    "window_of",
]

log = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:
    # Transitional: pear_mqtt/ops/up.py probes this module for register_cli; remove once it
    # probes pear_mqtt.cli.bridge.
    if name == "register_cli":
        from ..cli.bridge import register_cli
        return register_cli
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_ITEM_ID_MAX = 128
# Messages whose items go into one store transaction (one commit, then one ack each): a
# backlog is written in large batches, while a trickle still commits message by message.
_INGEST_MESSAGES = 64
# model_validate / model_validate_json minus pydantic's Python wrapper, once per item.
_validate_shared = SharedInsight.__pydantic_validator__.validate_python
_validate_contribution = Contribution.__pydantic_validator__.validate_json


# -- the bridge ----------------------------------------------------------------------------

class BridgeStatus(BaseModel):
    """A snapshot of the bridge's connections and counters (metrics, never published)."""

    model_config = ConfigDict(frozen=True)

    health: Health
    connected: bool
    public_connected: bool
    sources: dict[str, bool]
    policy_version: str
    items_received: int = 0
    items_counted: int = 0
    duplicates: int = 0
    ignored: int = 0
    dropped: dict[str, int] = Field(default_factory=dict)
    suppressed: dict[str, int] = Field(default_factory=dict)
    windows_open: int = 0
    windows_published: int = 0
    open_items: int = 0
    cells_published: int = 0
    messages_published: int = 0
    outbox_depth: int = 0
    epsilon_spent: dict[str, float] = Field(default_factory=dict)
    ticks: int = 0
    items_per_second: float | None = None
    started_at: datetime | None = None
    last_publish: datetime | None = None
    error: str | None = None  # why the bridge stopped counting (its state failed)


@dataclass(slots=True)
class _Input:
    """One broker subscription the bridge reads."""

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


class Bridge:
    """The running bridge (see the module docstring).

    ::

        async with Bridge(BridgeConfigManager.load(file="bridge.toml")) as bridge:
            await stop_event.wait()

    ``clock`` drives the window decisions (when a window is due; tests move it); envelope
    checks always use real time. ``rng`` seeds the noise (tests only).
    """

    def __init__(self, config: BridgeConfig, *, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self._clock = clock
        self._noise = NoiseMechanism(config.dp, rng=rng) if config.dp.enabled else None
        self._inputs: list[_Input] = []
        self._store: BridgeStore | None = None
        self._output: PublicOutput | None = None
        self._public_codec: EnvelopeCodec | None = None
        self._out_task: asyncio.Task[None] | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._closing = False
        self._changed = asyncio.Event()
        self._work = asyncio.Event()
        self._suppressions = SuppressionCounter()
        self._extra_suppressed: Counter[str] = Counter()
        self._dropped: Counter[str] = Counter()
        self._c: Counter[str] = Counter()
        self._first_count: float | None = None
        self._last_count: float | None = None
        self._started_at: datetime | None = None
        self._last_publish: datetime | None = None
        self._policy_version = config.policy_version()
        self._fatal: str | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, *, timeout: float = 10.0) -> None:
        """Open the state, connect every input and the public broker, start the clock.

        Raises :class:`ConfigError`/:class:`~pear_mqtt.errors.PKIError` for bad material and
        :class:`ConnectError` when the public broker cannot be reached within ``timeout``;
        inputs that are down are retried in the background.
        """
        cfg = self.config
        self._closing = False
        self._build_inputs()
        self._public_codec = bridge_codec(tls=cfg.public.tls, network=cfg.public.network_id,
                                    encryption=None, crl=cfg.public.crl_file,
                                    rel=cfg.public.reliability, what="public")
        self._output = PublicOutput(config=cfg, codec=self._public_codec)
        self._store = BridgeStore(cfg.state_path)
        previous = self._store.get_meta("policy_version")
        if previous is not None and previous != self._policy_version:
            log.warning("the disclosure policy changed since the last run (%s -> %s); open "
                        "windows are published under the new one", previous,
                        self._policy_version)
        self._store.set_meta("policy_version", self._policy_version)
        self._started_at = datetime.now(UTC)
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._out_task = asyncio.create_task(self._run_output(first))
        for inp in self._inputs:
            inp.task = asyncio.create_task(self._run_input(inp))
        self._tick_task = asyncio.create_task(self._run_ticks())
        try:
            await asyncio.wait_for(asyncio.shield(first), timeout)
        except TimeoutError:
            await self.stop(drain=False)
            raise ConnectError(f"bridge could not reach the public broker "
                               f"{cfg.public.broker_url} within {timeout} s") from None

    def _build_inputs(self) -> None:
        cfg = self.config
        self._inputs = []
        sources: list[SourceConfig] = []
        if cfg.consortium is not None:
            sources.append(cfg.consortium)
        sources += cfg.private
        for src in sources:
            what = (f"consortium {src.network_id}" if src.mode == "consortium"
                    else f"private {src.company_id}")
            codec = bridge_codec(tls=src.tls, network=src.network_id, encryption=src.encryption,
                           crl=src.crl_file, rel=src.reliability, what=what)
            scheme = TopicScheme(mode=src.mode, network=src.network_id,
                                 member=src.company_id or codec.signer.identity.member)
            opener = (SealOpener.from_file(src.aggregator_key_file)
                      if src.aggregator_key_file else None)
            self._inputs.append(_Input(
                name=what.replace(" ", ":"), kind=src.mode, network=src.network_id,
                broker_url=src.broker_url, tls=src.tls, reliability=src.reliability,
                codec=codec, opener=opener, policy=src.policy(), domain=src.identity_domain,
                filters=[scheme.live_filter(), scheme.presence_filter()],
                company_id=src.company_id, member_alias=src.member,
                include_full=src.aggregate_full))
        pub = cfg.public
        if pub.contributions:
            codec = bridge_codec(tls=pub.tls, network=pub.network_id, encryption=None,
                           crl=pub.crl_file, rel=pub.reliability, what="public contributions")
            scheme = TopicScheme(mode="public", network=pub.network_id,
                                 member=codec.signer.identity.member)
            self._inputs.append(_Input(
                name=f"public:{pub.network_id}", kind="public", network=pub.network_id,
                broker_url=pub.broker_url, tls=pub.tls, reliability=pub.reliability,
                codec=codec,
                opener=SealOpener.from_file(pub.aggregator_key_file)
                if pub.aggregator_key_file else None,
                policy=pub.policy(), domain=pub.network_id,
                filters=[scheme.contrib_filter()]))

    async def stop(self, *, drain: bool = True, timeout: float = 10.0) -> None:
        """Stop: disconnect the inputs and count what they already received (``drain``),
        send what the outbox holds while the public broker is up, and close the state."""
        self._closing = True
        if self._tick_task is not None:
            await stop_task(self._tick_task)
            self._tick_task = None
        for inp in self._inputs:
            task, conn = inp.task, inp.conn
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
                log.error("input %s failed while stopping: %r", inp.name, task.exception())
            inp.task = None
        if drain and self._store is not None and self._output is not None:
            with contextlib.suppress(PearError, TimeoutError):
                await asyncio.wait_for(self._flush(), timeout)
        if self._out_task is not None:
            await stop_task(self._out_task)
            self._out_task = None
        out_conn = self._output.detach() if self._output is not None else None
        if out_conn is not None:
            if drain:
                await out_conn.close()
            else:
                out_conn.abort()
        if self._store is not None:
            self._store.close()
            self._store = None
        self._changed.set()

    async def __aenter__(self) -> Bridge:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _backoff(self, attempt: int, rel: ReliabilityConfig) -> None:
        delay = min(rel.reconnect_max_delay, rel.reconnect_min_delay * 2 ** min(attempt, 16))
        await asyncio.sleep(random.uniform(0, delay))  # full jitter between reconnects

    async def _run_input(self, inp: _Input) -> None:
        attempt = 0
        while not self._closing:
            # A stable client id with a persistent session: the broker queues what arrives
            # while the bridge is down and delivers it on reconnect.
            conn = bridge_connection(url=inp.broker_url, tls=inp.tls, rel=inp.reliability,
                                    client_id=f"pear-bridge-{self.config.bridge_id}-"
                                              f"{inp.name.replace(':', '-')}")
            try:
                await conn.connect()
                granted = await conn.subscribe([(f, 1) for f in inp.filters])
                if any(g >= 128 for g in granted):
                    raise ConnectError(f"{inp.name}: broker refused subscriptions {granted}")
            except (ConnectError, TransportError) as exc:
                conn.abort()
                log.info("bridge input %s: %s", inp.name, exc)
                attempt += 1
                await self._backoff(attempt, inp.reliability)
                continue
            attempt = 0
            inp.conn, inp.connected = conn, True
            self._changed.set()
            log.info("bridge input %s connected to %s", inp.name, inp.broker_url)
            try:
                async for msg in conn.messages():
                    # What else already arrived is taken along (up to _INGEST_MESSAGES), so
                    # that a backlog costs one store transaction per group instead of one per
                    # message; the rest stays in the transport's bounded inbox.
                    group = [msg, *conn.drain_inbox(limit=_INGEST_MESSAGES - 1)]
                    try:
                        self._ingest(inp, group)
                    except OutboxError as exc:
                        # The state cannot record what was counted: stop counting rather
                        # than count what a restart would count again. Not acknowledged:
                        # the broker keeps the messages for the next run.
                        self._fail(f"input {inp.name}: {exc}")
                        return
                    for m in group:
                        conn.ack(m)  # stored (or refused for good): the broker may forget it
                    self._changed.set()
                    if conn.queued:
                        await asyncio.sleep(0)  # acks, writes and keep-alives go on
            finally:
                inp.connected = False
                inp.conn = None
                self._changed.set()
            if not self._closing:
                self._c["reconnects"] += 1
                await self._backoff(1, inp.reliability)

    async def _run_output(self, first: asyncio.Future[None]) -> None:
        assert self._output is not None
        pub = self.config.public
        attempt = 0
        while not self._closing:
            conn = bridge_connection(url=pub.broker_url, tls=pub.tls, rel=pub.reliability,
                                    client_id=f"pear-bridge-{self.config.bridge_id}-out")
            try:
                await conn.connect()
            except ConnectError as exc:
                conn.abort()
                log.info("bridge output: %s", exc)
                if attempt == 0 and not first.done():
                    log.warning("public broker %s unreachable: %s", pub.broker_url, exc)
                attempt += 1
                await self._backoff(attempt, pub.reliability)
                continue
            attempt = 0
            self._output.attach(conn)
            if not first.done():
                first.set_result(None)
            self._work.set()
            self._changed.set()
            await conn.closed.wait()
            self._output.attach(None)
            self._changed.set()
            if not self._closing:
                self._c["reconnects"] += 1

    # -- receiving -------------------------------------------------------------------------
    def _drop(self, reason: str, n: int = 1) -> None:
        self._dropped[reason] += n

    def _ingest(self, inp: _Input, msgs: Sequence[InboundMessage]) -> None:
        """Check every message of ``msgs`` in order and count what they admit in one store
        transaction. A message that fails unexpectedly is dropped alone (``internal_error``);
        :class:`OutboxError` (nothing of ``msgs`` was counted) is the caller's to handle."""
        assert self._store is not None
        now = self._clock()
        admitted: list[tuple[InboundMessage, list[NewContribution]]] = []
        for msg in msgs:
            try:
                batch = self._receive(inp, msg, now)
            except Exception:  # one message must never stop the bridge
                log.exception("unexpected error on %r", msg.topic)
                self._dropped["internal_error"] += 1
                continue
            if batch:
                admitted.append((msg, batch))
        if not admitted:
            return
        if len(admitted) == 1:
            groups = admitted
        else:
            try:
                self._count([new for _, batch in admitted for new in batch], now)
                return
            except OutboxError:
                raise
            except Exception:
                # Not the store failing (that is OutboxError): some item it could not take.
                # Message by message, as if they had come one at a time, so only the
                # message at fault is lost.
                groups = admitted
        for msg, batch in groups:
            try:
                self._count(batch, now)
            except OutboxError:
                raise
            except Exception:
                log.exception("unexpected error on %r", msg.topic)
                self._dropped["internal_error"] += 1

    def _count(self, batch: list[NewContribution], now: float) -> None:
        assert self._store is not None
        result = self._store.add(batch, now=now)
        c = self._c
        c["items_counted"] += result.counted
        c["duplicates"] += result.duplicates
        if result.copied:
            self._drop("copied_token", result.copied)
        if result.counted:
            mono = time.monotonic()
            self._first_count = self._first_count or mono
            self._last_count = mono

    def _receive(self, inp: _Input, msg: InboundMessage, now: float) -> list[NewContribution]:
        """The items of ``msg`` to count; everything else is dropped and counted here."""
        try:
            parsed = parse_topic(msg.topic)
        except TopicError:
            self._drop("bad_topic")
            return []
        if inp.kind == "private":
            in_scope = parsed.mode == "private" and parsed.company == inp.company_id
        else:
            in_scope = parsed.mode == inp.kind and parsed.network == inp.network
        if not in_scope:
            self._drop("bad_topic")
            return []
        if not msg.payload:
            if not msg.retain:  # a cleared retained message is legitimate; this is not
                self._drop("malformed")
            return []
        if parsed.kind == "nodes":
            self._presence(inp, parsed, msg)
            return []
        if parsed.kind not in ("insights", "contrib"):
            self._drop("unexpected_topic")
            return []
        try:
            decoded = inp.codec.decode(msg.payload, check_replay=not msg.retain)
        except EnvelopeError as exc:
            self._drop(exc.reason)
            log.debug("dropped message on %s: %s", msg.topic, exc)
            return []
        signer = decoded.signer
        if parsed.company != signer.member or (
                inp.company_id is not None and signer.member != inp.company_id):
            self._drop("identity_mismatch")
            return []
        body = decoded.message.body
        items = body.get("items") if isinstance(body, dict) else None
        if decoded.message.kind != "insights" or not isinstance(items, list):
            self._drop("unexpected_kind" if decoded.message.kind != "insights"
                       else "malformed")
            return []
        self._c["items_received"] += len(items)
        source = f"{inp.kind}/{inp.network}/{signer.member}"
        batch: list[NewContribution] = []
        for raw in items:
            new = self._admit(inp, parsed, signer, raw, now, source)
            if new is not None:
                batch.append(new)
        return batch

    def _presence(self, inp: _Input, parsed: ParsedTopic, msg: InboundMessage) -> None:
        try:
            decoded = inp.codec.decode(msg.payload, check_replay=False)
        except EnvelopeError as exc:
            self._drop(exc.reason)
            return
        signer = decoded.signer
        if parsed.company != signer.member or parsed.node != signer.node:
            self._drop("identity_mismatch")
            return
        body = decoded.message.body
        raw = body.get("levels") if isinstance(body, dict) else None
        if not isinstance(raw, dict):
            return  # presence without levels: nothing to hold items against
        try:
            levels = {g: SharingLevel(v) for g, v in raw.items() if g in FIELD_GROUPS}
        except ValueError:
            self._drop("malformed")
            return
        inp.presence[(signer.member, signer.node)] = levels

    def _admit(self, inp: _Input, parsed: ParsedTopic, signer: Identity, raw: Any,
               now: float, source: str) -> NewContribution | None:
        if not isinstance(raw, dict):
            self._drop("malformed")
            return None
        iid = raw.get("iid")
        if not isinstance(iid, str) or not 0 < len(iid) <= _ITEM_ID_MAX:
            self._drop("malformed")
            return None
        try:
            shared: SharedInsight = _validate_shared(raw.get("insight"))
        except ValidationError:
            self._drop("malformed")
            return None
        if shared.category != parsed.category:
            self._drop("mismatch")
            return None
        sealed = raw.get("sealed")
        contribution: Contribution | None = None
        if sealed is not None:
            if not isinstance(sealed, str):
                self._drop("malformed")
                return None
            if inp.opener is None:
                self._drop("no_aggregator_key")
                return None
            try:
                contribution = _validate_contribution(inp.opener.open(sealed))
            except DecryptionError:
                self._drop("seal_failed")
                return None
            except ValidationError:
                self._drop("malformed")
                return None
        reason = check_item(shared=shared, contribution=contribution, policy=inp.policy,
                            announced=inp.presence.get((signer.member, signer.node)))
        if reason is not None:
            self._drop(reason)
            log.warning("dropped an item of %s/%s on %s: %s", signer.member, signer.node,
                        parsed.category, reason)
            return None
        values: dict[str, dict[str, float]] = {}
        currency: str | None = None
        if contribution is not None:
            values.update({g: dict(f) for g, f in contribution.values.items() if f})
            currency = contribution.currency
        if inp.include_full:
            for group, level in shared.levels.items():
                if level is not SharingLevel.FULL:
                    continue
                fields = shared.groups[group]
                numbers = {n: float(v) for n, v in fields.items()
                           if isinstance(v, int | float) and not isinstance(v, bool)}
                if numbers:
                    values[group] = numbers
                if group == "price_data" and isinstance(fields.get("currency"), str):
                    currency = str(fields["currency"])
        if not values:
            self._c["ignored"] += 1  # nothing this item may contribute to an aggregate
            return None
        start = window_of(shared.window_start, shared.window_end,
                          window_seconds=self.config.window_seconds)
        if start is None:
            self._drop("spans_windows")
            return None
        if shared.window_start.timestamp() > now + self.config.max_clock_skew:
            self._drop("future")
            return None
        assert self._store is not None
        if self._store.window_state(start) in ("ready", "published"):
            self._drop("late")
            return None
        member = inp.member_alias or signer.member
        token = hashlib.sha256(sealed.encode()).digest() if isinstance(sealed, str) else None
        return NewContribution(
            source_key=source, item_id=iid,
            window_start=start, category=shared.category, region=shared.region,
            domain=inp.domain, company=member, currency=currency, values=values,
            digest=item_digest(network=inp.network, member=signer.member, item=raw),
            token_digest=token)

    # -- closing windows -----------------------------------------------------------------------
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
        assert self._store is not None
        now = self._clock() if now is None else now
        cfg = self.config
        due: list[int] = []
        for w in self._store.open_windows():
            due_at = w.start + cfg.window_seconds + cfg.publication_lag_seconds
            if now < due_at:
                continue
            # A backfilled window (first seen after it was due) gets its settling time from
            # its first input, not from a due time long past.
            hold_until = max(due_at, w.first_input) + cfg.max_settle_seconds
            if now < w.last_input + cfg.settle_seconds and now < hold_until:
                continue
            due.append(w.start)
        return due

    async def tick(self) -> None:
        """One round: close the windows that are due, then send what the outbox holds."""
        if self._store is None:
            return
        now = self._clock()
        for start in self.due_windows(now):
            self._close(start, now)
        await self._flush()
        self._c["ticks"] += 1
        self._changed.set()

    def _close(self, start: int, now: float) -> None:
        assert self._store is not None and self._output is not None
        cfg = self.config
        rows = self._store.contributions(start)
        period_start = ((start // cfg.dp.period_seconds) * cfg.dp.period_seconds
                        if cfg.dp.enabled else None)
        spent = self._store.spent(period_start) if period_start is not None else 0.0
        result = aggregate_window(start, rows, window_seconds=cfg.window_seconds,
                                  min_companies=cfg.min_companies,
                                  dominance_cap=cfg.dominance_cap, dp=cfg.dp,
                                  noise=self._noise, budget_spent=spent,
                                  counter=self._suppressions)
        for cell in result.cells:
            for reason, n in cell.suppressed.items():
                if reason not in ("below_k", "dominance"):
                    self._extra_suppressed[reason] += n  # the counter has the others
        ledger_rows: list[LedgerEntry] = []
        charged = sum(1 for c in result.cells if c.epsilon > 0)
        if period_start is not None and charged:
            ledger_rows.append(LedgerEntry(period_start=period_start, epsilon=result.epsilon,
                                           delta=result.delta, cells=charged))
        ledger = merged_ledger(self._store.ledger(), ledger_rows)
        try:
            outgoing, receipts = self._output.build(result, now=now, ledger=ledger)
        except PrivacyError as exc:
            # Defence in depth: aggregate_window never yields such a cell; if it ever did,
            # nothing of this window is published and the error is loud.
            log.error("window %s not published: %s", start, exc)
            self._drop("publisher_refused")
            outgoing, receipts = [], []
        self._store.close_window(start, now=now, outgoing=outgoing, receipts=receipts,
                                 ledger=ledger_rows)
        published = sum(1 for c in result.cells if c.published)
        self._c["cells_published"] += published
        self._c["windows_closed"] += 1
        log.info("window %s closed: %d items, %d of %d cells published, suppressed %s",
                 datetime.fromtimestamp(start, UTC).isoformat(), len(rows), published,
                 len(result.cells), result.suppressed or "nothing")

    async def _flush(self) -> None:
        store, output = self._store, self._output
        if store is None or output is None or not output.connected:
            return
        rows = store.pending()
        if not rows:
            return
        acked = await output.send(rows)
        if acked:
            store.acknowledge(acked, now=self._clock())
            self._c["messages_published"] += len(acked)
            self._last_publish = datetime.now(UTC)

    # -- status ------------------------------------------------------------------------------
    def status(self) -> BridgeStatus:
        """Connections, counters and the ledger right now."""
        store = self._store
        counts = store.counts() if store is not None else {}
        sources = {inp.name: inp.connected for inp in self._inputs}
        public = self._output is not None and self._output.connected
        connected = public and all(sources.values())
        if store is None or self._fatal is not None:
            health = Health.DOWN
        elif connected:
            health = Health.OK
        else:
            health = Health.DEGRADED if public or any(sources.values()) else Health.DOWN
        rate: float | None = None
        if self._first_count is not None and self._last_count is not None and \
                self._last_count > self._first_count:
            rate = round(self._c["items_counted"] / (self._last_count - self._first_count), 1)
        eps: dict[str, float] = {}
        if store is not None and self.config.dp.enabled:
            for e in store.ledger()[-LEDGER_PERIODS:]:
                eps[datetime.fromtimestamp(e.period_start, UTC).isoformat()] = e.epsilon
        suppressed = Counter(self._suppressions.counts)
        suppressed.update(self._extra_suppressed)
        c = self._c
        return BridgeStatus(
            health=health, connected=connected, public_connected=public, sources=sources,
            policy_version=self._policy_version, items_received=c["items_received"],
            items_counted=c["items_counted"], duplicates=c["duplicates"], ignored=c["ignored"],
            dropped=dict(self._dropped), suppressed=dict(suppressed),
            windows_open=counts.get("open", 0), windows_published=counts.get("published", 0),
            open_items=counts.get("open_items", 0), cells_published=c["cells_published"],
            messages_published=c["messages_published"],
            outbox_depth=store.outbox_depth if store is not None else 0, epsilon_spent=eps,
            ticks=c["ticks"], items_per_second=rate, started_at=self._started_at,
            last_publish=self._last_publish, error=self._fatal)

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

    def poke(self) -> None:
        """Run a tick now instead of waiting for ``tick_seconds`` (after moving the clock)."""
        self._work.set()
