"""Unit tests of pear_mqtt's PKI: files, subjects, extensions, validity, registry, CRL, CLI."""

from __future__ import annotations

import datetime as dt
import json
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pear_mqtt.cli import main
from pear_mqtt.errors import PKIError
from pear_mqtt.security import pki
from pear_mqtt.security.identity import identity_of

pytestmark = pytest.mark.unit


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _crl(ca_dir: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((ca_dir / pki.CA_CRL).read_bytes())


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ca"
    pki.create_ca(directory=d, network="net1")
    return d


def test_create_ca_writes_files_with_private_key_0600(ca_dir: Path) -> None:
    for name in (pki.CA_CERT, pki.CA_KEY, pki.CA_CRL, pki.REGISTRY):
        assert (ca_dir / name).is_file(), name
    assert stat.S_IMODE((ca_dir / pki.CA_KEY).stat().st_mode) == 0o600
    cert = _cert(ca_dir / pki.CA_CERT)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "net1"
    assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)
    assert list(_crl(ca_dir)) == []
    assert pki.list_certificates(ca_dir=ca_dir) == []


def test_create_ca_refuses_to_overwrite_without_force(ca_dir: Path) -> None:
    before = (ca_dir / pki.CA_CERT).read_bytes()
    with pytest.raises(PKIError, match=r"ca\.crt already exists"):
        pki.create_ca(directory=ca_dir, network="net1")
    assert (ca_dir / pki.CA_CERT).read_bytes() == before
    pki.create_ca(directory=ca_dir, network="net1", force=True)
    assert (ca_dir / pki.CA_CERT).read_bytes() != before


def test_create_ca_validates_network_and_key_type(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="must not contain"):
        pki.create_ca(directory=tmp_path / "a", network="bad/net")
    with pytest.raises(PKIError, match="key type"):
        pki.create_ca(directory=tmp_path / "b", network="n", key_type="rsa")  # type: ignore[arg-type]


def test_node_certificate_subject_eku_and_identity(ca_dir: Path, tmp_path: Path) -> None:
    paths = pki.issue(ca_dir=ca_dir, out_dir=tmp_path / "out", role="node", member="acme",
                      node="store-7")
    assert paths.cert.name == "node-acme-store-7.crt"
    assert stat.S_IMODE(paths.key.stat().st_mode) == 0o600
    assert paths.ca.read_bytes() == (ca_dir / pki.CA_CERT).read_bytes()
    cert = _cert(paths.cert)
    ident = identity_of(cert)
    assert (ident.network, ident.member, ident.node) == ("net1", "acme", "store-7")
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(_cert(ca_dir / pki.CA_CERT))


def test_broker_certificate_has_sans_and_server_auth(ca_dir: Path, tmp_path: Path) -> None:
    paths = pki.issue(ca_dir=ca_dir, out_dir=tmp_path, role="broker", member="mqtt1",
                      hosts=("mqtt.example.com", "10.0.0.5", "::1"))
    cert = _cert(paths.cert)
    assert identity_of(cert).node == "broker"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.example.com"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "::1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_bridge_certificate_and_role_node_rules(ca_dir: Path, tmp_path: Path) -> None:
    paths = pki.issue(ca_dir=ca_dir, out_dir=tmp_path, role="bridge", member="bridge1")
    assert identity_of(_cert(paths.cert)).node == "bridge"
    with pytest.raises(PKIError, match="OU='broker'"):
        pki.issue(ca_dir=ca_dir, out_dir=tmp_path, role="broker", member="b", node="x")
    with pytest.raises(PKIError, match="node="):
        pki.issue(ca_dir=ca_dir, out_dir=tmp_path, role="node", member="acme")
    # A node must never share the bridge's username (it would inherit the bridge's ACL).
    with pytest.raises(PKIError, match="bridge certificate"):
        pki.issue(ca_dir=ca_dir, out_dir=tmp_path, role="node", member="bridge1", node="s")


