"""Item ids: derived from what an insight describes, keyed by the node's private key."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from pear_mqtt.model.insight import MarketInsight, PriceData
from pear_mqtt.node.item_ids import ItemIds
from pear_mqtt.security import pki
from pear_mqtt.security.signing import Signer

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ids-pki")
    pki.create_ca(directory=root / "ca", network="net")
    return root


def signer(root: Path, member: str, node: str, *, out: str = "out",
           key_type: Any = None) -> Signer:
    kw = {} if key_type is None else {"key_type": key_type}
    paths = pki.issue(ca_dir=root / "ca", out_dir=root / out, role="node", member=member,
                      node=node, force=True, **kw)
    return Signer.from_files(key_file=paths.key, cert_file=paths.cert)


def observation(**kw: Any) -> MarketInsight:
    base: dict[str, Any] = {"category": "grocery/dairy", "region": "north",
                            "window_start": T0, "window_end": T0 + timedelta(hours=1),
                            "price_data": PriceData(price=2.5)}
    return MarketInsight(**{**base, **kw})


def test_an_observation_keeps_its_id(ca: Path) -> None:
    s = signer(ca, "acme", "store-1")
    ids = ItemIds(s)
    first = ids.of(observation())
    assert re.fullmatch(r"[0-9a-f]{32}", first)  # 128 bits, hex
    # re-sent with other values, or re-read by another process of the same node (key file)
    assert ids.of(observation(price_data=PriceData(price=9.0), sample_size=4)) == first
    assert ItemIds(Signer.from_files(key_file=ca / "out" / "node-acme-store-1.key",
                                     cert_file=ca / "out" / "node-acme-store-1.crt")
                   ).of(observation()) == first
    # each part of the description is part of the id
    others = {ids.of(observation(category="grocery/bakery")),
              ids.of(observation(product_id="sku-1")),
              ids.of(observation(region="south")),
              ids.of(observation(window_start=T0 - timedelta(hours=1))),
              ids.of(observation(window_end=T0 + timedelta(hours=2)))}
    assert len(others) == 5 and first not in others
    # same moment in another time zone: the same window
    cet = timezone(timedelta(hours=1))
    assert ids.of(observation(window_start=T0.astimezone(cet))) == first


def test_ids_differ_by_node_and_need_the_node_key(ca: Path) -> None:
    a = ItemIds(signer(ca, "acme", "store-1")).of(observation())
    assert ItemIds(signer(ca, "acme", "store-2")).of(observation()) != a
    assert ItemIds(signer(ca, "bolt", "store-1")).of(observation()) != a
    # the same identity with a new key (a re-issued certificate) gives other ids: nobody
    # without the node's key can compute, or confirm a guess of, what an id describes
    reissued = ItemIds(signer(ca, "acme", "store-1", out="reissued")).of(observation())
    assert reissued != a
    plain = hashlib.blake2b(b"\x00".join(x.encode() for x in (
        "net", "acme", "store-1", "grocery/dairy", "", "north", T0.isoformat(),
        (T0 + timedelta(hours=1)).isoformat())), digest_size=16).hexdigest()
    assert a != plain


def test_ecdsa_keys_derive_ids_too(ca: Path) -> None:
    s = signer(ca, "cobalt", "store-1", key_type="ec-p256")
    assert ItemIds(s).of(observation()) == ItemIds(s).of(observation())


def test_ids_do_not_depend_on_what_was_asked_before(ca: Path) -> None:
    # Window bounds' text is remembered for a while: ids over more windows than it keeps,
    # asked in another order by another instance, come out the same.
    s = signer(ca, "acme", "store-1")
    windows = [observation(window_start=T0 + timedelta(hours=h),
                           window_end=T0 + timedelta(hours=h + 1)) for h in range(700)]
    ids = ItemIds(s)
    forward = [ids.of(w) for w in windows]
    other = ItemIds(s)
    backward = [other.of(w) for w in reversed(windows)][::-1]
    assert forward == backward and len(set(forward)) == len(windows)
