"""The embedded amqtt broker admits and confines clients like the mosquitto deployment.

The broker runs on the test's event loop; paho-mqtt clients run on paho's network thread
(``loop_start``), and the test awaits their queues through ``asyncio.to_thread`` so the loop
stays free to serve them. Nothing sleeps: absence of a forbidden message is proved by a marker
published after it on an allowed topic, which the broker handles in order.

Certificates come from the session ``pki`` fixture (``conftest.py``, minted by
:mod:`pear_mqtt.security.pki`): network ``testnet``, node certificates for acme, globex, initech...,
the bridge user ``bridge``, and expired / revoked / foreign ones.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import signal
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from brokers import NetworkPKI
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from pear_mqtt.errors import BrokerError, ConfigError
from pear_mqtt.model.topics import TopicScheme
from pear_mqtt.ops.embedded.broker import EmbeddedBroker
from pear_mqtt.ops.embedded.policy import AccessPolicy
from pear_mqtt.security import pki as pkimod
from pear_mqtt.security.pki import CertPaths

pytestmark = pytest.mark.integration

TIMEOUT = 10.0
HOST = "127.0.0.1"


# -- a paho client the event loop can wait on -----------------------------------------------

@dataclass(frozen=True)
class Msg:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Peer:
    """A paho MQTT 3.1.1 client on its own network thread; every wait is awaitable."""

    def __init__(self, *, port: int, certs: CertPaths | None = None, ca: Path | None = None,
                 client_id: str, clean_session: bool = True, username: str | None = None,
                 will: tuple[str, bytes] | None = None) -> None:
        self.port = port
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=clean_session, protocol=mqtt.MQTTv311,
                                  reconnect_on_failure=False)
        trust = ca if ca is not None else certs.ca if certs is not None else None
        if trust is not None:
            ctx = ssl.create_default_context(cafile=str(trust))
            if certs is not None:
                ctx.load_cert_chain(str(certs.cert), str(certs.key))
            self.client.tls_set_context(ctx)
        if username is not None:
            self.client.username_pw_set(username, "ignored")
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.outcomes: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.messages: queue.Queue[Msg] = queue.Queue()
        self.subacks: queue.Queue[tuple[int, list[ReasonCode]]] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self._looping = False

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode,
                    props: Any) -> None:
        if rc.is_failure:
            self.outcomes.put(("refused", str(rc)))
        else:
            self.outcomes.put(("connected", flags.session_present))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode,
                       props: Any) -> None:
        self.outcomes.put(("disconnected", str(rc)))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(Msg(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      rcs: list[ReasonCode], props: Any) -> None:
        self.subacks.put((mid, rcs))

    async def connect(self) -> tuple[str, Any]:
        """``("connected", session_present)``, ``("refused", reason)``, or ``("failed", ...)``
        when the TCP/TLS connection itself is torn down."""
        try:
            await asyncio.to_thread(self.client.connect, HOST, self.port, 30)
        except (OSError, ssl.SSLError) as exc:  # TLS 1.2 style: the handshake itself fails
            return ("failed", repr(exc))
        self.client.loop_start()
        self._looping = True
        kind, detail = await asyncio.to_thread(self.outcomes.get, True, TIMEOUT)
        # TLS 1.3: the client finishes its handshake before the server rejects its
        # certificate, so the refusal arrives as a dropped connection instead of a CONNACK.
        return ("failed", detail) if kind == "disconnected" else (kind, detail)

    async def connected(self) -> Peer:
        outcome = await self.connect()
        assert outcome[0] == "connected", outcome
        return self

    async def subscribe(self, topic_filter: str, qos: int = 1) -> bool:
        """Subscribe; True when granted, False on SUBACK failure."""
        _, mid = self.client.subscribe(topic_filter, qos)
        got, codes = await asyncio.to_thread(self.subacks.get, True, TIMEOUT)
        assert got == mid
        return not codes[0].is_failure

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1,
                      retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        await asyncio.to_thread(info.wait_for_publish, TIMEOUT)
        assert info.is_published()

    async def next_message(self) -> Msg:
        return await asyncio.to_thread(self.messages.get, True, TIMEOUT)

    async def until(self, topic: str, payload: bytes | None = None) -> list[Msg]:
        """Every message up to and including the first on ``topic`` (with ``payload``)."""
        seen: list[Msg] = []
        while True:
            msg = await self.next_message()
            seen.append(msg)
            if msg.topic == topic and (payload is None or msg.payload == payload):
                return seen

    async def close(self) -> None:
        self.client.disconnect()
        if self._looping:
            self._looping = False
            await asyncio.to_thread(self.client.loop_stop)


# -- fixtures ---------------------------------------------------------------------------------

StartBroker = Callable[..., Awaitable[EmbeddedBroker]]
MakePeer = Callable[..., Peer]


@pytest.fixture
async def start_broker(pki: NetworkPKI) -> AsyncIterator[StartBroker]:
    """``await start_broker(mode, **kwargs)``: a started broker with the test network's TLS."""
    started: list[EmbeddedBroker] = []

    async def start(mode: str, **kwargs: Any) -> EmbeddedBroker:
        if kwargs.pop("tls", True):
            kwargs.setdefault("ca_file", pki.ca)
            kwargs.setdefault("cert_file", pki.broker.cert)
            kwargs.setdefault("key_file", pki.broker.key)
            kwargs.setdefault("crl_file", pki.crl)
        kwargs.setdefault("bridge_users", [pki.bridge_user])
        broker = EmbeddedBroker(mode=mode, network=kwargs.pop("network", pki.network), **kwargs)
        await broker.start()
        started.append(broker)
        return broker

    yield start
    for broker in reversed(started):
        await broker.stop()