def test_issue_refuses_overwrite_and_bad_identifiers(ca_dir: Path, tmp_path: Path) -> None:
    pki.issue(ca_dir=ca_dir, out_dir=tmp_path, role="node", member="acme", node="s1")
    with pytest.raises(PKIError, match=r"node-acme-s1\.crt already exists"):
        pki.issue(ca_dir=ca_dir, out_dir=tmp_path, role="node", member="acme", node="s1")
    pki.issue(ca_dir=ca_dir, out_dir=tmp_path, role="node", member="acme", node="s1",
              force=True)
    for bad in ("a+b", "a#", "$sys", ""):
        with pytest.raises(PKIError):
            pki.issue(ca_dir=ca_dir, out_dir=tmp_path, role="node", member=bad, node="s1")


def test_validity_defaults_overrides_and_ca_cap(ca_dir: Path, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    p = pki.issue(ca_dir=ca_dir, out_dir=tmp_path, role="node", member="a", node="n")
    cert = _cert(p.cert)
    assert now - dt.timedelta(minutes=6) < cert.not_valid_before_utc <= now
    lifetime = cert.not_valid_after_utc - now
    assert dt.timedelta(days=396) < lifetime <= dt.timedelta(days=397, seconds=5)

    expired = pki.issue(ca_dir=ca_dir, out_dir=tmp_path, role="node", member="a", node="old",
                        not_before=now - dt.timedelta(days=10),
                        not_after=now - dt.timedelta(days=1))
    assert _cert(expired.cert).not_valid_after_utc < now

    with pytest.raises(PKIError, match="after the CA expires"):
        pki.issue(ca_dir=ca_dir, out_dir=tmp_path, role="node", member="a", node="far",
                  not_after=now + dt.timedelta(days=5000))
    capped = pki.issue(ca_dir=ca_dir, out_dir=tmp_path, role="node", member="a", node="cap",
                       days=5000)
    assert _cert(capped.cert).not_valid_after_utc <= \
        _cert(ca_dir / pki.CA_CERT).not_valid_after_utc
    with pytest.raises(PKIError, match="timezone"):
        pki.issue(ca_dir=ca_dir, out_dir=tmp_path, role="node", member="a", node="tz",
                  not_after=dt.datetime(2030, 1, 1))
    with pytest.raises(PKIError, match="before it starts"):
        pki.issue(ca_dir=ca_dir, out_dir=tmp_path, role="node", member="a", node="neg",
                  not_before=now, not_after=now - dt.timedelta(seconds=1))


def test_ec_p256_keys(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    pki.create_ca(directory=d, network="n", key_type="ec-p256")
    p = pki.issue(ca_dir=d, out_dir=tmp_path, role="node", member="a", node="n",
                  key_type="ec-p256")
    cert = _cert(p.cert)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(_cert(d / pki.CA_CERT))
    # Mixed: ed25519 leaf under an EC CA.
    p2 = pki.issue(ca_dir=d, out_dir=tmp_path, role="node", member="a", node="m")
    _cert(p2.cert).verify_directly_issued_by(_cert(d / pki.CA_CERT))
    assert [r.key_type for r in pki.list_certificates(ca_dir=d)] == ["ec-p256", "ed25519"]


def test_registry_lists_issued_certificates(ca_dir: Path, tmp_path: Path) -> None:
    a = pki.issue(ca_dir=ca_dir, out_dir=tmp_path, role="node", member="acme", node="s1")
    pki.issue(ca_dir=ca_dir, out_dir=tmp_path, role="broker", member="mqtt")
    records = pki.list_certificates(ca_dir=ca_dir)
    assert [(r.role, r.member, r.node) for r in records] == [
        ("node", "acme", "s1"), ("broker", "mqtt", "broker")]
    assert records[0].serial == _cert(a.cert).serial_number
    assert records[0].not_after == _cert(a.cert).not_valid_after_utc
    assert not any(r.revoked for r in records)
    assert records[0].to_json()["serial"] == str(records[0].serial)


def test_revoke_by_file_and_by_serial(ca_dir: Path, tmp_path: Path) -> None:
    a = pki.issue(ca_dir=ca_dir, out_dir=tmp_path, role="node", member="acme", node="s1")
    b = pki.issue(ca_dir=ca_dir, out_dir=tmp_path, role="node", member="acme", node="s2")
    crl_path = pki.revoke(ca_dir=ca_dir, cert=a.cert)
    assert crl_path == ca_dir / pki.CA_CRL
    crl = _crl(ca_dir)
    ca_cert = _cert(ca_dir / pki.CA_CERT)
    assert crl.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(_cert(a.cert).serial_number)
    assert crl.get_revoked_certificate_by_serial_number(_cert(b.cert).serial_number) is None
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    pki.revoke(ca_dir=ca_dir, cert=_cert(b.cert).serial_number)
    crl2 = _crl(ca_dir)
    assert len(list(crl2)) == 2
    assert crl2.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > number
    assert crl2.next_update_utc is not None
    assert crl2.next_update_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=300)
    assert [r.revoked for r in pki.list_certificates(ca_dir=ca_dir)] == [True, True]

    # Revoking again keeps the original date.
    first = pki.list_certificates(ca_dir=ca_dir)[0].revoked_at
    pki.revoke(ca_dir=ca_dir, cert=a.cert)
    assert pki.list_certificates(ca_dir=ca_dir)[0].revoked_at == first


def test_revoke_refuses_foreign_certificates_and_unknown_serials(ca_dir: Path,
                                                                 tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.create_ca(directory=other, network="net1")
    foreign = pki.issue(ca_dir=other, out_dir=tmp_path / "f", role="node", member="acme",
                        node="s1")
    with pytest.raises(PKIError, match="not issued by"):
        pki.revoke(ca_dir=ca_dir, cert=foreign.cert)
    with pytest.raises(PKIError, match="not in"):
        pki.revoke(ca_dir=ca_dir, cert=12345)
    with pytest.raises(PKIError, match="does not exist"):
        pki.revoke(ca_dir=ca_dir, cert=tmp_path / "missing.crt")


def test_revoke_certificate_missing_from_registry(ca_dir: Path, tmp_path: Path) -> None:
    a = pki.issue(ca_dir=ca_dir, out_dir=tmp_path, role="node", member="acme", node="s1")
    reg = json.loads((ca_dir / pki.REGISTRY).read_text())
    reg["certificates"] = []
    (ca_dir / pki.REGISTRY).write_text(json.dumps(reg))
    pki.revoke(ca_dir=ca_dir, cert=a.cert)
    [rec] = pki.list_certificates(ca_dir=ca_dir)
    assert rec.revoked and rec.member == "acme" and rec.node == "s1"


def test_revoked_nodes_lists_nodes_whose_newest_certificate_is_revoked(
        ca_dir: Path, tmp_path: Path) -> None:
    issued: list[pki.CertPaths] = []

    def node(member: str, name: str, **kw: object) -> pki.CertPaths:
        # A directory per certificate: a re-keyed node's files must not replace the old ones.
        issued.append(pki.issue(ca_dir=ca_dir, out_dir=tmp_path / str(len(issued)),
                                role="node", member=member, node=name,
                                **kw))  # type: ignore[arg-type]
        return issued[-1]

    assert pki.revoked_nodes(ca_dir=ca_dir) == []
    s9 = node("acme", "s9")
    node("acme", "s1")
    node("globex", "s9")
    pki.revoke(ca_dir=ca_dir, cert=s9.cert)
    # Per node: acme's s1 and globex's s9 are not affected.
    assert pki.revoked_nodes(ca_dir=ca_dir) == [("acme", "s9")]

    # Re-keying the node lifts it; revoking the new key brings it back.
    rekeyed = node("acme", "s9")
    assert pki.revoked_nodes(ca_dir=ca_dir) == []
    pki.revoke(ca_dir=ca_dir, cert=rekeyed.cert)
    assert pki.revoked_nodes(ca_dir=ca_dir) == [("acme", "s9")]

    # Revoking an older key of a node with a newer one leaves the node alone, even when
    # the older one is revoked after the newer was issued.
    old = node("globex", "s2", not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=2))
    node("globex", "s2")
    pki.revoke(ca_dir=ca_dir, cert=old.cert)
    assert pki.revoked_nodes(ca_dir=ca_dir) == [("acme", "s9")]

    # Broker and bridge certificates are not nodes.
    broker = pki.issue(ca_dir=ca_dir, out_dir=tmp_path / "b", role="broker", member="mqtt")
    bridge = pki.issue(ca_dir=ca_dir, out_dir=tmp_path / "b", role="bridge", member="br")
    pki.revoke(ca_dir=ca_dir, cert=broker.cert)
    pki.revoke(ca_dir=ca_dir, cert=bridge.cert)
    node("initech", "s1")
    pki.revoke(ca_dir=ca_dir, cert=node("hooli", "s3").cert)
    assert pki.revoked_nodes(ca_dir=ca_dir) == [("acme", "s9"), ("hooli", "s3")]


def test_refresh_crl_extends_next_update(ca_dir: Path) -> None:
    pki.refresh_crl(ca_dir=ca_dir, days=3)
    nxt = _crl(ca_dir).next_update_utc
    assert nxt is not None and nxt < dt.datetime.now(dt.UTC) + dt.timedelta(days=4)


def test_missing_or_mismatched_ca_material(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="does not exist"):
        pki.issue(ca_dir=tmp_path / "nope", out_dir=tmp_path, role="node", member="a",
                  node="n")
    a, b = tmp_path / "a", tmp_path / "b"
    pki.create_ca(directory=a, network="n")
    pki.create_ca(directory=b, network="n")
    (a / pki.CA_KEY).write_bytes((b / pki.CA_KEY).read_bytes())
    with pytest.raises(PKIError, match="does not match"):
        pki.issue(ca_dir=a, out_dir=tmp_path, role="node", member="x", node="n")


def test_cli_init_issue_revoke_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d, out = tmp_path / "ca", tmp_path / "out"
    assert main(["pki", "init", "--dir", str(d), "--network", "clinet"]) == 0
    assert main(["pki", "init", "--dir", str(d), "--network", "clinet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["pki", "issue", "--dir", str(d), "--out", str(out), "--role", "broker",
                 "--member", "mqtt", "--host", "mqtt.local", "--host", "192.0.2.1"]) == 0
    assert main(["pki", "issue", "--dir", str(d), "--out", str(out), "--role", "node",
                 "--member", "acme", "--node", "s1", "--key-type", "ec-p256"]) == 0
    assert main(["pki", "revoke", "--dir", str(d), "--cert",
                 str(out / "node-acme-s1.crt")]) == 0
    capsys.readouterr()
    assert main(["pki", "list", "--dir", str(d), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(e["role"], e["member"], e["revoked_at"] is not None) for e in listed] == [
        ("broker", "mqtt", False), ("node", "acme", True)]
    serial = listed[0]["serial"]
    assert main(["pki", "revoke", "--dir", str(d), "--serial", serial]) == 0
    assert main(["pki", "list", "--dir", str(d)]) == 0
    text = capsys.readouterr().out
    assert "revoked" in text and "mqtt" in text
    assert main(["pki", "crl", "--dir", str(d), "--days", "30"]) == 0
    assert main(["pki", "revoke", "--dir", str(d), "--serial", "xyz"]) == 2


# -- pseudonyms ----------------------------------------------------------------------------

@pytest.fixture
def anon_dir(tmp_path: Path) -> Path:
    d = tmp_path / "anon-ca"
    pki.create_ca(directory=d, network="anon1", pseudonyms=True)
    return d


def test_pseudonym_registry_is_operator_only(anon_dir: Path, tmp_path: Path) -> None:
    assert pki.has_pseudonyms(ca_dir=anon_dir)
    pki.enrol(ca_dir=anon_dir, out_dir=tmp_path / "out", company="acme", store="store-1")
    for name in (pki.PSEUDONYMS, pki.REGISTRY):
        assert stat.S_IMODE((anon_dir / name).stat().st_mode) == 0o600, name
    # Nothing outside the two 0600 registries links a name to its pseudonym.
    for path in [*(tmp_path / "out").iterdir(), anon_dir / pki.CA_CRL,
                 *(anon_dir / "issued").iterdir()]:
        assert b"acme" not in path.read_bytes() and "acme" not in path.name, path
        assert b"store-1" not in path.read_bytes() and "store-1" not in path.name, path


def test_enrol_issues_under_random_pseudonyms_stable_for_reissue(anon_dir: Path,
                                                                 tmp_path: Path) -> None:
    paths, who = pki.enrol(ca_dir=anon_dir, out_dir=tmp_path / "a", company="acme",
                           store="store-1")
    assert (who.company, who.store) == ("acme", "store-1")
    for pseudonym in (who.member, who.node):
        assert re.fullmatch(r"p[a-z2-7]{24}", pseudonym)
    ident = identity_of(_cert(paths.cert))
    assert (ident.network, ident.member, ident.node) == ("anon1", who.member, who.node)
    assert paths.cert.name == f"node-{who.member}-{who.node}.crt"
    # A re-issue (and another store of the same company) keeps the company's pseudonym.
    again, same = pki.enrol(ca_dir=anon_dir, out_dir=tmp_path / "b", company="acme",
                            store="store-1")
    assert same == who and identity_of(_cert(again.cert)) == ident
    _, second = pki.enrol(ca_dir=anon_dir, out_dir=tmp_path / "b", company="acme",
                          store="store-2")
    assert second.member == who.member and second.node != who.node
    _, other = pki.enrol(ca_dir=anon_dir, out_dir=tmp_path / "b", company="globex",
                         store="store-1")
    assert other.member != who.member and other.node not in (who.node, second.node)
    assert pki.list_pseudonyms(ca_dir=anon_dir) == [who, second, other]
    registry = pki.list_certificates(ca_dir=anon_dir)
    assert {r.member for r in registry} == {who.member, other.member}


def test_each_network_draws_its_own_pseudonyms(tmp_path: Path) -> None:
    seen: list[pki.Enrolment] = []
    for n in range(3):
        d = tmp_path / f"ca{n}"
        pki.create_ca(directory=d, network="same-net", pseudonyms=True)
        seen.append(pki.enrol(ca_dir=d, out_dir=tmp_path / f"o{n}", company="acme",
                              store="store-1")[1])
    assert len({e.member for e in seen}) == 3 and len({e.node for e in seen}) == 3
    # Replacing a CA replaces its pseudonyms too.
    d = tmp_path / "ca0"
    pki.create_ca(directory=d, network="same-net", pseudonyms=True, force=True)
    assert pki.list_pseudonyms(ca_dir=d) == []
    pki.create_ca(directory=d, network="same-net", force=True)
    assert not pki.has_pseudonyms(ca_dir=d)


def test_rotation_redraws_every_pseudonym_and_revokes_node_certificates(
        anon_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = [pki.enrol(ca_dir=anon_dir, out_dir=out, company=c, store=s)[1]
           for c, s in (("acme", "store-1"), ("acme", "store-2"), ("globex", "store-1"))]
    bridge = pki.issue(ca_dir=anon_dir, out_dir=out, role="bridge", member="bridge")
    new = pki.rotate_pseudonyms(ca_dir=anon_dir)
    assert [(e.company, e.store) for e in new] == [(e.company, e.store) for e in old]
    old_names = {p for e in old for p in (e.member, e.node)}
    assert not old_names & {p for e in new for p in (e.member, e.node)}
    assert new[0].member == new[1].member != new[2].member
    records = pki.list_certificates(ca_dir=anon_dir)
    assert {r.role for r in records if r.revoked} == {"node"}
    assert all(r.revoked for r in records if r.role == "node")
    assert {r.serial for r in records if r.revoked} == {
        e.serial_number for e in _crl(anon_dir)}
    assert _cert(bridge.cert).serial_number not in {e.serial_number for e in _crl(anon_dir)}
    # Re-enrolment issues under the new pseudonyms, again stable.
    _, again = pki.enrol(ca_dir=anon_dir, out_dir=out, company="acme", store="store-1")
    assert again == new[0]


def test_rotation_turns_pseudonyms_on_for_a_plain_ca(ca_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="assigns no pseudonyms"):
        pki.enrol(ca_dir=ca_dir, out_dir=tmp_path, company="acme", store="s1")
    pki.issue(ca_dir=ca_dir, out_dir=tmp_path, role="node", member="acme", node="s1")
    assert stat.S_IMODE((ca_dir / pki.REGISTRY).stat().st_mode) == 0o644
    assert pki.rotate_pseudonyms(ca_dir=ca_dir) == []
    assert pki.revoked_nodes(ca_dir=ca_dir) == [("acme", "s1")]
    _, who = pki.enrol(ca_dir=ca_dir, out_dir=tmp_path, company="acme", store="s1")
    assert who.member != "acme" and who.node != "s1"
    assert stat.S_IMODE((ca_dir / pki.REGISTRY).stat().st_mode) == 0o600


def test_enrol_refuses_bad_names_and_a_broken_registry(anon_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="company"):
        pki.enrol(ca_dir=anon_dir, out_dir=tmp_path, company="a/b", store="s1")
    with pytest.raises(PKIError, match="store"):
        pki.enrol(ca_dir=anon_dir, out_dir=tmp_path, company="acme", store="")
    assert pki.list_pseudonyms(ca_dir=anon_dir) == []
    (anon_dir / pki.PSEUDONYMS).write_text("{")
    with pytest.raises(PKIError, match="not valid JSON"):
        pki.list_pseudonyms(ca_dir=anon_dir)
    (anon_dir / pki.PSEUDONYMS).write_text(json.dumps({"version": 9}))
    with pytest.raises(PKIError, match="unknown layout"):
        pki.enrol(ca_dir=anon_dir, out_dir=tmp_path, company="acme", store="s1")


def test_cli_pseudonyms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d, out = tmp_path / "ca", tmp_path / "out"
    assert main(["pki", "init", "--dir", str(d), "--network", "anon", "--pseudonyms"]) == 0
    capsys.readouterr()
    # A node certificate under plain names would undo the anonymity: refused, with the way.
    assert main(["pki", "issue", "--dir", str(d), "--out", str(out), "--role", "node",
                 "--member", "acme", "--node", "s1"]) == 2
    assert "pki enrol" in capsys.readouterr().err
    assert main(["pki", "enrol", "--dir", str(d), "--out", str(out), "--company", "acme",
                 "--store", "s1"]) == 0
    text = capsys.readouterr().out
    (listed,) = pki.list_pseudonyms(ca_dir=d)
    assert f'node_id = "{listed.node}"' in text and listed.member in text
    assert main(["pki", "pseudonyms", "--dir", str(d), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [listed.to_json()]
    assert main(["pki", "pseudonyms", "--dir", str(d)]) == 0
    assert listed.node in capsys.readouterr().out
    assert main(["pki", "rotate-pseudonyms", "--dir", str(d)]) == 2
    assert "--yes" in capsys.readouterr().err
    assert pki.list_pseudonyms(ca_dir=d) == [listed]
    assert main(["pki", "rotate-pseudonyms", "--dir", str(d), "--yes"]) == 0
    assert "revoked" in capsys.readouterr().out
    (rotated,) = pki.list_pseudonyms(ca_dir=d)
    assert rotated.member != listed.member
    assert pki.revoked_nodes(ca_dir=d) == [(listed.member, listed.node)]
