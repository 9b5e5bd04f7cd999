"""The bridge without brokers: configuration, input checks, aggregation, noise, state,
the output path and the receipts."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import random
import sqlite3
import stat
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pear_mqtt.bridge.admission import check_item, input_hash, item_digest, window_of
from pear_mqtt.bridge.aggregation import (
    CellResult,
    PublishedGroup,
    WindowResult,
    aggregate_window,
)
from pear_mqtt.bridge.closing import WindowCloser, due_windows
from pear_mqtt.bridge.config import (
    DEFAULT_BOUNDS,
    BridgeConfig,
    BridgeConfigManager,
    DPConfig,
    SourceConfig,
)
from pear_mqtt.bridge.histogram import BUCKETS
from pear_mqtt.bridge.ingest import Ingestor
from pear_mqtt.bridge.links import InputLink, input_links
from pear_mqtt.bridge.noise import NoiseMechanism
from pear_mqtt.bridge.output import PublicOutput, verify_publication
from pear_mqtt.bridge.state import (
    BridgeStore,
    LedgerEntry,
    NewContribution,
    OutgoingRow,
    StoredContribution,
)
from pear_mqtt.bridge.status import BridgeCounters
from pear_mqtt.cli import main
from pear_mqtt.errors import ConfigError, OutboxError, PrivacyError
from pear_mqtt.model.aggregates import AggregateBody, ReceiptBody
from pear_mqtt.model.insight import SharingLevel
from pear_mqtt.model.topics import TopicScheme, parse_topic
from pear_mqtt.privacy.aggregate import FieldStatistics, SuppressionCounter, aggregate_cell
from pear_mqtt.privacy.filter import Contribution, SharedInsight
from pear_mqtt.privacy.ranges import ValueRange
from pear_mqtt.security import pki as pkimod
from pear_mqtt.security.envelope import EnvelopeCodec
from pear_mqtt.security.seal import seal
from pear_mqtt.security.signing import Signer
from pear_mqtt.security.trust import TrustStore

pytestmark = pytest.mark.unit

DAY = 86400
W0 = 20_000 * DAY  # a window start (2024-10-04)
T0 = datetime.fromtimestamp(W0, UTC)
KEY = base64.b64encode(bytes(range(32))).decode()
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
A, F, R, N = (SharingLevel.AGGREGATED, SharingLevel.FULL, SharingLevel.RANGES_ONLY,
              SharingLevel.NONE)
CONSORTIUM = {"price_data": R, "sales_data": A, "trends": F}
NO_DP = DPConfig()


@pytest.fixture(autouse=True)
def _no_bridge_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("PEAR_BRIDGE_"):
            monkeypatch.delenv(name)


# -- material -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Material:
    root: Path
    ca: Path
    bridge: pkimod.CertPaths
    node: pkimod.CertPaths
    x25519: Path


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    from pear_mqtt.security.seal import generate_x25519_key, save_x25519_private_key

    root = tmp_path_factory.mktemp("bridge-pki")
    pkimod.create_ca(directory=root / "ca", network="mkt")
    bridge = pkimod.issue(ca_dir=root / "ca", out_dir=root / "out", role="bridge",
                          member="bridge")
    node = pkimod.issue(ca_dir=root / "ca", out_dir=root / "out", role="node", member="acme",
                        node="store-1")
    x = root / "agg.key"
    save_x25519_private_key(generate_x25519_key(), x)
    return Material(root=root, ca=root / "ca" / pkimod.CA_CERT, bridge=bridge, node=node,
                    x25519=x)


def tls(m: Material, certs: pkimod.CertPaths | None = None) -> dict[str, str]:
    c = certs or m.bridge
    return {"ca_file": str(m.ca), "cert_file": str(c.cert), "key_file": str(c.key)}


def minimal(m: Material | None = None, **kw: Any) -> dict[str, Any]:
    t = tls(m) if m else {}
    return {"consortium": {"network_id": "grp", "broker_url": "mqtts://c:8883", "tls": t},
            "public": {"network_id": "mkt", "broker_url": "mqtts://p:8883", "tls": t}, **kw}


# -- configuration ------------------------------------------------------------------------

TOML = """
bridge_id = "br-1"
min_companies = 6
dominance_cap = 0.2
window_seconds = 3600
publication_lag_seconds = 7200
state_path = "/var/lib/pear/bridge.sqlite"

[consortium]
network_id = "retail-eu"
broker_url = "mqtts://consortium:8883"
aggregator_key_file = "/k/agg.key"
tls = { ca_file = "/k/ca.crt", cert_file = "/k/b.crt", key_file = "/k/b.key" }
data_sharing = { price_data = "aggregated" }
encryption = { keys = { k1 = "@KEY@" } }

[[private]]
mode = "private"
network_id = "acme-private"
company_id = "acme"
domain = "retail-eu"
member = "pacme"
broker_url = "mqtts://acme:8883"

[public]
network_id = "market"
broker_url = "mqtts://public:8883"
contributions = false

