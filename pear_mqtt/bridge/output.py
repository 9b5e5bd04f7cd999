"""The one path from the bridge to each broker it writes to (:class:`PublicOutput`: the
public broker, and the consortium broker for the consortium's own aggregates), the check an
auditor runs on what it published (:func:`verify_publication`), and the ε ledger."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal

from pydantic import ValidationError

from ..errors import OversizedMessage, PrivacyError, TopicError, TransportError
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
from ..model.topics import TopicScheme, parse_topic
from ..security.envelope import EnvelopeCodec
from ..transport import Connection
from .aggregation import CellResult, WindowResult
from .config import BridgeConfig
from .endpoints import BRIDGE_NODE
from .history import BridgeLog
from .state import LedgerEntry, OutgoingRow

__all__ = ["LEDGER_PERIODS", "PublicOutput", "merged_ledger", "verify_publication"]

log = logging.getLogger(__name__)

LEDGER_PERIODS = 24
"""Budget periods listed in the retained ledger (and in the status)."""

_ALLOWED_KINDS: dict[str, str] = {"aggregates": "aggregate", "bridge_receipt": "receipt",
                                  "bridge_state": "ledger"}
_CONSORTIUM_KINDS: dict[str, str] = {"aggregates": "aggregate", "bridge_receipt": "receipt",
                                     "bridge_partial": "partial"}

Audience = Literal["public", "consortium"]


class PublicOutput:
    """The one path from the bridge to the public broker.

    :meth:`build` turns a :class:`WindowResult` into signed messages — an aggregate and a
    receipt per category with at least one published cell, and the ledger when noise is on —
    and refuses (:class:`PrivacyError`) any statistic below k companies. :meth:`send`
    publishes outbox rows, and refuses anything that is not a bridge-signed aggregate,
    receipt or ledger on this network's ``aggregates/`` or ``state/bridge/`` topics. The
    connection it writes with is private to it.

    With ``audience="consortium"`` it writes the consortium's own aggregates, on the
    consortium broker (``pear/v1/consortium/<network>/aggregates/<category>``, their receipts
    under ``state/bridge/receipts/``) with the bridge's consortium certificate (``codec``),
    encrypted under the group key when one is active; no ledger (they carry no noise).

    ``history``: the bridge's log of what goes to this broker. Every aggregate and receipt
    is built with its place in it (the envelope's ``log`` member) and appended to it just
    before it is published (docs/HISTORY.md, "The bridge's log").
    """

    def __init__(self, *, config: BridgeConfig, codec: EnvelopeCodec,
                 audience: Audience = "public", history: BridgeLog | None = None) -> None:
        self._config = config
        self._codec = codec
        self._audience = audience
        if audience == "consortium":
            assert config.consortium is not None
            self._network = config.consortium.network_id
        else:
            self._network = config.public.network_id
        self._scheme = TopicScheme(mode=audience, network=self._network,
                                   member=codec.signer.identity.member)
        self._kinds = _CONSORTIUM_KINDS if audience == "consortium" else _ALLOWED_KINDS
        self._policy_version = config.policy_version()
        self._conn: Connection | None = None
        self._sender = codec.signer.sender
        self._history = history

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.connected

    def attach(self, conn: Connection | None) -> None:
        """Use ``conn`` (or nothing) for :meth:`send`."""
        self._conn = conn

    def detach(self) -> Connection | None:
        """Stop using the connection and hand it back (to close it)."""
        conn, self._conn = self._conn, None
        return conn

    def _check(self, body: AggregateBody) -> None:
        k = self._config.min_companies
        for cell in body.cells:
            for hist in cell.histograms or ():
                if hist.companies < k or sum(b.companies for b in hist.buckets) != \
                        hist.companies:
                    raise PrivacyError(f"refusing to publish {body.category}/{cell.region} "
                                       f"{hist.field} histogram: {hist.companies} companies "
                                       f"< k = {k}")
            for group in cell.groups:
                for name, stat in group.fields.items():
                    if stat.companies < k:
                        raise PrivacyError(f"refusing to publish {body.category}/{cell.region}"
                                           f" {group.group}.{name}: {stat.companies} companies"
                                           f" < k = {k}")
                    if stat.stddev is not None and (stat.companies < 3 or body.noise):
                        raise PrivacyError(f"refusing to publish a standard deviation for "
                                           f"{group.group}.{name}")

    def build(self, result: WindowResult, *, now: float,
              ledger: Sequence[LedgerEntry] = ()
              ) -> tuple[list[tuple[str, bytes, bool]], list[tuple[str, bytes]]]:
        """Signed (topic, payload, retain) messages for ``result``, and (category, receipt)
        pairs for the archive. ``ledger`` is the ledger including ``result``'s spending."""
        dp = self._config.dp
        consortium = self._audience == "consortium"
        noise = (NoiseInfo(mechanism=dp.mechanism, epsilon_per_cell=dp.epsilon_per_cell,
                           delta=dp.delta if dp.mechanism == "gaussian" else None)
                 if dp.mechanism != "none" and not consortium else None)
        ws = datetime.fromtimestamp(result.window_start, UTC)
        we = datetime.fromtimestamp(result.window_end, UTC)
        by_category: dict[str, list[CellResult]] = {}
        for cell in result.cells:
            if cell.published:
                by_category.setdefault(cell.category, []).append(cell)
        out: list[tuple[str, bytes, bool]] = []
        receipts: list[tuple[str, bytes]] = []
        refs = self._history.refs() if self._history is not None else None
        for category, cells in sorted(by_category.items()):
            body = AggregateBody(
                network=self._network, category=category, window_start=ws, window_end=we,
                policy_version=self._policy_version, min_companies=self._config.min_companies,
                dominance_cap=self._config.dominance_cap, noise=noise,
                cells=[PublishedCell(region=c.region, groups=[
                    PublishedGroupBody(group=g.group, currency=g.currency, fields={
                        n: PublishedStatistic(count=s.count, companies=s.companies,
                                              mean=s.mean, stddev=s.stddev, sum=s.sum)
                        for n, s in g.fields.items()})
                    for g in c.groups], histograms=c.histograms or None) for c in cells])
            self._check(body)
            topic = (self._scheme.consortium_aggregate(category) if consortium
                     else self._scheme.aggregate(category))
            try:
                # Public: plain, anyone may verify it. Consortium: under the group key when
                # one is active, like every other message there.
                payload = self._codec.encode(kind="aggregate", body=body.model_dump(mode="json"),
                                             encrypt=None if consortium else False,
                                             log_ref=None if refs is None else refs.peek())
            except OversizedMessage as exc:
                log.error("aggregate of %s for %s is too large to publish: %s", category,
                          ws.isoformat(), exc)
                continue
            receipt = ReceiptBody(
                network=self._network, category=category, window_start=ws, window_end=we,
                aggregate_topic=topic, aggregate_sha256=hashlib.sha256(payload).hexdigest(),
                policy_version=self._policy_version, min_companies=self._config.min_companies,
                dominance_cap=self._config.dominance_cap,
                mechanism="none" if consortium else dp.mechanism,
                cells=[ReceiptCell(region=c.region, contributors=c.contributors,
                                   identity_domains=c.domains, inputs=c.inputs,
                                   input_hash=c.input_hash, epsilon_spent=c.epsilon,
                                   delta_spent=c.delta) for c in cells],
                issued_at=datetime.fromtimestamp(now, UTC))
            if refs is not None:
                refs.take()
            rpayload = self._codec.encode(kind="receipt", body=receipt.model_dump(mode="json"),
                                          encrypt=None if consortium else False,
                                          log_ref=None if refs is None else refs.peek())
            if refs is not None:
                refs.take()
            rtopic = (self._scheme.consortium_receipt(category) if consortium
                      else self._scheme.bridge_receipt(category))
            out += [(topic, payload, True), (rtopic, rpayload, True)]
            receipts.append((category, rpayload))
        if dp.mechanism != "none" and result.epsilon > 0 and not consortium:
            out.append((self._scheme.bridge_state("ledger"), self.ledger_message(ledger), True))
        return out, receipts

    def ledger_message(self, ledger: Sequence[LedgerEntry]) -> bytes:
        """The signed retained ledger of the latest :data:`LEDGER_PERIODS` periods."""
        dp = self._config.dp
        assert dp.mechanism != "none"
        periods = [LedgerPeriod(
            period_start=datetime.fromtimestamp(e.period_start, UTC),
            period_end=datetime.fromtimestamp(e.period_start + dp.period_seconds, UTC),
            epsilon_spent=round(e.epsilon, 9),
            epsilon_remaining=round(max(0.0, dp.budget_per_period - e.epsilon), 9),
            delta_spent=e.delta, cells=e.cells) for e in list(ledger)[-LEDGER_PERIODS:]]
        body = LedgerBody(network=self._network, mechanism=dp.mechanism,
                          epsilon_per_cell=dp.epsilon_per_cell,
                          budget_per_period=dp.budget_per_period,
                          period_seconds=dp.period_seconds,
                          policy_version=self._policy_version, periods=periods)
        return self._codec.encode(kind="ledger", body=body.model_dump(mode="json"),
                                  encrypt=False)

    def admit(self, row: OutgoingRow) -> None:
        """Raise :class:`PrivacyError` unless ``row`` is a plain envelope this bridge signed,
        of the kind its topic carries, on this network's aggregates or bridge-state topics
        (or, scaled out, the empty retained message that clears a partial).
        :meth:`send` checks every row with it."""
        try:
            parsed = parse_topic(row.topic)
        except TopicError:
            raise PrivacyError(f"refusing to publish to {row.topic!r}: not a pear_mqtt "
                               "topic") from None
        kind = self._kinds.get(parsed.kind)
        if parsed.mode != self._audience or parsed.network != self._network or kind is None:
            raise PrivacyError(f"refusing to publish to {row.topic!r}: the bridge writes "
                               "aggregates and its own state only")
        if not row.payload and row.retain and parsed.kind == "bridge_partial":
            return  # clearing a merged window's retained partial
        try:
            head = json.loads(row.payload)
        except ValueError:
            raise PrivacyError(f"refusing to publish a non-envelope to {row.topic!r}") from None
        if not isinstance(head, dict) or head.get("kind") != kind \
                or head.get("from") != self._sender \
                or not ("body" in head or (self._audience == "consortium" and "enc" in head)):
            raise PrivacyError(f"refusing to publish to {row.topic!r}: not a plain "
                               f"bridge-signed {kind!r} envelope")

    async def send(self, rows: Sequence[OutgoingRow], *, timeout: float = 30.0) -> list[int]:
        """Publish ``rows`` (pipelined, QoS 1, retained as marked); the ids acknowledged.

        A row refused by :meth:`admit` is never sent (and never acknowledged): it stays in
        the outbox and the error is logged, so it cannot leak and cannot be lost silently.
        """
        conn = self._conn
        if conn is None or not conn.connected or not rows:
            return []
        pending: list[tuple[int, asyncio.Future[None]]] = []
        for row in rows:
            try:
                self.admit(row)
            except PrivacyError as exc:
                log.error("%s", exc)
                continue
            if self._history is not None and not self._history.record(row.topic, row.payload):
                continue
            try:
                pending.append((row.id, conn.publish(row.topic, row.payload, qos=1,
                                                     retain=row.retain)))
            except TransportError as exc:
                log.info("publishing stopped: %s", exc)
                break
        acked: list[int] = []
        if not pending:
            return acked
        done, _ = await asyncio.wait([f for _, f in pending], timeout=timeout)
        for rid, fut in pending:
            if fut in done and not fut.cancelled() and fut.exception() is None:
                acked.append(rid)
        for _, fut in pending:
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: a lost connection is handled by the caller
        return acked


def verify_publication(*, aggregate_payload: bytes, receipt_payload: bytes,
                       codec: EnvelopeCodec) -> tuple[AggregateBody, ReceiptBody]:
    """Check an aggregate message against its receipt, as an auditor would.

    ``codec`` must trust the public network's CA. Both envelopes must verify and be signed by
    a bridge certificate (OU ``bridge``), the receipt must name the aggregate's exact bytes
    (SHA-256), its topic, window and category, and every cell of the aggregate must have a
    receipt entry with at least ``min_companies`` contributors. Raises
    :class:`~pear_mqtt.errors.PearError` (``EnvelopeError`` or ``PrivacyError``) otherwise.
    """
    agg = codec.decode(aggregate_payload, check_replay=False, max_age=float("inf"))
    rec = codec.decode(receipt_payload, check_replay=False, max_age=float("inf"))
    for d, kind in ((agg, "aggregate"), (rec, "receipt")):
        if d.signer.node != BRIDGE_NODE or d.message.kind != kind:
            raise PrivacyError(f"{kind} is not a bridge-signed {kind!r} envelope "
                               f"({d.signer.sender}, {d.message.kind})")
    try:
        body = AggregateBody.model_validate(agg.message.body)
        receipt = ReceiptBody.model_validate(rec.message.body)
    except ValidationError as exc:
        raise PrivacyError(f"malformed aggregate or receipt: {exc}") from None
    if receipt.aggregate_sha256 != hashlib.sha256(aggregate_payload).hexdigest():
        raise PrivacyError("the receipt describes another aggregate message")
    if (receipt.category, receipt.window_start, receipt.window_end) != (
            body.category, body.window_start, body.window_end):
        raise PrivacyError("receipt and aggregate disagree on category or window")
    by_region = {c.region: c for c in receipt.cells}
    for cell in body.cells:
        entry = by_region.get(cell.region)
        if entry is None or entry.contributors < receipt.min_companies:
            raise PrivacyError(f"cell {cell.region} has no receipt with enough contributors")
    return body, receipt


def merged_ledger(ledger: Sequence[LedgerEntry], extra: Sequence[LedgerEntry]
                  ) -> list[LedgerEntry]:
    """``ledger`` with ``extra``'s spending added to its periods, ordered by period."""
    by: dict[int, LedgerEntry] = {e.period_start: e for e in ledger}
    for e in extra:
        old = by.get(e.period_start)
        by[e.period_start] = e if old is None else LedgerEntry(
            period_start=e.period_start, epsilon=old.epsilon + e.epsilon,
            delta=old.delta + e.delta, cells=old.cells + e.cells)
    return [by[k] for k in sorted(by)]
