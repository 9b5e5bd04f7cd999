"""The bridge's output for the consortium's members and its price histograms, without
brokers: bucket histograms, the differencing test between the two releases of a window, the
state of a window closed for the consortium first, the consortium output's messages, and
the configuration."""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pear_mqtt.bridge.aggregation import CellResult, WindowResult, aggregate_window
from pear_mqtt.bridge.config import BridgeConfig, BridgeConfigManager, DPConfig
from pear_mqtt.bridge.histograms import Histogram, bucket_histogram
from pear_mqtt.bridge.noise import NoiseMechanism
from pear_mqtt.bridge.output import BridgeOutput, verify_publication
from pear_mqtt.bridge.state import (
    BridgeStore,
    Bucket,
    NewContribution,
    OutgoingRow,
    StoredContribution,
)
from pear_mqtt.config.models import EncryptionConfig
from pear_mqtt.errors import PrivacyError
from pear_mqtt.model.aggregates import AggregateBody
from pear_mqtt.model.topics import TopicScheme, parse_topic
from pear_mqtt.security import pki as pkimod
from pear_mqtt.security.envelope import EnvelopeCodec
from pear_mqtt.security.signing import Signer
from pear_mqtt.security.trust import TrustStore

pytestmark = pytest.mark.unit

DAY = 86400
W0 = 20_000 * DAY
KEY = base64.b64encode(bytes(range(32))).decode()
NO_DP = DPConfig()
B1: Bucket = (1.0, 1.25)
B2: Bucket = (1.25, 1.5625)
B3: Bucket = (1.5625, 1.95312)


def item(company: str, bucket: Bucket | None = None, *, observed: float = 0.0,
         values: dict[str, dict[str, float]] | None = None, source: str = "consortium",
         domain: str = "grp", currency: str = "EUR", region: str = "north",
         iid: str | None = None) -> StoredContribution:
    iid = iid or f"{source}-{company}-{bucket}-{observed}-{values}"
    return StoredContribution(
        item_id=iid, category="food/milk", region=region, domain=domain, company=company,
        currency=currency, values=values or {}, digest=hashlib.sha256(iid.encode()).digest(),
        source_key=f"{source}/grp/{company}", ranges={"price": bucket} if bucket else {},
        observed=observed)


def histogram(items: list[StoredContribution], *, k: int = 5,
              cap: float = 0.25) -> Histogram | str:
    return bucket_histogram(items, "price", identity=lambda c: c.company,
                            domain_of={c.company: c.domain for c in items},
                            min_companies=k, dominance_cap=cap)


def run(rows: list[StoredContribution], *, k: int = 5, dp: DPConfig = NO_DP,
        released: Any = None) -> WindowResult:
    noise = NoiseMechanism(dp, rng=random.Random(3)) if dp.enabled else None
    return aggregate_window(W0, rows, window_seconds=DAY, min_companies=k, dominance_cap=0.25,
                            dp=dp, noise=noise, released=released)


def from_consortium(c: StoredContribution) -> bool:
    return c.source == "consortium"


# -- histograms -------------------------------------------------------------------------------

def test_each_company_counts_once_with_its_latest_bucket() -> None:
    rows = [item("a", B1, observed=10), item("a", B3, observed=20),  # a moved up: B3
            item("b", B3, observed=5), item("b", B1, observed=1),  # b's latest: B3
            item("c", B2), item("d", B2), item("e", B1)]
    h = histogram(rows)
    assert isinstance(h, Histogram)
    assert (h.companies, h.buckets) == (5, [(B1, 1), (B2, 2), (B3, 2)])
    assert h.median == B2  # the 3rd of 5 in ascending order


def test_median_is_the_lower_middle_and_open_ends_sort_outside() -> None:
    low: Bucket = (None, 1.0)
    high: Bucket = (1.95312, None)
    rows = [item("a", low), item("b", B1), item("c", B1), item("d", high), item("e", high),
            item("f", high)]
    h = histogram(rows)
    assert isinstance(h, Histogram)
    assert [b for b, _ in h.buckets] == [low, B1, high]
    assert h.median == B1  # 3rd of 6


