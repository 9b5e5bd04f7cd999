"""Hostile input at a receiving node, through a real mosquitto broker with mutual TLS.

What is proven:

- **Bulk fuzz** (``PEAR_FUZZ_N`` payloads, default 10,000): an attacker holding a *valid*
  consortium member certificate floods its own subtree (all the broker lets it write) with
  seeded mutations of real envelopes (bit flips, truncations, splices, member swaps and type
  changes, deep nesting, huge numbers, bad base64, forged signatures, wrong group-key ids, wrong
  keys, foreign-CA / expired / revoked / not-yet-valid signers, impersonation, verbatim replays
  of captured envelopes, oversized payloads), validly signed but structurally hostile envelopes
  drawn from hypothesis strategies, and fuzzed topic suffixes; it also tries topics outside its
  subtree. Meanwhile an honest node sends insights. The receiving ``PearNetwork`` never
  crashes, hangs or reconnects; every honest insight arrives exactly once; the broker refuses
  every publish outside the attacker's subtree and none of them reaches a subscriber; every
  hostile message that reached the receiver is counted exactly once (the sum of its drop,
  duplicate and delivered-from-the-attacker counts equals the number that reached it), each
  family under its reason (``replayed``, ``unknown_key``, ``decryption_failed``,
  ``bad_signature``, ``oversized``, ``identity_mismatch``, ``bad_topic``); nothing is an
  ``internal_error``; resident memory grows by at most one copy of what was sent (the tight
  byte bound is the large-message test, expected to fail until the transport is fixed).
- **Writing under another's identity**: a member's certificate cannot publish into another
  member's subtree (the broker answers "not authorized" and a subscriber on ``#`` of the
  admin listener sees nothing), and an envelope the attacker signs while claiming another
  company's node, inside its own subtree, is refused with a counted reason.
- **Messages a receiver used to ignore silently** — an empty non-retained payload, and the
  receiver's own envelope replayed into another member's subtree — are counted too.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from brokers import GROUP_KEY, MosquittoBroker, NetworkPKI, probe
from faults_report import record
from hostile_fuzz import (
    FUZZ_N,
    Attacker,
    Hostile,
    Mutator,
    Progress,
    RssSampler,
    StructuredSigner,
    codec_for,
    envelope_members,
    fuzz_suffix,
    interleave,
    rss_bound_mb,
    sign_raw,
    structured_cases,
)

from pear_mqtt.config.models import NetworkConfig
from pear_mqtt.errors import TopicError
from pear_mqtt.model.acl import topic_matches
from pear_mqtt.model.insight import MarketInsight, PriceData, SalesData, TrendData
from pear_mqtt.model.topics import TopicScheme, parse_topic
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.node.records import ReceivedInsight
from pear_mqtt.privacy.filter import PrivacyFilter
from pear_mqtt.security.envelope import EnvelopeCodec
from pear_mqtt.security.seal import Sealer, SealOpener, load_x25519_public_key

OTHER_KEY = "A" * 43 + "="  # 32 bytes, not the network's group key
SEED = 20261107
WAIT = 60.0
KNOWN_REASONS = {"malformed", "oversized", "unsupported_version", "bad_signature",
                 "unknown_key", "decryption_failed", "replayed", "stale", "identity_mismatch",
                 "bad_topic", "unexpected_kind", "mismatch"}


def market_insight(i: int, category: str = "grocery/dairy") -> MarketInsight:
    t0 = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(hours=i % 24)
    return MarketInsight(
        category=category, product_id=f"sku-{i}", region="north", window_start=t0,
        window_end=t0 + timedelta(hours=1),
        price_data=PriceData(currency="EUR", price=1.0 + i / 100),
        sales_data=SalesData(units=10.0 + i, revenue=20.0 + i),
        trends=TrendData(price_change_pct=0.5, direction="up"), sample_size=3)


def item_of(config: NetworkConfig, insight: MarketInsight, sealer: Sealer,
            iid: str | None = None) -> dict[str, Any]:
    """An item exactly as a node of ``config`` would put it in a batch."""
    result = PrivacyFilter(config=config).apply(insight)
    item: dict[str, Any] = {"iid": iid or uuid.uuid4().hex,
                            "insight": result.shared.model_dump(mode="json", exclude_none=True)}
    if result.contribution is not None:
        item["sealed"] = sealer.seal(result.contribution.model_dump_json().encode())
    return item


class Watch:
    """Collects what the receiver delivers, by member, and wakes waiters."""

    def __init__(self, attacker_member: str) -> None:
        self.attacker = attacker_member
        self.legit: Counter[str] = Counter()
        self.attacker_delivered = 0
        self.markers: set[str] = set()
        self.changed = asyncio.Event()

    def __call__(self, r: ReceivedInsight) -> None:
        if r.member == self.attacker:
            if r.item_id.startswith("marker-"):
                self.markers.add(r.item_id)
            else:
                self.attacker_delivered += 1
        else:
            self.legit[r.item_id] += 1
        self.changed.set()

    async def until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            self.changed.clear()
            # Deliveries set the event; drop counters have none, so poll them too.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.05))


def drops(net: PearNetwork) -> Counter[str]:
    return Counter(net.status().dropped)


FORBIDDEN = (
    # another member's subtree, including the receiver's sync marker
    "pear/v1/consortium/testnet/acme/insights/grocery/dairy",
    "pear/v1/consortium/testnet/acme/state/store-1/grocery/dairy",
    "pear/v1/consortium/testnet/acme/nodes/store-1",
    "pear/v1/consortium/testnet/globex/nodes/store-1/sync",
    # a look-alike member and the network root
    "pear/v1/consortium/testnet/mallory2/insights/grocery/dairy",
    "pear/v1/consortium/testnet/mallor/insights/grocery/dairy",
    "pear/v1/consortium/testnet",
    # another network, other modes' foreign subtrees, the bridge's outputs
    "pear/v1/consortium/othernet/mallory/insights/grocery/dairy",
    "pear/v1/private/acme/insights/grocery/dairy",
    "pear/v1/public/testnet/aggregates/grocery/dairy",
    "pear/v1/public/testnet/state/bridge/ledger",
    "pear/v1/public/testnet/contrib/acme/grocery/dairy",
    "pear/v1/public/testnet/nodes/acme",
    # outside the scheme
    "$SYS/broker/clients/total",
    "other/topic",
)
SPY_FILTERS = ("pear/v1/consortium/testnet/acme/#", "pear/v1/consortium/testnet/globex/#",
               "pear/v1/consortium/testnet/mallory2/#", "pear/v1/consortium/testnet/mallor/#",
               "pear/v1/consortium/testnet", "pear/v1/consortium/othernet/#",
               "pear/v1/private/acme/#", "pear/v1/public/#", "$SYS/broker/clients/total",
               "other/#")


# The fuzzed certificates (a negative serial, a country name of the wrong length) are
# refused as they should be; cryptography also warns that it will stop parsing them.
@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
async def test_bulk_fuzz_at_a_receiving_node(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker,
        pki: NetworkPKI, aggregator: tuple[Path, SealOpener]) -> None:
    n = FUZZ_N
    began = time.perf_counter()
    rng = random.Random(SEED)
    member = "mallory"
    scheme = TopicScheme(mode="consortium", network=pki.network, member=member)
    rx_config = make_config("globex")
    rx_scheme = TopicScheme(mode="consortium", network=pki.network, member="globex")
    filters = (rx_scheme.live_filter(), rx_scheme.presence_filter(),
               rx_scheme.sync_marker("store-1"))
    sealer = Sealer(load_x25519_public_key(aggregator[0]))
    mallory_cfg = make_config(member)
    mallory = codec_for(pki.node(member), pki.ca, keys={"k1": GROUP_KEY}, active="k1")
    marker_codec = codec_for(pki.node(member, "store-2"), pki.ca, keys={"k1": GROUP_KEY},
                             active="k1")
    categories = ("grocery/dairy", "grocery/bakery", "home/garden")
    watch = Watch(member)
    n_legit = max(200, n // 100)

    async with PearNetwork(rx_config) as rx, PearNetwork(make_config("acme")) as honest:
        rx.on_insight(watch)
        # Captured traffic: the attacker (a member, so a legitimate reader of the network)
        # records the honest node's real envelopes to mutate and replay.
        captured: list[bytes] = []
        with probe(mosquitto, pki.node(member, "store-3"),
                   subscribe=["pear/v1/consortium/testnet/acme/insights/#"]) as spy:
            legit_sent: list[str] = []
            for i in range(10):
                legit_sent.append(await honest.broadcast_market_insight(market_insight(i)))
                await honest.flush(timeout=WAIT)
                captured.append(spy.expect(lambda m: True, timeout=WAIT)[0].payload)
        await watch.until(lambda: len(watch.legit) >= len(legit_sent), WAIT, "warm-up")

        own_valid = [mallory.encode(kind="insights", body={"items": [
            item_of(mallory_cfg, market_insight(i, categories[i % 3]), sealer)]})
            for i in range(20)]
        presigned = {
            "wrong_kid": [codec_for(pki.node(member), pki.ca, keys={"k2": GROUP_KEY},
                                    active="k2").encode(kind="insights", body={"items": []})
                          for _ in range(8)],
            "wrong_key": [codec_for(pki.node(member), pki.ca, keys={"k1": OTHER_KEY},
                                    active="k1").encode(kind="insights", body={"items": []})
                          for _ in range(8)],
            "foreign_ca": [codec_for(pki.foreign, pki.foreign_ca).encode(
                kind="insights", body={"items": []}) for _ in range(4)],
            "expired": [codec_for(pki.expired, pki.ca).encode(kind="insights",
                                                              body={"items": []})],
            "revoked": [codec_for(pki.revoked, pki.ca).encode(kind="insights",
                                                              body={"items": []})],
            "not_yet_valid": [codec_for(pki.not_yet_valid, pki.ca).encode(
                kind="insights", body={"items": []})],
            # the attacker's own valid key, claiming to be the honest company's node
            "impersonation": [sign_raw(mallory.signer, envelope_members(
                sender="acme/store-1", seq=int(time.time() * 1e6) + i, ts=time.time(),
                body={"items": [item_of(mallory_cfg, market_insight(i), sealer)]}))
                for i in range(8)],
        }
        mutator = Mutator(SEED, bases=[*captured, *own_valid, *presigned["wrong_kid"],
                                       *presigned["foreign_ca"]],
                          replays=captured, presigned=presigned,
                          oversized_every=max(1000, n // 25))
        # Structure: validly signed by the attacker, every header member and the body drawn
        # by hypothesis (about 5 % of the total).
        t_gen = time.perf_counter()
        cases = structured_cases(max(50, n // 20), own_valid_item(own_valid, mallory))
        gen_s = time.perf_counter() - t_gen
        # Another node of the attacker's company signs these: a drawn sequence number near
        # 2**63 would otherwise push the other hostile envelopes out of the replay window,
        # changing their drop reason (though not their count).
        struct_signer = StructuredSigner(codec_for(pki.node(member, "store-4"), pki.ca).signer)
        # The attacker signing presence for another of its company's nodes' topic.
        presence_mismatch = [mallory.encode(kind="presence", body={
            "node": "store-9", "online": True, "since": time.time(), "session": "x"})
            for _ in range(4)]

        def reach(topic: str) -> str:
            return "reach" if any(topic_matches(f, topic) for f in filters) else "noreach"

        def bulk() -> Iterator[Hostile]:
            for tag, payload in mutator.payloads(n - len(cases) - n // 10 - n // 50):
                topic = scheme.insights(rng.choice(categories))
                yield Hostile(topic, payload, f"{tag}|{reach(topic)}")

        def structured() -> Iterator[Hostile]:
            for case in cases:
                topic = scheme.insights(rng.choice(categories))
                yield Hostile(topic, struct_signer.sign(case), f"structured|{reach(topic)}")

        def topics() -> Iterator[Hostile]:
            for _ in range(n // 10):
                topic = f"{scheme.member_root}/{fuzz_suffix(rng)}".rstrip("/") or "x"
                try:
                    parse_topic(topic)
                    family = "topic_valid"
                except TopicError:
                    family = "topic_bad"
                yield Hostile(topic, b"not an envelope", f"{family}|{reach(topic)}")
            for payload in presence_mismatch * 4:
                topic = scheme.presence("store-9")
                yield Hostile(topic, payload, f"presence_mismatch|{reach(topic)}")

        def forbidden() -> Iterator[Hostile]:
            for i in range(n // 50):
                yield Hostile(FORBIDDEN[i % len(FORBIDDEN)], rng.choice(own_valid),
                              "forbidden|noreach")

        before, dup_before = drops(rx), rx.status().duplicates
        attacker = Attacker(host="localhost", port=mosquitto.tls_port,
                            certs=pki.node(member)).connect()
        with probe(mosquitto, subscribe=SPY_FILTERS) as admin, RssSampler() as rss:
            loop = asyncio.get_running_loop()
            stream = interleave(rng, bulk(), structured(), topics(), forbidden())
            total = n
            progress = Progress(attacker, loop)
            attack = loop.run_in_executor(None, partial(attacker.publish_all, stream,
                                                        progress=progress))
            # Honest traffic interleaved with the flood, paced by the attacker's progress.
            flood_began = time.perf_counter()
            for i in range(n_legit):
                await progress.wait_for((i + 1) * total // (n_legit + 1))
                legit_sent.append(await honest.broadcast_market_insight(
                    market_insight(100 + i, categories[i % 3])))
            await asyncio.wait_for(attack, timeout=600)
            marker = f"marker-{uuid.uuid4().hex}"
            attacker.publish(scheme.insights("grocery/dairy"), marker_codec.encode(
                kind="insights", body={"items": [item_of(mallory_cfg, market_insight(0),
                                                         sealer, iid=marker)]}), "marker")
            await loop.run_in_executor(None, attacker.drain)
            # Everything the attacker sent before the marker has been handled once it arrives.
            await watch.until(lambda: marker in watch.markers, WAIT, "the attacker's marker")
            await honest.flush(timeout=WAIT)
            await watch.until(lambda: len(watch.legit) >= len(legit_sent), WAIT,
                              "every honest insight")
            flood_s = time.perf_counter() - flood_began
            # The admin listener's subscriber saw nothing of the refused publishes: a marker
            # on one of its filters, sent after them by the same broker, comes first.
            admin_marker = f"pear/v1/public/testnet/spy/{uuid.uuid4().hex}"
            with probe(mosquitto) as p:
                p.publish(admin_marker, b"m")
            _, leaked = admin.expect(admin_marker, timeout=WAIT)
        attacker.close()
        status = rx.status()
        after = drops(rx)

    out = attacker.outcome
    delta = after - before
    dup_delta = status.duplicates - dup_before
    reached = sum(v for k, v in out.accepted.items() if k.endswith("|reach"))
    by_family: Counter[str] = Counter()
    for tag, v in out.accepted.items():
        if tag.endswith("|reach"):
            by_family[tag.split("|")[0]] += v
    counted = sum(delta.values()) + dup_delta + watch.attacker_delivered
    hostile_sent = sum(out.accepted.values()) + sum(out.refused.values()) - 1  # minus marker
    print(f"\nnode fuzz: N={n} hostile sent={hostile_sent} reached={reached} "
          f"counted={counted} refused_by_broker={sum(out.refused.values())} drops={dict(delta)} "
          f"dup={dup_delta} attacker_delivered={watch.attacker_delivered} "
          f"legit={len(legit_sent)} rss {rss.baseline:.0f}->{rss.peak:.0f} MB "
          f"flood {flood_s:.1f} s hypothesis {gen_s:.1f} s")

    # the broker: everything outside the attacker's subtree refused, nothing leaked
    assert out.refused == Counter({"forbidden|noreach": n // 50}), out.refused
    # (the admin view also carries the honest node's own traffic: look for the attacker's)
    assert not [m.topic for m in leaked if m.payload in own_valid], leaked
    # the receiver: alive, connected all along, no internal errors
    assert status.connected and status.reconnects == 0 and status.health.value == "ok"
    assert set(delta) <= KNOWN_REASONS, delta
    # legitimate traffic: every insight exactly once
    assert set(watch.legit) == set(legit_sent) and max(watch.legit.values()) == 1
    # every hostile message that reached the receiver is counted exactly once
    assert counted == reached, (counted, reached, delta, by_family)
    # ...and each family under its reason
    assert delta["replayed"] >= by_family["replay"]
    assert delta["unknown_key"] >= by_family["presigned:wrong_kid"]
    assert delta["decryption_failed"] >= by_family["presigned:wrong_key"]
    assert delta["bad_signature"] >= sum(by_family[f"presigned:{t}"] for t in (
        "foreign_ca", "expired", "revoked", "not_yet_valid", "impersonation"))
    assert delta["oversized"] == by_family["oversized"] > 0
    assert delta["identity_mismatch"] >= by_family["presence_mismatch"] > 0
    assert delta["bad_topic"] >= by_family["topic_bad"] > 0
    assert rss.growth < rss_bound_mb(attacker.bytes_sent), f"RSS grew {rss.growth:.0f} MB"
    record("node: fuzzed payloads and topics from a member's valid certificate",
           group="hostile", sent=len(legit_sent), delivered=len(watch.legit), lost=len(
               set(legit_sent) - set(watch.legit)), duplicated=0, refused=counted + sum(
               out.refused.values()), peak_rss_mb=round(rss.peak, 1),
           notes=f"N={n}: {reached:,} reached the node, each counted once; "
                 f"{sum(out.refused.values()):,} refused by the broker ACL; "
                 f"RSS +{rss.growth:.0f} MB",
           extra={"n": n, "reached": reached, "drops": dict(delta), "duplicates": dup_delta,
                  "attacker_items_delivered": watch.attacker_delivered,
                  "broker_refused": sum(out.refused.values()),
                  "families": dict(by_family), "flood_s": round(flood_s, 2),
                  "total_s": round(time.perf_counter() - began, 2)})


def own_valid_item(own_valid: list[bytes], codec: EnvelopeCodec) -> dict[str, Any]:
    """One real item of the attacker's, decrypted, as the template hypothesis mutates."""
    body = codec.decode(own_valid[0], check_replay=False).message.body
    item: dict[str, Any] = body["items"][0]
    return item


