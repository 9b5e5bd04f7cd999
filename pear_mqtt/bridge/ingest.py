"""From an input link's messages to counted items: verify each envelope, hold each item
against the policy and its node's presence, open its sealed part, and count what passes in
one store transaction. Everything dropped is counted by reason."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from ..errors import DecryptionError, EnvelopeError, OutboxError, TopicError
from ..model.insight import FIELD_GROUPS, SharingLevel
from ..model.mixed import item_categories
from ..model.topics import ParsedTopic, parse_topic
from ..privacy.filter import Contribution, SharedInsight
from ..security.identity import Identity
from ..transport import InboundMessage
from .admission import check_item, item_digest, window_of
from .config import BridgeConfig
from .histogram import BUCKETS, bucket_values
from .links import InputLink
from .partials import partition_key
from .state import BridgeStore, NewContribution
from .status import BridgeCounters

__all__ = ["Ingestor"]

log = logging.getLogger(__name__)

_ITEM_ID_MAX = 128
# model_validate / model_validate_json minus pydantic's Python wrapper, once per item.
_validate_shared = SharedInsight.__pydantic_validator__.validate_python
_validate_contribution = Contribution.__pydantic_validator__.validate_json


class Ingestor:
    """Checks what the input links deliver and counts what they admit into ``store``.

    ``clock`` decides which windows are late or in the future (tests move it); envelope
    checks use real time. Counts go to ``counters``. A scale-out worker (``share``, see
    docs/BRIDGE.md "Scale-out") takes only the partitions ``owner`` assigns to it and leaves
    the others' messages, unopened, to their instances (every instance reads presences).
    """

    def __init__(self, *, config: BridgeConfig, store: BridgeStore, counters: BridgeCounters,
                 clock: Callable[[], float],
                 owner: Callable[[str], bool] | None = None) -> None:
        self._config = config
        self._store = store
        self._counters = counters
        self._clock = clock
        self._owner = owner

    def ingest(self, link: InputLink, msgs: Sequence[InboundMessage]) -> None:
        """Check every message of ``msgs`` in order and count what they admit in one store
        transaction. A message that fails unexpectedly is dropped alone (``internal_error``);
        :class:`OutboxError` (nothing of ``msgs`` was counted) is the caller's to handle."""
        now = self._clock()
        admitted: list[tuple[InboundMessage, list[NewContribution]]] = []
        for msg in msgs:
            try:
                batch = self.receive(link, msg, now)
            except Exception:  # one message must never stop the bridge
                log.exception("unexpected error on %r", msg.topic)
                self._counters.drop("internal_error")
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
                self._counters.drop("internal_error")

    def _count(self, batch: list[NewContribution], now: float) -> None:
        self._counters.add(self._store.add(batch, now=now))

    def receive(self, link: InputLink, msg: InboundMessage,
                now: float) -> list[NewContribution]:
        """The items of ``msg`` to count; everything else is dropped and counted here."""
        drop = self._counters.drop
        try:
            parsed = parse_topic(msg.topic)
        except TopicError:
            drop("bad_topic")
            return []
        if link.kind == "private":
            in_scope = parsed.mode == "private" and parsed.company == link.company_id
        else:
            in_scope = parsed.mode == link.kind and parsed.network == link.network
        if not in_scope:
            drop("bad_topic")
            return []
        if not msg.payload:
            if not msg.retain:  # a cleared retained message is legitimate; this is not
                drop("malformed")
            return []
        if parsed.kind == "nodes":
            self._presence(link, parsed, msg)
            return []
        if parsed.kind not in ("insights", "contrib"):
            drop("unexpected_topic")
            return []
        owner = self._owner
        if owner is not None and parsed.category is not None and not owner(partition_key(
                kind=link.kind, network=link.network, sender=parsed.company or "",
                category=parsed.category)):
            self._counters.other_instances += 1
            return []
        try:
            decoded = link.codec.decode(msg.payload, check_replay=not msg.retain)
        except EnvelopeError as exc:
            drop(exc.reason)
            log.debug("dropped message on %s: %s", msg.topic, exc)
            return []
        signer = decoded.signer
        if parsed.company != signer.member or (
                link.company_id is not None and signer.member != link.company_id):
            drop("identity_mismatch")
            return []
        body = decoded.message.body
        items = body.get("items") if isinstance(body, dict) else None
        if decoded.message.kind != "insights" or not isinstance(items, list):
            drop("unexpected_kind" if decoded.message.kind != "insights" else "malformed")
            return []
        source = f"{link.kind}/{link.network}/{signer.member}"
        if parsed.category is not None:
            categories = [parsed.category] * len(items)
        elif (named := item_categories(body, len(items))) is not None:
            # Several categories: a scaled-out instance takes its partitions' items only.
            categories = named
            if owner is not None:
                mine = [owner(partition_key(kind=link.kind, network=link.network,
                                            sender=signer.member, category=c))
                        for c in categories]
                if not any(mine):
                    self._counters.other_instances += 1
                    return []
                items = [i for i, m in zip(items, mine, strict=True) if m]
                categories = [c for c, m in zip(categories, mine, strict=True) if m]
        else:
            drop("malformed")
            return []
        self._counters.items_received += len(items)
        batch: list[NewContribution] = []
        for raw, category in zip(items, categories, strict=True):
            new = self.admit(link, category, signer, raw, now, source)
            if new is not None:
                batch.append(new)
        return batch

    def _presence(self, link: InputLink, parsed: ParsedTopic, msg: InboundMessage) -> None:
        try:
            decoded = link.codec.decode(msg.payload, check_replay=False)
        except EnvelopeError as exc:
            self._counters.drop(exc.reason)
            return
        signer = decoded.signer
        if parsed.company != signer.member or parsed.node != signer.node:
            self._counters.drop("identity_mismatch")
            return
        body = decoded.message.body
        raw = body.get("levels") if isinstance(body, dict) else None
        if not isinstance(raw, dict):
            return  # presence without levels: nothing to hold items against
        try:
            levels = {g: SharingLevel(v) for g, v in raw.items() if g in FIELD_GROUPS}
        except ValueError:
            self._counters.drop("malformed")
            return
        link.presence[(signer.member, signer.node)] = levels

    def admit(self, link: InputLink, category: str, signer: Identity, raw: Any,
              now: float, source: str) -> NewContribution | None:
        """One item ``raw`` of ``category`` (as its message names it) of a verified message
        from ``signer``: what to count, or None (dropped and counted by reason, or
        ``ignored`` when it carries nothing this link may aggregate)."""
        drop = self._counters.drop
        if not isinstance(raw, dict):
            drop("malformed")
            return None
        iid = raw.get("iid")
        if not isinstance(iid, str) or not 0 < len(iid) <= _ITEM_ID_MAX:
            drop("malformed")
            return None
        body = raw.get("insight")
        sealed = raw.get("sealed")
        shared: SharedInsight | None = None
        if body is not None:
            try:
                shared = _validate_shared(body)
            except ValidationError:
                drop("malformed")
                return None
            if shared.category != category:
                drop("mismatch")
                return None
        elif sealed is None:
            drop("malformed")  # neither a published nor a sealed part
            return None
        contribution: Contribution | None = None
        if sealed is not None:
            if not isinstance(sealed, str):
                drop("malformed")
                return None
            if link.opener is None:
                drop("no_aggregator_key")
                return None
            try:
                contribution = _validate_contribution(link.opener.open(sealed))
            except DecryptionError:
                drop("seal_failed")
                return None
            except ValidationError:
                drop("malformed")
                return None
        # What the item describes: its published part, else (sent alone) its sealed part.
        about: SharedInsight | Contribution
        if shared is not None:
            about = shared
        elif contribution is not None:
            about = contribution
            if about.category != category:
                drop("mismatch")
                return None
        else:  # unreachable: an item with neither part was dropped above
            drop("malformed")
            return None
        reason = check_item(shared=shared, contribution=contribution, policy=link.policy,
                            announced=link.presence.get((signer.member, signer.node)))
        if reason is not None:
            drop(reason)
            log.warning("dropped an item of %s/%s on %s: %s", signer.member, signer.node,
                        category, reason)
            return None
        values: dict[str, dict[str, float]] = {}
        currency: str | None = None
        if contribution is not None:
            # Read-only from here on (the store writes them as JSON): no copies.
            values.update({g: f for g, f in contribution.values.items() if f})
            currency = contribution.currency
        if link.include_full and shared is not None:
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
        buckets = bucket_values(shared) if shared is not None else None
        if buckets is not None:
            values[BUCKETS], bucket_currency = buckets
            currency = currency or bucket_currency
        if not values:
            self._counters.ignored += 1  # nothing this item may contribute to an aggregate
            return None
        start = window_of(about.window_start, about.window_end,
                          window_seconds=self._config.window_seconds)
        if start is None:
            drop("spans_windows")
            return None
        if about.window_start.timestamp() > now + self._config.max_clock_skew:
            drop("future")
            return None
        if self._store.window_state(start) in ("ready", "published") \
                or self._store.frozen(start):
            drop("late")
            return None
        member = link.member_alias or signer.member
        token = hashlib.sha256(sealed.encode()).digest() if isinstance(sealed, str) else None
        return NewContribution(
            source_key=source, item_id=iid,
            window_start=start, category=about.category, region=about.region,
            domain=link.domain, company=member, currency=currency, values=values,
            digest=item_digest(network=link.network, member=signer.member, item=raw),
            token_digest=token)
