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

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import math
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config.models import (
    BrokerURL,
    EncryptionConfig,
    ReliabilityConfig,
    TLSConfig,
)
from ..errors import (
    ConfigError,
    ConnectError,
    DecryptionError,
    EnvelopeError,
    OutboxError,
    OversizedMessage,
    PearError,
    PrivacyError,
    TopicError,
    TransportError,
)
from ..files import atomic_write
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
    ADDITIVE_FIELDS,
    Contribution,
    FieldStatistics,
    SharedInsight,
    SuppressionCounter,
    aggregate,
)
from ..security.envelope import EnvelopeCodec, SealOpener, Signer, TrustStore
from ..security.identity import Identity
from ..transport import Connection, InboundMessage, stop_task
from .config import (
    DEFAULT_BOUNDS,
    BridgeConfig,
    BridgeConfigManager,
    DPConfig,
    PublicConfig,
    SourceConfig,
)
from .state import BridgeStore, LedgerEntry, NewContribution, OutgoingRow, StoredContribution

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
    "register_cli",
    "verify_publication",
    "window_of",
]

log = logging.getLogger(__name__)

BRIDGE_NODE = "bridge"
"""The OU of every bridge certificate (:mod:`pear_mqtt.pki`): receivers check it."""

_ITEM_ID_MAX = 128
_DIGEST_DOMAIN = b"pear_mqtt bridge item v1"
# json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False) without building an
# encoder per call: the same bytes, ~1 µs less per item.
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"),
                                   ensure_ascii=False).encode
# Messages whose items go into one store transaction (one commit, then one ack each): a
# backlog is written in large batches, while a trickle still commits message by message.
_INGEST_MESSAGES = 64
# model_validate / model_validate_json minus pydantic's Python wrapper, once per item.
_validate_shared = SharedInsight.__pydantic_validator__.validate_python
_validate_contribution = Contribution.__pydantic_validator__.validate_json
_LEDGER_PERIODS = 24  # periods listed in the retained ledger
_MIN_SESSION_EXPIRY = 7 * 86400


# -- input checks --------------------------------------------------------------------------

def check_item(*, shared: SharedInsight, contribution: Contribution | None,
               policy: Mapping[str, SharingLevel],
               announced: Mapping[str, SharingLevel] | None = None) -> str | None:
    """Why an item must be dropped, or None when it discloses no more than allowed.

    - ``policy_violation``: a group is shared at another level than ``policy`` says (e.g. an
      exact ``full`` price where the policy says ``ranges_only``, or any shared group the
      policy keeps ``aggregated`` or ``none``), or a sealed group the policy does not say
      ``aggregated``;
    - ``presence_mismatch``: a group at another level than the sender's node announced in its
      presence (``announced``; not checked when unknown);
    - ``mismatch``: the sealed contribution describes another category, product, region or
      window than the insight that carries it.
    """
    sealed = {g for g, fields in (contribution.values if contribution else {}).items()
              if fields}
    for group, level in shared.levels.items():
        if policy.get(group) is not level:
            return "policy_violation"
    for group in sealed:
        if policy.get(group) is not SharingLevel.AGGREGATED:
            return "policy_violation"
    if announced is not None:
        for group, level in shared.levels.items():
            if announced.get(group) is not level:
                return "presence_mismatch"
        for group in sealed:
            if announced.get(group) is not SharingLevel.AGGREGATED:
                return "presence_mismatch"
    if contribution is not None and (
            contribution.category != shared.category
            or contribution.product_id != shared.product_id
            or contribution.region != shared.region
            or contribution.window_start != shared.window_start
            or contribution.window_end != shared.window_end):
        return "mismatch"
    return None