async def test_company_cannot_write_under_another_identity(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker,
        pki: NetworkPKI, aggregator: tuple[Path, SealOpener]) -> None:
    member = "mallory"
    scheme = TopicScheme(mode="consortium", network=pki.network, member=member)
    mallory = codec_for(pki.node(member), pki.ca, keys={"k1": GROUP_KEY}, active="k1")
    sealer = Sealer(load_x25519_public_key(aggregator[0]))
    mallory_cfg = make_config(member)
    async with PearNetwork(make_config("globex")) as rx, \
            PearNetwork(make_config("acme")) as honest:
        watch = Watch(member)
        rx.on_insight(watch)
        before = drops(rx)
        with probe(mosquitto, subscribe=["#"]) as admin, \
                probe(mosquitto, pki.node(member)) as evil:
            refused = 0
            # 1. A's certificate, B's subtree: the broker says no.
            acme = TopicScheme(mode="consortium", network=pki.network, member="acme")
            envelope = mallory.encode(kind="insights", body={"items": [
                item_of(mallory_cfg, market_insight(1), sealer)]})
            for topic in (acme.insights("grocery/dairy"), acme.state("store-1", "grocery/dairy"),
                          acme.presence("store-1"), acme.sync_marker("store-1"),
                          "pear/v1/private/acme/insights/grocery/dairy",
                          "pear/v1/public/testnet/contrib/acme/grocery/dairy"):
                rc = evil.publish(topic, envelope)
                assert rc is not None and rc.value == 135, (topic, rc)  # not authorized
                refused += 1
            # 2. A signs an envelope claiming B's node, in A's own subtree.
            claims = [
                (scheme.insights("grocery/dairy"), sign_raw(mallory.signer, envelope_members(
                    sender="acme/store-1", seq=int(time.time() * 1e6), ts=time.time(),
                    body={"items": [item_of(mallory_cfg, market_insight(2), sealer)]})),
                 "bad_signature"),
                (scheme.presence("store-9"), mallory.encode(kind="presence", body={
                    "node": "store-9", "online": True, "since": time.time(), "session": "s"}),
                 "identity_mismatch"),
            ]
            for topic, payload, _ in claims:
                rc = evil.publish(topic, payload)
                assert rc is not None and not rc.is_failure
            iid = await honest.broadcast_market_insight(market_insight(3))
            await watch.until(lambda: iid in watch.legit, WAIT, "the honest insight")
            await watch.until(lambda: sum((drops(rx) - before).values()) >= len(claims), WAIT,
                              "the refusals to be counted")
            marker = f"pear/v1/spy/{uuid.uuid4().hex}"
            with probe(mosquitto) as p:
                p.publish(marker, b"m")
            _, seen = admin.expect(marker, timeout=WAIT)
        delta = drops(rx) - before
    leaked = [m.topic for m in seen if m.payload == envelope]
    assert leaked == [], leaked
    assert delta == Counter(reason for _, _, reason in claims), delta
    assert watch.attacker_delivered == 0 and set(watch.legit) == {iid}
    assert not any(p.member == "acme" and p.node == "store-9" for p in rx.peers())
    record("node: a member writing under another member's identity", group="hostile", sent=1,
           delivered=1, lost=0, refused=refused + sum(delta.values()),
           notes="broker refused 6 publishes into other subtrees (none seen on #); "
                 "forged sender and foreign node counted as bad_signature / "
                 "identity_mismatch")