[dp]
mechanism = "laplace"
epsilon_per_cell = 0.5
budget_per_period = 10
period_seconds = 86400
bounds = { "sales_data.units" = [0, 5000] }
""".replace("@KEY@", KEY)


def test_loads_toml_with_every_section(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(TOML)
    c = BridgeConfigManager.load(file=path, env={})
    assert (c.bridge_id, c.min_companies, c.dominance_cap, c.window_seconds) == (
        "br-1", 6, 0.2, 3600)
    assert c.consortium is not None and c.consortium.policy() == {**CONSORTIUM,
                                                                  "price_data": A}
    assert c.consortium.aggregate_full is False and c.private[0].aggregate_full is True
    (p,) = c.private
    assert (p.company_id, p.identity_domain, p.member) == ("acme", "retail-eu", "pacme")
    assert p.policy() == {"price_data": F, "sales_data": F, "trends": F}
    assert c.dp.bounds["sales_data.units"] == (0, 5000)
    assert c.dp.bounds["price_data.price"] == DEFAULT_BOUNDS["price_data.price"]  # merged
    assert c.consortium.encryption.keys["k1"].get_secret_value() == KEY


def test_environment_overrides_file_per_leaf(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(TOML)
    env = {"PEAR_BRIDGE_MIN_COMPANIES": "9", "PEAR_BRIDGE_DP__MECHANISM": "gaussian",
           "PEAR_BRIDGE_DP__EPSILON_PER_CELL": "0.25",
           "PEAR_BRIDGE_CONSORTIUM__BROKER_URL": "mqtts://other:1",
           "PEAR_BRIDGE_PRIVATE": json.dumps([{"mode": "private", "network_id": "x",
                                               "company_id": "globex"}]),
           "UNRELATED": "1"}
    c = BridgeConfigManager.load(file=path, env=env, dominance_cap=0.1)
    assert (c.min_companies, c.dp.mechanism, c.dp.epsilon_per_cell, c.dominance_cap) == (
        9, "gaussian", 0.25, 0.1)
    assert c.consortium is not None and c.consortium.broker_url == "mqtts://other:1"
    assert c.consortium.network_id == "retail-eu"  # the rest of the table stays
    assert [s.company_id for s in c.private] == ["globex"]


@pytest.mark.parametrize("change, message", [
    ({"public": {"network_id": "mkt", "data_sharing": {"price_data": "full"}}},
     "public.data_sharing"),
    ({"private": [{"mode": "private", "network_id": "x"}]}, "company_id"),
    ({"dp": {"mechanism": "gaussian", "epsilon_per_cell": 2}}, "ε <= 1"),
    ({"dp": {"mechanism": "laplace", "epsilon_per_cell": 2, "budget_per_period": 1}},
     "budget_per_period"),
    ({"dp": {"bounds": {"sales_data.units": [5, 1]}}}, "lo < hi"),
    ({"consortium": None, "public": {"network_id": "m", "contributions": False}},
     "nothing to aggregate"),
    ({"min_companies": 1}, "min_companies"),
    ({"dominance_cap": 0}, "dominance_cap"),
    ({"surprise": 1}, "surprise"),
    ({"consortium": {"network_id": "g", "broker_url": "mqtt://c:1883"}}, "mqtts://"),
    ({"max_settle_seconds": 1, "settle_seconds": 5}, "max_settle_seconds"),
])
def test_invalid_configs_name_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BridgeConfigManager.load(env={}, **{**minimal(), **change})


def test_errors_never_echo_secret_values() -> None:
    secret = "do-not-print-this-secret"
    with pytest.raises(ConfigError) as err:
        BridgeConfigManager.load(env={}, **minimal(
            consortium={"network_id": "g", "encryption": {"keys": {"k1": secret},
                                                          "active": "nope"}}))
    assert secret not in str(err.value)
    with pytest.raises(ConfigError, match=r"keys\.k1") as err:
        BridgeConfigManager.load(env={}, **minimal(
            consortium={"network_id": "g", "encryption": {"keys": {"k1": secret}}}))
    assert secret not in str(err.value)


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_save_and_load_round_trip(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(TOML)
    config = BridgeConfigManager.load(file=path, env={})
    out = tmp_path / f"saved{suffix}"
    assert BridgeConfigManager.save(config, out, include_secrets=True) == []
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert BridgeConfigManager.load(file=out, env={}) == config
    omitted = BridgeConfigManager.save(config, tmp_path / f"public{suffix}")
    assert omitted == ["consortium.encryption.keys.k1"]
    assert KEY not in (tmp_path / f"public{suffix}").read_text()


def test_policy_version_follows_the_disclosure_rules_only() -> None:
    base = BridgeConfigManager.load(env={}, **minimal())
    same = BridgeConfigManager.load(env={}, **minimal(tick_seconds=5, bridge_id="other"))
    stricter = BridgeConfigManager.load(env={}, **minimal(min_companies=7))
    assert base.policy_version() == same.policy_version() != stricter.policy_version()
    assert base.policy_version().startswith("p") and len(base.policy_version()) == 17


def test_warnings_point_at_weak_settings() -> None:
    config = BridgeConfigManager.load(env={}, **minimal(
        min_companies=3, dominance_cap=0.5, publication_lag_seconds=0,
        private=[{"mode": "private", "network_id": "x", "company_id": "acme"}]))
    text = "\n".join(BridgeConfigManager.warnings(config))
    for part in ("min_companies is 3", "dominance_cap is 50%", "publication_lag_seconds",
                 "aggregator_key_file is not set", "no member/domain"):
        assert part in text


def test_validate_for_connect_names_missing_files(material: Material, tmp_path: Path) -> None:
    config = BridgeConfigManager.load(env={}, **minimal(material))
    with pytest.raises(ConfigError, match="aggregator_key_file is required"):
        BridgeConfigManager.validate(config, for_connect=True)
    ok = BridgeConfigManager.load(env={}, **minimal(
        material, public={"network_id": "mkt", "broker_url": "mqtts://p:1",
                          "tls": tls(material), "aggregator_key_file": str(material.x25519)},
        consortium={"network_id": "grp", "broker_url": "mqtts://c:1", "tls": tls(material),
                    "aggregator_key_file": str(tmp_path / "missing.key")}))
    with pytest.raises(ConfigError, match=r"missing\.key is missing"):
        BridgeConfigManager.validate(ok, for_connect=True)


def test_cli_check_and_receipts(material: Material, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    data = minimal(material, state_path=str(tmp_path / "state.sqlite"))
    data["consortium"]["aggregator_key_file"] = str(material.x25519)
    data["public"]["aggregator_key_file"] = str(material.x25519)
    path = tmp_path / "bridge.json"
    path.write_text(json.dumps(data))
    assert main(["bridge", "--config", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "consortium grp" in out and "k=5" in out and "dominance cap 25%" in out
    assert main(["bridge", "--config", str(path), "--receipts"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["bridge", "--config", str(tmp_path / "nope.toml")]) == 2


# -- input checks -----------------------------------------------------------------------------

def shared(levels: dict[str, SharingLevel], groups: dict[str, dict[str, Any]],
           **kw: Any) -> SharedInsight:
    return SharedInsight(category=kw.get("category", "food/milk"), region="north",
                         window_start=T0, window_end=T0 + timedelta(hours=1),
                         levels=levels, groups=groups)


def contribution(values: dict[str, dict[str, float]], **kw: Any) -> Contribution:
    base: dict[str, Any] = {"company": "acme", "category": "food/milk", "region": "north",
                            "window_start": T0, "window_end": T0 + timedelta(hours=1),
                            "currency": "EUR", "values": values}
    return Contribution(**{**base, **kw})


RANGE = {"price": ValueRange(lo=1.0, hi=1.25)}


@pytest.mark.parametrize("item, policy, announced, reason", [
    # as the consortium default says: fine (the direction follows the price ranges; the
    # demand change and the sample size follow sales into the sealed part)
    ((shared({"price_data": R, "trends": F},
             {"price_data": RANGE, "trends": {"direction": "up"}}),
      contribution({"sales_data": {"units": 3}, "trends": {"demand_change_pct": 2.0}},
                   sample_size=4)), CONSORTIUM, None, None),
    # a sealed part alone, as the consortium default says: fine
    ((None, contribution({"sales_data": {"units": 3}}, sample_size=4)), CONSORTIUM, None, None),
    # an exact price where the policy says ranges_only
    ((shared({"price_data": F}, {"price_data": {"price": 1.1}}), None), CONSORTIUM, None,
     "policy_violation"),
    # ranges of a group the policy keeps aggregated
    ((shared({"sales_data": R}, {"sales_data": {"units": ValueRange(lo=1, hi=2)}}), None),
     CONSORTIUM, None, "policy_violation"),
    # a group the policy says none, even sealed
    ((None, contribution({"trends": {"demand_change_pct": 1.0}})),
     {**CONSORTIUM, "trends": N}, None, "policy_violation"),
    # a sealed price where the policy says ranges_only
    ((None, contribution({"price_data": {"price": 1.1}})), CONSORTIUM, None,
     "policy_violation"),
    # a sealed price change whose source the policy keeps in ranges: not sent at all
    ((None, contribution({"trends": {"price_change_pct": 1.1}})), CONSORTIUM, None,
     "policy_violation"),
    # a sealed sample size where the policy keeps sales in ranges
    ((None, contribution({"price_data": {"price": 1.1}}, sample_size=3)),
     {"price_data": A, "sales_data": R, "trends": F}, None, "policy_violation"),
    # the node announced trends none but shares them in full
    ((shared({"price_data": R, "trends": F},
             {"price_data": {}, "trends": {"direction": "up"}}), None), CONSORTIUM,
     {**CONSORTIUM, "trends": N}, "presence_mismatch"),
    # the node announced sales in ranges but seals them
    ((None, contribution({"sales_data": {"units": 1}})), CONSORTIUM,
     {**CONSORTIUM, "sales_data": R}, "presence_mismatch"),
    # the node announced sales in ranges but seals the sample size
    ((None, contribution({"trends": {"price_change_pct": 1.0}}, sample_size=2)),
     {**CONSORTIUM, "price_data": A, "trends": A}, {**CONSORTIUM, "price_data": A,
                                                   "trends": A, "sales_data": R},
     "presence_mismatch"),
    # the sealed part describes another region
    ((shared({"price_data": R}, {"price_data": RANGE}),
      contribution({"sales_data": {"units": 1}}, region="south")), CONSORTIUM,
     None, "mismatch"),
    # public: only sealed groups
    ((shared({"price_data": F, "trends": F},
             {"price_data": {}, "trends": {"price_change_pct": 1.0}}), None),
     {"price_data": A, "sales_data": A, "trends": A}, None, "policy_violation"),
])
def test_check_item(item: tuple[SharedInsight | None, Contribution | None],
                    policy: dict[str, SharingLevel], announced: dict[str, SharingLevel] | None,
                    reason: str | None) -> None:
    s, c = item
    assert check_item(shared=s, contribution=c, policy=policy, announced=announced) == reason


def test_window_of() -> None:
    assert window_of(T0, T0 + timedelta(hours=1), window_seconds=DAY) == W0
    assert window_of(T0 + timedelta(hours=23), T0 + timedelta(days=1),
                     window_seconds=DAY) == W0
    assert window_of(T0 + timedelta(hours=23), T0 + timedelta(hours=25),
                     window_seconds=DAY) is None
    assert window_of(T0 - timedelta(seconds=1), T0, window_seconds=DAY) == W0 - DAY


def test_item_digest_and_input_hash() -> None:
    item = {"iid": "a1", "insight": {"b": 1, "a": [1, 2]}, "sealed": "tok"}
    d = item_digest(network="n", member="m", item=item)
    reordered = {"sealed": "tok", "insight": {"a": [1, 2], "b": 1}, "iid": "a1"}
    assert item_digest(network="n", member="m", item=reordered) == d
    for other in ({**item, "sealed": "tok2"}, {**item, "iid": "a2"}):
        assert item_digest(network="n", member="m", item=other) != d
    assert item_digest(network="n", member="m2", item=item) != d
    e = item_digest(network="n", member="m", item={**item, "iid": "b"})
    assert input_hash([d, e]) == input_hash([e, d]) != input_hash([d])


# -- aggregation ------------------------------------------------------------------------------

def stored(company: str, values: dict[str, dict[str, float]], *, domain: str = "grp",
           category: str = "food/milk", region: str = "north", currency: str | None = "EUR",
           iid: str | None = None) -> StoredContribution:
    iid = iid or f"{company}-{json.dumps(values, sort_keys=True)}"
    return StoredContribution(item_id=iid, category=category, region=region, domain=domain,
                              company=company, currency=currency, values=values,
                              digest=hashlib.sha256(iid.encode()).digest())


def run(rows: list[StoredContribution], *, k: int = 5, cap: float = 0.25,
        dp: DPConfig = NO_DP, noise: NoiseMechanism | None = None,
        spent: float = 0.0) -> WindowResult:
    return aggregate_window(W0, rows, window_seconds=DAY, min_companies=k, dominance_cap=cap,
                            dp=dp, noise=noise, budget_spent=spent)


def stats_of(cell: CellResult) -> dict[str, dict[str, FieldStatistics]]:
    return {g.group if g.currency in (None, "EUR") else f"{g.group}/{g.currency}": g.fields
            for g in cell.groups}


values = st.integers(1, 10**6).map(lambda n: n / 100)


@FAST
@given(st.lists(st.tuples(st.integers(0, 7), st.sampled_from(["north", "south"]),
                          values, values), min_size=1, max_size=40),
       st.integers(2, 6), st.sampled_from([0.25, 0.5, 1.0]))
def test_single_domain_matches_privacy_aggregate_cell(
        rows: list[tuple[int, str, float, float]], k: int, cap: float) -> None:
    items = [stored(f"co{c}", {"price_data": {"price": p}, "sales_data": {"units": u}},
                    region=r, iid=f"i{i}") for i, (c, r, p, u) in enumerate(rows)]
    result = run(items, k=k, cap=cap)
    for cell in result.cells:
        reference = aggregate_cell(
            [Contribution(company=s.company, category=s.category, region=s.region,
                          window_start=T0, window_end=T0 + timedelta(days=1),
                          currency=s.currency, values=s.values)
             for s in items if s.region == cell.region],
            min_companies=k, dominance_cap=cap)
        want = {g: o.statistics for g, o in reference.items() if o.statistics}
        assert stats_of(cell) == want
        assert cell.contributors == len({s.company for s in items if s.region == cell.region})
        assert cell.domains == 1
        assert sum(cell.suppressed.values()) == sum(
            len(o.suppressed) for o in reference.values())


def test_prices_are_aggregated_per_currency() -> None:
    rows = [stored(f"e{n}", {"price_data": {"price": 1.0 + n}}) for n in range(5)] + [
        stored(f"u{n}", {"price_data": {"price": 9.0}}, currency="USD") for n in range(3)]
    (cell,) = run(rows).cells
    (group,) = cell.groups
    assert (group.group, group.currency, group.fields["price"].companies) == (
        "price_data", "EUR", 5)
    assert cell.suppressed == {"below_k": 1}  # the USD price: three companies


def test_identities_from_different_domains_are_judged_conservatively() -> None:
    # Five identities, but three in one domain and two in another: they may be only three
    # companies, so k = 5 fails although privacy.aggregate alone would pass.
    rows = [stored(f"a{n}", {"sales_data": {"units": 10}}) for n in range(3)] + [
        stored(f"b{n}", {"sales_data": {"units": 10}}, domain="mkt") for n in range(2)]
    (cell,) = run(rows).cells
    assert not cell.published and cell.suppressed == {"below_k": 1}
    assert (cell.contributors, cell.domains) == (5, 2)
    # Five in one domain pass k; but each domain's largest identity may be one company:
    # (20 + 15) / 130 = 27 % > 25 %, although no single identity holds more than 15 %.
    rows = [stored(f"a{n}", {"sales_data": {"units": 20}}) for n in range(5)] + [
        stored(f"b{n}", {"sales_data": {"units": 15}}, domain="mkt") for n in range(2)]
    (cell,) = run(rows).cells
    assert cell.suppressed == {"dominance": 1}
    # the same company under the same identity in both sources merges (private alias)
    rows = [stored(f"a{n}", {"sales_data": {"units": 20}}) for n in range(5)] + [
        stored("a0", {"sales_data": {"units": 1}}, iid="private-1")]
    (cell,) = run(rows).cells
    units = stats_of(cell)["sales_data"]["units"]
    assert (units.companies, units.count, units.sum) == (5, 6, 101)


def test_noise_spends_the_budget_and_suppresses_when_it_is_gone() -> None:
    dp = DPConfig(mechanism="laplace", epsilon_per_cell=1.0, budget_per_period=2.5)
    # Without the default bounds (model_copy does not merge them): only units are bounded.
    dp = dp.model_copy(update={"bounds": {"sales_data.units": (0, 1000)}})
    noise = NoiseMechanism(dp, rng=random.Random(7))
    rows = [stored(f"c{n}", {"sales_data": {"units": 100.0 + n},
                             "trends": {"price_change_pct": 1.0}},
                   category=f"cat{c}") for c in range(4) for n in range(5)]
    result = run(rows, dp=dp, noise=noise, spent=0.5)
    published = [c for c in result.cells if c.published]
    assert [c.category for c in published] == ["cat0", "cat1"]
    assert result.epsilon == 2.0 and result.period_start == (W0 // dp.period_seconds) * \
        dp.period_seconds
    for cell in published:
        assert cell.epsilon == 1.0
        # trends.price_change_pct has no bounds: never published under noise
        assert cell.suppressed == {"unbounded": 1}
        units = stats_of(cell)["sales_data"]["units"]
        assert units.stddev is None and units.companies == 5
        assert 0 <= units.mean <= 1000 and units.mean != 102.0
        assert units.sum is not None and 0 <= units.sum <= 5000
    for cell in result.cells[2:]:
        assert cell.suppressed == {"unbounded": 1, "budget": 1} and cell.epsilon == 0


def test_gaussian_noise_tracks_delta() -> None:
    dp = DPConfig(mechanism="gaussian", epsilon_per_cell=0.5, delta=1e-5)
    rows = [stored(f"c{n}", {"sales_data": {"units": 10.0}}) for n in range(5)]
    result = run(rows, dp=dp, noise=NoiseMechanism(dp, rng=random.Random(1)))
    (cell,) = result.cells
    assert (cell.epsilon, cell.delta, result.delta) == (0.5, 1e-5, 1e-5)


def test_noise_without_a_mechanism_is_refused() -> None:
    with pytest.raises(ConfigError):
        NoiseMechanism(NO_DP)
    with pytest.raises(ConfigError):
        run([], dp=DPConfig(mechanism="laplace"))


@pytest.mark.parametrize("mechanism", ["laplace", "gaussian"])
def test_noise_has_the_calibrated_scale(mechanism: str) -> None:
    dp = DPConfig(mechanism=mechanism, epsilon_per_cell=0.5, delta=1e-6)  # type: ignore[arg-type]
    noise = NoiseMechanism(dp, rng=random.Random(42))
    draws = [noise.sample(sensitivity=2.0, epsilon=0.5, delta=1e-6) for _ in range(20_000)]
    scale = noise.scale(sensitivity=2.0, epsilon=0.5, delta=1e-6)
    assert abs(statistics.fmean(draws)) < 0.05 * scale
    if mechanism == "laplace":
        assert scale == 4.0
        assert statistics.fmean(abs(d) for d in draws) == pytest.approx(scale, rel=0.03)
    else:
        assert scale == pytest.approx(2.0 * math.sqrt(2 * math.log(1.25e6)) / 0.5)
        assert statistics.pstdev(draws) == pytest.approx(scale, rel=0.03)


def test_suppression_counter_records_privacy_outcomes() -> None:
    counter = SuppressionCounter()
    rows = [stored(f"c{n}", {"sales_data": {"units": 1.0}}) for n in range(3)]
    aggregate_window(W0, rows, window_seconds=DAY, min_companies=5, dominance_cap=0.25,
                     dp=NO_DP, counter=counter)
    assert counter.counts == {"below_k": 1}


# -- state ------------------------------------------------------------------------------------

def new(iid: str, *, window: int = W0, source: str = "c/grp/acme", token: bytes | None = None,
        company: str = "acme") -> NewContribution:
    return NewContribution(source_key=source, item_id=iid, window_start=window,
                           category="food/milk", region="north", domain="grp",
                           company=company, currency="EUR",
                           values={"sales_data": {"units": 1.5}},
                           digest=hashlib.sha256(iid.encode()).digest(), token_digest=token)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BridgeStore]:
    s = BridgeStore(tmp_path / "state" / "bridge.sqlite")
    yield s
    s.close()


def test_store_counts_each_item_once_across_restarts(store: BridgeStore) -> None:
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    r = store.add([new("a", token=b"t1"), new("b"), new("a")], now=10.0)
    assert (r.counted, r.duplicates, r.copied) == (2, 1, 0)
    # another sender may use the same id; nobody may reuse a sealed token
    r = store.add([new("a", source="c/grp/globex"), new("z", source="c/grp/evil", token=b"t1")],
                  now=11.0)
    assert (r.counted, r.duplicates, r.copied) == (1, 0, 1)
    path = store.path
    store.close()
    again = BridgeStore(path)
    try:
        assert (again.add([new("b")], now=12.0).duplicates) == 1
        (w,) = again.open_windows()
        assert (w.start, w.first_input, w.last_input, w.items) == (W0, 10.0, 11.0, 3)
        rows = again.contributions(W0)
        assert [(r.item_id, r.company) for r in rows] == [("a", "acme"), ("b", "acme"),
                                                          ("a", "acme")]
        assert rows[0].values == {"sales_data": {"units": 1.5}}
        assert again.window_state(W0) == "open" and again.window_state(W0 + DAY) is None
    finally:
        again.close()


def test_a_new_store_file_has_16_kib_pages_and_an_old_one_keeps_its_own(
        tmp_path: Path) -> None:
    old = tmp_path / "old.sqlite"
    conn = sqlite3.connect(old)
    conn.execute("CREATE TABLE t (x)")  # a file made with SQLite's default 4 KiB pages
    conn.close()
    for path, size in ((tmp_path / "new.sqlite", 16384), (old, 4096)):
        s = BridgeStore(path)
        try:
            assert s.add([new("a")], now=10.0).counted == 1
        finally:
            s.close()
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA page_size").fetchone()[0] == size
        conn.close()


def test_store_replaces_a_later_copy_of_the_same_item(store: BridgeStore) -> None:
    """One row per (source, item id): a changed copy (a re-sent or re-read observation)
    replaces the earlier values, an unchanged one is a duplicate, and a token, once seen in an
    open window, stays refused to others even after its item was replaced."""
    first = new("a", token=b"t1")
    assert store.add([first, new("b")], now=1.0).counted == 2
    later = first._replace(values={"sales_data": {"units": 9.0}}, digest=b"d2",
                           token_digest=b"t2")
    r = store.add([later, first], now=2.0)
    # the later copy replaces; the first copy delivered again after it changes nothing
    assert (r.counted, r.replaced, r.duplicates, r.copied) == (0, 1, 1, 0)
    r = store.add([later], now=3.0)
    assert (r.counted, r.replaced, r.duplicates) == (0, 0, 1)
    # a re-read (sealed anew) with the same values replaces them with themselves
    again = later._replace(digest=b"d3", token_digest=b"t5")
    r = store.add([again], now=4.0)
    assert (r.counted, r.replaced, r.duplicates) == (0, 1, 0)
    rows = {c.item_id: c for c in store.contributions(W0)}
    assert set(rows) == {"a", "b"} and rows["a"].values == {"sales_data": {"units": 9.0}}
    (w,) = store.open_windows()
    assert (w.items, w.last_input) == (2, 4.0)  # replaced, not added
    # another sender replaying the replaced item's first token, or its current one
    r = store.add([new("x", source="c/grp/evil", token=b"t1"),
                   new("y", source="c/grp/evil", token=b"t2")], now=5.0)
    assert (r.counted, r.copied) == (0, 2)
    # a batch that is all new still takes the one-statement path, tokens included
    r = store.add([new("c", token=b"t3"), new("d", token=b"t4")], now=6.0)
    assert (r.counted, r.replaced) == (2, 0)
    assert store.add([new("e", source="c/grp/evil", token=b"t3")], now=7.0).copied == 1
    # closing the window forgets its tokens with its values
    store.close_window(W0, now=8.0, outgoing=[], receipts=[], ledger=[])
    assert store.add([new("z", window=W0 + DAY, token=b"t1")], now=9.0).counted == 1


def test_store_closes_windows_through_the_outbox(store: BridgeStore) -> None:
    store.add([new("a"), new("b", window=W0 + DAY)], now=1.0)
    store.close_window(W0, now=2.0, outgoing=[("t/agg", b"A", True), ("t/rec", b"R", True)],
                       receipts=[("food/milk", b"R")],
                       ledger=[LedgerEntry(period_start=0, epsilon=1.0, delta=0.0, cells=1)])
    assert store.window_state(W0) == "ready"
    assert store.contributions(W0) == []  # exact values are gone with the window
    with pytest.raises(OutboxError, match="late"):
        store.add([new("c")], now=3.0)
    pending = store.pending()
    assert [(p.topic, p.payload, p.retain) for p in pending] == [("t/agg", b"A", True),
                                                                 ("t/rec", b"R", True)]
    assert store.acknowledge([pending[0].id], now=4.0) == []
    assert store.acknowledge([pending[1].id], now=5.0) == [W0]
    assert store.window_state(W0) == "published" and store.outbox_depth == 0
    store.close_window(W0 + DAY, now=6.0, outgoing=[], receipts=[],
                       ledger=[LedgerEntry(period_start=0, epsilon=0.5, delta=1e-6, cells=2)])
    assert store.window_state(W0 + DAY) == "published"
    assert store.ledger() == [LedgerEntry(period_start=0, epsilon=1.5, delta=1e-6, cells=3)]
    assert store.spent(0) == 1.5 and store.spent(DAY) == 0.0
    assert list(store.receipts()) == [(W0, "food/milk", b"R")]
    assert store.counts() == {"open": 0, "ready": 0, "published": 2, "open_items": 0}


# -- the output path --------------------------------------------------------------------------

def bridge_config(m: Material, **kw: Any) -> BridgeConfig:
    return BridgeConfigManager.load(env={}, **minimal(m, **kw))


def output(m: Material, **kw: Any) -> tuple[PublicOutput, EnvelopeCodec]:
    codec = EnvelopeCodec(
        signer=Signer.from_files(key_file=m.bridge.key, cert_file=m.bridge.cert),
        trust=TrustStore.from_files(ca_files=[m.ca], network="mkt"))
    return PublicOutput(config=bridge_config(m, **kw), codec=codec), codec


def cell(companies: int, *, region: str = "north", stddev: float | None = None) -> CellResult:
    stats = FieldStatistics(count=companies, companies=companies, mean=2.0, stddev=stddev,
                            sum=10.0)
    return CellResult(category="food/milk", region=region,
                      groups=[PublishedGroup(group="sales_data", currency=None,
                                             fields={"units": stats})],
                      contributors=companies, domains=1, inputs=companies, input_hash="ab")


def window(*cells: CellResult) -> WindowResult:
    return WindowResult(window_start=W0, window_end=W0 + DAY, cells=list(cells), epsilon=0.0,
                        delta=0.0, period_start=None)


def test_output_builds_signed_aggregate_and_receipt(material: Material) -> None:
    out, codec = output(material)
    messages, receipts = out.build(window(cell(5), cell(6, region="south")), now=W0 + 2 * DAY)
    scheme = TopicScheme(mode="public", network="mkt", member="bridge")
    assert [(t, r) for t, _, r in messages] == [(scheme.aggregate("food/milk"), True),
                                                (scheme.bridge_receipt("food/milk"), True)]
    assert parse_topic(messages[1][0]).kind == "bridge_receipt"
    body, receipt = verify_publication(aggregate_payload=messages[0][1],
                                       receipt_payload=messages[1][1], codec=codec)
    assert isinstance(body, AggregateBody) and isinstance(receipt, ReceiptBody)
    assert [c.region for c in body.cells] == ["north", "south"]
    assert receipts == [("food/milk", messages[1][1])]
    for row_id, (topic, payload, retain) in enumerate(messages):
        out.admit(OutgoingRow(id=row_id, window_start=W0, topic=topic, payload=payload,
                               retain=retain))


def test_output_refuses_a_cell_below_k_or_a_stray_stddev(material: Material) -> None:
    out, _ = output(material)
    with pytest.raises(PrivacyError, match="4 companies < k = 5"):
        out.build(window(cell(5), cell(4, region="south")), now=0)
    noisy, _ = output(material, dp={"mechanism": "laplace"})
    with pytest.raises(PrivacyError, match="standard deviation"):
        noisy.build(window(cell(5, stddev=0.1)), now=0)  # noise on: no stddev at all
    assert out.build(window(), now=0) == ([], [])  # nothing published: nothing sent


@pytest.mark.parametrize("topic, kind", [
    ("pear/v1/public/mkt/contrib/acme/food", "aggregate"),  # not the bridge's to write
    ("pear/v1/consortium/grp/acme/insights/food", "aggregate"),  # not the public broker
    ("pear/v1/public/other/aggregates/food", "aggregate"),  # another network
    ("pear/v1/public/mkt/aggregates/food", "receipt"),  # kind does not fit the topic
    ("not/a/pear/topic", "aggregate"),
])
def test_output_refuses_anything_but_its_own_messages(material: Material, topic: str,
                                                      kind: str) -> None:
    out, codec = output(material)
    payload = codec.encode(kind=kind, body={"x": 1})
    with pytest.raises(PrivacyError, match="refusing"):
        out.admit(OutgoingRow(id=1, window_start=W0, topic=topic, payload=payload,
                               retain=True))


def test_output_refuses_envelopes_signed_by_someone_else(material: Material) -> None:
    out, _ = output(material)
    node_codec = EnvelopeCodec(
        signer=Signer.from_files(key_file=material.node.key, cert_file=material.node.cert),
        trust=TrustStore.from_files(ca_files=[material.ca], network="mkt"))
    for payload in (node_codec.encode(kind="aggregate", body={}), b"raw bytes"):
        with pytest.raises(PrivacyError, match="refusing"):
            out.admit(OutgoingRow(id=1, window_start=W0, topic="pear/v1/public/mkt/"
                                   "aggregates/food", payload=payload, retain=True))


def test_verify_publication_rejects_a_mismatched_pair(material: Material) -> None:
    out, codec = output(material)
    first, _ = out.build(window(cell(5)), now=0)
    second, _ = out.build(window(cell(7)), now=0)
    with pytest.raises(PrivacyError, match="another aggregate"):
        verify_publication(aggregate_payload=second[0][1], receipt_payload=first[1][1],
                           codec=codec)
    with pytest.raises(PrivacyError, match="receipt"):
        verify_publication(aggregate_payload=first[0][1], receipt_payload=first[0][1],
                           codec=codec)


def test_ledger_message(material: Material) -> None:
    out, codec = output(material, dp={"mechanism": "laplace", "budget_per_period": 3})
    payload = out.ledger_message([LedgerEntry(period_start=0, epsilon=1.0, delta=0.0,
                                              cells=1)])
    body = codec.decode(payload, check_replay=False, max_age=math.inf).message.body
    (period,) = body["periods"]
    assert (period["epsilon_spent"], period["epsilon_remaining"], period["cells"]) == (
        1.0, 2.0, 1)
    assert body["mechanism"] == "laplace" and body["policy_version"].startswith("p")


def test_source_config_rules() -> None:
    with pytest.raises(ValueError, match="company_id and member"):
        SourceConfig(network_id="g", company_id="acme")
    s = SourceConfig(mode="private", network_id="p", company_id="acme")
    assert (s.identity_domain, s.aggregate_full) == ("p", True)


# -- the window clock and the single publish path --------------------------------------------

def test_windows_become_due_after_lag_and_settling(store: BridgeStore) -> None:
    config = BridgeConfigManager.load(env={}, **minimal(
        window_seconds=DAY, publication_lag_seconds=DAY, settle_seconds=60,
        max_settle_seconds=600))

    def due(now: float) -> list[int]:
        return due_windows(store.open_windows(), config=config, now=now)

    due_at = W0 + 2 * DAY
    store.add([new("a")], now=due_at - 30)  # live: input before it is due
    assert due(due_at - 1) == []  # lag not over
    assert due(due_at) == []  # input 30 s ago: still settling
    assert due(due_at + 30) == [W0]
    # a trickle holds it back, but not beyond max_settle after it became due
    store.add([new("b")], now=due_at + 599)
    assert due(due_at + 599) == []
    assert due(due_at + 600) == [W0]
    # backfilled history (first seen long after it was due) settles from its first input
    old = W0 - 30 * DAY
    store.add([new("c", window=old)], now=due_at + 1000)
    store.add([new("d", window=old)], now=due_at + 1050)
    assert old not in due(due_at + 1100)
    assert old in due(due_at + 1110)


def test_only_the_public_output_publishes() -> None:
    """Structural: the one call in the bridge that writes to a broker sits in
    PublicOutput.send."""
    import ast
    import pkgutil

    import pear_mqtt.bridge as package

    functions: list[tuple[str, ast.AST]] = []
    for info in pkgutil.iter_modules(package.__path__):
        path = Path(package.__path__[0]) / f"{info.name}.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for top in tree.body:
            if isinstance(top, ast.ClassDef):
                functions += [(f"{info.name}.{top.name}.{f.name}", f) for f in top.body
                              if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)]
            elif isinstance(top, ast.FunctionDef | ast.AsyncFunctionDef):
                functions.append((f"{info.name}.{top.name}", top))
    assert any(name == "output.PublicOutput.send" for name, _ in functions)
    sites = [name for name, fn in functions for call in ast.walk(fn)
             if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
             and call.func.attr in ("publish", "will_set")]
    assert sites == ["output.PublicOutput.send"], sites


# -- ingesting a backlog ----------------------------------------------------------------------

CATEGORY = "food/milk"


@dataclass
class Ingest:
    """The ingestor of a bridge reading the consortium "mkt" (no connections), its store and
    counters, and acme's node codec."""

    ingestor: Ingestor
    link: InputLink
    store: BridgeStore
    counters: BridgeCounters
    node: EnvelopeCodec
    aggregator: Any
    topic: str

    def item(self, iid: str, *, units: float = 2.0, sealed: str | None = None
             ) -> dict[str, Any]:
        """A sealed part alone (sales aggregated, nothing published), as a node sends it."""
        contribution = Contribution(company="acme", category=CATEGORY, region="north",
                                    window_start=T0, window_end=T0 + timedelta(hours=1),
                                    values={"sales_data": {"units": units}}, sample_size=1)
        token = sealed or seal(self.aggregator, contribution.model_dump_json().encode())
        return {"iid": iid, "sealed": token}

    def message(self, *items: dict[str, Any]) -> Any:
        from pear_mqtt.transport import InboundMessage

        payload = self.node.encode(kind="insights", body={"items": list(items)})
        return InboundMessage(topic=self.topic, payload=payload, qos=1, retain=False)