def test_a_histogram_needs_k_companies_and_respects_the_cap() -> None:
    rows = [item(f"c{n}", B1) for n in range(4)] + [item("c0", B2, observed=9)]
    assert histogram(rows) == "below_k"  # four companies, however many items
    five = [item(f"c{n}", B1) for n in range(5)]
    assert isinstance(histogram(five), Histogram)
    assert histogram(five, cap=0.1) == "dominance"  # each company is 1/5 of it
    # two domains of 3 + 2 identities may be three companies: below k
    mixed = [item(f"a{n}", B1) for n in range(3)] + [
        item(f"b{n}", B1, domain="mkt") for n in range(2)]
    assert histogram(mixed) == "below_k"


def test_window_publishes_histograms_next_to_sealed_statistics() -> None:
    rows = [item(f"c{n}", B1 if n < 3 else B2, values={"sales_data": {"units": 10.0 + n}})
            for n in range(5)] + [item("u0", B1, currency="USD")]
    (cell,) = run(rows).cells
    groups = {(g.group, g.currency): g for g in cell.groups}
    price = groups[("price_data", "EUR")]
    assert price.fields == {} and set(price.histograms) == {"price"}
    assert price.histograms["price"].buckets == [(B1, 3), (B2, 2)]
    assert groups[("sales_data", None)].fields["units"].companies == 5
    assert ("price_data", "USD") not in groups and cell.suppressed == {"below_k": 1}
    assert cell.contributors == 6 and cell.inputs == 6


def test_noise_withholds_histograms() -> None:
    dp = DPConfig(mechanism="laplace")
    (cell,) = run([item(f"c{n}", B1) for n in range(5)], dp=dp).cells
    assert not cell.published and cell.suppressed == {"noise": 1} and cell.epsilon == 0


# -- differencing between the consortium's release and the public's ----------------------

def test_public_statistic_that_adds_fewer_than_k_companies_is_withheld() -> None:
    members = [item(f"c{n}", B1, values={"sales_data": {"units": 10.0}}) for n in range(5)]
    # a member's own private broker, or a public participant: one company more
    one_more = item("p0", B2, values={"sales_data": {"units": 12.0}}, source="private")
    (cell,) = run([*members, one_more], released=from_consortium).cells
    assert not cell.published
    assert cell.suppressed == {"differencing": 2}  # units and the price histogram
    # without an earlier release there is nothing to subtract from
    (cell,) = run([*members, one_more]).cells
    assert cell.published
    # the same cell without the extra item: what the consortium got, no difference
    (cell,) = run(members, released=from_consortium).cells
    assert cell.published and cell.suppressed == {}


def test_public_statistic_that_adds_k_companies_of_its_own_is_published() -> None:
    members = [item(f"c{n}", B1, values={"sales_data": {"units": 10.0}}) for n in range(5)]
    others = [item(f"p{n}", B2, values={"sales_data": {"units": 11.0}}, source="public",
                   domain="mkt") for n in range(5)]
    (cell,) = run([*members, *others], released=from_consortium).cells
    (price, sales) = sorted(cell.groups, key=lambda g: g.group)
    assert sales.fields["units"].companies == 10  # five per domain: k holds in each
    assert price.histograms["price"].companies == 10
    assert cell.suppressed == {}


def test_a_statistic_the_consortium_never_got_is_not_held_back() -> None:
    # three members (below k for the consortium) plus five public participants
    members = [item(f"c{n}", values={"sales_data": {"units": 10.0}}) for n in range(3)]
    others = [item(f"p{n}", values={"sales_data": {"units": 10.0}}, source="public",
                   domain="grp") for n in range(3)]
    (cell,) = run([*members, *others], released=from_consortium).cells
    assert cell.groups[0].fields["units"].companies == 6


# -- the store --------------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path: Path) -> Iterator[BridgeStore]:
    s = BridgeStore(tmp_path / "bridge.sqlite")
    yield s
    s.close()


def new(iid: str, **kw: Any) -> NewContribution:
    return NewContribution(source_key="consortium/grp/acme", item_id=iid, window_start=W0,
                           category="food/milk", region="north", domain="grp",
                           company="acme", currency="EUR", values=kw.pop("values", {}),
                           digest=hashlib.sha256(iid.encode()).digest(), token_digest=None,
                           **kw)