async def test_silently_ignored_messages_are_counted(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker,
        pki: NetworkPKI) -> None:
    member = "mallory"
    scheme = TopicScheme(mode="consortium", network=pki.network, member=member)
    async with PearNetwork(make_config("globex")) as rx, \
            PearNetwork(make_config("acme")) as honest:
        watch = Watch(member)
        rx.on_insight(watch)
        own = rx.identity
        with probe(mosquitto, pki.node(member),
                   subscribe=[f"pear/v1/consortium/testnet/{own.member}/nodes/+"]) as evil:
            # the receiver's own retained presence, as any member can read it
            presence, _ = evil.expect(lambda m: m.retain, timeout=WAIT)
            before = drops(rx)
            evil.publish(scheme.insights("grocery/dairy"), b"")  # not retained: not a clear
            evil.publish(scheme.insights("grocery/dairy"), presence.payload)
            iid = await honest.broadcast_market_insight(market_insight(1))
            await watch.until(lambda: iid in watch.legit, WAIT, "the honest insight")
            # both come before a marker the attacker sends after them
            marker_codec = codec_for(pki.node(member, "store-2"), pki.ca,
                                     keys={"k1": GROUP_KEY}, active="k1")
            evil.publish(scheme.insights("grocery/dairy"), marker_codec.encode(
                kind="insights", body={"items": [{"iid": "marker-x", "insight": json.loads(
                    json.dumps(PrivacyFilter(config=make_config(member)).apply(
                        market_insight(2)).shared.model_dump(mode="json",
                                                             exclude_none=True)))}]}))
            await watch.until(lambda: "marker-x" in watch.markers, WAIT, "the marker")
        delta = drops(rx) - before
    record("node: empty payload and the receiver's own envelope replayed", group="hostile",
           sent=1, delivered=len(watch.legit), lost=1 - len(watch.legit),
           refused=sum(delta.values()), notes=f"{sum(delta.values())} of 2 counted")
    assert sum(delta.values()) == 2, delta
    assert delta["malformed"] == 1 and delta["identity_mismatch"] == 1, delta