@pytest.fixture
def ingest(material: Material, tmp_path: Path) -> Iterator[Ingest]:
    from pear_mqtt.config.models import EncryptionConfig
    from pear_mqtt.security.seal import load_x25519_private_key

    config = BridgeConfigManager.load(env={}, **minimal(
        material, state_path=str(tmp_path / "s.sqlite"),
        consortium={"network_id": "mkt", "broker_url": "mqtts://c:8883", "tls": tls(material),
                    "encryption": {"keys": {"k1": KEY}, "active": "k1"},
                    "aggregator_key_file": str(material.x25519),
                    "data_sharing": {"sales_data": "aggregated"}},
        public={"network_id": "mkt", "broker_url": "mqtts://p:8883", "tls": tls(material),
                "contributions": False}))
    (link,) = input_links(config)
    store = BridgeStore(config.state_path)
    counters = BridgeCounters()
    ingestor = Ingestor(config=config, store=store, counters=counters, clock=lambda: W0 + DAY)
    node = EnvelopeCodec(
        signer=Signer.from_files(key_file=material.node.key, cert_file=material.node.cert),
        trust=TrustStore.from_files(ca_files=[material.ca], network="mkt"),
        encryption=EncryptionConfig(keys={"k1": KEY}, active="k1"))
    aggregator = load_x25519_private_key(material.x25519).public_key()
    topic = TopicScheme(mode="consortium", network="mkt", member="acme").insights(CATEGORY)
    try:
        yield Ingest(ingestor=ingestor, link=link, store=store, counters=counters, node=node,
                     aggregator=aggregator, topic=topic)
    finally:
        store.close()