@pytest.fixture
async def peers() -> AsyncIterator[MakePeer]:
    """``peers(port=..., certs=..., client_id=...)``: a :class:`Peer`, closed at teardown."""
    made: list[Peer] = []

    def make(**kwargs: Any) -> Peer:
        peer = Peer(**kwargs)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        await peer.close()


def scheme(mode: str, member: str, network: str = "testnet") -> TopicScheme:
    return TopicScheme(mode=mode, network=network, member=member)


# -- access policy (no broker) -------------------------------------------------------------------

def test_policy_semantics() -> None:
    consortium = AccessPolicy.for_network(mode="consortium", network="n", bridge_users=["br"])
    root = "pear/v1/consortium/n"
    assert consortium.may_publish(username="acme", topic=f"{root}/acme/insights/x")
    assert not consortium.may_publish(username="acme", topic=f"{root}/globex/insights/x")
    assert consortium.may_subscribe(username="acme", topic_filter=f"{root}/+/state/#")
    assert not consortium.may_subscribe(username="acme", topic_filter="pear/v1/#")
    assert not consortium.may_subscribe(username="acme", topic_filter="#")
    # a username shaped like a pattern gets nothing, as with mosquitto
    assert not consortium.may_publish(username="+", topic=f"{root}/+/insights/x")

    public = AccessPolicy.for_network(mode="public", network="n", bridge_users=["br"])
    proot = "pear/v1/public/n"
    assert public.may_publish(username="acme", topic=f"{proot}/contrib/acme/x")
    assert not public.may_subscribe(username="acme", topic_filter=f"{proot}/contrib/acme/#")
    assert not public.may_publish(username="acme", topic=f"{proot}/aggregates/x")
    assert public.may_publish(username="br", topic=f"{proot}/aggregates/x")
    assert public.may_subscribe(username="br", topic_filter=f"{proot}/contrib/#")

    from pear_mqtt.model.acl import AclRule
    holes = AccessPolicy([AclRule("read", "a/#"), AclRule("deny", "a/secret")])
    assert holes.may_subscribe(username="u", topic_filter="a/#")  # narrowed per message
    assert not holes.may_read(username="u", topic="a/secret")
    assert not holes.may_subscribe(username="u", topic_filter="a/secret")