async def test_items_whose_category_their_message_misstates_are_refused(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker,
        pki: NetworkPKI, aggregator: tuple[Path, SealOpener]) -> None:
    """A member's validly signed envelopes that misstate an item's category, on its own
    category topic or on its topic of several categories, or that do not name each item's
    category there: the items described truly arrive, each false one is counted."""
    member = "mallory"
    scheme = TopicScheme(mode="consortium", network=pki.network, member=member)
    mallory = codec_for(pki.node(member), pki.ca, keys={"k1": GROUP_KEY}, active="k1")
    sealer = Sealer(load_x25519_public_key(aggregator[0]))
    cfg = make_config(member)

    def item(i: int, category: str) -> dict[str, Any]:
        return item_of(cfg, market_insight(i, category), sealer, iid=f"item-{i}")

    async with PearNetwork(make_config("globex")) as rx:
        watch = Watch("nobody")
        rx.on_insight(watch)
        topics: dict[str, str] = {}
        rx.on_insight(lambda r: topics.__setitem__(r.item_id, r.topic))
        before = drops(rx)
        sent = [
            # the second item is bakery, said to be dairy
            (scheme.mixed_insights(), {"items": [item(1, "grocery/dairy"),
                                                 item(2, "grocery/bakery")],
                                       "categories": [["grocery/dairy", 2]]}),
            # bakery on the dairy topic
            (scheme.insights("grocery/dairy"), {"items": [item(3, "grocery/bakery")]}),
            # categories that do not add up, or none at all: the whole message is refused
            (scheme.mixed_insights(), {"items": [item(4, "grocery/dairy")],
                                       "categories": [["grocery/dairy", 2]]}),
            (scheme.mixed_insights(), {"items": [item(5, "grocery/dairy")]}),
            # told truly, in two runs
            (scheme.mixed_insights(), {"items": [item(6, "grocery/dairy"),
                                                 item(7, "grocery/bakery/bread")],
                                       "categories": [["grocery/dairy", 1],
                                                      ["grocery/bakery/bread", 1]]}),
        ]
        with probe(mosquitto, pki.node(member)) as evil:
            for topic, body in sent:
                rc = evil.publish(topic, mallory.encode(kind="insights", body=body))
                assert rc is not None and not rc.is_failure
            await watch.until(lambda: {"item-6", "item-7"} <= set(watch.legit), WAIT,
                              "the truly described items")
        delta = drops(rx) - before
    assert set(watch.legit) == {"item-1", "item-6", "item-7"}, watch.legit
    # Each is delivered as if on its own category's topic.
    assert topics == {"item-1": scheme.insights("grocery/dairy"),
                      "item-6": scheme.insights("grocery/dairy"),
                      "item-7": scheme.insights("grocery/bakery/bread")}, topics
    assert delta == Counter({"mismatch": 2, "malformed": 2}), delta
    record("node: items whose message misstates their category", group="hostile", sent=7,
           delivered=len(watch.legit), lost=0, refused=sum(delta.values()),
           notes="an item of another category than its topic's or its run's: mismatch; a "
                 "several-category body not naming each item's: malformed")


