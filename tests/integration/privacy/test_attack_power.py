"""The attacks can see what they look for: each is run on a capture built to leak it.

A held bound means something only if the attack would have noticed the leak, so each attack
gets one by construction, independent of what the library publishes: pseudonyms keyed by a
secret in the attacker's config (a), exact changes beside buckets (b), the sample size equal
to the sealed transactions (c), a clear store name in a topic (d), aggregates that count a
re-sent observation twice (e), and hourly cells beside their day with one hour suppressed (f).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import privacy_attacks as attacks
from privacy_report import ATTACKS, load, render
from privacykit import POLICIES, Capture, Observation, WireMessage, first_hour, market

from pear_mqtt.bridge.status import BridgeStatus
from pear_mqtt.config.models import PrivacyConfig
from pear_mqtt.model.insight import Health
from pear_mqtt.privacy.aggregate import aggregate_cell
from pear_mqtt.privacy.filter import Contribution
from pear_mqtt.privacy.ranges import RangeScheme
from pear_mqtt.security.identity import Identity

NETWORK = "net"
COMPANIES = ("acme", "globex", "initech", "umbrella", "hooli", "wayne")
ATTACKER = COMPANIES[-1]
IDS = {c: Identity(network=NETWORK, member=f"p{c}", node="n1") for c in COMPANIES}
BRIDGE = Identity(network=NETWORK, member="bridge", node="bridge")


def capture(truth: Sequence[Observation], wire: Iterable[WireMessage], *,
            resent: Sequence[Observation] = (), ids: Mapping[str, Identity] = IDS,
            files: tuple[Path, ...] = ()) -> Capture:
    return Capture(
        policy=POLICIES[1], levels={"price_data": "ranges_only", "sales_data": "aggregated",
                                    "trends": "full"},
        attacker=ATTACKER, attacker_ids=frozenset({ids[ATTACKER]}), attacker_files=files,
        scheme=PrivacyConfig(), companies=COMPANIES, stores=("store-1",), truth=tuple(truth),
        identities={(i.member, i.node): (c, "store-1") for c, i in ids.items()},
        wire=tuple(wire), snapshot=(), resent=tuple(resent), replays={}, barriers=0,
        bridge=BridgeStatus(health=Health.OK, connected=True, public_connected=True,
                            sources={}, policy_version="p"),
        min_companies=5, dominance_cap=0.25, window_seconds=86400, private_attempts=None,
        seconds=0.0)


def message(signer: Identity, kind: str, body: Any, *, topic: str | None = None
            ) -> WireMessage:
    return WireMessage(network=NETWORK, topic=topic or f"pear/v1/consortium/{NETWORK}/x",
                       payload=b"", snapshot=False, signer=signer, kind=kind, body=body,
                       cert_names=(), error=None)


def shared(o: Observation, groups: dict[str, Any], levels: dict[str, str], *,
           sample_size: float = 1) -> dict[str, Any]:
    """A state body holding ``o`` as an insight publishing ``groups``."""
    i = o.insight
    return {"iid": f"{o.company}{i.category}{i.window_start}", "insight": {
        "category": i.category, "region": i.region, "window_start": i.window_start,
        "window_end": i.window_end, "sample_size": sample_size, "levels": levels,
        "groups": groups}}


def truth() -> list[Observation]:
    return market({(c, "store-1"): c for c in COMPANIES}, start=first_hour(), early="acme")


def aggregate(observations: Sequence[Observation], start: float, end: float,
              category: str) -> WireMessage | None:
    """The aggregate a bridge would publish for one window, from ``observations``."""
    chosen = [o for o in observations if o.insight.category == category
              and start <= o.insight.window_start.timestamp() < end]
    contributions = [Contribution(
        company=o.company, category=category, region=o.insight.region,
        window_start=o.insight.window_start, window_end=o.insight.window_end,
        values={"sales_data": {k: float(v) for k, v in vars(o.insight.sales_data).items()
                               if v is not None}}) for o in chosen if o.insight.sales_data]
    outcomes = aggregate_cell(contributions, min_companies=5, dominance_cap=0.25)
    fields = {n: s.model_dump(exclude_none=True)
              for o in outcomes.values() for n, s in o.statistics.items()}
    if not fields:
        return None
    iso = [datetime.fromtimestamp(t, UTC).isoformat() for t in (start, end)]
    return message(BRIDGE, "aggregate", {
        "category": category, "window_start": iso[0], "window_end": iso[1],
        "cells": [{"region": "global", "groups": [{"group": "sales_data", "fields": fields}]}]})


def test_a_finds_pseudonyms_keyed_by_a_secret_in_its_config(tmp_path: Path) -> None:
    secret = b"the-network-secret"
    config = tmp_path / "attacker.toml"
    config.write_text(f'[privacy]\npseudonym_secret = "{secret.decode()}"\n')
    ids = {c: Identity(network=NETWORK,
                       member=attacks.keyed_pseudonym(secret, NETWORK, "company", c),
                       node=attacks.keyed_pseudonym(secret, NETWORK, "store", f"{c}/store-1"))
           for c in COMPANIES}
    wire = [message(i, "presence", {"online": True}) for i in ids.values()]
    finding = attacks.dictionary(capture(truth(), wire, ids=ids, files=(config,)))
    assert finding.metrics["own_reproduced"]
    assert not finding.held and len(finding.metrics["reversed_companies"]) == 5, \
        finding.learned


def test_b_finds_a_price_narrowed_by_exact_changes() -> None:
    obs = truth()
    scheme = RangeScheme.from_config(PrivacyConfig())
    wire = []
    for o in obs:
        i = o.insight
        assert i.price_data is not None and i.trends is not None
        bucket = scheme.bucket(i.price_data.price or 0.0, category=i.category)
        groups: dict[str, Any] = {"price_data": {"price": bucket.model_dump()}}
        levels = {"price_data": "ranges_only"}
        if i.trends.price_change_pct is not None:
            groups["trends"] = {"price_change_pct": i.trends.price_change_pct}
            levels["trends"] = "full"
        wire.append(message(IDS[o.company], "state", shared(o, groups, levels)))
    finding = attacks.interval(capture(obs, wire))
    assert finding.metrics["unsound"] == 0
    assert not finding.held and finding.metrics["narrower"] > 0, finding.learned


def test_c_finds_a_sample_size_equal_to_the_sealed_transactions() -> None:
    obs = truth()
    wire = [message(IDS[o.company], "state",
                    shared(o, {}, {}, sample_size=o.insight.sales_data.transactions or 0))
            for o in obs if o.insight.sales_data is not None]
    finding = attacks.linking(capture(obs, wire))
    assert not finding.held and finding.metrics["links"] == ["sample_size=transactions"], \
        finding.learned


def test_d_finds_a_clear_store_name_in_a_topic() -> None:
    acme = IDS["acme"]
    topic = f"pear/v1/consortium/{NETWORK}/{acme.member}/nodes/store-1"
    finding = attacks.names(capture(truth(), [message(acme, "presence", {}, topic=topic)]))
    assert not finding.held and finding.metrics["named"] == {"acme": ["store-1"]}, \
        finding.learned


def test_e_finds_an_aggregate_that_counts_a_resend_twice() -> None:
    obs = truth()
    last = max(o.insight.window_start for o in obs)
    resent = [o for o in obs if o.company == ATTACKER and o.insight.window_start == last]
    day = int(last.timestamp() // 86400) * 86400
    wire = [m for c in {o.insight.category for o in obs}
            if (m := aggregate([*obs, *resent], day, day + 86400, c)) is not None]
    finding = attacks.skew(capture(obs, wire, resent=resent))
    assert not finding.held and finding.metrics["moved"] > 0, finding.learned


def test_f_finds_one_hour_left_out_of_the_hourly_cells() -> None:
    obs = truth()
    first = min(o.insight.window_start for o in obs).timestamp()  # acme alone that hour
    day = math.floor(first / 86400) * 86400
    category = obs[0].insight.category
    wire = [aggregate(obs, day, day + 86400, category)]
    wire += [aggregate(obs, h, h + 3600, category)
             for h in range(int(first), day + 86400, 3600)]
    finding = attacks.differencing(capture(obs, [m for m in wire if m is not None]))
    assert not finding.held and finding.metrics["derived"] > 0, finding.learned


def test_the_report_renders_every_row(tmp_path: Path) -> None:
    rows = [{"attack": a, "policy": p.name, "levels": {}, "learned": "x | y", "bound": "0",
             "held": a != "b", "metrics": {}, "order": p.order}
            for a in ATTACKS for p in POLICIES]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = render(load(results))
    assert text.count("**not held**") == len(POLICIES)
    assert "x \\| y" in text
