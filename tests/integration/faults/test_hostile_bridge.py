"""Hostile input at the public bridge, through real consortium and public mosquitto brokers.

What is proven (``PEAR_FUZZ_N`` hostile payloads, default 10,000): while six honest companies
send their insights, an attacker holding a valid consortium member certificate floods its own
subtree with the same seeded mutations and hypothesis-drawn structures as the node test, plus
the attacks only the bridge can be the target of — an exact value where the policy says
aggregated, a sealed token copied from an honest company, a sealed contribution that does not
match its insight, a sealed blob that does not open, windows in the future or spanning two
windows. The bridge never crashes, hangs or loses its connections; every hostile message that
reached it is counted exactly once (drops by reason + ignored + duplicates), none is counted
into a window, every honest item is; and the aggregate it publishes equals the reference
computation over the honest inputs alone (so nothing hostile reached the public broker).
Memory grows by at most one copy of what was sent (no leak; the tight byte bound is the
node's large-message test, expected to fail until the transport bounds its inbox by bytes).
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from bridgekit import (
    POLICY,
    Clock,
    Input,
    Net,
    assert_same,
    cells_of,
    close_window,
    insight,
    publish,
    published,
    reference,
    wait,
    yesterday,
)
from brokers import GROUP_KEY, NetworkPKI, probe
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

from pear_mqtt.bridge.service import Bridge
from pear_mqtt.bridge.status import BridgeStatus
from pear_mqtt.config.models import NetworkConfig
from pear_mqtt.errors import TopicError
from pear_mqtt.model.acl import topic_matches
from pear_mqtt.model.insight import MarketInsight, SharingLevel
from pear_mqtt.model.mixed import item_categories
from pear_mqtt.model.topics import TopicScheme, parse_topic
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.privacy.filter import PrivacyFilter
from pear_mqtt.security.seal import load_x25519_public_key, seal

OTHER_KEY = "A" * 43 + "="
SEED = 20261108
WAIT = 120.0
CATEGORIES = ("fz/alpha", "fz/beta")


def item_of(config: NetworkConfig, it: MarketInsight, pub_file: Path, *,
            sealed_for: MarketInsight | None = None) -> dict[str, Any]:
    """An item as a node of ``config`` sends it; ``sealed_for`` seals another insight's
    contribution instead (a mismatch)."""
    f = PrivacyFilter(config=config)
    result = f.apply(it)
    item: dict[str, Any] = {"iid": uuid.uuid4().hex}
    if result.shared is not None:  # nothing is published under POLICY: a sealed part alone
        item["insight"] = result.shared.model_dump(mode="json", exclude_none=True)
    contribution = f.apply(sealed_for).contribution if sealed_for else result.contribution
    if contribution is not None:
        item["sealed"] = seal(load_x25519_public_key(pub_file),
                              contribution.model_dump_json().encode())
    return item


def units(s: BridgeStatus) -> int:
    """Every outcome of a message or item the bridge reports, but the counted ones."""
    return sum(s.dropped.values()) + s.ignored + s.duplicates + s.replaced


# The fuzzed certificates (a negative serial, a country name of the wrong length) are
# refused as they should be; cryptography also warns that it will stop parsing them.
@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
async def test_bulk_fuzz_at_the_bridge(net: Net, pki: NetworkPKI) -> None:
    n = FUZZ_N
    began = time.perf_counter()
    rng = random.Random(SEED)
    start = yesterday()
    inputs = [Input(company=f"c{c}", store="store-1", insight=insight(
        CATEGORIES[i % 2], start=start + timedelta(hours=i % 23), price=1.0 + c + i / 100,
        units=100.0 + 3 * c + i, revenue=50.0 + c + i)) for c in range(6) for i in range(20)]
    warm, rest = [i for i in inputs if i.company == "c0"], [i for i in inputs
                                                             if i.company != "c0"]
    member = net.member("mallory")
    scheme = TopicScheme(mode="consortium", network=pki.network, member=member)
    filters = (scheme.live_filter(), scheme.presence_filter())
    m_cfg = net.node_config(member)
    mallory = codec_for(pki.node(member), pki.ca, keys={"k1": GROUP_KEY}, active="k1")
    reader = codec_for(pki.node(member, "store-3"), pki.ca, keys={"k1": GROUP_KEY})
    clock = Clock()

    async with Bridge(net.bridge_config(), clock=clock) as bridge:
        await wait(bridge, lambda s: s.connected)  # subscribed to every source
        # Captured traffic: the attacker is a member and reads the honest envelopes.
        with probe(net.consortium, pki.node(member, "store-3"),
                   subscribe=[f"pear/v1/consortium/{pki.network}/+/insights/#"]) as spy:
            await publish(net, warm)
            await wait(bridge, lambda s: s.items_counted >= len(warm))
            seen = [spy.expect(lambda m: True, timeout=WAIT)[0]]
            while not spy.messages.empty():
                seen.append(spy.messages.get_nowait())
        captured = [m.payload for m in seen]
        # (category, item): under POLICY an item is its sealed part alone, and its topic is
        # all that says which category it belongs to
        # (a $mixed envelope names its items' categories in its body)
        honest_items: list[tuple[str, dict[str, Any]]] = []
        for m in seen:
            body = reader.decode(m.payload, check_replay=False).message.body
            named = parse_topic(m.topic).category
            cats = ([named] * len(body["items"]) if named is not None
                    else item_categories(body, len(body["items"])))
            assert cats is not None
            honest_items.extend(zip(cats, body["items"], strict=True))

        def signed(item: dict[str, Any]) -> bytes:
            return mallory.encode(kind="insights", body={"items": [item]})

        def at(hours: int, category: str = CATEGORIES[0]) -> MarketInsight:
            return insight(category, start=start + timedelta(hours=hours), price=9.99,
                           units=999.0, revenue=99.0)

        loud = net.node_config(member, levels={**POLICY, "price_data": SharingLevel.FULL})
        copied = []
        copied_category: dict[bytes, str] = {}
        for category, h in honest_items:  # an honest sealed token under the attacker's item
            payload = signed({"iid": uuid.uuid4().hex, "sealed": h["sealed"]})
            copied.append(payload)
            copied_category[payload] = category
        bridge_attacks: dict[str, list[bytes]] = {
            "policy_violation": [signed(item_of(loud, at(i), net.pub_file)) for i in range(10)],
            "copied_token": copied,
            "mismatch": [signed(item_of(m_cfg, at(i), net.pub_file, sealed_for=at(i, "fz/x")))
                         for i in range(10)],
            "seal_failed": [signed({**item_of(m_cfg, at(i), net.pub_file),
                                    "sealed": base64.urlsafe_b64encode(rng.randbytes(90))
                                    .decode().rstrip("=")}) for i in range(10)],
            "future": [signed(item_of(m_cfg, insight(CATEGORIES[0], start=start + timedelta(
                days=30), units=5.0), net.pub_file)) for _ in range(10)],
            "spans_windows": [signed(item_of(m_cfg, insight(CATEGORIES[0], start=start + timedelta(
                hours=23, minutes=30), units=5.0), net.pub_file)) for _ in range(10)],
        }
        # valid-looking items of the attacker's own: mutated, never sent as they are
        own_valid = [signed(item_of(m_cfg, at(i, CATEGORIES[i % 2]), net.pub_file))
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
            "impersonation": [sign_raw(mallory.signer, envelope_members(
                sender=f"{net.member('c1')}/store-1", seq=int(time.time() * 1e6) + i,
                ts=time.time(), body={"items": [item_of(m_cfg, at(i), net.pub_file)]}))
                for i in range(8)],
        }
        mutator = Mutator(SEED, bases=[*captured, *own_valid, *copied],
                          replays=captured, presigned=presigned,
                          oversized_every=max(1000, n // 25))
        # The hypothesis template carries a sealed token for another region: "keep" can then
        # never make a countable item of the attacker's. (Under POLICY nothing is published:
        # the template's published part is one of the consortium defaults, which POLICY
        # refuses.)
        template = item_of(net.node_config(member, levels={}), at(1), net.pub_file,
                           sealed_for=insight(CATEGORIES[0], start=start, units=1.0,
                                              region="south"))
        cases = structured_cases(max(50, n // 20), template)
        struct_signer = StructuredSigner(codec_for(pki.node(member, "store-4"), pki.ca).signer)
        presence_mismatch = mallory.encode(kind="presence", body={
            "node": "store-9", "online": True, "since": time.time(), "session": "x",
            "levels": {}})

        def reach(topic: str) -> str:
            return "reach" if any(topic_matches(f, topic) for f in filters) else "noreach"

        n_attacks = sum(len(v) for v in bridge_attacks.values())

        def bulk() -> Iterator[Hostile]:
            for tag, payload in mutator.payloads(n - len(cases) - n // 10 - n_attacks):
                topic = scheme.insights(rng.choice(CATEGORIES))
                yield Hostile(topic, payload, f"{tag}|{reach(topic)}")

        def structured() -> Iterator[Hostile]:
            for case in cases:
                topic = scheme.insights(rng.choice(CATEGORIES))
                yield Hostile(topic, struct_signer.sign(case), f"structured|{reach(topic)}")

        def targeted() -> Iterator[Hostile]:
            for reason, payloads in bridge_attacks.items():
                for payload in payloads:
                    # each sealed token and item id belongs to the category it names
                    yield Hostile(scheme.insights(CATEGORIES[0]) if reason != "copied_token"
                                  else scheme.insights(copied_category[payload]), payload,
                                  f"{reason}|reach")

        def topics() -> Iterator[Hostile]:
            for i in range(n // 10):
                if i % 50 == 0:
                    topic = scheme.presence("store-9")
                    yield Hostile(topic, presence_mismatch, f"presence_mismatch|{reach(topic)}")
                    continue
                if i % 50 == 1:  # outside the attacker's subtree: the broker refuses
                    yield Hostile(f"pear/v1/consortium/{pki.network}/{net.member('c2')}"
                                  f"/insights/{CATEGORIES[0]}", own_valid[0],
                                  "forbidden|noreach")
                    continue
                topic = f"{scheme.member_root}/{fuzz_suffix(rng)}".rstrip("/")
                try:
                    parse_topic(topic)
                    family = "topic_valid"
                except TopicError:
                    family = "topic_bad"
                yield Hostile(topic, b"not an envelope", f"{family}|{reach(topic)}")

        # The honest nodes connect before the flood (a node joining later is the subject of
        # other tests) and send during it, paced by the attacker's progress.
        by_node: dict[tuple[str, str], list[MarketInsight]] = {}
        for i in rest:
            by_node.setdefault((i.company, i.store), []).append(i.insight)
        nodes = {key: PearNetwork(net.node_config(net.member(key[0]), node=key[1]))
                 for key in by_node}
        await asyncio.gather(*(node.connect() for node in nodes.values()))
        before = bridge.status()
        attacker = Attacker(host="localhost", port=net.consortium.tls_port,
                            certs=pki.node(member)).connect()
        loop = asyncio.get_running_loop()
        try:
            with RssSampler() as rss:
                progress = Progress(attacker, loop)
                attack = loop.run_in_executor(None, partial(
                    attacker.publish_all, interleave(rng, bulk(), structured(), targeted(),
                                                     topics()), progress=progress))
                flood_began = time.perf_counter()
                queue = [(key, it) for key, its in by_node.items() for it in its]
                rng.shuffle(queue)
                for i, (key, it) in enumerate(queue):
                    await progress.wait_for((i + 1) * n // (len(queue) + 1))
                    await nodes[key].broadcast_market_insight(it)
                await asyncio.wait_for(attack, timeout=900)
                await asyncio.gather(*(node.flush(timeout=WAIT) for node in nodes.values()))
                flood_s = time.perf_counter() - flood_began
                out = attacker.outcome
                reached = sum(v for k, v in out.accepted.items() if k.endswith("|reach"))
                # Bounded polling of the bridge's own counters, with a deadline.
                status = await wait(bridge, lambda s: units(s) - units(before)
                                    + s.items_counted - before.items_counted
                                    >= reached + len(rest), timeout=WAIT)
        finally:
            await asyncio.gather(*(node.disconnect() for node in nodes.values()))
        attacker.close()
        assert status.health.value == "ok" and status.error is None, status
        final = await close_window(bridge, clock)
    messages = net.marker()

    by_family: Counter[str] = Counter()
    for tag, v in out.accepted.items():
        if tag.endswith("|reach"):
            by_family[tag.split("|")[0]] += v
    dropped = Counter(status.dropped) - Counter(before.dropped)
    counted_hostile = units(status) - units(before)
    print(f"\nbridge fuzz: N={n} reached={reached} counted={counted_hostile} "
          f"refused_by_broker={sum(out.refused.values())} drops={dict(dropped)} "
          f"ignored={status.ignored - before.ignored} "
          f"dup={status.duplicates - before.duplicates} items_counted={status.items_counted} "
          f"rss {rss.baseline:.0f}->{rss.peak:.0f} MB flood {flood_s:.1f} s")

    # honest items: all counted, nothing else
    assert status.items_counted == final.items_counted == len(inputs)
    # every hostile message that reached the bridge counted once, under a reason
    assert counted_hostile == reached, (counted_hostile, reached, dropped, by_family)
    assert "internal_error" not in dropped, dropped
    for reason in ("policy_violation", "copied_token", "mismatch", "seal_failed", "future",
                   "spans_windows"):
        assert dropped[reason] >= by_family[reason] > 0, (reason, dropped)
    assert dropped["replayed"] >= by_family["replay"]
    assert dropped["unknown_key"] >= by_family["presigned:wrong_kid"]
    assert dropped["oversized"] == by_family["oversized"] > 0
    assert dropped["identity_mismatch"] >= by_family["presence_mismatch"] > 0
    assert dropped["bad_topic"] + dropped["unexpected_topic"] >= by_family["topic_bad"] > 0
    assert out.refused == Counter({"forbidden|noreach": out.refused["forbidden|noreach"]})
    assert out.refused["forbidden|noreach"] > 0
    # the public output is exactly the reference over the honest inputs
    want = reference(net, inputs)
    got = published(messages, pki.network)
    assert set(got) == {cat for cat, _ in want} == set(CATEGORIES)
    for category, msg in got.items():
        cells = cells_of(msg.payload)
        assert set(cells) == {key for key in want if key[0] == category}
        for key, groups in cells.items():
            assert_same(groups, want[key])
    assert member.encode() not in b"".join(m.payload for m in messages)
    assert rss.growth < rss_bound_mb(attacker.bytes_sent), f"RSS grew {rss.growth:.0f} MB"
    record("bridge: fuzzed contributions from a member's valid certificate", group="hostile",
           sent=len(inputs), delivered=status.items_counted,
           lost=len(inputs) - status.items_counted, refused=counted_hostile + sum(
               out.refused.values()), peak_rss_mb=round(rss.peak, 1),
           notes=f"N={n}: {reached:,} reached the bridge, each counted once, none "
                 f"aggregated; published aggregates equal the honest-only reference; "
                 f"RSS +{rss.growth:.0f} MB",
           extra={"n": n, "reached": reached, "drops": dict(dropped),
                  "families": dict(by_family), "flood_s": round(flood_s, 2),
                  "total_s": round(time.perf_counter() - began, 2)})


async def test_empty_contribution_is_counted(net: Net, pki: NetworkPKI) -> None:
    member = net.member("mallory")
    scheme = TopicScheme(mode="consortium", network=pki.network, member=member)
    async with Bridge(net.bridge_config(), clock=Clock()) as bridge:
        before = await wait(bridge, lambda s: s.connected)
        with probe(net.consortium, pki.node(member)) as evil:
            evil.publish(scheme.insights(CATEGORIES[0]), b"")  # not retained: no clear
            # a marker with a reason of its own: the empty payload was handled before it
            evil.publish(scheme.insights(CATEGORIES[0]), b'{"v":3}')
        after = await wait(bridge, lambda s: s.dropped.get("unsupported_version", 0) >= 1)
    record("bridge: empty contribution", group="hostile", sent=0, delivered=0, lost=0,
           refused=units(after) - units(before),
           notes="2 empty payloads (non-retained), both counted as malformed")
    assert units(after) - units(before) == 2