def test_buckets_are_stored_with_the_item(store: BridgeStore) -> None:
    store.add([new("a", ranges={"price": (1.0, None)}, observed=W0 + 3600.0),
               new("b", values={"sales_data": {"units": 2.0}})], now=1.0)
    a, b = store.contributions(W0)
    assert (a.ranges, a.observed, a.values, a.source) == ({"price": (1.0, None)},
                                                           W0 + 3600.0, {}, "consortium")
    assert (b.ranges, b.observed, b.values) == ({}, 0.0, {"sales_data": {"units": 2.0}})


def test_a_window_closed_for_the_consortium_stays_open_for_the_public(
        store: BridgeStore, tmp_path: Path) -> None:
    store.add([new("a")], now=1.0)
    store.close_for_consortium(W0, now=2.0, outgoing=[("pear/v1/consortium/grp/aggregates/x",
                                                       b"C", True)],
                               receipts=[("x", b"R")], ledger=[])
    assert store.consortium_closed(W0) and store.window_state(W0) == "open"
    assert [r.topic for r in store.pending("pear/v1/public/")] == []
    (row,) = store.pending("pear/v1/consortium/grp/")
    assert store.acknowledge([row.id], now=3.0) == []  # its consortium messages are out
    assert store.window_state(W0) == "open" and [w.start for w in store.open_windows()] == [W0]
    store.close()
    again = BridgeStore(tmp_path / "bridge.sqlite")
    try:
        assert again.consortium_closed(W0) and not again.consortium_closed(W0 + DAY)
        assert list(again.receipts()) == [(W0, "x", b"R")]
        again.close_window(W0, now=4.0, outgoing=[("pear/v1/public/mkt/aggregates/x", b"P",
                                                   True)], receipts=[], ledger=[])
        (row,) = again.pending("pear/v1/public/mkt/")
        assert again.acknowledge([row.id], now=5.0) == [W0]
        assert again.window_state(W0) == "published"
    finally:
        again.close()


# -- the consortium output --------------------------------------------------------------------

@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("consortium-pki")
    pkimod.create_ca(directory=root / "ca", network="grp")
    bridge = pkimod.issue(ca_dir=root / "ca", out_dir=root / "out", role="bridge",
                          member="bridge")
    node = pkimod.issue(ca_dir=root / "ca", out_dir=root / "out", role="node", member="acme",
                        node="store-1")
    return {"ca": root / "ca" / pkimod.CA_CERT, "cert": bridge.cert, "key": bridge.key,
            "node_cert": node.cert, "node_key": node.key}


def config(m: dict[str, Path], **kw: Any) -> BridgeConfig:
    t = {"ca_file": str(m["ca"]), "cert_file": str(m["cert"]), "key_file": str(m["key"])}
    return BridgeConfigManager.load(env={}, **{
        "consortium": {"network_id": "grp", "broker_url": "mqtts://c:8883", "tls": t,
                       "encryption": {"keys": {"k1": KEY}, "active": "k1"}},
        "public": {"network_id": "mkt", "broker_url": "mqtts://p:8883", "tls": t},
        "consortium_output": {"enabled": True, "publication_lag_seconds": DAY}, **kw})


def codec(m: dict[str, Path], *, encrypted: bool = True) -> EnvelopeCodec:
    return EnvelopeCodec(
        signer=Signer.from_files(key_file=m["key"], cert_file=m["cert"]),
        trust=TrustStore.from_files(ca_files=[m["ca"]], network="grp"),
        encryption=EncryptionConfig(keys={"k1": KEY}, active="k1") if encrypted else None)


def window(*cells: CellResult) -> WindowResult:
    return WindowResult(window_start=W0, window_end=W0 + DAY, cells=list(cells), epsilon=0.0,
                        delta=0.0, period_start=None)


def histogram_cell(companies: int) -> CellResult:
    (cell,) = run([item(f"c{n}", B1 if n % 2 else B2) for n in range(companies)],
                  k=min(companies, 5)).cells
    return cell


