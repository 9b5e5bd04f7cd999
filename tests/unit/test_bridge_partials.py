"""Bridge scale-out without brokers: the sender partition, the sealed partials (parts,
verification) and the merge of partial cells, which must aggregate exactly as one store."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from pear_mqtt.bridge.aggregation import aggregate_window
from pear_mqtt.bridge.closing import due_windows
from pear_mqtt.bridge.config import BridgeConfig, DPConfig, PublicConfig, SourceConfig
from pear_mqtt.bridge.histogram import BUCKETS
from pear_mqtt.bridge.links import InputLink
from pear_mqtt.bridge.partials import (
    PartialExchange,
    decode_partial,
    encode_partials,
    owner_of,
    partition_key,
)
from pear_mqtt.bridge.service import Bridge
from pear_mqtt.bridge.state import BridgeStore, NewContribution
from pear_mqtt.bridge.status import BridgeCounters
from pear_mqtt.cli import main
from pear_mqtt.config.models import TLSConfig
from pear_mqtt.errors import ConfigError, EnvelopeError
from pear_mqtt.model.acl import acl_rules, topic_matches
from pear_mqtt.model.topics import TopicScheme
from pear_mqtt.security import pki as pkimod
from pear_mqtt.security.envelope import EnvelopeCodec
from pear_mqtt.security.seal import (
    Sealer,
    SealOpener,
    generate_x25519_key,
    save_x25519_private_key,
)
from pear_mqtt.security.signing import Signer
from pear_mqtt.security.trust import TrustStore
from pear_mqtt.transport import InboundMessage

pytestmark = pytest.mark.unit

DAY = 86400
W0 = 20_000 * DAY
INSTANCES = 3


def _item(rng: random.Random, n: int) -> NewContribution:
    company = f"co{rng.randrange(12)}"
    source = f"consortium/grp/{company}"
    values: dict[str, dict[str, float]] = {
        "sales_data": {"units": rng.uniform(1, 500), "revenue": rng.uniform(1, 9000) / 7},
        "trends": {"price_change_pct": rng.uniform(-5, 5)}}
    if rng.random() < 0.5:
        lo = float(rng.randrange(1, 5))
        values[BUCKETS] = {"at": float(W0 + rng.randrange(24) * 3600), "price.lo": lo,
                           "price.hi": lo * 1.25, "price.set": 1.0}
    category = rng.choice(["dairy", "bev/soda"])
    # An item id names what the item describes, its category among them (as a node's do).
    return NewContribution(
        source_key=source, item_id=f"{category}:i{rng.randrange(40)}", window_start=W0,
        category=category, region=rng.choice(["north", "south"]),
        domain="grp", company=company, currency="EUR", values=values,
        digest=hashlib.sha256(f"{n}".encode()).digest(),
        token_digest=hashlib.sha256(f"t{n}".encode()).digest())


@pytest.fixture
def codec_and_opener(tmp_path: Path) -> tuple[EnvelopeCodec, SealOpener]:
    pkimod.create_ca(directory=tmp_path / "ca", network="grp")
    bridge = pkimod.issue(ca_dir=tmp_path / "ca", out_dir=tmp_path / "out", role="bridge",
                          member="bridge")
    key = tmp_path / "agg.key"
    save_x25519_private_key(generate_x25519_key(), key)
    codec = EnvelopeCodec(signer=Signer.from_files(key_file=bridge.key, cert_file=bridge.cert),
                          trust=TrustStore.from_files(ca_files=[tmp_path / "ca" / pkimod.CA_CERT],
                                                      network="grp"))
    return codec, SealOpener.from_file(key)


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[list[BridgeStore]]:
    opened = [BridgeStore(tmp_path / f"s{i}.sqlite") for i in range(INSTANCES + 2)]
    yield opened
    for s in opened:
        s.close()


def test_owner_is_a_stable_hash_that_spreads_senders() -> None:
    sources = [f"consortium/grp/co{n}" for n in range(300)]
    owners = [owner_of(s, INSTANCES) for s in sources]
    assert owners == [owner_of(s, INSTANCES) for s in sources]
    assert owner_of("consortium/grp/co0", 2) == int.from_bytes(
        hashlib.sha256(b"consortium/grp/co0").digest()[:8], "big") % 2
    assert {owners.count(i) for i in range(INSTANCES)} <= set(range(70, 130))
    assert owner_of("anything", 1) == 0


@pytest.mark.parametrize("seed", range(5))
def test_merged_partials_aggregate_exactly_as_one_store(
        seed: int, stores: list[BridgeStore],
        codec_and_opener: tuple[EnvelopeCodec, SealOpener]) -> None:
    codec, opener = codec_and_opener
    rng = random.Random(seed)
    single, merged, *workers = stores
    scheme = TopicScheme(mode="consortium", network="grp", member="bridge")
    sealer = Sealer(opener.public_key)
    # Batches in arrival order, with re-sent items (same sender and id, new values) and
    # duplicates: each worker sees its senders' batches in the same order one bridge does.
    for batch_no in range(12):
        batch = [_item(rng, batch_no * 100 + n) for n in range(15)]
        single.add(batch, now=float(batch_no))
        for i, worker in enumerate(workers):
            mine = [it for it in batch if owner_of(partition_key(
                kind="consortium", network="grp", sender=it.company, category=it.category),
                INSTANCES) == i]
            worker.add(mine, now=float(batch_no))
    parts = 0
    for i, worker in enumerate(workers):
        # A small part size: several parts per partial, merged in any order.
        messages = encode_partials(codec=codec, sealer=sealer, scheme=scheme, bridge_id="b",
                                   window_start=W0, instance=i, instances=INSTANCES,
                                   policy_version="p1", rows=worker.contributions(W0),
                                   limit=2048)
        rng.shuffle(messages)
        for topic, payload, retain in messages:
            assert retain
            partial = decode_partial(topic, payload, codec=codec, opener=opener,
                                     instances=INSTANCES, policy_version="p1")
            assert partial.instance == i and partial.parts == len(messages)
            merged.add(partial.items, now=1.0)
            merged.record_partial(W0, instance=i, part=partial.part, parts=partial.parts)
            parts += 1
    assert parts > INSTANCES
    assert merged.partial_progress(INSTANCES) == {W0: []}
    assert merged.contributions(W0) == single.contributions(W0)
    want = aggregate_window(W0, single.contributions(W0), window_seconds=DAY, min_companies=3,
                            dominance_cap=0.6, dp=DPConfig())
    got = aggregate_window(W0, merged.contributions(W0), window_seconds=DAY, min_companies=3,
                           dominance_cap=0.6, dp=DPConfig())
    assert got == want
    assert any(c.published for c in want.cells) and any(c.histograms for c in want.cells)


def test_a_partial_is_refused_unless_it_matches_its_topic_policy_and_instances(
        codec_and_opener: tuple[EnvelopeCodec, SealOpener], stores: list[BridgeStore]) -> None:
    codec, opener = codec_and_opener
    scheme = TopicScheme(mode="consortium", network="grp", member="bridge")
    store = stores[0]
    store.add([_item(random.Random(1), 1)], now=0.0)
    ((topic, payload, _),) = encode_partials(
        codec=codec, sealer=Sealer(opener.public_key), scheme=scheme, bridge_id="b",
        window_start=W0, instance=1, instances=2, policy_version="p1",
        rows=store.contributions(W0))
    ok = decode_partial(topic, payload, codec=codec, opener=opener, instances=2,
                        policy_version="p1")
    assert len(ok.items) == 1 and ok.items[0].window_start == W0
    moved = scheme.bridge_partial("b", W0, 0, 0)  # another instance's place
    for args in ((moved, 2, "p1"), (topic, 3, "p1"), (topic, 2, "p2")):
        with pytest.raises(EnvelopeError):
            decode_partial(args[0], payload, codec=codec, opener=opener, instances=args[1],
                           policy_version=args[2])
    with pytest.raises(EnvelopeError):
        decode_partial(topic, payload, codec=codec, opener=SealOpener(generate_x25519_key()),
                       instances=2, policy_version="p1")


def test_partial_progress_names_the_instances_still_missing(
        stores: list[BridgeStore]) -> None:
    store = stores[0]
    store.record_partial(W0, instance=0, part=0, parts=2)
    store.record_partial(W0, instance=2, part=0, parts=1)
    assert store.partial_progress(3) == {W0: [0, 1]}
    store.record_partial(W0, instance=0, part=1, parts=2)
    store.record_partial(W0, instance=1, part=0, parts=1)
    assert store.partial_progress(3) == {W0: []}


def test_a_worker_close_fixes_the_window_and_queues_its_partial(
        stores: list[BridgeStore]) -> None:
    store = stores[0]
    store.add([_item(random.Random(2), 2)], now=0.0)
    store.close_partial(W0, now=5.0, outgoing=[("t/a", b"p", True)])
    store.close_partial(W0 + DAY, now=5.0, outgoing=[("t/b", b"q", True)])  # held nothing
    assert store.window_state(W0) == "published" == store.window_state(W0 + DAY)
    assert store.contributions(W0) == [] and store.counts()["open_items"] == 0
    assert [(r.topic, r.payload) for r in store.consortium_pending()] == [
        ("t/a", b"p"), ("t/b", b"q")]


def _config(tmp_path: Path, **kw: object) -> BridgeConfig:
    tls = TLSConfig()
    return BridgeConfig(
        consortium=SourceConfig(network_id="grp", broker_url="mqtts://c:8883", tls=tls,
                                aggregator_key_file=tmp_path / "agg.key"),
        public=PublicConfig(network_id="mkt", broker_url="mqtts://p:8883", tls=tls),
        state_path=tmp_path / "bridge.sqlite", **kw)  # type: ignore[arg-type]


def test_instances_are_validated_and_get_their_own_state_files(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="instance must be below instances"):
        _config(tmp_path, instance=2, instances=2)
    with pytest.raises(ValidationError, match="aggregator_key_file"):
        BridgeConfig(public=PublicConfig(network_id="mkt", broker_url="mqtts://p:8883",
                                         tls=TLSConfig(), contributions=True), instances=2)
    one = _config(tmp_path)
    assert one.role_state_path("single") == tmp_path / "bridge.sqlite"
    w1 = _config(tmp_path, instance=1, instances=2)
    assert w1.role_state_path("worker") == tmp_path / "bridge.w1.sqlite"
    assert w1.role_state_path("merge") == tmp_path / "bridge.merge.sqlite"
    # Scaling out changes nothing of what is disclosed: the policy version stays.
    assert w1.policy_version() == one.policy_version()


def test_only_bridges_may_read_or_write_partials() -> None:
    topic = TopicScheme(mode="consortium", network="grp", member="bridge").bridge_partial(
        "b", W0, 1, 0)
    rules = acl_rules(mode="consortium", network="grp", bridge_users=["bridge"])
    member = [r for r in rules if r.user is None and topic_matches(
        r.topic.replace("%u", "acme"), topic)]
    assert member == []
    bridge = {r.access for r in rules if r.user == "bridge" and topic_matches(r.topic, topic)}
    assert "readwrite" in bridge


def test_a_partial_with_a_non_finite_value_is_refused(
        codec_and_opener: tuple[EnvelopeCodec, SealOpener]) -> None:
    codec, opener = codec_and_opener
    scheme = TopicScheme(mode="consortium", network="grp", member="bridge")
    topic = scheme.bridge_partial("b", W0, 0, 0)
    row = ["consortium/grp/co1", "i1", "dairy", "north", "grp", "co1", "EUR",
           {"sales_data": {"units": "NaN"}}, "00", None]
    body = {"bridge": "b", "window_start": W0, "instance": 0, "instances": 1, "part": 0,
            "parts": 1, "policy_version": "p1",
            "items": Sealer(opener.public_key).seal(
                ("[" + str(row).replace("'", '"').replace("None", "null") + "]").encode(),
                aad=topic.encode())}
    payload = codec.encode(kind="partial", body=body, encrypt=False)
    with pytest.raises(EnvelopeError, match="malformed value"):
        decode_partial(topic, payload, codec=codec, opener=opener, instances=1,
                       policy_version="p1")


def test_the_cli_takes_instance_and_instances_and_says_what_is_wrong(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bridge.json"
    path.write_text(_config(tmp_path).model_dump_json())
    assert main(["bridge", "--config", str(path), "--instances", "2", "--instance", "2",
                 "--check"]) == 2
    err = capsys.readouterr().err
    assert "instance must be below instances (2), got 2" in err and len(err.splitlines()) <= 3


def test_a_bridge_refuses_a_role_that_does_not_fit_its_instances(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="set instances > 1"):
        Bridge(_config(tmp_path), role="merge")
    with pytest.raises(ConfigError, match="not 'single'"):
        Bridge(_config(tmp_path, instances=2), role="single")
    assert Bridge(_config(tmp_path, instance=1, instances=2)).role == "worker"
    assert Bridge(_config(tmp_path)).role == "single"


def test_a_partial_signed_by_a_member_is_refused(
        tmp_path: Path, codec_and_opener: tuple[EnvelopeCodec, SealOpener]) -> None:
    codec, opener = codec_and_opener
    node = pkimod.issue(ca_dir=tmp_path / "ca", out_dir=tmp_path / "node", role="node",
                        member="acme", node="store-1")
    forger = EnvelopeCodec(signer=Signer.from_files(key_file=node.key, cert_file=node.cert),
                           trust=TrustStore.from_files(ca_files=[tmp_path / "ca" / pkimod.CA_CERT],
                                                       network="grp"))
    scheme = TopicScheme(mode="consortium", network="grp", member="acme")
    ((topic, payload, _),) = encode_partials(
        codec=forger, sealer=Sealer(opener.public_key), scheme=scheme, bridge_id="b",
        window_start=W0, instance=0, instances=2, policy_version="p1", rows=[])
    with pytest.raises(EnvelopeError, match="not a bridge-signed partial"):
        decode_partial(topic, payload, codec=codec, opener=opener, instances=2,
                       policy_version="p1")


def test_a_worker_opens_a_window_another_instance_closed_and_settles_it_as_usual(
        tmp_path: Path, codec_and_opener: tuple[EnvelopeCodec, SealOpener],
        stores: list[BridgeStore]) -> None:
    codec, opener = codec_and_opener
    store = stores[0]
    config = _config(tmp_path, instance=1, instances=2, window_seconds=DAY,
                     publication_lag_seconds=DAY, settle_seconds=60.0)
    exchange = PartialExchange(config=config, role="worker", store=store,
                               counters=BridgeCounters(), codec=codec, opener=opener,
                               clock=lambda: W0 + 5 * DAY)
    scheme = TopicScheme(mode="consortium", network="grp", member="bridge")
    other = scheme.bridge_partial(config.bridge_id, W0, 0, 0)
    link = exchange.link(_consortium_link(config, codec, opener))
    exchange.receive(link, [InboundMessage(topic=other, payload=b"x", qos=1, retain=True)])
    # Not closed at once: its own items of the window may still be on their way.
    assert store.window_state(W0) == "open" and store.consortium_pending() == []
    assert store.add([_item(random.Random(3), 3)], now=W0 + 5 * DAY + 10).counted == 1
    (window,) = store.open_windows()
    assert (window.start, window.items) == (W0, 1)
    assert due_windows([window], config=config, now=W0 + 5 * DAY + 30) == []
    assert due_windows([window], config=config, now=W0 + 5 * DAY + 71) == [W0]
    exchange.close(W0, W0 + 5 * DAY + 71)
    assert store.window_state(W0) == "published" and len(store.consortium_pending()) == 1


def _consortium_link(config: BridgeConfig, codec: EnvelopeCodec,
                     opener: SealOpener) -> InputLink:
    """The consortium input link the partials link is made from (no key files read)."""
    assert config.consortium is not None
    return InputLink(name="consortium:grp", kind="consortium", network="grp",
                     broker_url=config.consortium.broker_url, tls=config.consortium.tls,
                     reliability=config.consortium.reliability, codec=codec, opener=opener,
                     policy={}, domain="grp", filters=[])