# -- admission --------------------------------------------------------------------------------

async def test_round_trip_with_retained_state(start_broker: StartBroker, peers: MakePeer,
                                              pki: NetworkPKI) -> None:
    broker = await start_broker("private")
    acme = scheme("private", "acme")
    writer = await peers(port=broker.tls_port, certs=pki.nodes["acme"],
                         client_id="acme-writer").connected()
    state_topic = acme.state("store-1", "dairy/milk")
    await writer.publish(state_topic, b"state-1", retain=True)

    reader = await peers(port=broker.tls_port, certs=pki.node("acme", "store-2"),
                         client_id="acme-reader").connected()
    assert await reader.subscribe(acme.state_filter())
    retained = await reader.next_message()
    assert retained == Msg(state_topic, b"state-1", 1, True)

    assert await reader.subscribe(acme.live_filter())
    live_topic = acme.insights("dairy/milk")
    await writer.publish(live_topic, b"live-1")
    assert await reader.next_message() == Msg(live_topic, b"live-1", 1, False)


@pytest.mark.parametrize("which", ["no_cert", "foreign_ca", "expired", "not_yet_valid",
                                   "revoked"])
async def test_bad_certificates_are_refused(which: str, start_broker: StartBroker,
                                            peers: MakePeer, pki: NetworkPKI) -> None:
    broker = await start_broker("consortium")
    # Control: the same client set-up with a good certificate gets in, so a refusal below is
    # the broker's doing and not a client-side trust problem.
    await peers(port=broker.tls_port, certs=pki.nodes["acme"], client_id="control").connected()
    certs = None if which == "no_cert" else getattr(pki, which if which != "foreign_ca"
                                                    else "foreign")
    bad = peers(port=broker.tls_port, certs=certs, ca=pki.ca, client_id=f"bad-{which}")
    kind, detail = await bad.connect()
    assert kind in ("failed", "refused"), (kind, detail)


async def test_certificate_of_another_network_is_refused(start_broker: StartBroker,
                                                         peers: MakePeer,
                                                         pki: NetworkPKI) -> None:
    # Same CA, but the broker serves a different network id than the certificates' O.
    broker = await start_broker("consortium", network="othernet")
    kind, _ = await peers(port=broker.tls_port, certs=pki.nodes["acme"],
                          client_id="wrong-network").connect()
    assert kind == "refused"


async def test_username_comes_from_the_certificate(start_broker: StartBroker, peers: MakePeer,
                                                   pki: NetworkPKI) -> None:
    broker = await start_broker("private")
    spoofer = await peers(port=broker.tls_port, certs=pki.nodes["acme"], client_id="spoof",
                          username="globex").connected()
    assert not await spoofer.subscribe("pear/v1/private/globex/#")
    assert await spoofer.subscribe("pear/v1/private/acme/#")


async def test_last_will_outside_own_subtree_is_refused(start_broker: StartBroker,
                                                        peers: MakePeer,
                                                        pki: NetworkPKI) -> None:
    broker = await start_broker("consortium")
    forged = (scheme("consortium", "globex").presence("store-1"), b"offline")
    kind, _ = await peers(port=broker.tls_port, certs=pki.nodes["acme"], client_id="will-bad",
                          will=forged).connect()
    assert kind == "refused"
    own = (scheme("consortium", "acme").presence("store-1"), b"offline")
    await peers(port=broker.tls_port, certs=pki.nodes["acme"], client_id="will-ok",
                will=own).connected()


# -- ACL ----------------------------------------------------------------------------------------