def test_ingest_counts_a_group_of_messages_as_one_at_a_time_would(
        ingest: Ingest, monkeypatch: pytest.MonkeyPatch) -> None:
    ingestor, counters = ingest.ingestor, ingest.counters
    first = ingest.item("a")
    admit = ingestor.admit

    def failing(link: Any, parsed: Any, signer: Any, raw: Any, now: float,
                source: str) -> Any:
        if raw.get("iid") == "boom":
            raise RuntimeError("unexpected")
        return admit(link, parsed, signer, raw, now, source)

    monkeypatch.setattr(ingestor, "admit", failing)
    ingestor.ingest(ingest.link, [
        ingest.message(first, ingest.item("b")),
        ingest.message(ingest.item("boom"), ingest.item("lost")),  # dropped as a whole
        ingest.message(first, ingest.item("c")),  # a redelivered item, across messages
        ingest.message(ingest.item("d", sealed=first["sealed"])),  # a copied token
    ])
    assert (counters.items_received, counters.items_counted, counters.duplicates) == (7, 3, 1)
    assert counters.dropped == {"internal_error": 1, "copied_token": 1}
    assert sorted(r.item_id for r in ingest.store.contributions(W0)) == ["a", "b", "c"]
    (window,) = ingest.store.open_windows()
    assert window.items == 3


