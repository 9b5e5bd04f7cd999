"""Identity against real brokers: pseudonyms no member can compute, a node id its certificate
must name, and revocation checked by receivers.

- A consortium member, with nothing but its own configuration and what it reads, cannot map
  any other member's pseudonym to a company name: a dictionary attack over candidate names,
  keyed with every byte of its own configuration and key material, maps nothing (the same
  attack maps every pseudonym of the retired shared-secret scheme, the control).
- A node whose ``node_id`` is not its certificate's OU is refused at ``connect()`` with one
  line naming both values, before it opens a socket.
- A receiver holding the CA's CRL (``tls.crl_file``) drops what a revoked node signs from the
  moment the CA re-signs the CRL, live and retained, and counts it as ``revoked``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from brokers import (
    GROUP_KEY,
    MosquittoBroker,
    NetworkPKI,
    build_pki,
    new_unique_id,
    probe,
)

from pear_mqtt.config.manager import NetworkConfigManager
from pear_mqtt.config.models import (
    EncryptionConfig,
    NetworkConfig,
    PrivacyConfig,
    ReliabilityConfig,
    TLSConfig,
)
from pear_mqtt.errors import ConfigError, TopicError
from pear_mqtt.model.insight import MarketInsight, NetworkMode
from pear_mqtt.model.topics import TopicScheme, parse_topic
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.security import pki as pkimod
from pear_mqtt.security.seal import SealOpener

MEMBERS = ("globex", "initech", "umbrella", "hooli", "wayne")
# What an attacker would guess: the retailers it competes with, and then some.
CANDIDATE_COMPANIES = ("acme", *MEMBERS, "stark", "tyrell", "cyberdyne", "soylent", "aperture",
                       "contoso", "fabrikam", "northwind", "acme-corp", "globex-eu")
CANDIDATE_STORES = tuple(f"store-{i}" for i in range(1, 11))


# -- the attack -------------------------------------------------------------------------------

def _framed(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _renderings(digest: bytes) -> set[str]:
    b32 = base64.b32encode(digest).decode("ascii").lower()
    return {"p" + b32[:24], b32[:24], b32.rstrip("="), digest.hex(), digest.hex()[:24]}


def derivations(key: bytes, network: str, kind: str, name: str) -> set[str]:
    """Every way the attacker tries to compute the pseudonym of ``name`` from ``key``: the
    retired keyed scheme (HMAC-SHA256 over domain, network, kind and name, length-framed),
    plain HMACs and hashes of the name, in the usual renderings."""
    value = name.encode()
    digests = [
        hmac.new(key, _framed(b"pear_mqtt/pseudonym/v1", network.encode(), kind.encode(),
                              value), hashlib.sha256).digest(),
        hmac.new(key, value, hashlib.sha256).digest(),
        hmac.new(key, network.encode() + b"/" + value, hashlib.sha256).digest(),
        hashlib.sha256(key + value).digest(),
        hashlib.sha256(value).digest(),
        hashlib.sha256(network.encode() + b"/" + value).digest(),
    ]
    return set().union(*(_renderings(d) for d in digests))


def dictionary_attack(observed: set[str], *, keys: Iterable[bytes],
                      network: str) -> dict[str, str]:
    """Which observed pseudonyms the attacker maps to a name: ``{pseudonym: name}``."""
    found: dict[str, str] = {}
    for key in keys:
        for company in CANDIDATE_COMPANIES:
            for guess in derivations(key, network, "company", company) & observed:
                found[guess] = company
            for store in CANDIDATE_STORES:
                for name in (store, f"{company}/{store}"):
                    for guess in derivations(key, network, "store", name) & observed:
                        found[guess] = f"{company}/{store}"
    return found


def key_material(config_file: Path, config: NetworkConfig) -> list[bytes]:
    """Everything the attacker holds: each string of its configuration file, and the bytes of
    every file it names (certificate, key, CA, aggregator key)."""
    def strings(node: Any) -> Iterable[str]:
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for k, v in node.items():
                yield k
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)

    data, _ = NetworkConfigManager.to_dict(config, secrets="include")
    keys = [b"", *(s.encode() for s in strings(data))]
    for s in list(strings(data)):
        if Path(s).is_file():
            keys.append(Path(s).read_bytes())
    keys.append(config_file.read_bytes())
    return keys


async def test_a_member_cannot_map_any_pseudonym_to_a_company_name(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker,
        pki: NetworkPKI, insight: Callable[..., MarketInsight],
        take: Callable[..., Awaitable[list[Any]]], tmp_path: Path) -> None:
    # The attacker: acme, a member in good standing, with its own configuration file.
    mine = make_config("acme", pseudonymous=True)
    config_file = tmp_path / "acme.toml"
    NetworkConfigManager.save(mine, config_file, include_secrets=True)
    assert "pseudonym" not in config_file.read_text()
    own_certs, own = pki.enrolled("acme")
    everything = f"pear/v1/consortium/{pki.network}/#"
    observed: set[str] = set()
    with probe(mosquitto, own_certs, subscribe=[everything]) as spy:
        async with PearNetwork(mine) as me:
            stream = me.insights()
            for company in MEMBERS:
                async with PearNetwork(make_config(company, pseudonymous=True)) as member:
                    await member.broadcast_market_insight(insight())
                    await member.flush(timeout=10)
            received = await take(stream, len(MEMBERS))
        marker = TopicScheme("consortium", pki.network, own.member).sync_marker("spy")
        spy.publish(marker, b"end")
        _, wire = spy.expect(marker)
    # Everything it could read: topic levels, envelope senders, the insights' identities.
    for m in wire:
        try:
            parsed = parse_topic(m.topic)
        except TopicError:
            continue
        observed.update(x for x in (parsed.company, parsed.node) if x)
        if m.payload.startswith(b"{"):
            observed.update(json.loads(m.payload).get("from", "").split("/"))
    for r in received:
        observed.update(x for x in (r.member, r.node, r.insight.company, r.insight.store) if x)
    observed -= {own.member, own.node, ""}

    # (The operator's registry, not the attacker's, says whose they are.)
    theirs = {c: pki.enrolled(c)[1] for c in MEMBERS}
    assert {p for e in theirs.values() for p in (e.member, e.node)} <= observed
    keys = key_material(config_file, mine)

    assert dictionary_attack(observed, keys=keys, network=pki.network) == {}
    # Nothing the attacker holds even mentions another member's pseudonym or name.
    blob = b"\n".join(keys)
    for company, e in theirs.items():
        assert e.member.encode() not in blob and e.node.encode() not in blob
        assert company.encode() not in blob

    # Control: the same attack against the retired scheme, whose secret sat in every
    # member's configuration, maps every pseudonym back to its company.
    secret = secrets.token_urlsafe(32).encode()
    retired = {c: "p" + base64.b32encode(hmac.new(secret, _framed(
        b"pear_mqtt/pseudonym/v1", pki.network.encode(), b"company", c.encode()),
        hashlib.sha256).digest()).decode().lower()[:24] for c in MEMBERS}
    assert dictionary_attack(set(retired.values()), keys=[*keys, secret],
                             network=pki.network) == {v: k for k, v in retired.items()}


# -- node id -------------------------------------------------------------------------------------

async def test_a_node_id_its_certificate_does_not_name_is_refused_before_any_traffic(
        make_config: Callable[..., NetworkConfig], pki: NetworkPKI) -> None:
    good = make_config("acme", pseudonymous=True)
    _, who = pki.enrolled("acme")
    with socket.socket() as listener:  # stands in for the broker: counts connection attempts
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        # The classic mistake: the store's own id (or the hostname default) as node_id.
        wrong = good.model_copy(update={"node_id": "store-1",
                                        "broker_url": f"mqtts://localhost:{port}"})
        with pytest.raises(ConfigError) as err:
            await PearNetwork(wrong).connect(timeout=5)
        message = str(err.value)
        assert "\n" not in message
        assert "node_id 'store-1'" in message and repr(good.node_id) in message
        assert f'set node_id = "{good.node_id}"' in message
        with pytest.raises(BlockingIOError):
            listener.accept()  # no connection was attempted

        # Where the company id is published (private mode), it must be the certificate's CN.
        private = make_config("acme", mode=NetworkMode.PRIVATE).model_copy(update={
            "company_id": "acme-corp", "broker_url": f"mqtts://localhost:{port}"})
        with pytest.raises(ConfigError) as err:
            await PearNetwork(private).connect(timeout=5)
        message = str(err.value)
        assert "\n" not in message and "company_id 'acme-corp'" in message
        assert 'set company_id = "acme"' in message
        with pytest.raises(BlockingIOError):
            listener.accept()

    # With the certificate's node id the same node joins the real broker.
    async with PearNetwork(good) as net:
        assert (net.identity.member, net.identity.node) == (who.member, who.node)


# -- revocation ----------------------------------------------------------------------------------

def crl_config(own: NetworkPKI, broker: MosquittoBroker, aggregator: Path, company: str,
               store: str = "store-1", *, crl: bool = True) -> NetworkConfig:
    certs, who = own.enrolled(company, store)
    return NetworkConfig(
        mode=NetworkMode.CONSORTIUM, company_id=company, network_id=own.network,
        node_id=who.node, broker_url=broker.tls_url,
        # interval 0: look at the file on every check, so the test needs no timing
        tls=TLSConfig(ca_file=certs.ca, cert_file=certs.cert, key_file=certs.key,
                      crl_file=own.crl if crl else None, crl_check_interval=0),
        privacy=PrivacyConfig(aggregator_key_file=aggregator),
        encryption=EncryptionConfig(keys={"k1": GROUP_KEY}, active="k1"),
        reliability=ReliabilityConfig(reconnect_min_delay=0.05, reconnect_max_delay=0.5))


async def test_a_revoked_nodes_messages_are_dropped_by_a_receiver_holding_the_crl(
        mosquitto_factory: Callable[..., MosquittoBroker], tmp_path: Path,
        aggregator: tuple[Path, SealOpener], insight: Callable[..., MarketInsight],
        take: Callable[..., Awaitable[list[Any]]]) -> None:
    own = build_pki(tmp_path / "pki", network=new_unique_id("crl"))  # this test revokes
    broker = mosquitto_factory(pki=own)
    node = lambda c, **kw: crl_config(own, broker, aggregator[0], c, **kw)  # noqa: E731
    lost_certs, lost = own.enrolled("acme")
    async with PearNetwork(node("globex")) as rx, PearNetwork(node("acme")) as gone, \
            PearNetwork(node("initech")) as honest:
        stream = rx.insights()
        await gone.broadcast_market_insight(insight(category="crl/before"))
        (first,) = await take(stream, 1)
        assert (first.member, first.node) == (lost.member, lost.node)
        assert first.insight.category == "crl/before"

        pkimod.revoke(ca_dir=own.ca_dir, cert=lost_certs.cert)
        # The broker is not told (no SIGHUP): the open connection still publishes.
        await gone.broadcast_market_insight(insight(category="crl/after"))
        await gone.flush(timeout=10)
        await honest.broadcast_market_insight(insight(category="crl/honest"))
        (second,) = await take(stream, 1)  # the revoked node's insight came first
        assert second.insight.category == "crl/honest"
        dropped = rx.status().dropped
        assert dropped.get("revoked", 0) >= 1, dropped

    # A late joiner with the CRL drops the revoked node's retained state (which the broker
    # still serves until its ACL is re-rendered), and keeps the honest node's.
    async with PearNetwork(node("hooli")) as late:
        result = await late.sync(timeout=10)
        assert {r.insight.category for r in result.states.values()} == {"crl/honest"}
        assert late.status().dropped.get("revoked", 0) >= 1
    # Without the CRL a receiver would have taken them: the drop is the CRL's doing.
    async with PearNetwork(node("umbrella", crl=False)) as blind:
        result = await blind.sync(timeout=10)
        assert {r.insight.category for r in result.states.values()} == {
            "crl/before", "crl/after", "crl/honest"}