async def test_company_cannot_publish_into_another_subtree(start_broker: StartBroker,
                                                           peers: MakePeer,
                                                           pki: NetworkPKI) -> None:
    broker = await start_broker("consortium")
    acme, globex = scheme("consortium", "acme"), scheme("consortium", "globex")
    observer = await peers(port=broker.tls_port, certs=pki.nodes["initech"],
                           client_id="observer").connected()
    assert await observer.subscribe(acme.live_filter())  # every member's insights

    # The detector works: globex writing its own subtree is seen.
    owner = await peers(port=broker.tls_port, certs=pki.nodes["globex"],
                        client_id="globex").connected()
    await owner.publish(globex.insights("dairy"), b"genuine")
    assert (await observer.next_message()).payload == b"genuine"

    intruder = await peers(port=broker.tls_port, certs=pki.nodes["acme"],
                           client_id="intruder").connected()
    await intruder.publish(globex.insights("dairy"), b"forged")
    await intruder.publish(globex.state("store-1", "dairy"), b"forged-state", retain=True)
    marker = acme.insights("marker")
    await intruder.publish(marker, b"marker")
    seen = await observer.until(marker)
    assert all(not m.topic.startswith(globex.member_root) for m in seen)

    # Nor was the forged state retained: a retained sentinel stored after it arrives alone.
    sentinel = acme.state("store-1", "sentinel")
    await intruder.publish(sentinel, b"sentinel", retain=True)
    late = await peers(port=broker.tls_port, certs=pki.nodes["umbrella"],
                       client_id="late").connected()
    assert await late.subscribe(acme.state_filter())
    retained = await late.until(sentinel)
    assert all(not m.topic.startswith(globex.member_root) for m in retained), retained


async def test_only_the_bridge_writes_the_consortium_aggregates(start_broker: StartBroker,
                                                                peers: MakePeer,
                                                                pki: NetworkPKI) -> None:
    broker = await start_broker("consortium")
    acme = scheme("consortium", "acme")
    topic = scheme("consortium", pki.bridge_user).consortium_aggregate("dairy")
    reader = await peers(port=broker.tls_port, certs=pki.nodes["initech"],
                         client_id="reader").connected()
    assert await reader.subscribe(acme.aggregates_filter())  # every member reads them
    intruder = await peers(port=broker.tls_port, certs=pki.nodes["acme"],
                           client_id="intruder").connected()
    await intruder.publish(topic, b"forged", retain=True)
    bridge = await peers(port=broker.tls_port, certs=pki.bridge,
                         client_id="bridge").connected()
    await bridge.publish(topic, b"genuine", retain=True)
    # the forged one never arrives: the bridge's, published after it, is the first
    assert (await reader.next_message()).payload == b"genuine"


async def test_public_participant_rights(start_broker: StartBroker, peers: MakePeer,
                                         pki: NetworkPKI) -> None:
    broker = await start_broker("public")
    acme, globex = scheme("public", "acme"), scheme("public", "globex")
    root = acme.network_root
    bridge = await peers(port=broker.tls_port, certs=pki.bridge,
                         client_id="bridge").connected()
    assert await bridge.subscribe(f"{root}/contrib/#")
    assert await bridge.subscribe(f"{root}/aggregates/#")

    participant = await peers(port=broker.tls_port, certs=pki.nodes["acme"],
                              client_id="acme").connected()
    # Reading contributions is the bridge's alone, own ones included; broad filters too.
    assert not await participant.subscribe(f"{root}/contrib/#")
    assert not await participant.subscribe(f"{root}/contrib/acme/#")
    assert not await participant.subscribe(f"{root}/#")
    assert await participant.subscribe(acme.live_filter())  # aggregates
    assert await participant.subscribe(acme.presence_filter())

    # A participant cannot write aggregates: the marker on its own contrib arrives alone.
    await participant.publish(acme.aggregate("dairy"), b"fake-aggregate", retain=True)
    marker = acme.insights("dairy")  # contrib/acme/dairy
    await participant.publish(marker, b"marker")
    seen = await bridge.until(marker)
    assert all("/aggregates/" not in m.topic for m in seen), seen

    # Another participant's contribution reaches the bridge but never the participant.
    other = await peers(port=broker.tls_port, certs=pki.nodes["globex"],
                        client_id="globex").connected()
    await other.publish(globex.insights("dairy"), b"globex-input")
    assert (await bridge.next_message()).payload == b"globex-input"
    await participant.publish(acme.presence("acme"), b"online", retain=True)
    seen = await participant.until(acme.presence("acme"))
    assert all("/contrib/" not in m.topic for m in seen), seen

    # The bridge writes aggregates, which participants read.
    await bridge.publish(acme.aggregate("dairy"), b"mean=3.2", retain=True)
    assert await participant.until(acme.aggregate("dairy"), b"mean=3.2")