def window_of(start: datetime, end: datetime, *, window_seconds: int) -> int | None:
    """The bridge window (epoch seconds of its start) that holds the observation window
    ``[start, end]``, or None when it spans more than one bridge window."""
    ws = int(start.timestamp() // window_seconds) * window_seconds
    return ws if end.timestamp() <= ws + window_seconds else None


def item_digest(*, network: str, member: str, item: Mapping[str, Any]) -> bytes:
    """The digest of one received item, as the receipt's input hash covers it.

    SHA-256 over a domain tag, the network, the sending member, the item id, the insight as
    canonical JSON (sorted keys, no spaces) and the sealed token, NUL-separated. Any member
    who received the item (consortium members read each other's items) can recompute it.
    """
    insight = _CANONICAL_JSON(item.get("insight"))
    sealed = item.get("sealed")
    parts = [_DIGEST_DOMAIN, network.encode(), member.encode(), str(item.get("iid")).encode(),
             insight.encode(), sealed.encode() if isinstance(sealed, str) else b""]
    return hashlib.sha256(b"\x00".join(parts)).digest()


def input_hash(digests: Iterable[bytes]) -> str:
    """The input hash of a cell: SHA-256 of its item digests in ascending order (hex)."""
    h = hashlib.sha256()
    for d in sorted(digests):
        h.update(d)
    return h.hexdigest()


# -- noise ---------------------------------------------------------------------------------

class NoiseMechanism:
    """Laplace or Gaussian noise from a cryptographic random source.

    ``rng`` defaults to :class:`random.SystemRandom`; tests pass a seeded
    :class:`random.Random`. Noise is drawn with floating-point arithmetic (no snapping), which
    leaks in the last bits of a value; published values are rounded to 6 significant digits.
    """

    def __init__(self, dp: DPConfig, *, rng: random.Random | None = None) -> None:
        if not dp.enabled:
            raise ConfigError("NoiseMechanism needs dp.mechanism laplace or gaussian")
        self.dp = dp
        self._rng = rng if rng is not None else random.SystemRandom()

    def scale(self, *, sensitivity: float, epsilon: float, delta: float) -> float:
        """Laplace scale b, or the Gaussian standard deviation, for one release."""
        if self.dp.mechanism == "laplace":
            return sensitivity / epsilon
        return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon

    def sample(self, *, sensitivity: float, epsilon: float, delta: float) -> float:
        """One draw of noise for a release with this sensitivity and budget."""
        b = self.scale(sensitivity=sensitivity, epsilon=epsilon, delta=delta)
        if self.dp.mechanism == "gaussian":
            return self._rng.gauss(0.0, b)
        while True:
            u = self._rng.random() - 0.5
            if u != -0.5:
                return -b * math.copysign(1.0, u) * math.log(1 - 2 * abs(u))


# -- aggregation ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class PublishedGroup:
    """The statistics of one group (price statistics per currency) that passed every test."""

    group: str
    currency: str | None
    fields: dict[str, FieldStatistics]


@dataclass(frozen=True, slots=True, kw_only=True)
class CellResult:
    """One (category, region) cell of a window: what may be published, and its receipt data.

    ``groups`` is empty when everything was suppressed; ``suppressed`` counts suppressed
    statistics per reason (metrics only). ``contributors`` counts distinct identities,
    ``domains`` the identity domains they came from.
    """

    category: str
    region: str
    groups: list[PublishedGroup]
    contributors: int
    domains: int
    inputs: int
    input_hash: str
    epsilon: float = 0.0
    delta: float = 0.0
    suppressed: dict[str, int] = field(default_factory=dict)

    @property
    def published(self) -> bool:
        return bool(self.groups)


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowResult:
    """Every cell of one window, and the budget it spent."""

    window_start: int
    window_end: int
    cells: list[CellResult]
    epsilon: float
    delta: float
    period_start: int | None

    @property
    def suppressed(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for c in self.cells:
            total.update(c.suppressed)
        return dict(total)


def _identity_key(domain: str, company: str) -> str:
    # A valid identifier for privacy.aggregate that cannot collide across domains.
    return "c" + hashlib.sha256(f"{domain}\x00{company}".encode()).hexdigest()[:32]


def _combined(name: str, values: Sequence[float]) -> float:
    return math.fsum(values) if name in ADDITIVE_FIELDS else math.fsum(values) / len(values)


def _weight(name: str, values: Sequence[float]) -> float:
    # privacy.aggregate's dominance weights: the company's total for additive fields, its
    # number of observations otherwise.
    return math.fsum(values) if name in ADDITIVE_FIELDS else float(len(values))


def _round(x: float) -> float:
    return float(f"{x:.6g}")


@dataclass(slots=True)
class _Candidate:
    group: str
    currency: str | None
    name: str
    stats: FieldStatistics
    per_company: dict[str, list[float]]


def aggregate_window(window_start: int, contributions: Sequence[StoredContribution], *,
                     window_seconds: int,
                     min_companies: int, dominance_cap: float, dp: DPConfig,
                     noise: NoiseMechanism | None = None, budget_spent: float = 0.0,
                     counter: SuppressionCounter | None = None) -> WindowResult:
    """Aggregate one window's counted items into cells (category, region).

    ``contributions`` are the counted items of the window
    (:class:`pear_mqtt.bridge_state.StoredContribution`).
    Each group is aggregated with :func:`pear_mqtt.privacy.aggregate` (price statistics per
    currency), counting companies by identity within their domain; cells that mix identity
    domains then pass the conservative test described in the module docstring. With noise
    on, each cell whose statistics survive spends ``dp.epsilon_per_cell`` from the budget of
    its period (``budget_spent`` already gone), or is suppressed as ``budget``.
    """
    if dp.enabled and noise is None:
        raise ConfigError("noise is on (dp.mechanism) but no NoiseMechanism was given")
    window_end = window_start + window_seconds
    period = (window_start // dp.period_seconds) * dp.period_seconds if dp.enabled else None
    spent = budget_spent
    epsilon_total = delta_total = 0.0
    by_cell: dict[tuple[str, str], list[StoredContribution]] = {}
    for c in contributions:
        by_cell.setdefault((c.category, c.region), []).append(c)
    ws = datetime.fromtimestamp(window_start, UTC)
    we = datetime.fromtimestamp(window_end, UTC)
    cells: list[CellResult] = []
    for (category, region), items in sorted(by_cell.items()):
        domain_of: dict[str, str] = {}
        converted: list[Contribution] = []
        for c in items:
            key = _identity_key(c.domain, c.company)
            domain_of[key] = c.domain
            converted.append(Contribution(company=key, category=category, region=region,
                                          window_start=ws, window_end=we, currency=c.currency,
                                          values=c.values))
        suppressed: Counter[str] = Counter()
        candidates: list[_Candidate] = []
        present = {g for conv in converted for g, fs in conv.values.items() if fs}
        for group in (g for g in FIELD_GROUPS if g in present):
            holding = [conv for conv in converted if conv.values.get(group)]
            if group == "price_data":
                parts: dict[str | None, list[Contribution]] = {}
                for conv in holding:
                    parts.setdefault(conv.currency, []).append(conv)
            else:
                parts = {None: holding}
            for currency, part in sorted(parts.items(), key=lambda kv: kv[0] or ""):
                outcome = aggregate(part, group=group, min_companies=min_companies,
                                    dominance_cap=dominance_cap)
                if counter is not None:
                    counter.record(outcome)
                suppressed.update(outcome.suppressed.values())
                for name, stats in outcome.statistics.items():
                    per_company: dict[str, list[float]] = {}
                    for conv in part:
                        value = conv.values[group].get(name)
                        if value is not None:
                            per_company.setdefault(conv.company, []).append(value)
                    reason = _cross_domain(name, per_company, domain_of,
                                           min_companies=min_companies,
                                           dominance_cap=dominance_cap)
                    if reason is None and dp.enabled and f"{group}.{name}" not in dp.bounds:
                        reason = "unbounded"
                    if reason is not None:
                        suppressed[reason] += 1
                        continue
                    candidates.append(_Candidate(group=group, currency=currency, name=name,
                                                 stats=stats, per_company=per_company))
        eps = dlt = 0.0
        if candidates and dp.enabled:
            assert noise is not None
            if spent + dp.epsilon_per_cell > dp.budget_per_period * (1 + 1e-9):
                suppressed["budget"] += len(candidates)
                candidates = []
            else:
                candidates = _add_noise(candidates, dp=dp, noise=noise, group_bounds=dp.bounds)
                eps = dp.epsilon_per_cell
                dlt = dp.delta if dp.mechanism == "gaussian" else 0.0
                spent += eps
                epsilon_total += eps
                delta_total += dlt
        groups: dict[tuple[str, str | None], dict[str, FieldStatistics]] = {}
        for cand in candidates:
            groups.setdefault((cand.group, cand.currency), {})[cand.name] = cand.stats
        cells.append(CellResult(
            category=category, region=region,
            groups=[PublishedGroup(group=g, currency=cur, fields=fs)
                    for (g, cur), fs in groups.items()],
            contributors=len(domain_of), domains=len(set(domain_of.values())),
            inputs=len(items), input_hash=input_hash(c.digest for c in items),
            epsilon=eps, delta=dlt, suppressed=dict(suppressed)))
    return WindowResult(window_start=window_start, window_end=window_end, cells=cells,
                        epsilon=epsilon_total, delta=delta_total, period_start=period)


def _cross_domain(name: str, per_company: Mapping[str, Sequence[float]],
                  domain_of: Mapping[str, str], *, min_companies: int,
                  dominance_cap: float) -> str | None:
    """The conservative k and dominance test for a field whose companies span domains."""
    domains: dict[str, list[str]] = {}
    for company in per_company:
        domains.setdefault(domain_of[company], []).append(company)
    if len(domains) <= 1:
        return None
    if max(len(ids) for ids in domains.values()) < min_companies:
        return "below_k"
    weights = {c: _weight(name, vs) for c, vs in per_company.items()}
    total = math.fsum(weights.values())
    if total > 0:
        share = math.fsum(max(weights[c] for c in ids) for ids in domains.values()) / total
    else:
        share = len(domains) / len(per_company)
    return "dominance" if share > dominance_cap else None


def _add_noise(candidates: list[_Candidate], *, dp: DPConfig, noise: NoiseMechanism,
               group_bounds: Mapping[str, tuple[float, float]]) -> list[_Candidate]:
    releases = sum(1 + (c.name in ADDITIVE_FIELDS) for c in candidates)
    eps = dp.epsilon_per_cell / releases
    delta = dp.delta / releases
    out: list[_Candidate] = []
    for cand in candidates:
        lo, hi = group_bounds[f"{cand.group}.{cand.name}"]
        values = [min(max(_combined(cand.name, vs), lo), hi)
                  for vs in cand.per_company.values()]
        n = len(values)
        # Replace-one neighbours: changing one company moves the mean by at most
        # (hi - lo) / n and the sum by at most hi - lo. n itself is published.
        mean = math.fsum(values) / n + noise.sample(sensitivity=(hi - lo) / n, epsilon=eps,
                                                    delta=delta)
        total: float | None = None
        if cand.name in ADDITIVE_FIELDS:
            total = math.fsum(values) + noise.sample(sensitivity=hi - lo, epsilon=eps,
                                                     delta=delta)
            total = _round(min(max(total, n * lo), n * hi))
        stats = FieldStatistics(count=cand.stats.count, companies=cand.stats.companies,
                                mean=_round(min(max(mean, lo), hi)), stddev=None, sum=total)
        out.append(_Candidate(group=cand.group, currency=cand.currency, name=cand.name,
                              stats=stats, per_company={}))
    return out


# -- published messages --------------------------------------------------------------------
_ALLOWED_KINDS: dict[str, str] = {"aggregates": "aggregate", "bridge_receipt": "receipt",
                                  "bridge_state": "ledger"}


class PublicOutput:
    """The one path from the bridge to the public broker.

    :meth:`build` turns a :class:`WindowResult` into signed messages — an aggregate and a
    receipt per category with at least one published cell, and the ledger when noise is on —
    and refuses (:class:`PrivacyError`) any statistic below k companies. :meth:`send`
    publishes outbox rows, and refuses anything that is not a bridge-signed aggregate,
    receipt or ledger on this network's ``aggregates/`` or ``state/bridge/`` topics. The
    connection it writes with is private to it.
    """

    def __init__(self, *, config: BridgeConfig, codec: EnvelopeCodec) -> None:
        self._config = config
        self._codec = codec
        self._network = config.public.network_id
        self._scheme = TopicScheme(mode="public", network=self._network,
                                   member=codec.signer.identity.member)
        self._policy_version = config.policy_version()
        self._conn: Connection | None = None
        self._sender = codec.signer.sender

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
        noise = (NoiseInfo(mechanism=dp.mechanism, epsilon_per_cell=dp.epsilon_per_cell,
                           delta=dp.delta if dp.mechanism == "gaussian" else None)
                 if dp.mechanism != "none" else None)
        ws = datetime.fromtimestamp(result.window_start, UTC)
        we = datetime.fromtimestamp(result.window_end, UTC)
        by_category: dict[str, list[CellResult]] = {}
        for cell in result.cells:
            if cell.published:
                by_category.setdefault(cell.category, []).append(cell)
        out: list[tuple[str, bytes, bool]] = []
        receipts: list[tuple[str, bytes]] = []
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
                    for g in c.groups]) for c in cells])
            self._check(body)
            topic = self._scheme.aggregate(category)
            try:
                payload = self._codec.encode(kind="aggregate", body=body.model_dump(mode="json"),
                                             encrypt=False)
            except OversizedMessage as exc:
                log.error("aggregate of %s for %s is too large to publish: %s", category,
                          ws.isoformat(), exc)
                continue
            receipt = ReceiptBody(
                network=self._network, category=category, window_start=ws, window_end=we,
                aggregate_topic=topic, aggregate_sha256=hashlib.sha256(payload).hexdigest(),
                policy_version=self._policy_version, min_companies=self._config.min_companies,
                dominance_cap=self._config.dominance_cap, mechanism=dp.mechanism,
                cells=[ReceiptCell(region=c.region, contributors=c.contributors,
                                   identity_domains=c.domains, inputs=c.inputs,
                                   input_hash=c.input_hash, epsilon_spent=c.epsilon,
                                   delta_spent=c.delta) for c in cells],
                issued_at=datetime.fromtimestamp(now, UTC))
            rpayload = self._codec.encode(kind="receipt", body=receipt.model_dump(mode="json"),
                                          encrypt=False)
            out += [(topic, payload, True), (self._scheme.bridge_receipt(category), rpayload,
                                             True)]
            receipts.append((category, rpayload))
        if dp.mechanism != "none" and result.epsilon > 0:
            out.append((self._scheme.bridge_state("ledger"), self.ledger_message(ledger), True))
        return out, receipts

    def ledger_message(self, ledger: Sequence[LedgerEntry]) -> bytes:
        """The signed retained ledger of the latest :data:`_LEDGER_PERIODS` periods."""
        dp = self._config.dp
        assert dp.mechanism != "none"
        periods = [LedgerPeriod(
            period_start=datetime.fromtimestamp(e.period_start, UTC),
            period_end=datetime.fromtimestamp(e.period_start + dp.period_seconds, UTC),
            epsilon_spent=round(e.epsilon, 9),
            epsilon_remaining=round(max(0.0, dp.budget_per_period - e.epsilon), 9),
            delta_spent=e.delta, cells=e.cells) for e in list(ledger)[-_LEDGER_PERIODS:]]
        body = LedgerBody(network=self._network, mechanism=dp.mechanism,
                          epsilon_per_cell=dp.epsilon_per_cell,
                          budget_per_period=dp.budget_per_period,
                          period_seconds=dp.period_seconds,
                          policy_version=self._policy_version, periods=periods)
        return self._codec.encode(kind="ledger", body=body.model_dump(mode="json"),
                                  encrypt=False)

    def _admit(self, row: OutgoingRow) -> None:
        try:
            parsed = parse_topic(row.topic)
        except TopicError:
            raise PrivacyError(f"refusing to publish to {row.topic!r}: not a pear_mqtt "
                               "topic") from None
        kind = _ALLOWED_KINDS.get(parsed.kind)
        if parsed.mode != "public" or parsed.network != self._network or kind is None:
            raise PrivacyError(f"refusing to publish to {row.topic!r}: the bridge writes "
                               "aggregates and its own state only")
        try:
            head = json.loads(row.payload)
        except ValueError:
            raise PrivacyError(f"refusing to publish a non-envelope to {row.topic!r}") from None
        if not isinstance(head, dict) or head.get("kind") != kind \
                or head.get("from") != self._sender or "body" not in head:
            raise PrivacyError(f"refusing to publish to {row.topic!r}: not a plain "
                               f"bridge-signed {kind!r} envelope")

    async def send(self, rows: Sequence[OutgoingRow], *, timeout: float = 30.0) -> list[int]:
        """Publish ``rows`` (pipelined, QoS 1, retained as marked); the ids acknowledged.

        A row refused by :meth:`_admit` is never sent (and never acknowledged): it stays in
        the outbox and the error is logged, so it cannot leak and cannot be lost silently.
        """
        conn = self._conn
        if conn is None or not conn.connected or not rows:
            return []
        pending: list[tuple[int, asyncio.Future[None]]] = []
        for row in rows:
            try:
                self._admit(row)
            except PrivacyError as exc:
                log.error("%s", exc)
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