def test_ingest_counts_a_re_sent_observation_once_with_its_latest_values(
        ingest: Ingest) -> None:
    ingestor, counters = ingest.ingestor, ingest.counters
    first = ingest.item("obs", units=2.0)
    ingestor.ingest(ingest.link, [ingest.message(first)])
    ingestor.ingest(ingest.link, [ingest.message(first)])  # re-sent as it was
    ingestor.ingest(ingest.link, [ingest.message(ingest.item("obs", units=5.0))])  # re-read
    assert (counters.items_counted, counters.duplicates, counters.replaced) == (1, 1, 1)
    assert counters.dropped == {}
    (row,) = ingest.store.contributions(W0)
    assert row.values == {"sales_data": {"units": 5.0}}


def test_ingest_loses_only_the_message_whose_items_the_store_refuses(
        ingest: Ingest, monkeypatch: pytest.MonkeyPatch) -> None:
    ingestor, counters = ingest.ingestor, ingest.counters
    admit = ingestor.admit

    def corrupting(link: Any, parsed: Any, signer: Any, raw: Any, now: float,
                   source: str) -> Any:
        new = admit(link, parsed, signer, raw, now, source)
        if raw.get("iid") == "nan":  # cannot pass the checks; stands in for a store bug
            assert new is not None
            return new._replace(values={"sales_data": {"units": math.nan}})
        return new

    monkeypatch.setattr(ingestor, "admit", corrupting)
    ingestor.ingest(ingest.link, [ingest.message(ingest.item("a")),
                                  ingest.message(ingest.item("nan"), ingest.item("x")),
                                  ingest.message(ingest.item("b"))])
    assert (counters.items_counted, counters.dropped) == (2, {"internal_error": 1})
    assert sorted(r.item_id for r in ingest.store.contributions(W0)) == ["a", "b"]