# -- sessions -----------------------------------------------------------------------------------

async def test_persistent_session_keeps_qos1_messages(start_broker: StartBroker,
                                                      peers: MakePeer,
                                                      pki: NetworkPKI) -> None:
    broker = await start_broker("private")
    acme = scheme("private", "acme")
    store2 = pki.node("acme", "store-2")
    first = await peers(port=broker.tls_port, certs=store2, client_id="acme-s2",
                        clean_session=False).connected()
    assert await first.subscribe(acme.live_filter())
    await first.close()

    writer = await peers(port=broker.tls_port, certs=pki.nodes["acme"],
                         client_id="acme-s1").connected()
    for i in range(3):
        await writer.publish(acme.insights("dairy"), f"offline-{i}".encode())

    again = peers(port=broker.tls_port, certs=store2, client_id="acme-s2", clean_session=False)
    assert await again.connect() == ("connected", True)
    got = [await again.next_message() for _ in range(3)]
    assert [m.payload for m in got] == [b"offline-0", b"offline-1", b"offline-2"]


async def test_other_member_cannot_take_over_a_session(start_broker: StartBroker,
                                                       peers: MakePeer,
                                                       pki: NetworkPKI) -> None:
    broker = await start_broker("consortium")
    acme = scheme("consortium", "acme")
    owner = await peers(port=broker.tls_port, certs=pki.nodes["acme"], client_id="shared",
                        clean_session=False).connected()
    assert await owner.subscribe(acme.live_filter())
    await owner.close()

    for clean in (False, True):
        thief = peers(port=broker.tls_port, certs=pki.nodes["globex"], client_id="shared",
                      clean_session=clean)
        assert (await thief.connect())[0] == "refused"
        await thief.close()

    writer = await peers(port=broker.tls_port, certs=pki.node("acme", "store-9"),
                         client_id="acme-writer").connected()
    await writer.publish(acme.insights("dairy"), b"kept")
    back = peers(port=broker.tls_port, certs=pki.nodes["acme"], client_id="shared",
                 clean_session=False)
    assert await back.connect() == ("connected", True)
    assert (await back.next_message()).payload == b"kept"


async def test_concurrent_connects_with_one_client_id_admit_one_member(
        start_broker: StartBroker, peers: MakePeer, pki: NetworkPKI) -> None:
    # Two members racing for a client id nobody holds yet: one gets the session, the other
    # is refused (the ownership check and amqtt's session set-up happen one CONNECT at a time).
    broker = await start_broker("consortium")
    for i in range(5):
        racers = [peers(port=broker.tls_port, certs=pki.nodes[member], client_id=f"race-{i}",
                        clean_session=False) for member in ("globex", "acme")]
        outcomes = await asyncio.gather(*(racer.connect() for racer in racers))
        assert sorted(kind for kind, _ in outcomes) == ["connected", "refused"], outcomes


