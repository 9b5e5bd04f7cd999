"""Bridge scale-out: which instance counts a sender (:func:`owner_of`), the sealed and signed
partial a worker hands the merger for each window it closes (:func:`encode_partials`,
:func:`decode_partial`), and both ends of that exchange (:class:`PartialExchange`).
The contract is in docs/BRIDGE.md ("Scale-out")."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import EnvelopeError, MalformedMessage, OutboxError, TopicError
from ..model.topics import PartialTopic, TopicScheme, parse_partial_topic
from ..security.envelope import EnvelopeCodec
from ..security.seal import Sealer, SealOpener
from ..transport import InboundMessage
from .config import BridgeConfig, BridgeRole
from .endpoints import BRIDGE_NODE
from .links import InputLink
from .state import BridgeStore, NewContribution, StoredContribution
from .status import BridgeCounters

__all__ = ["PART_BYTES", "Partial", "PartialExchange", "decode_partial", "encode_partials",
           "owner_of", "partition_key"]

log = logging.getLogger(__name__)

PART_BYTES = 192 * 1024
"""Rows (as JSON) per partial message: sealed, base64 and signed it stays far inside the
network's 1 MiB message limit."""


def partition_key(*, kind: str, network: str, sender: str, category: str) -> str:
    """What decides an item's instance, all read from its message's topic before anything
    is opened: the sender's source key (``<kind>/<network>/<member>``) and the category.
    Every copy of one item (same sender, same id, which names its category) meets in one
    store, where the single bridge's rules (latest copy wins, duplicates) apply unchanged."""
    return f"{kind}/{network}/{sender}/{category}"