async def test_memory_stays_bounded_under_a_flood_of_large_messages(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker,
        pki: NetworkPKI) -> None:
    """Large payloads the receiver must read before refusing: ~1 MiB each, signed by the
    attacker's valid key over a body that is not an insight batch (so each costs a signature
    check over the whole megabyte). Memory must not grow with how many are queued."""
    member = "mallory"
    scheme = TopicScheme(mode="consortium", network=pki.network, member=member)
    signer = codec_for(pki.node(member, "store-5"), pki.ca).signer
    big = 200
    blob = "x" * (1024 * 1024 - 4096)
    seq0 = int(time.time() * 1e6)
    payloads = [sign_raw(signer, envelope_members(kind="state", sender=signer.sender,
                                                  seq=seq0 + i, ts=time.time(), body=blob))
                for i in range(8)]
    async with PearNetwork(make_config("globex")) as rx:
        watch = Watch(member)
        rx.on_insight(watch)
        before = drops(rx)
        # A small window: the attacker's own unacknowledged megabytes live in this process too.
        attacker = Attacker(host="localhost", port=mosquitto.tls_port, certs=pki.node(member),
                            window=4).connect()
        loop = asyncio.get_running_loop()
        # Python-level allocations, where received payloads live: unlike RSS, their peak does
        # not depend on how much heap earlier tests left behind for reuse.
        gc.collect()  # garbage an earlier test left must not count against this one
        tracemalloc.start()
        with RssSampler() as rss:
            await loop.run_in_executor(None, attacker.publish_all, (
                Hostile(scheme.insights("grocery/dairy"), payloads[i % len(payloads)],
                        "large|reach") for i in range(big)))
            marker_codec = codec_for(pki.node(member, "store-2"), pki.ca,
                                     keys={"k1": GROUP_KEY}, active="k1")
            attacker.publish(scheme.insights("grocery/dairy"), marker_codec.encode(
                kind="insights", body={"items": [{"iid": "marker-big", "insight": {}}]}),
                "marker")
            await loop.run_in_executor(None, attacker.drain)
            await watch.until(lambda: sum((drops(rx) - before).values()) >= big + 1, 120,
                              "every large message to be counted")
        held_mb = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
        attacker.close()
        delta = drops(rx) - before
        status = rx.status()
    record("node: flood of 1 MiB signed payloads", group="hostile", sent=0, delivered=0,
           lost=0, refused=sum(delta.values()), peak_rss_mb=round(rss.peak, 1),
           notes=f"{big} payloads of 1 MiB; up to {held_mb:.0f} MB held at once")
    print(f"\nlarge flood: {dict(delta)} rss {rss.baseline:.0f}->{rss.peak:.0f} MB, "
          f"peak held {held_mb:.0f} MB")
    assert status.connected and status.reconnects == 0
    # 8 envelopes sent 25 times each: 8 unexpected_kind (state on an insights topic), the
    # rest replayed; the marker's empty insight is malformed
    assert sum(delta.values()) == big + 1, delta
    assert held_mb < 100, f"{held_mb:.0f} MB held at once for {big} MiB received"
