"""Identity and access, enforced by a real mosquitto with the rendered configuration.

Who gets in (certificates from :mod:`pear_mqtt.security.pki`) and where they may write and read (the
ACL rendered by :mod:`pear_mqtt.ops.brokerconf` from
:func:`pear_mqtt.model.acl.acl_rules`), checked
with paho-mqtt 2.x and with the mosquitto command-line clients.

"Nothing arrived" is detected deterministically: after the forbidden message, a marker that
must arrive takes the same path to the same subscriber; the subscriber waits for the marker
and checks that nothing came before it. mosquitto handles one client's packets in order and
queues deliveries before it acknowledges the publisher, so a forbidden message that got
through would be delivered before the marker.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from brokers import MosquittoBroker, MqttProbe, NetworkPKI, build_pki, probe
from paho.mqtt.reasoncodes import ReasonCode

from pear_mqtt.model.topics import TopicScheme
from pear_mqtt.security import pki as pkimod
from pear_mqtt.security.pki import CertPaths

pytestmark = pytest.mark.integration

MOSQUITTO_PUB = shutil.which("mosquitto_pub")
MOSQUITTO_SUB = shutil.which("mosquitto_sub")

def _require_clients() -> None:
    if MOSQUITTO_PUB is None or MOSQUITTO_SUB is None:
        pytest.fail("mosquitto-clients is not installed (.ci/run installs it)")


needs_clients = pytest.mark.usefixtures("_clients")


@pytest.fixture
def _clients() -> None:
    _require_clients()

NOT_AUTHORIZED = 135  # MQTT 5 PUBACK reason code


def _bad_certs(pki: NetworkPKI) -> dict[str, CertPaths | None]:
    return {"no-certificate": None, "other-ca": pki.foreign, "expired": pki.expired,
            "not-yet-valid": pki.not_yet_valid, "revoked": pki.revoked}


BAD = ["no-certificate", "other-ca", "expired", "not-yet-valid", "revoked"]


def assert_refused(broker: MosquittoBroker, certs: CertPaths | None) -> None:
    """The mutual-TLS listener must not let ``certs`` (None: no certificate) get a session."""
    assert broker.pki is not None
    p = MqttProbe(host="localhost", port=broker.tls_port, certs=certs, ca=broker.pki.ca)
    try:
        rc = p.connect(timeout=5.0)
    except TimeoutError:
        pytest.fail("the broker neither accepted nor refused the connection")
    except (OSError, ConnectionError):
        return  # TLS alert or connection closed before CONNACK: refused
    finally:
        p.close()
    assert rc.is_failure, f"connected with {certs}: {rc}"


def assert_denied(rc: ReasonCode | None) -> None:
    assert rc is not None and rc.value == NOT_AUTHORIZED, f"PUBACK {rc}, expected not authorized"


def assert_ok(rc: ReasonCode | None) -> None:
    assert rc is not None and not rc.is_failure, f"PUBACK {rc}"


def _cli_tls_args(broker: MosquittoBroker, certs: CertPaths | None) -> list[str]:
    assert broker.pki is not None
    args = ["-h", "localhost", "-p", str(broker.tls_port), "--cafile", str(broker.pki.ca)]
    if certs is not None:
        args += ["--cert", str(certs.cert), "--key", str(certs.key)]
    return args


# -- who gets in ---------------------------------------------------------------------------

def test_valid_certificate_connects_as_its_cn(mosquitto: MosquittoBroker,
                                              pki: NetworkPKI) -> None:
    with probe(mosquitto, pki.nodes["acme"]) as p:
        assert p.is_connected
    assert "u'acme'" in mosquitto.log_text()


@pytest.mark.parametrize("which", BAD)
def test_bad_certificates_are_refused(mosquitto: MosquittoBroker, pki: NetworkPKI,
                                      which: str) -> None:
    assert_refused(mosquitto, _bad_certs(pki)[which])
    # Same broker, same moment: a good certificate still gets in.
    with probe(mosquitto, pki.nodes["globex"]):
        pass


@needs_clients
@pytest.mark.parametrize("which", BAD)
def test_bad_certificates_are_refused_for_mosquitto_pub(mosquitto: MosquittoBroker,
                                                        pki: NetworkPKI, which: str) -> None:
    assert MOSQUITTO_PUB is not None
    topic = TopicScheme("consortium", pki.network, "acme").insights("probe")

    def pub(certs: CertPaths | None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [MOSQUITTO_PUB, *_cli_tls_args(mosquitto, certs), "-t", topic, "-m", "x",
             "-q", "1", "-V", "mqttv5"],
            capture_output=True, text=True, timeout=20)

    bad = pub(_bad_certs(pki)[which])
    assert bad.returncode != 0, bad
    good = pub(pki.nodes["acme"])
    assert good.returncode == 0, good


@pytest.mark.parametrize("which, reason", [
    ("other-ca", "unable to get local issuer certificate"),
    ("expired", "certificate has expired"),
    ("not-yet-valid", "certificate is not yet valid"),
    ("revoked", "certificate revoked"),
])
def test_each_bad_certificate_fails_for_its_own_reason(pki: NetworkPKI, which: str,
                                                       reason: str) -> None:
    # mosquitto only logs "certificate verify failed"; OpenSSL with the broker's CA and CRL
    # names the reason, so each refusal above is the one it claims to be.
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed")
    certs = _bad_certs(pki)[which]
    assert certs is not None

    def verify(cert: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [openssl, "verify", "-crl_check", "-purpose", "sslclient", "-CAfile", str(pki.ca),
             "-CRLfile", str(pki.crl), str(cert)],
            capture_output=True, text=True, timeout=20)

    bad = verify(certs.cert)
    assert bad.returncode != 0 and reason in bad.stdout + bad.stderr, bad
    good = verify(pki.nodes["acme"].cert)
    assert good.returncode == 0, good


def test_revocation_takes_effect_on_reload(mosquitto: MosquittoBroker, pki: NetworkPKI,
                                           unique_id: str) -> None:
    certs = pki.node(unique_id)
    with probe(mosquitto, certs):
        pass
    pkimod.revoke(ca_dir=pki.ca_dir, cert=certs.cert)
    mosquitto.reload_and_wait()
    assert_refused(mosquitto, certs)
    with probe(mosquitto, pki.nodes["acme"]):
        pass


def _retained_burst(broker: MosquittoBroker, certs: CertPaths, scheme: TopicScheme,
                    node: str) -> dict[str, bytes]:
    """What a new subscriber with ``certs`` (a node ``node`` of ``scheme.member``) gets
    from the state and presence subtrees of the whole consortium: ``{topic: payload}``.

    The end of the burst is proved the way ``sync()`` proves it: mosquitto queues the retained
    messages of a SUBSCRIBE before it handles the client's next packet, so a marker the
    subscriber publishes on its own sync topic afterwards arrives after all of them.
    """
    with probe(broker, certs, subscribe=[scheme.state_filter(), scheme.presence_filter(),
                                         scheme.sync_marker(node)]) as p:
        marker = scheme.sync_marker(node)
        assert_ok(p.publish(marker, b"end of burst"))
        _, before = p.expect(marker)
    assert all(m.retain for m in before), before
    return {m.topic: m.payload for m in before}


def test_revoked_nodes_retained_state_is_no_longer_served(
        mosquitto_factory: Callable[..., MosquittoBroker], tmp_path: Path) -> None:
    # A network of its own: this test revokes acme/store-9.
    own = build_pki(tmp_path / "pki")
    # ca_dir: render() reads the revoked nodes from the CA registry, as `broker render` does.
    broker = mosquitto_factory(pki=own, ca_dir=own.ca_dir)
    acme = TopicScheme("consortium", own.network, "acme")
    globex = TopicScheme("consortium", own.network, "globex")
    store9, store1 = own.node("acme", "store-9"), own.nodes["acme"]
    gone = {acme.state("store-9", "dairy/milk"): b"store-9 milk",
            acme.presence("store-9"): b"store-9 online"}
    kept = {acme.state("store-1", "dairy/milk"): b"store-1 milk",
            globex.state("store-1", "dairy/milk"): b"globex milk"}

    with probe(broker, store9) as s9:
        for topic, payload in gone.items():
            assert_ok(s9.publish(topic, payload, retain=True))
        with probe(broker, store1) as s1, probe(broker, own.nodes["globex"]) as g:
            for client, topic in ((s1, acme.state("store-1", "dairy/milk")),
                                  (g, globex.state("store-1", "dairy/milk"))):
                assert_ok(client.publish(topic, kept[topic], retain=True))
        # Before: every new subscriber gets store-9's state and presence.
        assert _retained_burst(broker, own.nodes["globex"], globex, "store-1") == gone | kept
        assert _retained_burst(broker, store1, acme, "store-1") == gone | kept

        pkimod.revoke(ca_dir=own.ca_dir, cert=store9.cert)
        # `pear-mqtt broker render` again (the harness renders with the same arguments as
        # at start): the ACL now denies acme/store-9's topics to acme. Then SIGHUP.
        broker.render()
        assert f"user acme\ntopic deny {acme.member_root}/state/store-9/#" in \
            broker.acl_path.read_text()
        broker.reload_and_wait()

        # The store-9 connection opened before the revocation is still up (mosquitto does
        # not re-check the CRL of open connections), but it cannot put its state back.
        assert_denied(s9.publish(acme.state("store-9", "dairy/milk"), b"again", retain=True))
        assert_denied(s9.publish(acme.presence("store-9"), b"again", retain=True))

    # After: no new subscriber gets store-9's retained messages -- not another company
    # (check_retain_source: the publisher lost write access), not acme's other store (the
    # deny is read access as well) -- while store-1's and globex's are still served.
    assert _retained_burst(broker, own.nodes["globex"], globex, "store-1") == kept
    assert _retained_burst(broker, store1, acme, "store-1") == kept
    # Nor the bridge, which reads the whole consortium under a `user` section of its own.
    marker = acme.aggregate("end-of-burst")  # a topic the bridge may write and read
    with probe(broker, own.bridge, subscribe=[f"{acme.network_root}/#", marker]) as bridge:
        assert_ok(bridge.publish(marker, b"end"))
        _, before = bridge.expect(marker)
        assert {m.topic: m.payload for m in before} == kept

    # Node-precise: acme's other store still writes its own state; the revoked key is out.
    with probe(broker, store1) as s1:
        assert_ok(s1.publish(acme.state("store-1", "dairy/cheese"), b"cheese", retain=True))
    assert_refused(broker, store9)


def test_ec_p256_network_works_end_to_end(
        mosquitto_factory: Callable[..., MosquittoBroker], tmp_path: Path) -> None:
    # Ed25519 is the default; ECDSA P-256 is the fallback for TLS stacks without it.
    ec_pki = build_pki(tmp_path / "ec", key_type="ec-p256")
    broker = mosquitto_factory(pki=ec_pki)
    topic = TopicScheme("consortium", ec_pki.network, "acme").insights("ec")
    with probe(broker, ec_pki.nodes["globex"], subscribe=[topic]) as g, \
            probe(broker, ec_pki.nodes["acme"]) as a:
        assert_ok(a.publish(topic, b"p256"))
        assert g.expect(topic)[0].payload == b"p256"
    assert_refused(broker, ec_pki.revoked)
    assert_refused(broker, ec_pki.foreign)


def test_broker_certificate_cannot_be_used_as_a_client(mosquitto: MosquittoBroker,
                                                       pki: NetworkPKI) -> None:
    # serverAuth only: a stolen broker key does not make a member.
    assert_refused(mosquitto, pki.broker)


# -- consortium: read everything, write only your own subtree ------------------------------

@pytest.fixture
def consortium(pki: NetworkPKI) -> Iterator[dict[str, TopicScheme]]:
    yield {c: TopicScheme("consortium", pki.network, c) for c in ("acme", "globex")}


def test_consortium_member_cannot_write_into_another_members_subtree(
        mosquitto: MosquittoBroker, pki: NetworkPKI, consortium: dict[str, TopicScheme],
        unique_id: str) -> None:
    acme, globex = consortium["acme"], consortium["globex"]
    with probe(mosquitto, pki.nodes["globex"], subscribe=[f"{globex.network_root}/#"]) as g, \
            probe(mosquitto, pki.nodes["acme"]) as a:
        assert_denied(a.publish(globex.insights(unique_id), b"forged insight"))
        assert_denied(a.publish(globex.state("store-1", unique_id), b"forged state",
                                retain=True))
        assert_denied(a.publish(f"{globex.network_root}/{unique_id}", b"outside the scheme"))
        marker = acme.insights(f"{unique_id}/marker")
        assert_ok(a.publish(marker, b"marker"))
        got, before = g.expect(marker)
        assert got.payload == b"marker"  # consortium members read each other...
        assert before == []  # ...but nobody writes under another member's name

    # The forged retained state must not be there for a late joiner either.
    with probe(mosquitto, pki.nodes["globex"], subscribe=[f"{globex.member_root}/#"]) as late:
        own = globex.insights(f"{unique_id}/marker")
        assert_ok(late.publish(own, b"own marker"))
        _, before = late.expect(own)
        assert before == []


# -- private: a company sees only its own subtree -----------------------------------------

def test_company_cannot_read_or_write_another_companys_private_topics(
        mosquitto: MosquittoBroker, pki: NetworkPKI, unique_id: str) -> None:
    acme = TopicScheme("private", pki.network, "acme")
    globex = TopicScheme("private", pki.network, "globex")
    with probe(mosquitto, pki.nodes["acme"], subscribe=["pear/v1/private/#"]) as a, \
            probe(mosquitto, pki.nodes["globex"], subscribe=[f"{globex.network_root}/#"]) as g:
        # Read: globex's insight must not reach acme's catch-all subscription.
        assert_ok(g.publish(globex.insights(unique_id), b"globex secret"))
        g.expect(globex.insights(unique_id))  # positive control: globex reads its own
        a_marker = acme.insights(f"{unique_id}/marker")
        assert_ok(a.publish(a_marker, b"marker"))
        _, before = a.expect(a_marker)
        assert before == [], f"acme read {[m.topic for m in before]}"

        # Write: acme's publish into globex's subtree must not reach globex.
        assert_denied(a.publish(globex.insights(unique_id), b"forged"))
        assert_denied(a.publish(globex.state("store-1", unique_id), b"forged", retain=True))
        g_marker = globex.insights(f"{unique_id}/marker")
        assert_ok(g.publish(g_marker, b"marker"))
        _, before = g.expect(g_marker)
        assert before == [], f"globex got {[m.topic for m in before]}"


# -- public: only the bridge writes aggregates and reads contributions ------------------------

def test_public_participant_cannot_write_aggregates(mosquitto: MosquittoBroker,
                                                   pki: NetworkPKI, unique_id: str) -> None:
    acme = TopicScheme("public", pki.network, "acme")
    globex = TopicScheme("public", pki.network, "globex")
    with probe(mosquitto, pki.bridge, subscribe=[f"{acme.network_root}/#"]) as bridge, \
            probe(mosquitto, pki.nodes["acme"]) as a:
        assert_denied(a.publish(acme.aggregate(unique_id), b"fake aggregate", retain=True))
        assert_denied(a.publish(acme.bridge_state("ledger"), b"fake ledger", retain=True))
        assert_denied(a.publish(globex.insights(unique_id), b"as globex"))
        marker = acme.insights(unique_id)  # acme's own contrib/: allowed
        assert_ok(a.publish(marker, b"contribution"))
        got, before = bridge.expect(marker)  # positive control: the bridge reads contrib/
        assert got.payload == b"contribution"
        assert before == [], f"bridge got {[m.topic for m in before]}"


def test_public_participant_cannot_read_contributions(mosquitto: MosquittoBroker,
                                                      pki: NetworkPKI, unique_id: str) -> None:
    acme = TopicScheme("public", pki.network, "acme")
    globex = TopicScheme("public", pki.network, "globex")
    with probe(mosquitto, pki.nodes["acme"], subscribe=[f"{acme.network_root}/#"]) as a, \
            probe(mosquitto, pki.nodes["globex"]) as g, \
            probe(mosquitto, pki.bridge) as bridge:
        assert_ok(g.publish(globex.insights(unique_id), b"globex contribution"))
        marker = acme.aggregate(unique_id)
        assert_ok(bridge.publish(marker, b"aggregate", retain=True))
        got, before = a.expect(marker)  # positive control: participants read aggregates
        assert got.payload == b"aggregate"
        assert before == [], f"participant read {[m.topic for m in before]}"


# -- interoperability with the mosquitto command-line clients ------------------------------

@needs_clients
def test_mosquitto_sub_receives_what_paho_publishes(mosquitto: MosquittoBroker,
                                                    pki: NetworkPKI, unique_id: str) -> None:
    assert MOSQUITTO_SUB is not None
    stdbuf = shutil.which("stdbuf")
    if stdbuf is None:
        pytest.fail("stdbuf (coreutils) is needed to see mosquitto_sub's SUBACK as it happens")
    topic = TopicScheme("consortium", pki.network, "acme").insights(unique_id)
    # mosquitto_sub block-buffers stdout on a pipe; line buffering shows the SUBACK at once.
    sub = subprocess.Popen(
        [stdbuf, "-oL", MOSQUITTO_SUB, *_cli_tls_args(mosquitto, pki.nodes["globex"]),
         "-t", topic, "-q", "1", "-C", "1", "-W", "15", "-d", "-F", "MSG %t %p"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert sub.stdout is not None
        lines: list[str] = []
        # -d prints the SUBACK; -W bounds every read below.
        for line in sub.stdout:
            lines.append(line)
            if "SUBACK" in line:
                break
        else:
            pytest.fail(f"mosquitto_sub never subscribed: {''.join(lines)}")
        with probe(mosquitto, pki.nodes["acme"]) as a:
            assert_ok(a.publish(topic, b"hello from paho"))
        out = sub.stdout.read()
        assert sub.wait(timeout=20) == 0, "".join(lines) + out
        assert f"MSG {topic} hello from paho" in out
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()


@needs_clients
def test_paho_receives_what_mosquitto_pub_publishes(mosquitto: MosquittoBroker,
                                                    pki: NetworkPKI, unique_id: str) -> None:
    assert MOSQUITTO_PUB is not None
    topic = TopicScheme("consortium", pki.network, "globex").insights(unique_id)
    with probe(mosquitto, pki.nodes["acme"], subscribe=[topic]) as a:
        done = subprocess.run(
            [MOSQUITTO_PUB, *_cli_tls_args(mosquitto, pki.nodes["globex"]), "-t", topic,
             "-m", "hello from mosquitto_pub", "-q", "1"],
            capture_output=True, text=True, timeout=20)
        assert done.returncode == 0, done
        got, _ = a.expect(topic)
        assert got.payload == b"hello from mosquitto_pub"


@needs_clients
def test_mosquitto_pub_into_another_subtree_is_dropped(mosquitto: MosquittoBroker,
                                                       pki: NetworkPKI, unique_id: str) -> None:
    # MQTT 3.1.1 has no "not authorized" PUBACK: the broker acknowledges and drops.
    assert MOSQUITTO_PUB is not None
    globex = TopicScheme("consortium", pki.network, "globex")
    with probe(mosquitto, pki.nodes["globex"], subscribe=[f"{globex.member_root}/#"]) as g:
        done = subprocess.run(
            [MOSQUITTO_PUB, *_cli_tls_args(mosquitto, pki.nodes["acme"]),
             "-t", globex.insights(unique_id), "-m", "forged", "-q", "1"],
            capture_output=True, text=True, timeout=20)
        assert done.returncode == 0, done
        marker = globex.insights(f"{unique_id}/marker")
        assert_ok(g.publish(marker, b"marker"))
        _, before = g.expect(marker)
        assert before == []