def test_ingest_counts_nothing_of_a_group_the_store_cannot_write(ingest: Ingest) -> None:
    messages = [ingest.message(ingest.item("a")), ingest.message(ingest.item("b"))]
    ingest.store.close()  # every write fails from here on
    with pytest.raises(OutboxError):
        ingest.ingestor.ingest(ingest.link, messages)
    assert ingest.counters.items_counted == 0


def test_store_refuses_a_token_copied_within_one_batch(store: BridgeStore) -> None:
    """The ``tokens`` table alone keeps a sealed token to one item (new state files have no
    unique index on the contributions' token column): a copy in the same batch as the
    original, before or after it, is refused and the rest of the batch counted."""
    r = store.add([new("a", token=b"t1"), new("b"), new("x", source="c/grp/evil", token=b"t1")],
                  now=1.0)
    assert (r.counted, r.copied) == (2, 1)
    r = store.add([new("y", source="c/grp/evil", token=b"t2"), new("c", token=b"t2")], now=2.0)
    assert (r.counted, r.copied) == (1, 1)
    rows = {(c.source_key, c.item_id): c.token_digest for c in store.contributions(W0)}
    assert rows == {("c/grp/acme", "a"): b"t1", ("c/grp/acme", "b"): None,
                    ("c/grp/evil", "y"): b"t2"}