async def test_resumed_session_gets_only_its_own_retained(start_broker: StartBroker,
                                                          peers: MakePeer,
                                                          pki: NetworkPKI) -> None:
    # amqtt alone replays the retained messages of *every* filter any client subscribed to
    # when a session resumes; the embedded broker limits it to the session's own filters and
    # to what the session may read.
    broker = await start_broker("private")
    acme, globex = scheme("private", "acme"), scheme("private", "globex")
    for member, names in (("acme", acme), ("globex", globex)):
        bait = await peers(port=broker.tls_port, certs=pki.nodes[member],
                           client_id=f"{member}-bait").connected()
        assert await bait.subscribe(names.state_filter())
        await bait.publish(names.state("store-1", "bait"), b"bait", retain=True)
        assert (await bait.next_message()).payload == b"bait"

    store2 = pki.node("globex", "store-2")
    first = await peers(port=broker.tls_port, certs=store2, client_id="globex-presence",
                        clean_session=False).connected()
    assert await first.subscribe(globex.presence_filter())
    sentinel = globex.presence("store-2")
    await first.publish(sentinel, b"online", retain=True)
    assert (await first.next_message()).payload == b"online"
    await first.close()

    again = peers(port=broker.tls_port, certs=store2, client_id="globex-presence",
                  clean_session=False)
    assert await again.connect() == ("connected", True)
    seen = await again.until(sentinel)
    assert [m.topic for m in seen] == [sentinel], seen


# -- plain listener, lifecycle, CRL reload, CLI ---------------------------------------------------

async def test_plain_listener_is_anonymous_and_opt_in(start_broker: StartBroker,
                                                      peers: MakePeer, pki: NetworkPKI) -> None:
    with pytest.raises(ConfigError):
        EmbeddedBroker(mode="private", network="testnet")
    tls_only = await start_broker("private")
    assert tls_only.port is None

    broker = await start_broker("private", tls=False, allow_plain=True)
    assert broker.tls_port is None and broker.port is not None
    dev = await peers(port=broker.port, client_id="dev").connected()
    assert await dev.subscribe("#")
    await dev.publish("anything/goes", b"x", retain=True)
    assert await dev.until("anything/goes", b"x")


async def test_start_failures_raise_broker_error(start_broker: StartBroker,
                                                 pki: NetworkPKI, tmp_path: Path) -> None:
    busy = await start_broker("private")
    with pytest.raises(BrokerError, match="in use"):
        await start_broker("private", tls_port=busy.tls_port)
    with pytest.raises(BrokerError):
        await start_broker("private", cert_file=tmp_path / "missing.crt")
    with pytest.raises(BrokerError, match="not signed"):
        foreign_crl = pki.foreign_ca.parent / pkimod.CA_CRL
        await start_broker("private", crl_file=foreign_crl)
    with pytest.raises(BrokerError, match="already running"):
        await busy.start()


async def test_reload_crl_refuses_newly_revoked(start_broker: StartBroker, peers: MakePeer,
                                                pki: NetworkPKI, tmp_path: Path) -> None:
    # A CA of its own, so revoking here cannot disturb the shared test network.
    ca_dir = tmp_path / "ca"
    pkimod.create_ca(directory=ca_dir, network="reloadnet")
    server = pkimod.issue(ca_dir=ca_dir, out_dir=tmp_path / "b", role="broker", member="b")
    node = pkimod.issue(ca_dir=ca_dir, out_dir=tmp_path / "n", role="node", member="acme",
                        node="store-1")
    broker = await start_broker("private", network="reloadnet", ca_file=server.ca,
                                cert_file=server.cert, key_file=server.key,
                                crl_file=ca_dir / pkimod.CA_CRL)
    await (await peers(port=broker.tls_port, certs=node, client_id="before").connected()).close()
    pkimod.revoke(ca_dir=ca_dir, cert=node.cert)
    assert broker.reload_crl() == 1
    kind, _ = await peers(port=broker.tls_port, certs=node, client_id="after").connect()
    assert kind in ("failed", "refused")


