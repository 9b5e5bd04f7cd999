"""The privacy filter, range buckets, published identities and k-anonymous aggregation."""

from __future__ import annotations

import copy
import json
import math
import re
import string
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import pydantic
import pydantic_core
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pear_mqtt.config.models import NetworkConfig, PrivacyConfig
from pear_mqtt.errors import ConfigError, PrivacyError
from pear_mqtt.model.insight import (
    FIELD_GROUPS,
    MarketInsight,
    NetworkMode,
    PriceData,
    SalesData,
    SharingLevel,
    TrendData,
)
from pear_mqtt.privacy.aggregate import (
    AggregateOutcome,
    SuppressionCounter,
    aggregate,
    aggregate_cell,
)
from pear_mqtt.privacy.filter import (
    ADDITIVE_FIELDS,
    Contribution,
    EncodedResult,
    PrivacyFilter,
    SharedInsight,
)
from pear_mqtt.privacy.ranges import RangeScheme, ValueRange
from pear_mqtt.security.identity import Identity
from pear_mqtt.security.pseudonyms import draw_pseudonym

pytestmark = pytest.mark.unit

T0 = datetime(2024, 3, 1, tzinfo=UTC)
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

CATEGORIES = ["grocery", "grocery/dairy", "grocery/dairy/milk", "electronics/tv", "toys"]
CONFIGURED_EDGES = {"grocery": (0.5, 1.0, 2.0, 5.0, 10.0), "grocery/dairy": (0.25, 0.99, 1.49)}


def make_config(*, mode: NetworkMode = NetworkMode.CONSORTIUM, company: str = "Co-ACME",
                network: str = "net-1", node: str = "St-ONE", **privacy: Any) -> NetworkConfig:
    return NetworkConfig(mode=mode, company_id=company, network_id=network, node_id=node,
                         broker_url="mqtt://localhost:1883", allow_insecure_transport=True,
                         privacy=PrivacyConfig(**privacy))


def make_insight(**kw: Any) -> MarketInsight:
    base: dict[str, Any] = {"category": "grocery/dairy", "window_start": T0,
                            "window_end": T0 + timedelta(hours=1)}
    base.update(kw)
    return MarketInsight(**base)


# -- reference helpers (written independently of the implementation) ---------------------

def ref_edges_for(category: str, edges: dict[str, tuple[float, ...]]) -> tuple[float, ...] | None:
    levels = category.split("/")
    for n in range(len(levels), 0, -1):
        path = "/".join(levels[:n])
        if path in edges:
            return edges[path]
    return None


def ref_is_geometric_edge(x: float, ratio: float) -> bool:
    if x == 0:
        return True
    a = abs(x)
    guess = round(math.log(a) / math.log(ratio))
    for i in range(guess - 2, guess + 3):
        if i < -20:
            continue
        try:
            edge = float(f"{ratio ** i:.6g}")
        except OverflowError:
            continue
        if edge == a:
            return True
    return False


def numeric_leaves(node: Any) -> list[float]:
    if isinstance(node, bool) or node is None or isinstance(node, str):
        return []
    if isinstance(node, int | float):
        return [float(node)]
    if isinstance(node, dict):
        return [x for v in node.values() for x in numeric_leaves(v)]
    if isinstance(node, list):
        return [x for v in node for x in numeric_leaves(v)]
    raise AssertionError(f"unexpected JSON node {node!r}")


_NUMBER = re.compile(rb"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")


def significant_digits(v: float) -> int:
    mantissa = repr(abs(v)).split("e")[0].replace(".", "").lstrip("0")
    return len(mantissa.rstrip("0")) if "." in repr(v) else len(mantissa)


def group_numbers(insight: MarketInsight, group: str) -> list[float]:
    data = getattr(insight, group)
    if data is None:
        return []
    return [float(v) for v in data.model_dump().values()
            if isinstance(v, int | float) and not isinstance(v, bool)]


# -- strategies ----------------------------------------------------------------------------

money = st.one_of(
    st.floats(min_value=0, max_value=1e7, allow_nan=False, allow_infinity=False),
    st.integers(min_value=0, max_value=10**6).map(float),
    st.sampled_from([0.0, 1.0, 1.25, 0.5, 2.0, 9.99, 1234.5678]),
)
pct = st.one_of(
    st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, -1.0, -1.25, 3.3333, -0.8]),
)


@st.composite
def price_data(draw: st.DrawFn) -> PriceData:
    lo, hi = sorted([draw(money), draw(money)])
    return PriceData(currency=draw(st.sampled_from(["EUR", "USD"])),
                     price=draw(st.none() | money),
                     min_price=draw(st.none() | st.just(lo)),
                     max_price=draw(st.none() | st.just(hi)))


sales_data = st.builds(SalesData, units=st.none() | money, revenue=st.none() | money,
                       transactions=st.none() | money)
trend_data = st.builds(TrendData, price_change_pct=st.none() | pct,
                       demand_change_pct=st.none() | pct,
                       direction=st.none() | st.sampled_from(["up", "down", "flat"]))

insights = st.builds(
    make_insight,
    category=st.sampled_from(CATEGORIES),
    product_id=st.sampled_from([None, "sku-1"]),
    region=st.sampled_from(["global", "eu-west"]),
    price_data=st.none() | price_data(),
    sales_data=st.none() | sales_data,
    trends=st.none() | trend_data,
    sample_size=st.integers(min_value=1, max_value=10**6),
)

ident_tail = st.text(alphabet=string.ascii_uppercase, min_size=3, max_size=10)
company_ids = ident_tail.map(lambda s: f"Co-{s}")
store_ids = ident_tail.map(lambda s: f"St-{s}")


@st.composite
def configs(draw: st.DrawFn) -> NetworkConfig:
    mode = draw(st.sampled_from(list(NetworkMode)))
    allowed = ([SharingLevel.AGGREGATED, SharingLevel.NONE] if mode is NetworkMode.PUBLIC
               else list(SharingLevel))
    sharing = {g: draw(st.sampled_from(allowed)) for g in FIELD_GROUPS
               if draw(st.booleans())}
    return make_config(
        mode=mode, company=draw(company_ids), network=draw(st.sampled_from(["net-1", "net-2"])),
        data_sharing=sharing,
        anonymize_data=draw(st.booleans()),
        range_edges=draw(st.sampled_from([{}, CONFIGURED_EDGES])),
        range_ratio=draw(st.sampled_from([1.02, 1.25, 1.5, 2.0, 10.0])),
    )


# -- (a) nothing of a none / ranges_only / aggregated group leaks --------------------------

# The rules, restated independently of pear_mqtt.privacy.disclosure: a derived field takes
# the more restrictive of its group's level and its source's; a change is never published
# under ranges_only; text is never sealed.
_REF_ORDER = ["none", "aggregated", "ranges_only", "full"]
_REF_SOURCE = {("trends", "price_change_pct"): "price_data",
               ("trends", "direction"): "price_data",
               ("trends", "demand_change_pct"): "sales_data"}