def test_store_batches_classify_redeliveries_and_refuse_non_finite_values(
        store: BridgeStore) -> None:
    assert store.add([new("a"), new("b", token=b"t1"), new("c")], now=1.0).counted == 3
    r = store.add([new("d"), new("a"), new("e", token=b"t1"), new("f")], now=2.0)
    assert (r.counted, r.duplicates, r.copied) == (2, 1, 1)
    (window,) = store.open_windows()
    assert (window.items, window.first_input, window.last_input) == (5, 1.0, 2.0)
    bad = new("g")._replace(values={"sales_data": {"units": math.inf}})
    with pytest.raises(ValueError, match="finite"):
        store.add([new("h"), bad], now=3.0)
    assert sorted(c.item_id for c in store.contributions(W0)) == ["a", "b", "c", "d", "f"]


# -- price histograms and the consortium output -----------------------------------------------

def bucketed(company: str, lo: float | None, hi: float | None, *, at: float = 0.0,
             domain: str = "grp", iid: str | None = None) -> StoredContribution:
    stored_buckets: dict[str, float] = {"at": at, "price.set": 1.0}
    if lo is not None:
        stored_buckets["price.lo"] = lo
    if hi is not None:
        stored_buckets["price.hi"] = hi
    return stored(company, {BUCKETS: stored_buckets}, domain=domain,
                  iid=iid or f"{company}-{at}")


def test_histogram_counts_each_companys_latest_bucket_only_with_k_companies() -> None:
    rows = [bucketed(f"co{n}", 1.0, 1.25) for n in range(3)]
    rows += [bucketed("co3", 1.25, 1.5), bucketed("co4", 1.5, None)]
    # co0 reported a higher bucket later in the window: its latest counts, once.
    rows.append(bucketed("co0", 1.5, None, at=3600.0))
    (c,) = run(rows).cells
    assert c.groups == [] and c.published
    (h,) = c.histograms
    assert (h.field, h.currency, h.companies) == ("price", "EUR", 5)
    assert [(b.lo, b.hi, b.companies) for b in h.buckets] == [(1.0, 1.25, 2), (1.25, 1.5, 1),
                                                              (1.5, None, 2)]
    assert (h.median.lo, h.median.hi) == (1.25, 1.5)
    # four companies: nothing, and counted as below_k
    few = run([r for r in rows if r.company != "co4"]).cells[0]
    assert few.histograms == [] and not few.published
    assert few.suppressed == {"below_k": 1}
    # a dominance cap below 1/k withholds it too
    assert run(rows, cap=0.1).cells[0].histograms == []


def test_histogram_across_identity_domains_counts_the_largest_domain_alone() -> None:
    rows = [bucketed(f"co{n}", 1.0, 1.25, domain="grp") for n in range(3)]
    rows += [bucketed(f"pub{n}", 1.0, 1.25, domain="mkt") for n in range(3)]
    assert run(rows).cells[0].histograms == []
    rows += [bucketed(f"co{n}", 1.0, 1.25, domain="grp") for n in range(3, 5)]
    assert [h.companies for h in run(rows, cap=0.5).cells[0].histograms] == [8]


def test_statistics_off_leaves_only_histograms() -> None:
    rows = [stored(f"co{n}", {"sales_data": {"units": 10.0 + n}}) for n in range(5)]
    rows += [bucketed(f"co{n}", 1.0, 1.25) for n in range(5)]
    full = run(rows).cells[0]
    assert full.groups and full.histograms
    only = aggregate_window(W0, rows, window_seconds=DAY, min_companies=5,
                            dominance_cap=0.25, dp=NO_DP, statistics=False).cells[0]
    assert only.groups == [] and only.histograms == full.histograms


def test_store_closes_a_window_for_the_consortium_first(store: BridgeStore) -> None:
    store.add([new("a")], now=10.0)
    assert not store.frozen(W0)
    store.close_consortium(W0, now=20.0, outgoing=[("c/t", b"C", True)])
    assert store.frozen(W0) and store.consortium_outbox_depth == 1
    with pytest.raises(OutboxError, match="consortium"):
        store.add([new("b")], now=21.0)
    # the items stay for the public close; the public outbox is untouched
    assert [c.item_id for c in store.contributions(W0)] == ["a"]
    assert store.pending() == [] and store.window_state(W0) == "open"
    (row,) = store.consortium_pending()
    store.acknowledge_consortium([row.id])
    assert store.consortium_pending() == []
    reopened = BridgeStore(store.path)
    try:
        assert reopened.frozen(W0)
    finally:
        reopened.close()


def test_consortium_output_publishes_aggregates_and_receipts_on_the_consortium_topics(
        material: Material) -> None:
    codec = EnvelopeCodec(
        signer=Signer.from_files(key_file=material.bridge.key, cert_file=material.bridge.cert),
        trust=TrustStore.from_files(ca_files=[material.ca], network="mkt"))
    config = bridge_config(material, consortium_output=True, consortium_lag_seconds=3600)
    out = PublicOutput(config=config, codec=codec, audience="consortium")
    messages, receipts = out.build(window(cell(5)), now=W0 + DAY)
    scheme = TopicScheme(mode="consortium", network="grp", member="bridge")
    assert [(t, r) for t, _, r in messages] == [(scheme.consortium_aggregate("food/milk"), True),
                                                (scheme.consortium_receipt("food/milk"), True)]
    assert parse_topic(messages[1][0]).kind == "bridge_receipt"
    assert receipts == [("food/milk", messages[1][1])]  # archived like the public ones
    body, receipt = verify_publication(aggregate_payload=messages[0][1],
                                       receipt_payload=messages[1][1], codec=codec)
    assert body.network == "grp" and body.noise is None
    assert (receipt.network, receipt.mechanism, receipt.aggregate_topic) == (
        "grp", "none", scheme.consortium_aggregate("food/milk"))
    for i, (topic, payload, retain) in enumerate(messages):
        out.admit(OutgoingRow(id=i, window_start=W0, topic=topic, payload=payload,
                              retain=retain))
    public, _ = output(material)
    pub_messages, _ = public.build(window(cell(5)), now=W0 + DAY)
    for topic, payload in ((pub_messages[0][0], pub_messages[0][1]),
                           (pub_messages[1][0], pub_messages[1][1])):
        with pytest.raises(PrivacyError, match="refusing"):  # the public's topics: not here
            out.admit(OutgoingRow(id=2, window_start=W0, topic=topic, payload=payload,
                                  retain=True))


def test_consortium_output_config_rules(material: Material) -> None:
    with pytest.raises(ConfigError, match="consortium_lag_seconds"):
        bridge_config(material, consortium_output=True, publication_lag_seconds=3600,
                      consortium_lag_seconds=7200)
    with pytest.raises(ConfigError, match="needs a consortium source"):
        BridgeConfigManager.load(env={}, consortium_output=True, public={
            "network_id": "mkt", "broker_url": "mqtts://p:8883"})
    off = bridge_config(material)
    on = bridge_config(material, consortium_output=True)
    assert on.policy_version() != off.policy_version()
    assert "consortium_lag_seconds" not in off.policy_document()