def test_consortium_output_writes_encrypted_messages_under_the_consortium(
        material: dict[str, Path]) -> None:
    out = BridgeOutput(config=config(material), codec=codec(material), audience="consortium")
    assert out.topic_root == "pear/v1/consortium/grp/"
    messages, receipts = out.build(window(histogram_cell(5)), now=W0 + 2 * DAY)
    scheme = TopicScheme(mode="consortium", network="grp", member="bridge")
    assert [t for t, _, _ in messages] == [scheme.aggregate("food/milk"),
                                           scheme.bridge_receipt("food/milk")]
    assert [parse_topic(t).kind for t, _, _ in messages] == ["aggregates", "bridge_receipt"]
    agg, rec = messages[0][1], messages[1][1]
    assert b'"enc"' in agg and b"histograms" not in agg  # encrypted: nothing readable
    body, receipt = verify_publication(aggregate_payload=agg, receipt_payload=rec,
                                       codec=codec(material))
    assert body.network == "grp" and receipt.network == "grp"
    (group,) = body.cells[0].groups
    assert group.histograms is not None
    hist = group.histograms["price"]
    assert (hist.companies, [b.companies for b in hist.buckets]) == (5, [2, 3])
    assert (hist.median.lo, hist.median.hi) == B2
    for i, (topic, payload, retain) in enumerate(messages):
        out.admit(OutgoingRow(id=i, window_start=W0, topic=topic, payload=payload,
                              retain=retain))
    # ... and it writes nowhere else, the public's aggregates included
    with pytest.raises(PrivacyError, match="refusing"):
        out.admit(OutgoingRow(id=9, window_start=W0, topic="pear/v1/public/grp/aggregates/x",
                              payload=agg, retain=True))
    assert receipts == [("food/milk", rec)]


def test_public_messages_stay_plain_and_keep_their_old_shape(
        material: dict[str, Path]) -> None:
    out = BridgeOutput(config=config(material), codec=codec(material))
    stats = run([item(f"c{n}", values={"sales_data": {"units": 1.0}}) for n in range(5)])
    messages, _ = out.build(stats, now=W0)
    payload = messages[0][0], messages[0][1]
    assert payload[0] == "pear/v1/public/mkt/aggregates/food/milk"
    body = json.loads(payload[1])["body"]
    assert body["cells"][0]["groups"][0] == {
        "group": "sales_data", "currency": None,
        "fields": {"units": {"count": 5, "companies": 5, "mean": 1.0, "stddev": 0.0,
                             "sum": 5.0}}}
    assert AggregateBody.model_validate(body).cells[0].groups[0].histograms is None
    # the public output refuses an encrypted envelope even on its own topic
    sealed = codec(material).encode(kind="aggregate", body={"x": 1}, encrypt=True)
    with pytest.raises(PrivacyError, match="refusing"):
        out.admit(OutgoingRow(id=1, window_start=W0, topic=payload[0], payload=sealed,
                              retain=True))


def test_output_refuses_a_histogram_below_k(material: dict[str, Path]) -> None:
    out = BridgeOutput(config=config(material), codec=codec(material), audience="consortium")
    with pytest.raises(PrivacyError, match="histogram"):
        out.build(window(histogram_cell(4)), now=W0)


# -- configuration ----------------------------------------------------------------------------

def test_consortium_output_configuration(material: dict[str, Path]) -> None:
    on = config(material)
    off = config(material, consortium_output={"enabled": False})
    assert "consortium_output" in on.policy_document()
    assert "consortium_output" not in off.policy_document()
    assert on.policy_version() != off.policy_version()
    assert any("consortium_output is off" in w for w in BridgeConfigManager.warnings(off))
    assert any("signalling current prices" in w for w in BridgeConfigManager.warnings(on))
    with pytest.raises(Exception, match="must not exceed"):
        config(material, publication_lag_seconds=3600)
    with pytest.raises(Exception, match="needs a consortium source"):
        BridgeConfig.model_validate({**on.model_dump(), "consortium": None,
                                     "public": {**on.public.model_dump(),
                                                "contributions": True}})