class _LogSeen(logging.Handler):
    """Sets ``seen`` when a record of the watched logger contains ``needle``: lets a test wait
    (without sleeping) until the broker has handled something that leaves no other trace."""

    def __init__(self, needle: str) -> None:
        super().__init__(logging.DEBUG)
        self.needle = needle
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.seen.set()


async def _collect(peer: Peer, topics: set[str]) -> dict[str, bytes]:
    """Read until a message has arrived on each of ``topics``; return ``{topic: payload}``."""
    got: dict[str, bytes] = {}
    while not topics <= got.keys():
        msg = await peer.next_message()
        got[msg.topic] = msg.payload
    return got


async def test_reload_crl_stops_serving_a_revoked_nodes_retained_state(
        start_broker: StartBroker, peers: MakePeer, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # A CA of its own, so revoking acme/store-9 here cannot disturb the shared test network.
    ca_dir = tmp_path / "ca"
    pkimod.create_ca(directory=ca_dir, network="revnet")
    server = pkimod.issue(ca_dir=ca_dir, out_dir=tmp_path / "b", role="broker", member="b")

    def node(member: str, name: str) -> CertPaths:
        return pkimod.issue(ca_dir=ca_dir, out_dir=tmp_path / "n", role="node", member=member,
                            node=name)

    store9, store1, globex1 = node("acme", "store-9"), node("acme", "store-1"), \
        node("globex", "store-1")
    broker = await start_broker("consortium", network="revnet", ca_file=server.ca,
                                cert_file=server.cert, key_file=server.key,
                                crl_file=ca_dir / pkimod.CA_CRL)
    port = broker.tls_port
    acme, globex = scheme("consortium", "acme", "revnet"), scheme("consortium", "globex", "revnet")
    gone = {acme.state("store-9", "dairy/milk"): b"store-9 milk",
            acme.presence("store-9"): b"store-9 online"}
    kept = {acme.state("store-1", "dairy/milk"): b"store-1 milk",
            globex.state("store-1", "dairy/milk"): b"globex milk"}

    s9 = await peers(port=port, certs=store9, client_id="acme-store-9").connected()
    for topic, payload in gone.items():
        await s9.publish(topic, payload, retain=True)
    s1 = await peers(port=port, certs=store1, client_id="acme-store-1").connected()
    await s1.publish(acme.state("store-1", "dairy/milk"), kept[acme.state("store-1",
                                                                          "dairy/milk")],
                     retain=True)
    g1 = await peers(port=port, certs=globex1, client_id="globex-store-1").connected()
    await g1.publish(globex.state("store-1", "dairy/milk"),
                     kept[globex.state("store-1", "dairy/milk")], retain=True)

    # Before: a new subscriber gets store-9's state and presence with everything else.
    early = await peers(port=port, certs=globex1, client_id="early").connected()
    assert await early.subscribe(globex.state_filter())
    assert await early.subscribe(globex.presence_filter())
    assert await _collect(early, set(gone | kept)) == gone | kept

    pkimod.revoke(ca_dir=ca_dir, cert=store9.cert)
    assert broker.reload_crl() == 1

    # The store-9 connection opened before the revocation stays up (as with mosquitto), but
    # it may no longer subscribe, and whatever it publishes is refused, so it cannot put its
    # state back. The refusal leaves no trace but the broker's log: wait for that.
    assert not await s9.subscribe(acme.state_filter())
    refused = _LogSeen(f"refused publish on {acme.state('store-9', 'dairy/milk')!r}")
    embedded_log = logging.getLogger("pear_mqtt.ops.embedded")
    embedded_log.addHandler(refused)
    try:
        with caplog.at_level(logging.DEBUG, logger="pear_mqtt.ops.embedded"):
            await s9.publish(acme.state("store-9", "dairy/milk"), b"again", retain=True)
            assert await asyncio.to_thread(refused.seen.wait, TIMEOUT)
    finally:
        embedded_log.removeHandler(refused)

    # After: new subscribers -- another company, the same company's other store -- get
    # store-1's and globex's retained state but nothing of store-9's. A sentinel retained on a
    # new topic after the reload is the last retained message, so it ends the burst.
    sentinel = acme.state("store-1", "sentinel")
    await s1.publish(sentinel, b"sentinel", retain=True)
    for certs, client_id, names in ((globex1, "late-globex", globex),
                                    (store1, "late-acme", acme)):
        late = await peers(port=port, certs=certs, client_id=client_id).connected()
        assert await late.subscribe(names.presence_filter())
        assert await late.subscribe(names.state_filter())
        burst = {m.topic: m.payload for m in await late.until(sentinel)}
        assert burst == kept | {sentinel: b"sentinel"}, client_id

    # The revoked key cannot come back; acme's other store still writes its own state.
    kind, _ = await peers(port=port, certs=store9, client_id="store-9-again").connect()
    assert kind in ("failed", "refused")
    await s1.publish(acme.state("store-1", "dairy/cheese"), b"cheese", retain=True)
    check = await peers(port=port, certs=globex1, client_id="check").connected()
    assert await check.subscribe(acme.state("store-1", "dairy/cheese"))
    assert (await check.next_message()).payload == b"cheese"


async def test_cli_serves_until_sigterm(pki: NetworkPKI, peers: MakePeer,
                                        tmp_path: Path) -> None:
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    for src, name in ((pki.ca, "ca.crt"), (pki.crl, "ca.crl"),
                      (pki.broker.cert, "broker-test.crt"), (pki.broker.key, "broker-test.key")):
        (pki_dir / name).write_bytes(src.read_bytes())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pear_mqtt.cli", "embedded", "--mode", "consortium",
        "--network", pki.network, "--pki", str(pki_dir), "--port", "0",
        "--bridge-user", pki.bridge_user,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert "listening on mqtts://" in line, line
        port = int(line.rsplit(":", 1)[1])
        peer = await peers(port=port, certs=pki.nodes["acme"], client_id="cli").connected()
        await peer.close()
        proc.send_signal(signal.SIGHUP)
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert "CRL reloaded:" in line and "revoked" in line, line
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- measurements ---------------------------------------------------------------------------------

async def test_start_time_and_message_rate(start_broker: StartBroker, peers: MakePeer,
                                           pki: NetworkPKI,
                                           record_property: Callable[[str, object], None]
                                           ) -> None:
    starts = []
    for _ in range(5):
        began = time.perf_counter()
        async with EmbeddedBroker(mode="consortium", network=pki.network, ca_file=pki.ca,
                                  cert_file=pki.broker.cert, key_file=pki.broker.key,
                                  crl_file=pki.crl):
            starts.append(time.perf_counter() - began)
    start_s = sorted(starts)[len(starts) // 2]

    broker = await start_broker("consortium")
    acme = scheme("consortium", "acme")
    reader = await peers(port=broker.tls_port, certs=pki.nodes["globex"],
                         client_id="rate-reader").connected()
    assert await reader.subscribe(acme.live_filter())
    writer = await peers(port=broker.tls_port, certs=pki.nodes["acme"],
                         client_id="rate-writer").connected()
    count = 2000
    topic = acme.insights("rate")
    began = time.perf_counter()
    infos = [writer.client.publish(topic, b"x" * 200, qos=1) for _ in range(count)]
    for _ in range(count):
        await reader.next_message()
    elapsed = time.perf_counter() - began
    assert all(info.is_published() for info in infos[:-50])
    rate = count / elapsed
    record_property("embedded_start_seconds", round(start_s, 4))
    record_property("embedded_qos1_msgs_per_second", round(rate))
    print(f"\nembedded broker: start {start_s * 1000:.1f} ms (median of 5), "
          f"QoS 1 end-to-end {rate:.0f} msg/s over mTLS ({count} x 200 B)")
    assert start_s < 2.0