_REF_CHANGES = {("trends", "price_change_pct"), ("trends", "demand_change_pct")}


def ref_level(levels: dict[str, SharingLevel], group: str, field: str) -> str:
    own = levels[group].value
    source = _REF_SOURCE.get((group, field))
    if source is None:
        return own
    return min(own, levels[source].value, key=_REF_ORDER.index)


def ref_published(levels: dict[str, SharingLevel], group: str, field: str) -> bool:
    level = ref_level(levels, group, field)
    if level == "ranges_only":
        return (group, field) not in _REF_CHANGES
    return level == "full"


@FAST
@given(config=configs(), insight=insights, store=store_ids)
def test_filtered_insight_never_discloses_protected_values(
        config: NetworkConfig, insight: MarketInsight, store: str) -> None:
    result = PrivacyFilter(config=config).apply(insight, store=store)
    privacy = config.privacy
    levels = {g: config.sharing_level(g) for g in FIELD_GROUPS}
    sales = levels["sales_data"].value

    def observed(g: str) -> dict[str, Any]:
        data = getattr(insight, g)
        values = {} if data is None else {k: v for k, v in data.model_dump().items()
                                          if v is not None}
        return {} if set(values) <= {"currency"} else values

    # Every field the rules let out is there; nothing else is.
    expected_fields = {(g, name) for g in FIELD_GROUPS for name in observed(g)
                       if ref_published(levels, g, name)}
    expected_size = sales in ("full", "ranges_only")
    if not expected_fields and not expected_size:
        assert result.shared is None
        raw = b""
        parsed: dict[str, Any] = {"levels": {}, "groups": {}}
    else:
        assert result.shared is not None
        raw = result.shared.model_dump_json().encode()
        parsed = json.loads(raw)
    got_fields = {(g, name) for g, fields in parsed["groups"].items() for name in fields}
    assert got_fields == expected_fields

    def is_edge(x: float, field: str) -> bool:
        edges = (ref_edges_for(insight.category, privacy.range_edges)
                 if field in ("price", "min_price", "max_price") else None)
        if edges is not None:
            return x in edges
        return ref_is_geometric_edge(x, privacy.range_ratio)

    def any_edge(x: float) -> bool:
        return is_edge(x, "price") or is_edge(x, "units")

    # Exact numbers allowed out: the sample size at full sales, fields at an effective full.
    exact_allowed = {float(insight.sample_size)} if sales == "full" else set()
    for g, name in expected_fields:
        value = observed(g)[name]
        if ref_level(levels, g, name) == "full" and not isinstance(value, str):
            exact_allowed.add(float(value))

    # Structure: levels name the published groups and the sources of published derived
    # fields, at their configured level; exact values only at an effective full, every range
    # a data-independent bucket that holds the value it replaced.
    named = {g for g, _ in expected_fields}
    named |= {_REF_SOURCE[key] for key in expected_fields if key in _REF_SOURCE}
    if expected_size:
        named.add("sales_data")
    if result.shared is not None:
        assert set(parsed["levels"]) == named == set(parsed["groups"])
    for g, level in parsed["levels"].items():
        assert level in ("full", "ranges_only")
        assert levels[g].value == level
    for g, fields in parsed["groups"].items():
        original = observed(g)
        for name, value in fields.items():
            if ref_level(levels, g, name) == "full" or isinstance(original[name], str):
                assert value == original[name]
            else:
                assert isinstance(value, dict) and set(value) == {"lo", "hi"}
                v = original[name]
                assert value["lo"] is None or value["lo"] <= v
                assert value["hi"] is None or v < value["hi"]
                for end in (value["lo"], value["hi"]):
                    assert end is None or is_edge(end, name), (g, name, end)

    # sample_size follows the sales group: exact at full, a bucket at ranges_only, else absent.
    size = parsed.get("sample_size")
    if sales == "full":
        assert size == insight.sample_size
    elif sales == "ranges_only":
        assert isinstance(size, dict) and (size["lo"] is None or size["lo"] <= insight.sample_size)
        assert size["hi"] is None or insight.sample_size < size["hi"]
        for end in (size["lo"], size["hi"]):
            assert end is None or is_edge(end, "units")
    else:
        assert size is None

    leaves = numeric_leaves(parsed)
    for x in leaves:
        assert x in exact_allowed or any_edge(x), x

    tokens = set(_NUMBER.findall(raw))
    protected = [float(v) for g in FIELD_GROUPS for name, v in observed(g).items()
                 if not isinstance(v, str) and ref_level(levels, g, name) != "full"]
    if sales != "full":
        protected.append(float(insight.sample_size))
    for v in protected:
        # Parsed level: a protected value shows up only as something data-independent
        # (an edge) or as an exact value that is itself allowed (a coincidence with a full
        # field's value or the sample size).
        if v in leaves:
            assert v in exact_allowed or any_edge(v), v
        # Byte level: the value's text, as Python and as pydantic render it.
        if significant_digits(v) >= 4:
            for text in {repr(v).encode(), pydantic_core.to_json(v)}:
                if text in tokens:
                    assert v in exact_allowed or any_edge(v), (v, text)
    for g in FIELD_GROUPS:
        if levels[g] in (SharingLevel.AGGREGATED, SharingLevel.NONE):
            assert g.encode() not in raw

    if config.mode is NetworkMode.PUBLIC:
        assert result.shared is None

    # What went to the aggregator is exactly the fields at an effective aggregated.
    expected = {}
    for g in FIELD_GROUPS:
        sealed = {name: float(v) for name, v in observed(g).items()
                  if not isinstance(v, str) and ref_level(levels, g, name) == "aggregated"}
        if sealed:
            expected[g] = sealed
    if expected:
        assert result.contribution is not None
        assert result.contribution.values == expected
        assert result.contribution.sample_size == (insight.sample_size
                                                   if sales == "aggregated" else None)
    else:
        assert result.contribution is None


# -- (c) identities: the certificate's when anonymising -------------------------------------

def certificate_identity(config: NetworkConfig) -> Identity:
    """What an operator's CA would put in this node's certificate: random pseudonyms."""
    return Identity(network=config.network_id, member=draw_pseudonym(), node=draw_pseudonym())


@FAST
@given(config=configs(), insight=insights, store=store_ids, attached=st.booleans())
def test_real_identities_never_published_when_anonymising(
        config: NetworkConfig, insight: MarketInsight, store: str, attached: bool) -> None:
    me = certificate_identity(config)
    f = PrivacyFilter(config=config, identity=me if attached else None)
    result = f.apply(insight) if attached else f.apply(insight, store=store)
    if result.shared is None:
        return  # nothing published, no identity either
    raw = result.shared.model_dump_json()
    parsed = json.loads(raw)
    if config.privacy.anonymize_data:
        assert config.company_id not in raw
        assert store not in raw and config.node_id not in raw
        # Only what the certificate names (and every peer sees on the envelope anyway).
        expected = (me.member, me.node) if attached else (None, None)
        assert (parsed.get("company"), parsed.get("store")) == expected
        if result.contribution is not None and attached:
            assert (result.contribution.company, result.contribution.store) == expected
    elif attached:
        assert (parsed["company"], parsed["store"]) == (config.company_id, config.node_id)
    else:
        assert (parsed["company"], parsed["store"]) == (config.company_id, store)