def test_due_windows_for_the_consortium_come_first(material: Material,
                                                   store: BridgeStore) -> None:
    config = bridge_config(material, consortium_output=True, consortium_lag_seconds=3600,
                           publication_lag_seconds=DAY, settle_seconds=0)
    store.add([new("a")], now=float(W0))
    windows = store.open_windows()
    at = W0 + DAY + 3600
    assert due_windows(windows, config=config, now=at,
                       lag=config.consortium_lag_seconds) == [W0]
    assert due_windows(windows, config=config, now=at) == []
    assert due_windows(windows, config=config, now=W0 + 2 * DAY) == [W0]


def test_ingest_keeps_ranges_only_price_buckets_until_the_consortium_close(
        ingest: Ingest) -> None:
    def published(iid: str, lo: float, hi: float) -> dict[str, Any]:
        shared = SharedInsight(category=CATEGORY, region="north", window_start=T0,
                               window_end=T0 + timedelta(hours=1),
                               levels={"price_data": SharingLevel.RANGES_ONLY},
                               groups={"price_data": {"currency": "EUR",
                                                      "price": ValueRange(lo=lo, hi=hi)}})
        return {"iid": iid, "insight": shared.model_dump(mode="json")}

    ingest.ingestor.ingest(ingest.link, [ingest.message(published("p1", 1.0, 1.25))])
    assert ingest.counters.items_counted == 1 and ingest.counters.ignored == 0
    (row,) = ingest.store.contributions(W0)
    assert row.currency == "EUR"
    assert row.values == {BUCKETS: {"price.lo": 1.0, "price.hi": 1.25, "price.set": 1.0,
                                    "at": float(W0)}}
    ingest.store.close_consortium(W0, now=W0 + DAY, outgoing=[])
    ingest.ingestor.ingest(ingest.link, [ingest.message(published("p2", 1.25, 1.5625))])
    assert ingest.counters.dropped == {"late": 1}
    assert [r.item_id for r in ingest.store.contributions(W0)] == ["p1"]


def test_consortium_close_with_noise_on_carries_only_histograms_and_spends_nothing(
        material: Material, tmp_path: Path) -> None:
    config = bridge_config(material, consortium_output=True, consortium_lag_seconds=3600,
                           state_path=str(tmp_path / "s.sqlite"),
                           dp={"mechanism": "laplace", "budget_per_period": 5.0})
    codec = EnvelopeCodec(
        signer=Signer.from_files(key_file=material.bridge.key, cert_file=material.bridge.cert),
        trust=TrustStore.from_files(ca_files=[material.ca], network="mkt"))
    store = BridgeStore(config.state_path)
    try:
        store.add([NewContribution(
            source_key=f"consortium/grp/co{n}", item_id=f"i{n}", window_start=W0,
            category="food/milk", region="north", domain="grp", company=f"co{n}", currency="EUR",
            values={"sales_data": {"units": 10.0 + n},
                    BUCKETS: {"at": float(W0), "price.lo": 1.0, "price.hi": 1.25,
                              "price.set": 1.0}},
            digest=bytes([n]) * 32, token_digest=None) for n in range(6)], now=float(W0))
        closer = WindowCloser(
            config=config, store=store, noise=NoiseMechanism(config.dp, rng=random.Random(1)),
            output=PublicOutput(config=config, codec=codec), counters=BridgeCounters(),
            consortium=PublicOutput(config=config, codec=codec, audience="consortium"))
        assert closer.consortium_due(store.open_windows(), W0 + DAY + 3600) == [W0]
        closer.close_consortium(W0, W0 + DAY + 3600)
        assert closer.consortium_due(store.open_windows(), W0 + DAY + 3600) == []
        row, receipt_row = store.consortium_pending()
        body = AggregateBody.model_validate(codec.decode(row.payload, check_replay=False)
                                            .message.body)
        assert parse_topic(receipt_row.topic).kind == "bridge_receipt"
        (cell,) = body.cells
        assert cell.groups == [] and body.noise is None  # no noisy statistic for members
        assert [h.companies for h in cell.histograms or ()] == [6]
        assert store.ledger() == [] and store.pending() == []
        assert len(store.contributions(W0)) == 6  # kept for the public close
    finally:
        store.close()


def test_every_withheld_statistic_and_histogram_is_counted_in_the_status(
        material: Material, tmp_path: Path) -> None:
    config = bridge_config(material, state_path=str(tmp_path / "s.sqlite"))
    codec = EnvelopeCodec(
        signer=Signer.from_files(key_file=material.bridge.key, cert_file=material.bridge.cert),
        trust=TrustStore.from_files(ca_files=[material.ca], network="mkt"))
    store = BridgeStore(config.state_path)
    counters = BridgeCounters()
    try:
        # Four companies' price buckets (a histogram below k), and units of five identities
        # in two domains (three and two: below k for the cross-domain test only).
        store.add([NewContribution(
            source_key=f"consortium/grp/co{n}", item_id=f"b{n}", window_start=W0,
            category="food/milk", region="north", domain="grp", company=f"co{n}",
            currency="EUR", values={BUCKETS: {"at": float(W0), "price.lo": 1.0,
                                              "price.hi": 1.25, "price.set": 1.0}},
            digest=bytes([n]) * 32, token_digest=None) for n in range(4)] + [NewContribution(
                source_key=f"private/p/co{n}", item_id=f"u{n}", window_start=W0,
                category="food/milk", region="north", domain="grp" if n < 3 else "mkt",
                company=f"co{n}", currency=None, values={"sales_data": {"units": 10.0}},
                digest=bytes([10 + n]) * 32, token_digest=None) for n in range(5)],
            now=float(W0))
        closer = WindowCloser(config=config, store=store, noise=None, counters=counters,
                              output=PublicOutput(config=config, codec=codec))
        closer.close(W0, W0 + 100 * DAY)
        assert counters.all_suppressed() == {"below_k": 2}
        assert counters.cells_published == 0
    finally:
        store.close()


def test_the_members_get_only_cells_of_their_own_items(material: Material,
                                                       tmp_path: Path) -> None:
    """A private source's or public participant's items reach the members neither early nor
    mixed in: their cell goes to the public alone, after the public lag."""
    config = bridge_config(material, consortium_output=True, consortium_lag_seconds=3600,
                           state_path=str(tmp_path / "s.sqlite"))
    codec = EnvelopeCodec(
        signer=Signer.from_files(key_file=material.bridge.key, cert_file=material.bridge.cert),
        trust=TrustStore.from_files(ca_files=[material.ca], network="mkt"))
    store = BridgeStore(config.state_path)
    counters = BridgeCounters()

    def units(source: str, company: str, region: str) -> NewContribution:
        iid = f"{source}-{company}-{region}"
        return NewContribution(
            source_key=f"{source}/grp/{company}", item_id=iid, window_start=W0,
            category="food/milk", region=region, domain="grp", company=company, currency=None,
            values={"sales_data": {"units": 10.0}},
            digest=hashlib.sha256(iid.encode()).digest(), token_digest=None)

    try:
        store.add([units("consortium", f"co{n}", region) for n in range(5)
                   for region in ("north", "south")]
                  + [units("private", "p9", "south")], now=float(W0))
        closer = WindowCloser(
            config=config, store=store, noise=None, counters=counters,
            output=PublicOutput(config=config, codec=codec),
            consortium=PublicOutput(config=config, codec=codec, audience="consortium"))
        closer.close_consortium(W0, W0 + DAY + 3600)
        row, _ = store.consortium_pending()
        body = AggregateBody.model_validate(codec.decode(row.payload, check_replay=False)
                                            .message.body)
        assert [c.region for c in body.cells] == ["north"]
        assert counters.all_suppressed() == {"other_sources": 1}
        closer.close(W0, W0 + 100 * DAY)
        (agg, _) = store.pending()
        public = AggregateBody.model_validate(json.loads(agg.payload)["body"])
        assert [c.region for c in public.cells] == ["north", "south"]
    finally:
        store.close()