def owner_of(key: str, instances: int) -> int:
    """The instance (``0 <= i < instances``) that counts the items of partition ``key``
    (:func:`partition_key`): a stable hash, so every instance agrees without talking."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % instances


@dataclass(frozen=True, slots=True, kw_only=True)
class Partial:
    """One part of one instance's partial of a window: the items it counted, as its store
    held them when it closed the window."""

    window_start: int
    instance: int
    part: int
    parts: int
    items: list[NewContribution]


def _row(c: StoredContribution) -> list[Any]:
    return [c.source_key, c.item_id, c.category, c.region, c.domain, c.company, c.currency,
            c.values, c.digest.hex(), None if c.token_digest is None else c.token_digest.hex()]


def _item(row: Any, window_start: int) -> NewContribution:
    if not isinstance(row, list) or len(row) != 10:
        raise MalformedMessage("a partial's row is not a 10-element list")
    src, iid, cat, reg, dom, comp, cur, values, digest, token = row
    if not all(isinstance(v, str) for v in (src, iid, cat, reg, dom, comp, digest)) \
            or not (cur is None or isinstance(cur, str)) \
            or not (token is None or isinstance(token, str)) or not isinstance(values, dict):
        raise MalformedMessage("a partial's row has fields of the wrong type")
    try:
        vals = {str(g): {str(n): float(v) for n, v in fs.items()} for g, fs in values.items()}
        if not all(math.isfinite(v) for fs in vals.values() for v in fs.values()):
            raise ValueError("not a finite number")
        return NewContribution(
            source_key=src, item_id=iid, window_start=window_start, category=cat, region=reg,
            domain=dom, company=comp, currency=cur, values=vals, digest=bytes.fromhex(digest),
            token_digest=None if token is None else bytes.fromhex(token))
    except (AttributeError, TypeError, ValueError):
        raise MalformedMessage("a partial's row holds a malformed value") from None


def _chunks(rows: Sequence[list[Any]], limit: int) -> list[bytes]:
    """``rows`` as JSON arrays of at most about ``limit`` bytes each (at least one)."""
    out: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for row in rows:
        # json.dumps writes a float's shortest round-trip repr: the merger reads back the
        # very values the worker stored, which byte-identical aggregates need.
        text = json.dumps(row, separators=(",", ":"), allow_nan=False).encode()
        if current and size + len(text) > limit:
            out.append(b"[" + b",".join(current) + b"]")
            current, size = [], 0
        current.append(text)
        size += len(text) + 1
    out.append(b"[" + b",".join(current) + b"]")
    return out


def encode_partials(*, codec: EnvelopeCodec, sealer: Sealer, scheme: TopicScheme,
                    bridge_id: str, window_start: int, instance: int, instances: int,
                    policy_version: str, rows: Sequence[StoredContribution],
                    limit: int = PART_BYTES) -> list[tuple[str, bytes, bool]]:
    """The retained (topic, payload, True) messages of ``instance``'s partial of a window:
    its ``rows`` sealed to the aggregator key (bound to the topic), in bridge-signed
    ``partial`` envelopes, split into parts of about ``limit`` bytes."""
    chunks = _chunks([_row(r) for r in rows], limit)
    out: list[tuple[str, bytes, bool]] = []
    for part, chunk in enumerate(chunks):
        topic = scheme.bridge_partial(bridge_id, window_start, instance, part)
        body = {"bridge": bridge_id, "window_start": window_start, "instance": instance,
                "instances": instances, "part": part, "parts": len(chunks),
                "policy_version": policy_version,
                "items": sealer.seal(chunk, aad=topic.encode())}
        out.append((topic, codec.encode(kind="partial", body=body, encrypt=False), True))
    return out


def decode_partial(topic: str, payload: bytes, *, codec: EnvelopeCodec, opener: SealOpener,
                   instances: int, policy_version: str) -> Partial:
    """Verify and open one partial message; :class:`EnvelopeError` (or
    :class:`~pear_mqtt.errors.TopicError`) for anything but a bridge-signed partial of this
    policy and number of instances that matches its topic."""
    where = parse_partial_topic(topic)
    decoded = codec.decode(payload, check_replay=False, max_age=float("inf"))
    if decoded.signer.node != BRIDGE_NODE or decoded.message.kind != "partial":
        raise MalformedMessage(f"{topic}: not a bridge-signed partial")
    body = decoded.message.body
    if not isinstance(body, dict):
        raise MalformedMessage(f"{topic}: a partial's body is an object")
    expected = {"bridge": where.bridge_id, "window_start": where.window_start,
                "instance": where.instance, "part": where.part, "instances": instances,
                "policy_version": policy_version}
    wrong = sorted(k for k, v in expected.items() if body.get(k) != v)
    parts = body.get("parts")
    if wrong or not isinstance(parts, int) or not where.part < parts \
            or not isinstance(body.get("items"), str):
        raise MalformedMessage(f"{topic}: the partial does not match its topic or this "
                               f"bridge's instances and policy ({', '.join(wrong) or 'parts'})")
    raw = opener.open(body["items"], aad=topic.encode())
    try:
        rows = json.loads(raw)
    except ValueError:
        raise MalformedMessage(f"{topic}: a partial's items are not JSON") from None
    if not isinstance(rows, list):
        raise MalformedMessage(f"{topic}: a partial's items are a list")
    return Partial(window_start=where.window_start, instance=where.instance, part=where.part,
                   parts=parts, items=[_item(r, where.window_start) for r in rows])


class PartialExchange:
    """Both ends of the partials of one scaled-out bridge on the consortium broker.

    A ``worker`` closes a window by sealing its items into a partial (:meth:`close`), and
    opens a window it holds nothing of once another instance's partial of it appears, so
    that it closes it too (maybe empty) and the merger hears from every instance. The
    ``merge`` role verifies, opens and counts every partial into its own store
    (:meth:`receive`); a window is merged once every instance's partial is complete
    (:meth:`waiting`).
    """

    def __init__(self, *, config: BridgeConfig, role: BridgeRole, store: BridgeStore,
                 counters: BridgeCounters, codec: EnvelopeCodec, opener: SealOpener,
                 clock: Callable[[], float]) -> None:
        assert config.consortium is not None and role != "single"
        self._config = config
        self._role = role
        self._store = store
        self._counters = counters
        self._codec = codec
        self._opener = opener
        self._sealer = Sealer(opener.public_key)
        self._clock = clock
        self._policy_version = config.policy_version()
        self._scheme = TopicScheme(mode="consortium", network=config.consortium.network_id,
                                   member=codec.signer.identity.member)

    def link(self, base: InputLink) -> InputLink:
        """The input link that reads the partials, on ``base``'s (the consortium's) broker."""
        return InputLink(name="partials", kind="consortium", network=base.network,
                         broker_url=base.broker_url, tls=base.tls, reliability=base.reliability,
                         codec=self._codec, opener=self._opener, policy={}, domain=base.domain,
                         filters=[self._scheme.bridge_partials_filter(self._config.bridge_id)])

    def close(self, start: int, now: float) -> None:
        """A worker's close of the window starting at ``start``: its partial to the
        consortium outbox, its exact values gone, in one store transaction."""
        cfg = self._config
        rows = self._store.contributions(start)
        outgoing = encode_partials(codec=self._codec, sealer=self._sealer, scheme=self._scheme,
                                   bridge_id=cfg.bridge_id, window_start=start,
                                   instance=cfg.instance, instances=cfg.instances,
                                   policy_version=self._policy_version, rows=rows)
        self._store.close_partial(start, now=now, outgoing=outgoing)
        log.info("window %s closed by instance %d of %d: partial of %d items in %d parts",
                 start, cfg.instance, cfg.instances, len(rows), len(outgoing))

    def clear(self, start: int) -> None:
        """Merger, once the window starting at ``start`` is closed: clear the workers'
        retained partials of it (its exact values leave the broker as they leave the store)."""
        self._store.clear_partials(start, [
            self._scheme.bridge_partial(self._config.bridge_id, start, instance, part)
            for instance, part in self._store.partial_parts(start)])

    def waiting(self) -> dict[int, list[int]]:
        """Merger: per window some partial arrived for, the instances still missing."""
        return self._store.partial_progress(self._config.instances)

    def receive(self, link: InputLink, msgs: Sequence[InboundMessage]) -> None:
        """Handle what the partials link delivered (the ingest callback of its reader)."""
        now = self._clock()
        for msg in msgs:
            if not msg.payload:
                continue  # a cleared retained partial
            try:
                where = parse_partial_topic(msg.topic)
            except TopicError:
                self._counters.drop("bad_topic")
                continue
            if where.bridge_id != self._config.bridge_id \
                    or where.instance >= self._config.instances \
                    or where.window_start % self._config.window_seconds:
                self._counters.drop("bad_topic")
                continue
            try:
                if self._role == "worker":
                    self._seen(where, now)
                else:
                    self._merge(msg, where, now)
            except OutboxError:
                raise  # the state cannot record it: the caller stops, nothing is acked
            except Exception:  # one message must never stop the bridge
                log.exception("unexpected error on %r", msg.topic)
                self._counters.drop("internal_error")

    def _seen(self, where: PartialTopic, now: float) -> None:
        if where.instance == self._config.instance:
            return
        if self._store.window_state(where.window_start) is None:
            # Another instance closed a window this one holds nothing of. It opens it empty,
            # so that it closes (with an empty partial) under the usual lag and settle rule:
            # items of it still on their way (a backlog after a restart) are counted first.
            self._store.open_window(where.window_start, now=now)

    def _merge(self, msg: InboundMessage, where: PartialTopic, now: float) -> None:
        store = self._store
        start = where.window_start
        state = store.window_state(start)
        if (state is not None and state != "open") or store.frozen(start):
            return  # merged and closed already: a retained copy delivered again
        try:
            partial = decode_partial(msg.topic, msg.payload, codec=self._codec,
                                     opener=self._opener, instances=self._config.instances,
                                     policy_version=self._policy_version)
        except EnvelopeError as exc:
            self._counters.drop(exc.reason)
            log.warning("dropped a partial on %s: %s", msg.topic, exc)
            return
        if partial.items:
            self._counters.add(store.add(partial.items, now=now))
        store.record_partial(start, instance=partial.instance, part=partial.part,
                             parts=partial.parts)