def test_anonymising_filter_publishes_the_identity_attached_on_connect() -> None:
    # (sales in ranges: with prices and sales aggregated nothing of FULL_INSIGHT is published)
    config = make_config(data_sharing={"price_data": "aggregated", "sales_data": "ranges_only"})
    f = PrivacyFilter(config=config)
    assert f.identity is None
    me = Identity(network="net-1", member="pcompany", node="pstore")
    f.attach(me)
    assert f.identity == me
    for result in (f.apply(FULL_INSIGHT), f.apply(FULL_INSIGHT, store="pstore")):
        assert (result.shared.company, result.shared.store) == ("pcompany", "pstore")
        assert result.contribution is not None
        assert (result.contribution.company, result.contribution.store) == ("pcompany",
                                                                            "pstore")
    encoded = json.loads(f.encode(FULL_INSIGHT).shared)
    assert (encoded["company"], encoded["store"]) == ("pcompany", "pstore")
    # A store's own id cannot be published in its place: only the operator maps it.
    with pytest.raises(PrivacyError, match="not the node this certificate names"):
        f.apply(FULL_INSIGHT, store="St-TWO")
    # Without anonymize_data the configured ids go out, certificate or not.
    plain = PrivacyFilter(config=make_config(anonymize_data=False), identity=me)
    shared = plain.apply(FULL_INSIGHT).shared
    assert (shared.company, shared.store) == ("Co-ACME", "St-ONE")


# -- ranges --------------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(value=finite, ratio=st.floats(min_value=1.0001, max_value=10),
       category=st.sampled_from([None, *CATEGORIES]))
def test_bucket_holds_value_and_edges_are_data_independent(
        value: float, ratio: float, category: str | None) -> None:
    scheme = RangeScheme(ratio=ratio, edges=CONFIGURED_EDGES)
    r = scheme.bucket(value, category=category)
    assert value in r
    assert (r.lo is None or r.lo <= value) and (r.hi is None or value < r.hi)
    configured = None if category is None else ref_edges_for(category, CONFIGURED_EDGES)
    for end in (r.lo, r.hi):
        if end is None:
            continue
        if configured is not None:
            assert end in configured
        else:
            assert ref_is_geometric_edge(end, ratio), end
        assert scheme.is_edge(end, category=category)
    # Data independence: any other value inside the bucket gets the very same bucket.
    for probe in (r.lo, math.nextafter(r.hi, -math.inf) if r.hi is not None else None):
        if probe is not None:
            assert scheme.bucket(probe, category=category) == r


def test_zero_and_tiny_values_share_the_tiny_bucket() -> None:
    s = RangeScheme(ratio=1.25)
    tiny = float(f"{1.25 ** -20:.6g}")
    assert s.tiny == tiny
    for v in (0.0, -0.0, 1e-300, tiny / 2):
        assert s.bucket(v, category=None) == ValueRange(lo=0.0, hi=tiny)
    assert s.bucket(tiny, category=None).lo == tiny
    assert s.bucket(-1e-300, category=None) == ValueRange(lo=-tiny, hi=0.0)
    assert s.bucket(-tiny, category=None) == ValueRange(lo=-tiny, hi=0.0)


def test_geometric_buckets_anchor_at_one_and_mirror_negatives() -> None:
    s = RangeScheme(ratio=2.0)
    assert s.bucket(1.0, category=None) == ValueRange(lo=1.0, hi=2.0)
    assert s.bucket(3.0, category=None) == ValueRange(lo=2.0, hi=4.0)
    assert s.bucket(0.3, category=None) == ValueRange(lo=0.25, hi=0.5)
    assert s.bucket(-3.0, category=None) == ValueRange(lo=-4.0, hi=-2.0)
    # Half-open on the same side: -2 is the low edge of its bucket, as 2 is for positives.
    assert s.bucket(-2.0, category=None) == ValueRange(lo=-2.0, hi=-1.0)
    assert s.bucket(-4.0, category=None) == ValueRange(lo=-4.0, hi=-2.0)


def test_geometric_edges_are_rounded_to_six_significant_digits() -> None:
    s = RangeScheme(ratio=1.1)
    r = s.bucket(5.0, category=None)
    assert r.lo is not None and r.hi is not None
    for end in (r.lo, r.hi):
        assert end == float(f"{end:.6g}")
        assert len(repr(end).replace(".", "").lstrip("0")) <= 6


@pytest.mark.parametrize("ratio", [1.001, 1.01, 1.25, 10.0])
def test_consecutive_geometric_buckets_tile_the_line(ratio: float) -> None:
    """From the tiny buckets out past 1e20 either way, every bucket starts where its
    neighbour ends: no gap, no overlap, whichever way the scheme finds a value's bucket."""
    s = RangeScheme(ratio=ratio)
    r = s.bucket(s.tiny, category=None)  # upwards: each hi is the next bucket's lo
    while r.hi is not None and r.hi < 1e20:
        above = s.bucket(r.hi, category=None)
        assert above.lo == r.hi and s.bucket(math.nextafter(r.hi, -math.inf),
                                              category=None) == r
        r = above
    r = s.bucket(-s.tiny, category=None)  # downwards: each lo is the next bucket's hi
    while r.lo is not None and r.lo > -1e20:
        assert s.bucket(r.lo, category=None) == r  # a negative edge closes its bucket
        below = s.bucket(math.nextafter(r.lo, -math.inf), category=None)
        assert below.hi == r.lo
        r = below


def test_huge_values_get_an_open_upper_end() -> None:
    s = RangeScheme(ratio=1.25)
    top = s.bucket(1.7976931348623157e308, category=None)
    assert top.hi is None and top.lo is not None
    bottom = s.bucket(-1.7976931348623157e308, category=None)
    assert bottom.lo is None and bottom.hi is not None


def test_configured_edges_with_open_ends() -> None:
    s = RangeScheme(edges={"grocery": (1.0, 2.0, 5.0)})
    assert s.bucket(0.5, category="grocery") == ValueRange(lo=None, hi=1.0)
    assert s.bucket(1.0, category="grocery") == ValueRange(lo=1.0, hi=2.0)
    assert s.bucket(4.99, category="grocery") == ValueRange(lo=2.0, hi=5.0)
    assert s.bucket(5.0, category="grocery") == ValueRange(lo=5.0, hi=None)
    assert s.bucket(-3.0, category="grocery") == ValueRange(lo=None, hi=1.0)