def _codec(*, tls: TLSConfig, network: str, encryption: EncryptionConfig | None,
           crl: Path | None, rel: ReliabilityConfig, what: str) -> EnvelopeCodec:
    missing = tls.missing()
    if missing:
        raise ConfigError(f"{what}: {', '.join(missing)} required")
    assert tls.ca_file and tls.cert_file and tls.key_file
    signer = Signer.from_files(key_file=tls.key_file, cert_file=tls.cert_file)
    me = signer.identity
    if me.network != network:
        raise ConfigError(f"{what}: certificate {tls.cert_file} is for network {me.network!r},"
                          f" not {network!r}")
    if me.node != BRIDGE_NODE:
        raise ConfigError(f"{what}: certificate {tls.cert_file} is a {me.node!r} certificate; "
                          "the bridge needs one issued with role 'bridge'")
    trust = TrustStore.from_files(ca_files=[tls.ca_file], crl_files=[crl] if crl else [],
                                  network=network)
    return EnvelopeCodec(signer=signer, trust=trust, encryption=encryption,
                         max_bytes=rel.max_message_bytes, max_clock_skew=rel.max_clock_skew,
                         max_age=rel.max_message_age)


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
        self._public_codec = _codec(tls=cfg.public.tls, network=cfg.public.network_id,
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
            codec = _codec(tls=src.tls, network=src.network_id, encryption=src.encryption,
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
            codec = _codec(tls=pub.tls, network=pub.network_id, encryption=None,
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

    # -- connections -------------------------------------------------------------------------
    def _connection(self, *, url: str, tls: TLSConfig, rel: ReliabilityConfig,
                    client_id: str) -> Connection:
        protocol = {"auto": None, "5": 5, "3.1.1": 4}[rel.mqtt_version]
        # At least a week of session: what members send while the bridge is down (an
        # upgrade, a weekend outage) waits in the broker instead of being lost; a node's
        # one-hour default is meant for nodes, whose peers do not depend on them.
        # Manual acks: an item is acknowledged only once the state store has committed it,
        # so a bridge killed in between gets it again instead of losing it.
        return Connection(broker=BrokerURL.parse(url), client_id=client_id[:128], tls=tls,
                          keepalive=rel.keepalive, clean_start=False,
                          session_expiry=max(rel.session_expiry, _MIN_SESSION_EXPIRY),
                          protocol=protocol, manual_ack=True)

    async def _backoff(self, attempt: int, rel: ReliabilityConfig) -> None:
        delay = min(rel.reconnect_max_delay, rel.reconnect_min_delay * 2 ** min(attempt, 16))
        await asyncio.sleep(random.uniform(0, delay))  # full jitter between reconnects

    async def _run_input(self, inp: _Input) -> None:
        attempt = 0
        while not self._closing:
            # A stable client id with a persistent session: the broker queues what arrives
            # while the bridge is down and delivers it on reconnect.
            conn = self._connection(url=inp.broker_url, tls=inp.tls, rel=inp.reliability,
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
            conn = self._connection(url=pub.broker_url, tls=pub.tls, rel=pub.reliability,
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
        ledger = _merged_ledger(self._store.ledger(), ledger_rows)
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
            for e in store.ledger()[-_LEDGER_PERIODS:]:
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


def _merged_ledger(ledger: Sequence[LedgerEntry], extra: Sequence[LedgerEntry]
                   ) -> list[LedgerEntry]:
    by: dict[int, LedgerEntry] = {e.period_start: e for e in ledger}
    for e in extra:
        old = by.get(e.period_start)
        by[e.period_start] = e if old is None else LedgerEntry(
            period_start=e.period_start, epsilon=old.epsilon + e.epsilon,
            delta=old.delta + e.delta, cells=old.cells + e.cells)
    return [by[k] for k in sorted(by)]


# -- command line --------------------------------------------------------------------------



def _describe(config: BridgeConfig) -> str:
    inputs = []
    if config.consortium is not None:
        inputs.append(f"consortium {config.consortium.network_id} "
                      f"({config.consortium.broker_url})")
    inputs += [f"private {s.company_id} ({s.broker_url})" for s in config.private]
    if config.public.contributions:
        inputs.append(f"public contributions of {config.public.network_id}")
    dp = config.dp
    noise = "no noise" if not dp.enabled else (
        f"{dp.mechanism} noise, ε {dp.epsilon_per_cell:g} per cell, budget "
        f"{dp.budget_per_period:g} per {dp.period_seconds} s")
    return (f"bridge {config.bridge_id}: {', '.join(inputs)} -> public {config.public.network_id}"
            f" ({config.public.broker_url}); k={config.min_companies}, dominance cap "
            f"{config.dominance_cap:.0%}, window {config.window_seconds} s, lag "
            f"{config.publication_lag_seconds} s, {noise}; policy {config.policy_version()}; "
            f"state {config.state_path}")


async def _serve(config: BridgeConfig, *, status_file: Path | None,
                 status_interval: float) -> BridgeStatus:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    bridge = Bridge(config)
    await bridge.start(timeout=30.0)
    print(_describe(config), file=sys.stderr, flush=True)
    try:
        while not stop.is_set():
            if status_file is not None:
                atomic_write(status_file, bridge.status().model_dump_json(indent=2) + "\n",
                             fsync=False, make_parents=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), status_interval)
    finally:
        final = bridge.status()
        await bridge.stop()
        if status_file is not None:
            down = final.model_copy(update={"health": Health.DOWN, "connected": False})
            atomic_write(status_file, down.model_dump_json(indent=2) + "\n", make_parents=True)
    return final


def _cmd_bridge(args: argparse.Namespace) -> int:
    config = BridgeConfigManager.load(file=args.config)
    for warning in BridgeConfigManager.warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    if args.receipts:
        store = BridgeStore(config.state_path)
        try:
            for _window, _category, payload in store.receipts():
                sys.stdout.write(payload.decode("utf-8") + "\n")
        finally:
            store.close()
        return 0
    BridgeConfigManager.validate(config, for_connect=True)
    if args.check:
        print(_describe(config))
        return 0
    # Long-lived startup objects (modules, schemas, config) stay out of the cyclic collector's
    # full collections (15-40 ms each over them, measured): see the agent's command.
    gc.freeze()
    final = asyncio.run(_serve(config, status_file=args.status_file,
                               status_interval=args.status_interval))
    print(final.model_dump_json(indent=2))
    return 0


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pear-mqtt bridge``."""
    parser = subparsers.add_parser(
        "bridge", help="run the public bridge: k-anonymous aggregates to the public broker",
        description=(
            "Read the consortium broker, opted-in private brokers and public contributions "
            "with the bridge's certificates, verify and policy-check every item, and publish "
            "retained, signed aggregates per (category, region, window) to the public broker "
            "once a window is older than the publication lag — only for statistics of at least "
            "k companies with no company above the dominance cap, optionally with noise "
            "against an ε budget — plus a disclosure receipt per aggregate. State (open "
            "windows, counted item ids, ledger, outbox) lives in state_path, so a restart "
            "neither loses nor double-counts. SIGTERM/SIGINT stop it cleanly; a JSON status "
            "goes to stdout on exit."))
    parser.add_argument("--config", type=Path, metavar="FILE", required=True,
                        help="bridge config (.toml or .json); PEAR_BRIDGE_* variables "
                             "override it")
    parser.add_argument("--status-file", type=Path, metavar="PATH",
                        help="keep the current status as JSON in PATH (for health checks)")
    parser.add_argument("--status-interval", type=float, default=2.0, metavar="S",
                        help="seconds between status file updates (default: 2)")
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration and key material, print a summary")
    parser.add_argument("--receipts", action="store_true",
                        help="print every disclosure receipt issued so far (one signed "
                             "envelope per line) and exit")
    parser.set_defaults(handler=_cmd_bridge)