def test_a_value_bucketed_again_gets_the_same_bucket_for_its_own_category() -> None:
    s = RangeScheme(edges={"grocery": (1.0, 2.0, 5.0)})
    for _ in range(2):  # the second round is answered from the scheme's memory
        assert s.bucket(1.5, category="grocery") == ValueRange(lo=1.0, hi=2.0)
        assert s.bucket(1.5, category=None) == ValueRange(lo=1.25, hi=1.5625)
        assert s.bucket(1.5, category="toys") == ValueRange(lo=1.25, hi=1.5625)
        assert s.bucket(3, category="grocery") == ValueRange(lo=2.0, hi=5.0)
    with pytest.raises(PrivacyError):
        s.bucket(True, category=None)  # type: ignore[arg-type]


def test_configured_edges_use_nearest_ancestor() -> None:
    s = RangeScheme(edges=CONFIGURED_EDGES)
    assert s.edges_for("grocery/dairy/milk") == CONFIGURED_EDGES["grocery/dairy"]
    assert s.edges_for("grocery/bakery") == CONFIGURED_EDGES["grocery"]
    assert s.edges_for("grocery") == CONFIGURED_EDGES["grocery"]
    assert s.edges_for("groceryx") is None  # a path prefix, not a string prefix
    assert s.edges_for("electronics/tv") is None
    assert s.edges_for(None) is None
    assert s.bucket(1.2, category="grocery/dairy/milk") == ValueRange(lo=0.99, hi=1.49)
    assert s.bucket(1.2, category="grocery/bakery") == ValueRange(lo=1.0, hi=2.0)
    assert s.bucket(1.2, category="toys") == ValueRange(lo=1.0, hi=1.25)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_cannot_be_bucketed(value: float) -> None:
    with pytest.raises(PrivacyError):
        RangeScheme().bucket(value, category=None)


@pytest.mark.parametrize("kwargs", [
    {"ratio": 1.0}, {"ratio": math.inf}, {"ratio": 0.5},
    {"edges": {"grocery": (2.0, 1.0)}}, {"edges": {"grocery": (1.0,)}},
    {"edges": {"a/+": (1.0, 2.0)}}, {"edges": {"g": (1.0, math.nan)}},
    {"significant_digits": 1},
])
def test_range_scheme_rejects_bad_configuration(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        RangeScheme(**kwargs)


def test_value_range_validation() -> None:
    with pytest.raises(pydantic.ValidationError):
        ValueRange(lo=None, hi=None)
    with pytest.raises(pydantic.ValidationError):
        ValueRange(lo=2.0, hi=2.0)
    with pytest.raises(pydantic.ValidationError):
        ValueRange(lo=math.nan, hi=2.0)
    r = ValueRange(lo=1.0, hi=2.0)
    assert 1.0 in r and 1.5 in r and 2.0 not in r and "1.5" not in r


# -- the filter ----------------------------------------------------------------------------

FULL_INSIGHT = make_insight(
    price_data=PriceData(currency="EUR", price=1.2345, min_price=1.1111, max_price=1.3333),
    sales_data=SalesData(units=123.0, revenue=4567.89, transactions=42.0),
    trends=TrendData(price_change_pct=-2.5, demand_change_pct=4.25, direction="up"),
    sample_size=7,
)


def test_private_defaults_share_everything_with_real_ids() -> None:
    config = make_config(mode=NetworkMode.PRIVATE, anonymize_data=False)
    result = PrivacyFilter(config=config).apply(FULL_INSIGHT)
    assert result.contribution is None
    shared = result.shared
    assert (shared.company, shared.store) == ("Co-ACME", "St-ONE")
    assert shared.levels == dict.fromkeys(FIELD_GROUPS, SharingLevel.FULL)
    assert shared.groups["price_data"] == {"currency": "EUR", "price": 1.2345,
                                           "min_price": 1.1111, "max_price": 1.3333}
    assert shared.groups["trends"]["direction"] == "up"


def test_consortium_defaults_split_ranges_aggregates_and_full() -> None:
    config = make_config(range_edges={"grocery": (1.0, 1.25, 1.5)})
    me = certificate_identity(config)
    result = PrivacyFilter(config=config, identity=me).apply(FULL_INSIGHT)
    shared = result.shared
    assert shared is not None
    assert shared.levels == {"price_data": SharingLevel.RANGES_ONLY,
                             "trends": SharingLevel.FULL}
    # Category edges (via the "grocery" ancestor) apply to prices only.
    assert shared.groups["price_data"] == {
        "currency": "EUR", "price": ValueRange(lo=1.0, hi=1.25),
        "min_price": ValueRange(lo=1.0, hi=1.25), "max_price": ValueRange(lo=1.25, hi=1.5)}
    # Derived fields follow their source: the price change is not published next to price
    # ranges (it would narrow them), the direction is; the demand change and the sample size
    # (the transaction count) are sealed with the sales they derive from.
    assert shared.groups["trends"] == {"direction": "up"}
    assert shared.sample_size is None
    wire = shared.model_dump_json()
    assert "sales_data" not in wire and "-2.5" not in wire and "4.25" not in wire
    contribution = result.contribution
    assert contribution is not None
    assert contribution.values == {"sales_data": {"units": 123.0, "revenue": 4567.89,
                                                  "transactions": 42.0},
                                   "trends": {"demand_change_pct": 4.25}}
    assert contribution.sample_size == 7
    assert shared.company == contribution.company == me.member
    assert shared.store == contribution.store == me.node
    assert contribution.currency is None  # no aggregated prices


def test_ranges_only_non_price_fields_use_the_geometric_scheme() -> None:
    config = make_config(data_sharing={"sales_data": "ranges_only"},
                         range_edges={"grocery": (1.0, 2.0)})
    shared = PrivacyFilter(config=config).apply(FULL_INSIGHT).shared
    units = shared.groups["sales_data"]["units"]
    assert isinstance(units, ValueRange) and units.lo is not None and units.hi is not None
    assert units.lo <= 123.0 < units.hi and units.lo > 2.0


def test_anonymising_without_an_identity_drops_identities() -> None:
    config = make_config(data_sharing={"price_data": "aggregated",
                                       "sales_data": "ranges_only"})
    result = PrivacyFilter(config=config).apply(FULL_INSIGHT, store="St-TWO")
    assert result.shared is not None
    assert result.shared.company is None and result.shared.store is None
    raw = result.shared.model_dump_json()
    assert "Co-ACME" not in raw and "St-TWO" not in raw
    contribution = result.contribution
    assert contribution is not None
    # Sealed to the aggregator, which must still count distinct companies.
    assert contribution.company == "Co-ACME" and contribution.store is None
    assert contribution.currency == "EUR"
    assert contribution.values["price_data"] == {"price": 1.2345, "min_price": 1.1111,
                                                 "max_price": 1.3333}


def test_store_defaults_to_node_id() -> None:
    config = make_config(mode=NetworkMode.PRIVATE, anonymize_data=False, node="St-NODE")
    assert PrivacyFilter(config=config).apply(FULL_INSIGHT).shared.store == "St-NODE"


def test_empty_groups_are_absent() -> None:
    config = make_config(mode=NetworkMode.PRIVATE)
    result = PrivacyFilter(config=config).apply(make_insight(sample_size=1))
    # The sample size is the only observation; its source group is named (empty) so that a
    # receiver can check the level it is published at.
    assert result.shared is not None and result.shared.sample_size == 1
    assert result.shared.groups == {"sales_data": {}}
    assert result.shared.levels == {"sales_data": SharingLevel.FULL}
    assert result.contribution is None
    # A price group with nothing but its (default) currency holds no observation.
    only_unit = make_insight(price_data=PriceData(), trends=TrendData(direction="flat"))
    shared = PrivacyFilter(config=config).apply(only_unit).shared
    assert shared is not None
    assert shared.groups == {"trends": {"direction": "flat"}, "price_data": {},
                             "sales_data": {}}
    # Nothing to publish at all: no insight.
    quiet = make_config(mode=NetworkMode.PRIVATE, data_sharing={"sales_data": "none"})
    assert PrivacyFilter(config=quiet).apply(make_insight(sample_size=1)).shared is None


def test_aggregated_group_without_numbers_gives_no_contribution() -> None:
    config = make_config(data_sharing={"trends": "aggregated", "sales_data": "aggregated"})
    insight = make_insight(trends=TrendData(direction="up"), sales_data=SalesData())
    assert PrivacyFilter(config=config).apply(insight).contribution is None


def test_zero_and_negative_values_in_ranges() -> None:
    config = make_config(mode=NetworkMode.PRIVATE,
                         data_sharing={"trends": "ranges_only", "sales_data": "ranges_only"})
    insight = make_insight(trends=TrendData(price_change_pct=-3.3, demand_change_pct=0.0,
                                            direction="down"),
                           sales_data=SalesData(units=0.0), sample_size=3)
    f = PrivacyFilter(config=config)
    shared = f.apply(insight).shared
    assert shared is not None
    tiny = float(f"{1.25 ** -20:.6g}")
    assert shared.groups["sales_data"]["units"] == ValueRange(lo=0.0, hi=tiny)
    # Under ranges_only a change is not published, neither exact nor bucketed (with the
    # buckets of successive windows it would narrow the value below its bucket); the
    # direction is.
    assert shared.groups["trends"] == {"direction": "down"}
    assert isinstance(shared.sample_size, ValueRange) and 3 in shared.sample_size
    # Negative numbers (only changes are) fall in the mirrored buckets.
    change = f.ranges.bucket(-3.3, category=None)
    assert change.hi is not None and change.hi < 0 and -3.3 in change


def test_public_mode_publishes_no_groups() -> None:
    config = make_config(mode=NetworkMode.PUBLIC, data_sharing={"trends": "none"})
    result = PrivacyFilter(config=config).apply(FULL_INSIGHT)
    assert result.shared is None  # no message with category, window or sample size
    assert result.contribution is not None
    assert set(result.contribution.values) == {"price_data", "sales_data"}
    assert result.contribution.sample_size == 7


def test_public_mode_invariant_is_enforced_even_past_config_validation() -> None:
    good = make_config(mode=NetworkMode.PUBLIC)
    # model_copy skips validation: the filter must not trust the config to have caught it.
    bad = good.model_copy(update={"privacy": PrivacyConfig(data_sharing={"price_data": "full"})})
    with pytest.raises(PrivacyError):
        PrivacyFilter(config=bad)


def test_shared_insight_refuses_disclosing_shapes() -> None:
    common: dict[str, Any] = {"category": "grocery", "region": "global", "window_start": T0,
                              "window_end": T0}
    with pytest.raises(pydantic.ValidationError, match="holds no exact numbers"):
        SharedInsight(**common, levels={"price_data": SharingLevel.RANGES_ONLY},
                      groups={"price_data": {"price": 1.5}})
    with pytest.raises(pydantic.ValidationError, match="cannot be shared"):
        SharedInsight(**common, levels={"sales_data": SharingLevel.AGGREGATED},
                      groups={"sales_data": {}})
    with pytest.raises(pydantic.ValidationError, match="exactly the groups"):
        SharedInsight(**common, levels={}, groups={"trends": {"direction": "up"}})
    with pytest.raises(pydantic.ValidationError, match="holds exact values"):
        SharedInsight(**common, levels={"price_data": SharingLevel.FULL},
                      groups={"price_data": {"price": ValueRange(lo=1.0, hi=2.0)}})


def test_a_group_value_is_read_as_its_own_kind() -> None:
    # The union member is chosen by the value's type: text stays text even when it reads as
    # a number, a mapping is a range (or refused as one), numbers are numbers.
    body: dict[str, Any] = {"category": "grocery", "region": "global",
                            "window_start": "2026-11-01T00:00:00Z",
                            "window_end": "2026-11-01T01:00:00Z",
                            "levels": {"price_data": "ranges_only", "sales_data": "full"},
                            "groups": {"price_data": {"currency": "EUR",
                                                      "price": {"lo": 1, "hi": 2}},
                                       "sales_data": {"units": 3}}}
    shared = SharedInsight.model_validate(body)
    assert shared.groups["price_data"] == {"currency": "EUR", "price": ValueRange(lo=1, hi=2)}
    assert type(shared.groups["sales_data"]["units"]) is float
    assert SharedInsight.model_validate_json(json.dumps(body)) == shared
    for bad, rule in (({"lo": 2, "hi": 1}, "must be below"), ([1, 2], "valid number"),
                      (None, "valid number"), ("1.5", "not a number")):
        hostile = copy.deepcopy(body)
        hostile["groups"]["price_data"]["price"] = bad
        with pytest.raises(pydantic.ValidationError, match=rule):
            SharedInsight.model_validate(hostile)


F_, R_ = SharingLevel.FULL, SharingLevel.RANGES_ONLY
RANGE_ = ValueRange(lo=1.0, hi=1.25)


@pytest.mark.parametrize(("levels", "groups", "size", "match"), [
    # an exact price change next to price ranges: combined, they narrow the price
    ({"price_data": R_, "trends": F_}, {"price_data": {"price": RANGE_},
                                        "trends": {"price_change_pct": 1.5}}, None,
     "price_change_pct: not published"),
    # a bucketed change (under ranges_only a change is not published at all)
    ({"price_data": F_, "trends": R_}, {"price_data": {}, "trends": {
        "price_change_pct": RANGE_}}, None, "price_change_pct: not published"),
    ({"sales_data": R_, "trends": R_}, {"sales_data": {"units": RANGE_}, "trends": {
        "demand_change_pct": RANGE_}}, None, "demand_change_pct: not published"),
    # a change or direction whose source's level is not named (aggregated or none)
    ({"trends": F_}, {"trends": {"demand_change_pct": 2.0}}, None,
     "demand_change_pct: not published"),
    ({"trends": F_}, {"trends": {"direction": "up"}}, None, "direction: not published"),
    # the sample size follows sales: exact only at full, a bucket only at ranges_only
    ({"sales_data": R_}, {"sales_data": {"units": RANGE_}}, 7, "needs sales_data at full"),
    ({"price_data": F_}, {"price_data": {"price": 1.0}}, 7, "needs sales_data at full"),
    ({"sales_data": F_}, {"sales_data": {"units": 2.0}}, RANGE_,
     "needs sales_data at ranges_only"),
    # fields a group does not have, and text where numbers go (or bad text)
    ({"trends": F_, "price_data": F_}, {"trends": {"price_change": 1.0}, "price_data": {}},
     None, "not a field of trends"),
    ({"price_data": F_}, {"price_data": {"price": "1.2345"}}, None, "not a number"),
    ({"price_data": F_, "trends": F_}, {"price_data": {}, "trends": {"direction": "1.2345"}},
     None, "not a valid direction"),
    ({"price_data": F_}, {"price_data": {"currency": "1.23", "price": 1.0}}, None,
     "not a valid currency"),
    # a group named with nothing that needs it
    ({"price_data": F_, "sales_data": F_}, {"price_data": {"price": 1.0}, "sales_data": {}},
     None, "is empty"),
    # nothing shared at all: no insight
    ({}, {}, None, "shares nothing"),
])
def test_shared_insight_refuses_what_derived_fields_may_not_disclose(
        levels: dict[str, SharingLevel], groups: dict[str, Any], size: Any,
        match: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=match):
        SharedInsight(category="grocery", region="global", window_start=T0, window_end=T0,
                      sample_size=size, levels=levels, groups=groups)


def test_shared_insight_accepts_what_the_rules_allow() -> None:
    common: dict[str, Any] = {"category": "grocery", "region": "global", "window_start": T0,
                              "window_end": T0}
    # the direction next to price ranges; the source group named, empty
    SharedInsight(**common, levels={"price_data": R_, "trends": F_},
                  groups={"price_data": {}, "trends": {"direction": "up"}})
    # exact changes where their sources are exact; the exact sample size with full sales
    SharedInsight(**common, sample_size=3, levels={"price_data": F_, "sales_data": F_,
                                                   "trends": F_},
                  groups={"price_data": {"price": 1.0}, "sales_data": {},
                          "trends": {"price_change_pct": -1.0, "demand_change_pct": 2.0}})
    # a bucketed sample size with sales ranges
    SharedInsight(**common, sample_size=RANGE_, levels={"sales_data": R_},
                  groups={"sales_data": {}})


LEVELS = ["full", "ranges_only", "aggregated", "none"]


@pytest.mark.parametrize("trends", LEVELS)
@pytest.mark.parametrize("prices", LEVELS)
@pytest.mark.parametrize("sales", LEVELS)
def test_derived_fields_follow_their_source(trends: str, prices: str, sales: str) -> None:
    """Every combination of levels in a consortium: where each trend field and the sample
    size go (published exact, published as a bucket, sealed, or nowhere)."""
    config = make_config(data_sharing={"trends": trends, "price_data": prices,
                                       "sales_data": sales})
    result = PrivacyFilter(config=config).apply(FULL_INSIGHT)
    published = result.shared.groups.get("trends", {}) if result.shared else {}
    sealed = result.contribution.values.get("trends", {}) if result.contribution else {}

    def where(source: str) -> str:
        effective = min(trends, source, key=LEVELS[::-1].index)
        return {"full": "exact", "ranges_only": "absent", "aggregated": "sealed",
                "none": "absent"}[effective]

    for name, source, value in (("price_change_pct", prices, -2.5),
                                ("demand_change_pct", sales, 4.25)):
        want = where(source)
        assert (published.get(name) == value) == (want == "exact"), name
        assert (sealed.get(name) == value) == (want == "sealed"), name
        assert (name in published) == (want == "exact") and (name in sealed) == (
            want == "sealed"), name
    direction_out = min(trends, prices, key=LEVELS[::-1].index) in ("full", "ranges_only")
    assert (published.get("direction") == "up") == direction_out
    size = result.shared.sample_size if result.shared else None
    if sales == "full":
        assert size == 7
    elif sales == "ranges_only":
        assert isinstance(size, ValueRange) and 7 in size
    else:
        assert size is None
    assert (result.contribution.sample_size if result.contribution else None) == (
        7 if sales == "aggregated" else None)
    # every group the message names is at its configured level
    if result.shared is not None:
        for g, level in result.shared.levels.items():
            assert level.value == {"price_data": prices, "sales_data": sales,
                                   "trends": trends}[g]


@pytest.mark.parametrize("mode", list(NetworkMode))
def test_none_for_every_group_publishes_and_seals_nothing(mode: NetworkMode) -> None:
    config = make_config(mode=mode, data_sharing=dict.fromkeys(FIELD_GROUPS, "none"))
    result = PrivacyFilter(config=config).apply(FULL_INSIGHT)
    assert result.shared is None and result.contribution is None
    encoded = PrivacyFilter(config=config).encode(FULL_INSIGHT)
    assert encoded.shared is None and encoded.contribution is None


@pytest.mark.parametrize(("mode", "published", "sealed"), [
    (NetworkMode.PRIVATE, {"price_data", "sales_data", "trends"}, set()),
    (NetworkMode.CONSORTIUM, {"price_data", "trends"}, {"sales_data", "trends"}),
    (NetworkMode.PUBLIC, set(), {"price_data", "sales_data", "trends"}),
])
def test_each_modes_defaults(mode: NetworkMode, published: set[str], sealed: set[str]) -> None:
    result = PrivacyFilter(config=make_config(mode=mode)).apply(FULL_INSIGHT)
    assert set(result.shared.groups if result.shared else ()) == published
    assert set(result.contribution.values if result.contribution else ()) == sealed
    if mode is NetworkMode.PRIVATE:
        assert result.shared is not None and result.shared.sample_size == 7
        assert result.shared.groups["trends"] == {"price_change_pct": -2.5,
                                                  "demand_change_pct": 4.25,
                                                  "direction": "up"}
    elif mode is NetworkMode.PUBLIC:
        assert result.contribution is not None and result.contribution.sample_size == 7
        assert result.contribution.values["trends"] == {"price_change_pct": -2.5,
                                                        "demand_change_pct": 4.25}


@settings(max_examples=200, deadline=None)
@given(insight=insights, transactions=st.integers(min_value=1, max_value=10**6))
def test_sample_size_never_shows_a_sealed_value_under_consortium_defaults(
        insight: MarketInsight, transactions: int) -> None:
    """The simulator (and most sources) set the sample size to the transaction count, which
    the consortium seals: no published number may equal it unless it is a bucket edge."""
    sales = SalesData(units=float(transactions) * 3, revenue=float(transactions) * 7.5,
                      transactions=float(transactions))
    insight = insight.model_copy(update={"sales_data": sales, "sample_size": transactions})
    f = PrivacyFilter(config=make_config())
    result = f.apply(insight)
    encoded = f.encode(insight)
    if result.shared is None:
        assert encoded.shared is None
    else:
        assert result.shared.sample_size is None
        assert encoded.shared is not None and b"sample_size" not in encoded.shared
        sealed = {float(v) for v in sales.model_dump().values()}
        for x in numeric_leaves(json.loads(encoded.shared)):
            assert x not in sealed or f.ranges.is_edge(x, category=insight.category) or (
                f.ranges.is_edge(x, category=None)), x
    assert result.contribution is not None
    assert result.contribution.sample_size == transactions


def test_shared_insight_round_trips_through_json() -> None:
    config = make_config(data_sharing={"price_data": "ranges_only", "trends": "full"})
    shared = PrivacyFilter(config=config, identity=certificate_identity(config)).apply(
        FULL_INSIGHT).shared
    assert SharedInsight.model_validate_json(shared.model_dump_json()) == shared


def test_seed_configuration_filters() -> None:
    config = NetworkConfig(
        mode=NetworkMode.PRIVATE, company_id="example_company", node_id="store-1",
        broker_url="mqtt://localhost:1883", allow_insecure_transport=True,
        privacy=PrivacyConfig(anonymize_data=True, encrypt_connection=True, data_sharing={
            "price_data": "ranges_only", "sales_data": "aggregated", "trends": "full"}))
    result = PrivacyFilter(config=config).apply(FULL_INSIGHT)
    assert set(result.shared.groups) == {"price_data", "trends"}
    assert result.contribution is not None


# -- (b) aggregation -----------------------------------------------------------------------

agg_value = st.one_of(st.floats(min_value=0, max_value=1e6, allow_nan=False),
                      st.integers(min_value=0, max_value=1000).map(float), st.just(0.0))


@st.composite
def contribution_sets(draw: st.DrawFn) -> list[Contribution]:
    n_companies = draw(st.integers(min_value=1, max_value=8))
    out = []
    for _ in range(draw(st.integers(min_value=0, max_value=24))):
        company = f"c{draw(st.integers(min_value=0, max_value=n_companies - 1))}"
        values = {}
        sales = {f: draw(agg_value) for f in ("units", "revenue") if draw(st.booleans())}
        if sales:
            values["sales_data"] = sales
        prices = {f: draw(agg_value) for f in ("price",) if draw(st.booleans())}
        if prices:
            values["price_data"] = prices
        out.append(Contribution(
            company=company, store=f"s{draw(st.integers(min_value=0, max_value=3))}",
            category="grocery", region="global", window_start=T0, window_end=T0,
            currency="EUR" if prices else None, values=values))
    return out


def ref_per_company(contributions: list[Contribution], group: str,
                    field: str) -> dict[str, list[Fraction]]:
    out: dict[str, list[Fraction]] = {}
    for c in contributions:
        if field in c.values.get(group, {}):
            out.setdefault(c.company, []).append(Fraction(c.values[group][field]))
    return out


@settings(max_examples=200, deadline=None)
@given(contributions=contribution_sets(), k=st.integers(min_value=2, max_value=6),
       cap=st.floats(min_value=0.05, max_value=1.0))
def test_aggregates_respect_k_and_dominance(contributions: list[Contribution], k: int,
                                            cap: float) -> None:
    counter = SuppressionCounter()
    outcomes = aggregate_cell(contributions, min_companies=k, dominance_cap=cap,
                              counter=counter)
    total_suppressed = 0
    for group, outcome in outcomes.items():
        fields = {f for c in contributions for f in c.values.get(group, {})}
        assert set(outcome.statistics) | set(outcome.suppressed) == fields
        assert not set(outcome.statistics) & set(outcome.suppressed)
        total_suppressed += len(outcome.suppressed)
        for field in fields:
            per_company = ref_per_company(contributions, group, field)
            additive = field in ADDITIVE_FIELDS
            combined = {co: sum(vs) if additive else sum(vs) / len(vs)
                        for co, vs in per_company.items()}
            weights = combined if additive else {co: Fraction(len(vs))
                                                 for co, vs in per_company.items()}
            total = sum(weights.values())
            shares = ([w / total for w in weights.values()] if total > 0
                      else [Fraction(1, len(weights))] * len(weights))
            if field in outcome.statistics:
                stats = outcome.statistics[field]
                assert stats.companies == len(per_company) >= k
                assert float(max(shares)) <= cap * (1 + 1e-12)
                assert stats.count == sum(len(vs) for vs in per_company.values())
                ref_mean = sum(combined.values()) / len(combined)
                assert math.isclose(stats.mean, float(ref_mean), rel_tol=1e-9, abs_tol=1e-9)
                if additive:
                    assert stats.sum is not None
                    assert math.isclose(stats.sum, float(sum(combined.values())),
                                        rel_tol=1e-9, abs_tol=1e-9)
                else:
                    assert stats.sum is None
                if stats.companies >= 3:
                    ref_var = sum((x - ref_mean) ** 2 for x in combined.values()) / len(combined)
                    assert stats.stddev is not None
                    assert math.isclose(stats.stddev, math.sqrt(ref_var), rel_tol=1e-6,
                                        abs_tol=1e-6)
                else:
                    assert stats.stddev is None
                assert set(type(stats).model_fields) == {"count", "companies", "mean",
                                                         "stddev", "sum"}
            else:
                reason = outcome.suppressed[field]
                if len(per_company) < k:
                    assert reason == "below_k"
                else:
                    assert reason == "dominance"
                    assert float(max(shares)) >= cap * (1 - 1e-12)
    assert counter.total == total_suppressed


def _c(company: str, group: str = "sales_data", **values: float) -> Contribution:
    return Contribution(company=company, category="grocery", region="global",
                        window_start=T0, window_end=T0, values={group: values},
                        currency="EUR" if group == "price_data" else None)


def test_below_k_is_suppressed() -> None:
    out = aggregate([_c("a", units=1), _c("b", units=1)], group="sales_data",
                    min_companies=3, dominance_cap=1.0)
    assert out.statistics == {} and out.suppressed == {"units": "below_k"}
    assert out.suppression_counts() == {"below_k": 1}


def test_stores_of_one_company_count_once() -> None:
    many_stores = [_c("a", units=1) for _ in range(10)]
    out = aggregate([*many_stores, _c("b", units=1)], group="sales_data",
                    min_companies=3, dominance_cap=1.0)
    assert out.suppressed == {"units": "below_k"}


def test_dominant_company_is_suppressed() -> None:
    cs = [_c("a", units=100), _c("b", units=1), _c("c", units=1), _c("d", units=1),
          _c("e", units=1)]
    out = aggregate(cs, group="sales_data", min_companies=5, dominance_cap=0.25)
    assert out.suppressed == {"units": "dominance"}


def test_share_exactly_at_cap_is_published() -> None:
    cs = [_c(co, units=10) for co in "abcd"]
    out = aggregate(cs, group="sales_data", min_companies=4, dominance_cap=0.25)
    stats = out.statistics["units"]
    assert (stats.count, stats.companies, stats.mean, stats.sum, stats.stddev) == (
        4, 4, 10.0, 40.0, 0.0)


def test_non_additive_fields_average_per_company_and_weigh_by_contributions() -> None:
    # Company a's three stores average to 2.0; every company then counts once in the mean.
    cs = [_c("a", "price_data", price=1.0), _c("a", "price_data", price=2.0),
          _c("a", "price_data", price=3.0), _c("b", "price_data", price=4.0),
          _c("c", "price_data", price=6.0), _c("d", "price_data", price=8.0)]
    out = aggregate(cs, group="price_data", min_companies=4, dominance_cap=0.5)
    stats = out.statistics["price"]
    assert stats.mean == pytest.approx(5.0) and stats.sum is None and stats.count == 6
    assert out.currency == "EUR"
    # a holds 3 of 6 contributions: a cap below one half suppresses it.
    out = aggregate(cs, group="price_data", min_companies=4, dominance_cap=0.4)
    assert out.suppressed == {"price": "dominance"}


def test_stddev_withheld_for_two_companies() -> None:
    out = aggregate([_c("a", units=1), _c("b", units=3)], group="sales_data",
                    min_companies=2, dominance_cap=1.0)
    assert out.statistics["units"].stddev is None
    assert out.statistics["units"].mean == 2.0


def test_all_zero_additive_field_counts_as_equal_shares() -> None:
    cs = [_c(co, units=0) for co in "abcd"]
    out = aggregate(cs, group="sales_data", min_companies=4, dominance_cap=0.25)
    assert out.statistics["units"].sum == 0.0
    out = aggregate(cs, group="sales_data", min_companies=4, dominance_cap=0.2)
    assert out.suppressed == {"units": "dominance"}


def test_no_min_max_or_median_in_output() -> None:
    cs = [_c(co, units=i) for i, co in enumerate("abcde")]
    out = aggregate(cs, group="sales_data", min_companies=3, dominance_cap=0.5)
    dumped = out.model_dump_json()
    for word in ("min", "max", "median"):
        assert word not in dumped


def test_mixed_currencies_are_refused() -> None:
    usd = Contribution(company="b", category="grocery", region="global", window_start=T0,
                       window_end=T0, currency="USD", values={"price_data": {"price": 1.0}})
    with pytest.raises(PrivacyError):
        aggregate([_c("a", "price_data", price=1.0), usd], group="price_data",
                  min_companies=2, dominance_cap=1.0)


@pytest.mark.parametrize(("k", "cap"), [(1, 0.5), (0, 0.5), (3, 0.0), (3, 1.5)])
def test_thresholds_that_protect_nothing_are_refused(k: int, cap: float) -> None:
    with pytest.raises(PrivacyError):
        aggregate([], group="sales_data", min_companies=k, dominance_cap=cap)


def test_empty_contributions_and_cell_helper() -> None:
    out = aggregate([], group="sales_data", min_companies=3, dominance_cap=0.5)
    assert out == AggregateOutcome(group="sales_data", statistics={}, suppressed={})
    counter = SuppressionCounter()
    cs = [_c(co, units=1, revenue=5) for co in "abc"] + [_c("a", "price_data", price=2.0)]
    outcomes = aggregate_cell(cs, min_companies=3, dominance_cap=0.5, counter=counter)
    assert set(outcomes) == {"price_data", "sales_data"}
    assert set(outcomes["sales_data"].statistics) == {"units", "revenue"}
    assert outcomes["price_data"].suppressed == {"price": "below_k"}
    assert counter.counts == {"below_k": 1} and counter["dominance"] == 0


def test_contribution_validation() -> None:
    with pytest.raises(pydantic.ValidationError):
        _c("a", units=-1)
    with pytest.raises(pydantic.ValidationError):
        _c("a", units=math.nan)
    with pytest.raises(pydantic.ValidationError):
        Contribution(company="a", category="grocery", region="global", window_start=T0,
                     window_end=T0, values={"secrets": {"x": 1.0}})
    assert _c("a", "trends", price_change_pct=-4.0).values["trends"]["price_change_pct"] == -4.0


def test_aggregate_uses_config_thresholds() -> None:
    privacy = PrivacyConfig()
    cs = [_c(co, units=1) for co in "abcd"]
    out = aggregate(cs, group="sales_data", min_companies=privacy.min_companies,
                    dominance_cap=privacy.dominance_cap)
    assert out.suppressed == {"units": "below_k"}  # default k is 5


@given(config=configs(), insight=insights, store=store_ids)
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_encode_is_apply_serialised(config: NetworkConfig, insight: MarketInsight,
                                    store: str) -> None:
    """The node's fast path (``encode``: no models built) sends exactly what ``apply`` means,
    and receivers and the aggregator parse it back to the same models."""
    f = PrivacyFilter(config=config)
    try:
        expected = f.apply(insight, store=store)
    except PrivacyError:
        with pytest.raises(PrivacyError):
            f.encode(insight, store=store)
        return
    got = f.encode(insight, store=store)
    if expected.shared is None:
        assert got.shared is None
    else:
        assert got.shared is not None
        assert SharedInsight.model_validate_json(got.shared) == expected.shared
    if expected.contribution is None:
        assert got.contribution is None
    else:
        assert got.contribution is not None
        assert Contribution.model_validate_json(got.contribution) == expected.contribution


@given(config=configs(), batch=st.lists(insights, min_size=1, max_size=6), store=store_ids)
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
def test_encode_many_is_encode_per_insight(config: NetworkConfig, batch: list[MarketInsight],
                                          store: str) -> None:
    """The batch path sends exactly what encoding each insight alone sends, and refuses a
    batch at the first insight encoding alone refuses, naming its position."""
    f = PrivacyFilter(config=config)
    expected: list[EncodedResult] = []
    for position, insight in enumerate(batch):
        try:
            expected.append(f.encode(insight, store=store))
        except PrivacyError:
            with pytest.raises(PrivacyError, match=f"^insight {position} of the batch: "):
                f.encode_many(batch, store=store)
            return
    assert f.encode_many(batch, store=store) == expected


def test_open_ended_ranges_survive_the_wire() -> None:
    """A bucket with an open end (a value below the first configured edge) is sent without
    its None member and must still parse at the receiver (it was dropped as malformed)."""
    config = make_config(data_sharing={"price_data": SharingLevel.RANGES_ONLY},
                         range_edges={"grocery": (1.0, 2.0)})
    insight = make_insight(category="grocery/dairy", price_data=PriceData(price=0.5))
    shared = PrivacyFilter(config=config).apply(insight).shared
    wire = shared.model_dump_json(exclude_none=True)
    assert '"lo"' not in wire
    assert SharedInsight.model_validate_json(wire) == shared
