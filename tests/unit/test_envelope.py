"""The envelope codec: wire format, signatures, trust, encryption, replay, staleness, fuzzing."""

from __future__ import annotations

import base64
import hashlib
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pear_mqtt.config.models import EncryptionConfig, NetworkConfig, TLSConfig
from pear_mqtt.errors import (
    ConfigError,
    DecryptionError,
    EnvelopeError,
    MalformedMessage,
    OversizedMessage,
    PKIError,
    ReplayedMessage,
    RevokedCertificate,
    SignatureError,
    StaleMessage,
    UnknownKeyError,
    UnsupportedVersion,
)
from pear_mqtt.security.envelope import EnvelopeCodec
from pear_mqtt.security.identity import Identity, subject_for
from pear_mqtt.security.revocation import CrlFiles
from pear_mqtt.security.seal import (
    SealOpener,
    generate_x25519_key,
    load_x25519_private_key,
    load_x25519_public_key,
    save_x25519_private_key,
    save_x25519_public_key,
    seal,
)
from pear_mqtt.security.signing import Signer, VerifiedSigner
from pear_mqtt.security.trust import TrustStore

pytestmark = pytest.mark.unit

NOW = 1_750_000_000.0
DAY = 86400.0
NET = "net-a"


# -- a small PKI built with cryptography directly -------------------------------------------

def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _new_key(kind: str) -> Any:
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    raise AssertionError(kind)


def _sign_algorithm(key: Any) -> Any:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


V2_DOMAIN = b"pear_mqtt envelope v2 sha256\x00"


def signed_region(unsigned: bytes) -> bytes:
    """What an envelope's signature covers (docs/DESIGN.md, Envelope), given its bytes before
    ``,"sig":`` and a ``}``: in v1 those bytes, in v2 a domain tag and their SHA-256."""
    if unsigned.startswith(b'{"v":1,'):
        return unsigned
    return V2_DOMAIN + hashlib.sha256(unsigned).digest()


def _raw_sign(key: Any, data: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    signature: bytes = key.sign(data, ec.ECDSA(hashes.SHA256()))
    return signature


@dataclass
class CA:
    key: Any
    cert: x509.Certificate
    serial: int = 100

    @classmethod
    def make(cls, name: str, key_type: str = "ed25519") -> CA:
        key = _new_key(key_type)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(1)
                .not_valid_before(_dt(NOW - 10 * DAY)).not_valid_after(_dt(NOW + 3650 * DAY))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, _sign_algorithm(key)))
        return cls(key=key, cert=cert)

    def issue(self, *, member: str = "acme", node: str = "store-1", network: str = NET,
              key_type: str = "ed25519", not_before: float = NOW - DAY,
              not_after: float = NOW + 365 * DAY,
              subject: x509.Name | None = None) -> tuple[Any, x509.Certificate]:
        self.serial += 1
        key = _new_key(key_type)
        cert = (x509.CertificateBuilder()
                .subject_name(subject or subject_for(network=network, member=member, node=node))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(self.serial)
                .not_valid_before(_dt(not_before)).not_valid_after(_dt(not_after))
                .sign(self.key, _sign_algorithm(self.key)))
        return key, cert

    def crl(self, *certs: x509.Certificate) -> x509.CertificateRevocationList:
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(_dt(NOW - DAY)).next_update(_dt(NOW + 30 * DAY)))
        for cert in certs:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
                .revocation_date(_dt(NOW - 3600)).build())
        return builder.sign(self.key, _sign_algorithm(self.key))


@dataclass
class Clock:
    t: float = NOW

    def __call__(self) -> float:
        return self.t


@dataclass
class PKI:
    ca: CA
    alice_key: Any
    alice: x509.Certificate  # acme/store-1
    bob_key: Any
    bob: x509.Certificate  # globex/store-9
    extra: dict[str, tuple[Any, x509.Certificate]] = field(default_factory=dict)

    def trust(self, **kw: Any) -> TrustStore:
        kw.setdefault("network", NET)
        return TrustStore(cas=[self.ca.cert], **kw)

    def signer(self, who: str = "alice") -> Signer:
        key, cert = (self.alice_key, self.alice) if who == "alice" else (self.bob_key, self.bob)
        return Signer(private_key=key, certificate=cert)

    def codec(self, who: str = "alice", *, clock: Clock | None = None,
              trust: TrustStore | None = None, **kw: Any) -> EnvelopeCodec:
        return EnvelopeCodec(signer=self.signer(who), trust=trust or self.trust(),
                             clock=clock or Clock(), **kw)


@pytest.fixture(scope="module")
def pki() -> PKI:
    ca = CA.make("Net A CA")
    alice_key, alice = ca.issue(member="acme", node="store-1")
    bob_key, bob = ca.issue(member="globex", node="store-9")
    return PKI(ca=ca, alice_key=alice_key, alice=alice, bob_key=bob_key, bob=bob)


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def unb64(text: bytes | str) -> bytes:
    if isinstance(text, str):
        text = text.encode()
    return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def resign(wire: bytes, key: Any, edit: Callable[[bytes], bytes] = lambda h: h) -> bytes:
    """Edit the signed part of ``wire`` and sign it again with ``key`` (an insider's forgery)."""
    head = edit(wire[:wire.rindex(b',"sig":"')])
    return head + b',"sig":"' + b64(_raw_sign(key, signed_region(head + b"}"))) + b'"}'


def craft(members: list[tuple[str, Any]], *, key: Any, cert: x509.Certificate,
          raw: dict[str, bytes] | None = None) -> bytes:
    """Build and sign an envelope member by member (values JSON-encoded unless in ``raw``)."""
    raw = raw or {}
    parts = [b'"%s":%s' % (k.encode(), raw[k] if k in raw else json.dumps(v).encode())
             for k, v in members]
    head = b"{" + b",".join(parts) + b',"cert":"' + b64(der(cert)) + b'"'
    return head + b',"sig":"' + b64(_raw_sign(key, signed_region(head + b"}"))) + b'"}'


def header(sender: str = "acme/store-1", *, seq: int = 1, ts: float = NOW,
           kind: str = "insights") -> list[tuple[str, Any]]:
    return [("v", 1), ("kind", kind), ("id", "abcdefghijklmnopqrstuv"), ("from", sender),
            ("seq", seq), ("ts", ts)]


def group_keys(*kids: str, active: str | None = None) -> EncryptionConfig:
    return EncryptionConfig(
        keys={kid: base64.b64encode(bytes([i + 1]) * 32).decode() for i, kid in enumerate(kids)},
        active=active)


def items(n: int) -> dict[str, Any]:
    return {"items": [{"category": "grocery/dairy", "region": "eu", "i": i,
                       "price_data": {"currency": "EUR", "price": 1.25 + i / 100}}
                      for i in range(n)]}


# -- round trips and the wire format --------------------------------------------------------

def test_plain_round_trip(pki: PKI) -> None:
    tx, rx = pki.codec("alice"), pki.codec("bob")
    body = {"items": [{"x": 1, "name": "Käse €"}], "note": None}
    wire = tx.encode(kind="insights", body=body)
    got = rx.decode(wire)
    msg = got.message
    assert msg.body == body and msg.kind == "insights" and msg.version == 1
    assert msg.sender == "acme/store-1" and msg.key_id is None
    assert msg.timestamp == NOW and msg.sequence == int(NOW * 1000) * 1000 + 1
    assert len(msg.message_id) == 22
    assert got.signer == Identity(network=NET, member="acme", node="store-1")
    assert got.raw_size == len(wire)
    assert rx.stats == {"decoded": 1}
    assert rx.decode(bytearray(tx.encode(kind="state", body=1))).message.body == 1
    assert rx.decode(memoryview(tx.encode(kind="state", body=2))).message.body == 2


def test_wire_layout_and_signed_region(pki: PKI) -> None:
    wire = pki.codec().encode(kind="insights", body={"a": [1, 2]})
    assert wire.startswith(b'{"v":2,"kind":"insights","id":"')
    obj = json.loads(wire)
    assert list(obj) == ["v", "kind", "id", "from", "seq", "ts", "body", "cert", "sig"]
    assert unb64(obj["cert"]) == der(pki.alice)
    assert b"=" not in wire and b" " not in wire
    # The contract (v2): sig covers a domain tag and the SHA-256 of wire[:start_of_sig_member]
    # + "}" -- checked independently here.
    sig_at = wire.rindex(b',"sig":"')
    signed = V2_DOMAIN + hashlib.sha256(wire[:sig_at] + b"}").digest()
    pki.alice.public_key().verify(unb64(obj["sig"]), signed)  # type: ignore[call-arg,union-attr]


def test_v1_envelopes_are_still_read_and_versions_cannot_borrow_signatures(pki: PKI) -> None:
    """v1 signed the bytes themselves (history logs and retained states hold such envelopes);
    a signature made under one version's rule never verifies under the other's."""
    rx = pki.codec("bob")
    v1 = craft([*header(), ("body", {"n": 1})], key=pki.alice_key, cert=pki.alice)
    assert rx.decode(v1).message.body == {"n": 1}
    # The same v1 bytes relabelled v2 (same length, signature over the raw bytes): refused.
    relabelled = v1.replace(b'{"v":1,', b'{"v":2,', 1)
    with pytest.raises(SignatureError):
        pki.codec("bob").decode(relabelled)
    # A v2 envelope relabelled v1 keeps a signature over a digest: refused.
    v2 = pki.codec().encode(kind="insights", body={"n": 2})
    with pytest.raises(SignatureError):
        pki.codec("bob").decode(v2.replace(b'{"v":2,', b'{"v":1,', 1))
    assert pki.codec("bob").decode(v2).message.body == {"n": 2}
    # Each label signed, by the key's owner, under the other label's rule: refused too (a
    # reader that tried both rules would take these).
    for label, rule in ((2, lambda u: u), (1, lambda u: V2_DOMAIN + hashlib.sha256(u).digest())):
        members = [("v", label), *header()[1:], ("body", {"n": 3})]
        parts = [b'"%s":%s' % (k.encode(), json.dumps(v).encode()) for k, v in members]
        head = b"{" + b",".join(parts) + b',"cert":"' + b64(der(pki.alice)) + b'"'
        forged = head + b',"sig":"' + b64(_raw_sign(pki.alice_key, rule(head + b"}"))) + b'"}'
        with pytest.raises(SignatureError):
            pki.codec("bob").decode(forged)


def test_a_codec_writes_the_version_it_is_told(pki: PKI) -> None:
    """``write_version`` (``reliability.envelope_version``): version 1 for a network that is
    still upgrading; what it writes is signed over its bytes, and read by a v2 codec."""
    wire = pki.codec(write_version=1).encode(kind="insights", body={"n": 1})
    assert wire.startswith(b'{"v":1,"kind":"insights","id":"')
    sig_at = wire.rindex(b',"sig":"')
    pki.alice.public_key().verify(unb64(json.loads(wire)["sig"]),  # type: ignore[call-arg,union-attr]
                                  wire[:sig_at] + b"}")
    assert pki.codec("bob").decode(wire).message.body == {"n": 1}
    with pytest.raises(ConfigError, match="envelope version must be one of"):
        pki.codec(write_version=3)


def test_sequence_numbers_grow_and_survive_restart(pki: PKI) -> None:
    clock = Clock()
    first = pki.codec(clock=clock)
    seqs = [json.loads(first.encode(kind="state", body=i))["seq"] for i in range(5)]
    assert seqs == list(range(seqs[0], seqs[0] + 5))
    assert seqs[0] == int(NOW * 1000) * 1000 + 1
    clock.t += 0.001  # a restart one millisecond later, no state kept
    again = pki.codec(clock=clock)
    assert json.loads(again.encode(kind="state", body=0))["seq"] > seqs[-1]


def test_persisted_sequence_survives_a_clock_stepped_back(pki: PKI, tmp_path: Path) -> None:
    seq_file = tmp_path / "outbox.sqlite.seq"
    first = pki.codec(clock=Clock(NOW + 120))  # ran two minutes fast
    first.persist_sequence(seq_file)
    last = max(json.loads(first.encode(kind="state", body=i))["seq"] for i in range(3))
    again = pki.codec(clock=Clock(NOW))  # restarted with the corrected clock
    assert json.loads(again.encode(kind="state", body=0))["seq"] < last  # the failure mode
    fixed = pki.codec(clock=Clock(NOW))
    fixed.persist_sequence(seq_file)
    assert json.loads(fixed.encode(kind="state", body=0))["seq"] > last
    seq_file.write_text("garbage")
    with pytest.raises(ConfigError, match="sequence reservation"):
        pki.codec().persist_sequence(seq_file)


def test_sequence_reservations_move_a_block_ahead_and_a_failed_one_does_not_stop_sending(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from pear_mqtt.security import sequence

    monkeypatch.setattr(sequence, "SEQUENCE_BLOCK", 3)
    path = tmp_path / "node.seq"
    counter = sequence.SequenceCounter(start=100)
    counter.persist(path)
    assert sequence.read_reservation(path) == 103
    assert [counter.next() for _ in range(3)] == [101, 102, 103]
    assert sequence.read_reservation(path) == 106  # the block's last number reserved the next
    path.unlink()
    path.mkdir()  # the next reservation cannot be written
    with caplog.at_level("ERROR", logger="pear_mqtt.security.sequence"):
        assert [counter.next() for _ in range(4)] == [104, 105, 106, 107]
    assert "cannot record the sequence reservation" in caplog.text
    assert counter.last == 107


def test_encrypted_round_trip_hides_body(pki: PKI) -> None:
    keys = group_keys("k1", active="k1")
    tx, rx = pki.codec(encryption=keys), pki.codec("bob", encryption=keys)
    body = {"items": [{"secret": "PRICE-4711"}]}
    wire = tx.encode(kind="insights", body=body)
    assert b"PRICE-4711" not in wire
    assert list(json.loads(wire)) == ["v", "kind", "id", "from", "seq", "ts", "kid", "nonce",
                                      "enc", "cert", "sig"]
    got = rx.decode(wire)
    assert got.message.body == body and got.message.key_id == "k1"
    # encrypt=False overrides the active key; the plain message is still readable.
    plain = tx.encode(kind="insights", body=body, encrypt=False)
    assert b"PRICE-4711" in plain and rx.decode(plain).message.key_id is None


def test_encryption_configuration_errors(pki: PKI) -> None:
    with pytest.raises(ConfigError, match="no active group key"):
        pki.codec().encode(kind="state", body={}, encrypt=True)
    no_active = pki.codec(encryption=group_keys("k1"))
    assert b'"body"' in no_active.encode(kind="state", body={})
    short = EncryptionConfig(keys={"k-short": base64.b64encode(b"x" * 16).decode()})
    with pytest.raises(ConfigError, match="'k-short' decodes to 16 bytes"):
        pki.codec(encryption=short)
    with pytest.raises(ConfigError, match="'k-bad' is not valid base64"):
        pki.codec(encryption=EncryptionConfig(keys={"k-bad": "not base64 !!"}))
    urlsafe = EncryptionConfig(keys={"k": base64.urlsafe_b64encode(b"\xfb" * 32).decode()},
                               active="k")
    tx = pki.codec(encryption=urlsafe)
    assert pki.codec("bob", encryption=urlsafe).decode(
        tx.encode(kind="state", body=[1])).message.body == [1]


def test_batch_of_500_items(pki: PKI) -> None:
    tx = pki.codec(encryption=group_keys("k1", active="k1"))
    rx = pki.codec("bob", encryption=group_keys("k1"))
    body = items(500)
    assert rx.decode(tx.encode(kind="insights", body=body)).message.body == body
    assert rx.decode(tx.encode(kind="insights", body=body, encrypt=False)).message.body == body


def test_key_rotation(pki: PKI) -> None:
    old = pki.codec(encryption=group_keys("k1", "k2", active="k1"))
    # The rotated sender is a restart a second later (same identity, higher sequence).
    new = pki.codec(encryption=group_keys("k1", "k2", active="k2"), clock=Clock(NOW + 1))
    w_old, w_new = old.encode(kind="state", body="a"), new.encode(kind="state", body="b")
    both = pki.codec("bob", encryption=group_keys("k1", "k2"))
    assert both.decode(w_old).message.key_id == "k1"
    assert both.decode(w_new).message.key_id == "k2"
    only_old = pki.codec("bob", encryption=group_keys("k1"))
    with pytest.raises(UnknownKeyError, match="'k2'"):
        only_old.decode(w_new)
    with pytest.raises(UnknownKeyError):
        pki.codec("bob").decode(w_old)  # a node without any group key


def test_gcm_failure_is_decryption_error(pki: PKI) -> None:
    tx = pki.codec(encryption=group_keys("k1", active="k1"))
    other = EncryptionConfig(keys={"k1": base64.b64encode(b"\x09" * 32).decode()})
    with pytest.raises(DecryptionError):
        pki.codec("bob", encryption=other).decode(tx.encode(kind="state", body={}))


def test_ciphertext_is_bound_to_its_header(pki: PKI) -> None:
    """A valid signer re-sending someone's ciphertext under another header cannot get it read."""
    keys = group_keys("k1", active="k1")
    wire = pki.codec(encryption=keys).encode(kind="insights", body={"x": 1})
    seq = json.loads(wire)["seq"]
    moved = resign(wire, pki.alice_key,
                   lambda h: h.replace(b'"seq":%d' % seq, b'"seq":%d' % (seq + 7)))
    with pytest.raises(DecryptionError):
        pki.codec("bob", encryption=keys).decode(moved)


@pytest.mark.parametrize("key_type", ["ed25519", "p256"])
@pytest.mark.parametrize("ca_type", ["ed25519", "p256"])
def test_key_types(key_type: str, ca_type: str) -> None:
    ca = CA.make(f"CA {ca_type}", ca_type)
    key, cert = ca.issue(key_type=key_type)
    signer = Signer(private_key=key, certificate=cert)
    assert signer.algorithm == ("ed25519" if key_type == "ed25519" else "ecdsa-p256")
    trust = TrustStore(cas=[ca.cert], network=NET)
    tx = EnvelopeCodec(signer=signer, trust=trust, clock=Clock())
    rx = EnvelopeCodec(signer=signer, trust=TrustStore(cas=[ca.cert]), clock=Clock())
    wire = tx.encode(kind="insights", body=items(3))
    assert rx.decode(wire).signer.sender == "acme/store-1"
    with pytest.raises(SignatureError):
        rx.decode(resign(wire, _new_key(key_type)))


def test_signer_rejects_bad_key_material(pki: PKI) -> None:
    key, cert = pki.ca.issue(key_type="p384")
    with pytest.raises(PKIError, match="not supported"):
        Signer(private_key=key, certificate=cert)
    with pytest.raises(PKIError, match="does not belong"):
        Signer(private_key=pki.bob_key, certificate=pki.alice)


# -- trust: which certificates may sign -----------------------------------------------------

def _rejected_signer(pki: PKI, case: str) -> tuple[bytes, TrustStore]:
    """An envelope signed with a certificate that ``case`` makes unacceptable."""
    trust = pki.trust()
    if case == "expired":
        key, cert = pki.ca.issue(not_before=NOW - 10 * DAY, not_after=NOW - 60)
    elif case == "not_yet_valid":
        key, cert = pki.ca.issue(not_before=NOW + 3600)
    elif case == "other_ca_same_name":
        key, cert = CA.make("Net A CA").issue()
    elif case == "other_ca":
        key, cert = CA.make("Evil CA").issue()
    elif case == "revoked":
        key, cert = pki.ca.issue()
        trust = pki.trust(crls=[pki.ca.crl(cert)])
    elif case == "wrong_network":
        key, cert = pki.ca.issue(network="net-b")
    elif case == "p384_key":
        key, cert = pki.ca.issue(key_type="p384")
    elif case == "subject_outside_scheme":
        key, cert = pki.ca.issue(subject=x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, "acme")]))
    else:
        raise AssertionError(case)
    sender = "acme/store-1"
    return craft([*header(sender), ("body", {"x": 1})], key=key, cert=cert), trust


@pytest.mark.parametrize(("case", "words"), [
    ("expired", "expired at"),
    ("not_yet_valid", "not valid before"),
    ("other_ca_same_name", "not issued by a trusted CA"),
    ("other_ca", "not issued by a trusted CA"),
    ("revoked", "is revoked"),
    ("wrong_network", "belongs to network 'net-b', not 'net-a'"),
    ("p384_key", "Ed25519 or ECDSA P-256"),
    ("subject_outside_scheme", "exactly one"),
])
def test_untrusted_certificates_are_refused(pki: PKI, case: str, words: str) -> None:
    wire, trust = _rejected_signer(pki, case)
    rx = pki.codec("bob", trust=trust)
    with pytest.raises(SignatureError, match=words):
        rx.decode(wire)
    with pytest.raises(SignatureError, match=words):  # the cached verdict says the same
        rx.decode(wire)
    # A revocation is a refusal of its own (RevokedCertificate, a SignatureError).
    assert rx.stats == {"revoked" if case == "revoked" else "bad_signature": 2}


def test_a_malformed_name_is_refused_without_a_warning(pki: PKI) -> None:
    """cryptography warns as it reads a malformed name (a country of seven letters, as a
    fuzzer writes); the receiver refuses the certificate as any other, and nothing else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cryptography warns as the test writes it, too
        name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "ACMEXYZ", _validate=False),
                          x509.NameAttribute(NameOID.COMMON_NAME, "acme/store-1")])
        key, cert = CA.make("Evil CA").issue(subject=name)
    wire = craft([*header("acme/store-1"), ("body", {"x": 1})], key=key, cert=cert)
    rx = pki.codec("bob", trust=pki.trust())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SignatureError, match="not issued by a trusted CA"):
            rx.decode(wire)
    assert rx.stats == {"bad_signature": 1}


def test_revocation_only_hits_the_listed_certificate(pki: PKI) -> None:
    _key, cert = pki.ca.issue()
    rx = pki.codec("bob", trust=pki.trust(crls=[pki.ca.crl(cert)]))
    assert rx.decode(pki.codec().encode(kind="state", body=1)).message.body == 1


@dataclass
class Monotonic:
    t: float = 0.0

    def __call__(self) -> float:
        return self.t


def _write_crl(path: Path, crl: x509.CertificateRevocationList) -> None:
    tmp = path.with_suffix(".tmp")  # replaced whole, as the CA writes it
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    tmp.replace(path)


def test_crl_file_is_refreshed_when_it_changes_at_most_once_per_interval(
        pki: PKI, tmp_path: Path) -> None:
    """A receiver learns of a revocation from the CRL file without a restart; the file is
    looked at (one stat) at most once per interval."""
    ca_file, crl_file = tmp_path / "ca.pem", tmp_path / "ca.crl"
    ca_file.write_bytes(_pem(pki.ca.cert))
    _write_crl(crl_file, pki.ca.crl())
    key, cert = pki.ca.issue(member="initech", node="store-3")
    tx = EnvelopeCodec(signer=Signer(private_key=key, certificate=cert), trust=pki.trust(),
                       clock=Clock())
    mono = Monotonic()
    files = CrlFiles([crl_file], interval=5.0, clock=mono)
    trust = TrustStore(cas=[pki.ca.cert], crls=files.load(), network=NET, revocation=files)
    rx = pki.codec("bob", trust=trust)
    assert trust.revocation is files and files.interval == 5.0
    assert rx.decode(tx.encode(kind="state", body=1)).signer.node == "store-3"
    alice = pki.codec()
    assert rx.decode(alice.encode(kind="state", body=1)).signer.member == "acme"

    _write_crl(crl_file, pki.ca.crl(cert))
    mono.t = 4.9  # not yet time to look: the cached verdict stands
    assert rx.decode(tx.encode(kind="state", body=2)).message.body == 2
    mono.t = 5.0
    with pytest.raises(RevokedCertificate, match="is revoked"):
        rx.decode(tx.encode(kind="state", body=3))
    with pytest.raises(RevokedCertificate):
        rx.decode(tx.encode(kind="state", body=4, embed_certificate=False))
    assert rx.stats["revoked"] == 2
    # Other signers keep their cached verdicts.
    validations = trust.validations
    assert rx.decode(alice.encode(kind="state", body=5)).signer.member == "acme"
    assert trust.validations == validations
    # Unchanged file: nothing is re-read; a lifted revocation is taken in like any change.
    mono.t = 10.0
    assert not trust.refresh_crls()
    _write_crl(crl_file, pki.ca.crl())
    assert not trust.refresh_crls()  # checked at 10.0 already
    mono.t = 15.0
    assert trust.refresh_crls()
    assert rx.decode(tx.encode(kind="state", body=6)).message.body == 6


def test_unusable_crl_update_keeps_the_revocations_loaded_before(
        pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ca_file, crl_file = tmp_path / "ca.pem", tmp_path / "ca.crl"
    ca_file.write_bytes(_pem(pki.ca.cert))
    key, cert = pki.ca.issue(member="initech", node="store-4")
    _write_crl(crl_file, pki.ca.crl(cert))
    trust = TrustStore.from_files(ca_files=[ca_file], crl_files=[crl_file], network=NET,
                                  crl_check_interval=0)
    assert trust.revocation is not None and trust.revocation.paths == (crl_file,)
    rx = pki.codec("bob", trust=trust)
    tx = EnvelopeCodec(signer=Signer(private_key=key, certificate=cert), trust=pki.trust(),
                       clock=Clock())
    for broken in (b"half a CRL", None, CA.make("Evil CA").crl()):
        if broken is None:
            crl_file.unlink()
        elif isinstance(broken, bytes):
            crl_file.write_bytes(broken)
        else:
            _write_crl(crl_file, broken)
        assert not trust.refresh_crls()
        with pytest.raises(RevokedCertificate):
            rx.decode(tx.encode(kind="state", body=1))
    assert "keeping the revocations loaded before" in caplog.text
    with pytest.raises(PKIError, match="cannot load CRL"):
        crl_file.write_bytes(b"junk")
        TrustStore.from_files(ca_files=[ca_file], crl_files=[crl_file], network=NET)


def test_codec_from_config_reads_tls_crl_file(pki: PKI, tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(_pem(pki.ca.cert))
    (tmp_path / "node.pem").write_bytes(_pem(pki.bob))
    (tmp_path / "node.key").write_bytes(pki.bob_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    _write_crl(tmp_path / "ca.crl", pki.ca.crl(pki.alice))
    config = NetworkConfig(
        mode="consortium", company_id="globex", network_id=NET, node_id="store-9",
        broker_url="mqtts://localhost:8883",
        tls=TLSConfig(ca_file=tmp_path / "ca.pem", cert_file=tmp_path / "node.pem",
                      key_file=tmp_path / "node.key", crl_file=tmp_path / "ca.crl",
                      crl_check_interval=3))
    rx = EnvelopeCodec.from_config(config, clock=Clock())
    assert rx.trust.revocation is not None and rx.trust.revocation.interval == 3
    with pytest.raises(RevokedCertificate):
        rx.decode(pki.codec().encode(kind="state", body=1))


def test_network_check_is_optional(pki: PKI) -> None:
    key, cert = pki.ca.issue(network="net-b")
    wire = craft([*header(), ("body", 1)], key=key, cert=cert)
    assert pki.codec("bob", trust=pki.trust(network=None)).decode(wire).signer.network == "net-b"


def test_certificate_expiring_after_being_cached(pki: PKI) -> None:
    key, cert = pki.ca.issue(not_after=NOW + 100)
    clock = Clock()
    rx = pki.codec("bob", clock=clock)
    tx = EnvelopeCodec(signer=Signer(private_key=key, certificate=cert), trust=pki.trust(),
                       clock=clock)
    rx.decode(tx.encode(kind="state", body=1))
    clock.t += 101
    with pytest.raises(SignatureError, match="expired"):
        rx.decode(tx.encode(kind="state", body=2))


def test_certificate_validation_is_cached(pki: PKI) -> None:
    rx = pki.codec("bob")
    tx = pki.codec()
    before = rx.trust.validations  # bob's own certificate, validated by the constructor
    for i in range(5):
        rx.decode(tx.encode(kind="state", body=i))
    assert rx.trust.validations - before == 1


def test_one_signature_check_per_batch(pki: PKI, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = VerifiedSigner.verify

    def counting(self: VerifiedSigner, signature: bytes, data: bytes) -> None:
        calls.append(len(data))
        real(self, signature, data)

    monkeypatch.setattr(VerifiedSigner, "verify", counting)
    tx, rx = pki.codec(), pki.codec("bob")
    body = items(256)
    wire = tx.encode(kind="insights", body=body)
    assert rx.decode(wire).message.body == body
    assert calls == [len(V2_DOMAIN) + 32]  # one check, over the batch's digest


def test_libsodium_signatures_are_openssl_signatures(pki: PKI) -> None:
    """Ed25519 is deterministic: the libsodium path signs exactly as OpenSSL does, and what
    either signs verifies with the other."""
    data = b'{"v":1,"kind":"insights"}' * 40
    ours = pki.signer().sign(data)
    assert ours == pki.alice_key.sign(data)
    pki.alice.public_key().verify(ours, data)  # OpenSSL accepts libsodium's signature
    verified = pki.trust().verify_certificate(der(pki.alice), now=NOW)
    assert verified.raw_ed25519 == pki.alice.public_key().public_bytes_raw()
    verified.verify(pki.alice_key.sign(data), data)  # and libsodium OpenSSL's


@pytest.mark.parametrize("case", ["flipped bit", "short", "long", "borrowed prefix", "empty"])
def test_libsodium_verification_refuses_bad_signatures(pki: PKI, case: str) -> None:
    data = b'{"v":1,"kind":"insights","body":{"x":1}}'
    sig = pki.alice_key.sign(data)
    verified = pki.trust().verify_certificate(der(pki.alice), now=NOW)
    bad_sig, bad_data = {
        "flipped bit": (bytes([sig[0] ^ 1]) + sig[1:], data),
        "short": (sig[:63], data),
        "long": (sig + b"\0", data),
        # libsodium reads signature and message from one buffer: a short "signature" must not
        # borrow the message's first bytes.
        "borrowed prefix": (sig[:60], sig[60:] + data),
        "empty": (b"", sig + data),
    }[case]
    with pytest.raises(SignatureError, match="does not verify"):
        verified.verify(bad_sig, bad_data)


# -- header tampering and forgery -----------------------------------------------------------

@pytest.mark.parametrize("edit", [
    lambda w: w.replace(b'"from":"acme/store-1"', b'"from":"acme/store-2"'),
    lambda w: w.replace(b'"seq":1750000000000001', b'"seq":1750000000000002'),
    lambda w: w.replace(b'"kind":"insights"', b'"kind":"state"'),
    lambda w: w.replace(b'"ts":1750000000.0', b'"ts":1750000001.0'),
    lambda w: w.replace(b'"kid":"k1"', b'"kid":"k2"'),
], ids=["from", "seq", "kind", "ts", "kid"])
def test_header_tampering_breaks_the_signature(pki: PKI, edit: Callable[[bytes], bytes]) -> None:
    keys = group_keys("k1", "k2", active="k1")
    wire = pki.codec(encryption=keys).encode(kind="insights", body={"x": 1})
    tampered = edit(wire)
    assert tampered != wire
    with pytest.raises(SignatureError, match="does not verify"):
        pki.codec("bob", encryption=keys).decode(tampered)


def test_forged_from_with_a_valid_certificate(pki: PKI) -> None:
    """Bob holds a valid certificate but claims to be Alice."""
    wire = pki.codec("bob").encode(kind="insights", body={"x": 1})
    forged = resign(wire, pki.bob_key,
                    lambda h: h.replace(b'"from":"globex/store-9"', b'"from":"acme/store-1"'))
    with pytest.raises(SignatureError, match="does not match the signing certificate"):
        pki.codec().decode(forged)
    # ... or embeds Alice's certificate and signs with his own key.
    alice_cert = b64(der(pki.alice))
    bob_cert = b64(der(pki.bob))
    swapped = resign(wire, pki.bob_key, lambda h: h.replace(bob_cert, alice_cert).replace(
        b'"from":"globex/store-9"', b'"from":"acme/store-1"'))
    with pytest.raises(SignatureError, match="does not verify"):
        pki.codec().decode(swapped)


# -- certificate-less envelopes ("sk") --------------------------------------------------------

def test_signer_key_reference_needs_a_known_certificate(pki: PKI) -> None:
    tx = pki.codec(embed_certificate=False)
    wire = tx.encode(kind="insights", body={"x": 1})
    obj = json.loads(wire)
    assert "cert" not in obj and unb64(obj["sk"]) == tx.signer.fingerprint
    assert len(wire) < 400
    rx = pki.codec("bob")
    with pytest.raises(SignatureError, match="has not been seen"):
        rx.decode(wire)
    rx.decode(tx.encode(kind="presence", body={}, embed_certificate=True))
    assert rx.decode(wire).message.body == {"x": 1}
    # A node reads its own cert-less envelopes (its certificate is registered up front).
    assert tx.decode(tx.encode(kind="state", body=3)).message.body == 3


# -- replay protection ------------------------------------------------------------------------

def test_same_message_twice_is_a_replay(pki: PKI) -> None:
    tx, rx = pki.codec(), pki.codec("bob")
    wire = tx.encode(kind="insights", body={"x": 1})
    rx.decode(wire)
    with pytest.raises(ReplayedMessage, match=r"not new|already seen"):
        rx.decode(wire)
    assert rx.decode(wire, check_replay=False).message.body == {"x": 1}  # retained re-delivery
    assert rx.stats == {"decoded": 2, "replayed": 1}


def test_replay_window(pki: PKI) -> None:
    tx, rx = pki.codec(), pki.codec("bob", replay_window=8)
    wires = [tx.encode(kind="state", body=i) for i in range(12)]
    for i in (4, 2, 0, 1, 3):  # out of order inside the window: accepted once each
        assert rx.decode(wires[i]).message.body == i
    with pytest.raises(ReplayedMessage):
        rx.decode(wires[2])
    rx.decode(wires[11])  # window now covers seq indexes 4..11
    with pytest.raises(ReplayedMessage):
        rx.decode(wires[3])  # behind the window, although never seen
    for i in (10, 5, 6):
        rx.decode(wires[i])
    with pytest.raises(ReplayedMessage):
        rx.decode(wires[4])  # seen before the window moved, still inside: remembered


def test_replay_state_is_bounded(pki: PKI) -> None:
    rx = pki.codec("bob", max_senders=2)
    for node in ("n1", "n2", "n3"):
        key, cert = pki.ca.issue(node=node)
        tx = EnvelopeCodec(signer=Signer(private_key=key, certificate=cert), trust=pki.trust(),
                           clock=Clock())
        rx.decode(tx.encode(kind="state", body=node))
    assert rx.tracked_senders == 2


def test_rejected_message_does_not_burn_its_sequence(pki: PKI) -> None:
    keys = group_keys("k1", active="k1")
    wire = pki.codec(encryption=keys).encode(kind="state", body=1)
    rx = pki.codec("bob")
    with pytest.raises(UnknownKeyError):
        rx.decode(wire)
    assert pki.codec("bob", encryption=keys).decode(wire).message.body == 1


# -- time -------------------------------------------------------------------------------------

def test_stale_and_future_timestamps(pki: PKI) -> None:
    clock = Clock()
    wire = pki.codec().encode(kind="state", body=1)
    rx = pki.codec("bob", clock=clock, max_clock_skew=300, max_age=3600)
    clock.t = NOW + 3601
    with pytest.raises(StaleMessage, match="old"):
        rx.decode(wire)
    clock.t = NOW - 301
    with pytest.raises(StaleMessage, match="future"):
        rx.decode(wire)
    clock.t = NOW + 20
    with pytest.raises(StaleMessage):
        rx.decode(wire, max_age=10)
    clock.t = NOW - 299
    assert rx.decode(wire).message.body == 1
    assert rx.stats == {"stale": 3, "decoded": 1}


def test_an_entry_proven_by_a_signed_head_opens_without_its_own_checks(pki: PKI) -> None:
    keys = group_keys("k1", active="k1")
    clock = Clock()
    wire = pki.codec(encryption=keys).encode(kind="insights", body={"x": 1})
    rx = pki.codec("bob", clock=clock, encryption=keys, max_age=3600)
    acme = Identity(network=NET, member="acme", node="store-1")
    clock.t = NOW + 86400  # old on purpose: a repaired log entry
    with pytest.raises(StaleMessage):
        rx.decode(wire)
    for _ in range(2):  # neither its age nor its sequence number is checked
        got = rx.open_proven(wire, acme)
        assert got.message.body == {"x": 1} and got.signer == acme
    with pytest.raises(SignatureError, match="does not match"):
        rx.open_proven(wire, Identity(network=NET, member="globex", node="store-9"))
    with pytest.raises(DecryptionError):
        rx.open_proven(wire.replace(b'"enc":"', b'"enc":"AAAA', 1), acme)


# -- size, version, shape ---------------------------------------------------------------------

def test_oversized(pki: PKI) -> None:
    big = pki.codec().encode(kind="insights", body=items(40))
    assert len(big) > 2048
    with pytest.raises(OversizedMessage):
        pki.codec("bob", max_bytes=2048).decode(big)
    with pytest.raises(OversizedMessage, match="split the batch"):
        pki.codec(max_bytes=2048).encode(kind="insights", body=items(40))
    with pytest.raises(OversizedMessage):
        pki.codec("bob", max_bytes=2048).decode(b"x" * 5000)  # before any parsing


def test_versions(pki: PKI) -> None:
    rx = pki.codec("bob")
    with pytest.raises(UnsupportedVersion, match="version 3; this build reads 1 and 2"):
        rx.decode(b'{"v":3,"kind":"insights","anything":"new"}')
    with pytest.raises(UnsupportedVersion):
        rx.decode(craft([("v", 7), *header()[1:], ("body", 1)], key=pki.alice_key,
                        cert=pki.alice))
    with pytest.raises(MalformedMessage, match="integer"):
        rx.decode(b'{"v":"1","sig":"AAAA"}')
    with pytest.raises(SignatureError, match="unsigned"):
        rx.decode(b'{"v":1,"kind":"insights","id":"abcdefghij","from":"a/b","seq":1,"ts":1,'
                  b'"body":{}}')


@pytest.mark.parametrize("payload", [
    b"", b"\xff\xfe\x00", b"not json", b"[1,2]", b"null", b'"text"', b'{"v":1,', b"{}",
    b'{"v":1,"sig":"AA"}x', "a str, not bytes",
])
def test_not_an_envelope(pki: PKI, payload: Any) -> None:
    with pytest.raises(MalformedMessage):
        pki.codec("bob").decode(payload)


def test_leading_whitespace_is_not_canonical(pki: PKI) -> None:
    wire = pki.codec().encode(kind="state", body=1)
    with pytest.raises(MalformedMessage, match="canonical"):
        pki.codec("bob").decode(b" " + wire)


def test_bad_signature_encoding(pki: PKI) -> None:
    wire = pki.codec().encode(kind="state", body=1)
    sig_at = wire.rindex(b',"sig":"') + 8
    rx = pki.codec("bob")
    for bad in (b"!!!!", b"AAAA==", b"A", b"A" * 300):
        with pytest.raises(MalformedMessage):
            rx.decode(wire[:sig_at] + bad + b'"}')
    with pytest.raises(MalformedMessage):
        rx.decode(wire[:sig_at - 8] + b'"}')  # signature member removed: no signer reference


@pytest.mark.parametrize(("members", "raw"), [
    ([*header(seq="5"), ("body", 1)], {}),  # type: ignore[arg-type]
    ([*header(seq=-1), ("body", 1)], {}),
    ([*header(seq=2**64), ("body", 1)], {}),
    ([*header(), ("body", 1)], {"seq": b"true"}),
    ([*header(), ("body", 1)], {"ts": b'"now"'}),
    ([*header(), ("body", 1)], {"ts": b"NaN"}),
    ([*header(), ("body", 1)], {"ts": b"1e999"}),
    ([*header(ts=-5), ("body", 1)], {}),
    ([*header(kind="weird"), ("body", 1)], {}),
    ([*header(), ("body", 1)], {"kind": b"5"}),
    ([*header(), ("body", 1)], {"id": b"12345678901"}),
    ([*header(), ("body", 1)], {"id": b'"short"'}),
    ([*header(), ("body", 1), ("extra", 1)], {}),
    ([*header()[:2], *header()[3:], ("body", 1)], {}),  # no id
    ([*header()[1:], ("v", 1), ("body", 1)], {}),  # reordered
    ([*header(), ("body", 1), ("seq", 2)], {}),  # duplicate, last wins elsewhere
    ([*header(), ("seq", 2), ("body", 1)], {}),  # duplicate inside the header
    ([*header(), ("body", None)], {"body": b'{"a":[1,2}'}),
    ([*header(), ("body", None)], {"body": b'{"a":NaN}'}),
    ([*header(), ("body", None)], {"body": b'{"a":[-Infinity]}'}),
    ([*header(), ("body", None)], {"body": b'{"a":"\\ud800"}'}),  # a lone surrogate
    ([*header(), ("body", None)], {"body": b'{"a":"\xff"}'}),  # not UTF-8
    ([*header(), ("body", None)], {"body": b'{"deep":' + b"[" * 100000 + b"]" * 100000 + b"}"}),
    ([*header(), ("kid", "k1"), ("nonce", "!!"), ("enc", "AAAA")], {}),
    ([*header(), ("kid", "k1"), ("nonce", 5), ("enc", "AAAA")], {}),
    ([*header(), ("kid", None), ("nonce", "AAAA"), ("enc", "AAAA")], {}),
    ([*header(), ("kid", "k1"), ("nonce", "AAAA"), ("enc", "AAAAAAAAAAAAAAAAAAAAAAAA")], {}),
])
@pytest.mark.parametrize("version", [1, 2])
def test_signed_but_malformed(pki: PKI, members: list[tuple[str, Any]],
                              raw: dict[str, bytes], version: int) -> None:
    members = [(k, version if k == "v" else v) for k, v in members]
    wire = craft(members, key=pki.alice_key, cert=pki.alice, raw=raw)
    rx = pki.codec("bob", encryption=group_keys("k1"), max_bytes=1 << 20)
    with pytest.raises(MalformedMessage) as info:
        rx.decode(wire)
    assert "internal error" not in str(info.value)


def test_encode_refuses_what_decode_would_drop(pki: PKI) -> None:
    tx = pki.codec()
    with pytest.raises(MalformedMessage, match="kind"):
        tx.encode(kind="weird", body={})
    with pytest.raises(MalformedMessage, match="JSON"):
        tx.encode(kind="state", body={"x": float("nan")})
    with pytest.raises(MalformedMessage, match="JSON"):
        tx.encode(kind="state", body={"x": object()})
    with pytest.raises(MalformedMessage, match="JSON"):
        tx.encode(kind="state", body="\ud800")


def test_stats_count_every_outcome(pki: PKI) -> None:
    tx, rx = pki.codec(), pki.codec("bob", max_bytes=1024)
    wire = tx.encode(kind="state", body=1)
    rx.decode(wire)
    for payload in (wire, b"junk", b"x" * 2000):
        with pytest.raises(EnvelopeError):
            rx.decode(payload)
    assert rx.stats == {"decoded": 1, "replayed": 1, "malformed": 1, "oversized": 1}


# -- loading from files -----------------------------------------------------------------------

def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def test_from_files(pki: PKI, tmp_path: Path) -> None:
    key_file, cert_file = tmp_path / "node.key", tmp_path / "node.pem"
    key_file.write_bytes(pki.alice_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    cert_file.write_bytes(_pem(pki.alice))
    signer = Signer.from_files(key_file=key_file, cert_file=cert_file)
    assert signer.sender == "acme/store-1" and signer.identity.network == NET

    other = CA.make("Second CA")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(_pem(pki.ca.cert) + _pem(other.cert))
    revoked_key, revoked = pki.ca.issue(node="lost")
    crl_pem, crl_der = tmp_path / "crl.pem", tmp_path / "crl.der"
    crl = pki.ca.crl(revoked)
    crl_pem.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    crl_der.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    for crl_file in (crl_pem, crl_der):
        trust = TrustStore.from_files(ca_files=[ca_file], crl_files=[crl_file], network=NET)
        assert len(trust.cas) == 2
        rx = EnvelopeCodec(signer=signer, trust=trust, clock=Clock())
        key2, cert2 = other.issue(node="s2")
        tx2 = EnvelopeCodec(signer=Signer(private_key=key2, certificate=cert2), trust=trust,
                            clock=Clock())
        assert rx.decode(tx2.encode(kind="state", body=1)).signer.node == "s2"
        lost = craft([*header("acme/lost"), ("body", 1)], key=revoked_key, cert=revoked)
        with pytest.raises(SignatureError, match="revoked"):
            rx.decode(lost)

    with pytest.raises(PKIError, match="cannot read"):
        Signer.from_files(key_file=tmp_path / "missing.key", cert_file=cert_file)
    with pytest.raises(PKIError, match="cannot load private key"):
        Signer.from_files(key_file=cert_file, cert_file=cert_file)
    with pytest.raises(PKIError, match="not signed by any trusted CA"):
        TrustStore(cas=[other.cert], crls=[crl])
    with pytest.raises(ConfigError):
        TrustStore(cas=[])


def test_from_config(pki: PKI, tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(_pem(pki.ca.cert))
    (tmp_path / "node.pem").write_bytes(_pem(pki.alice))
    (tmp_path / "node.key").write_bytes(pki.alice_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    config = NetworkConfig(
        mode="consortium", company_id="acme", network_id=NET, node_id="store-1",
        tls=TLSConfig(ca_file=tmp_path / "ca.pem", cert_file=tmp_path / "node.pem",
                      key_file=tmp_path / "node.key"),
        encryption=group_keys("k1", active="k1"))
    codec = EnvelopeCodec.from_config(config, clock=Clock())
    assert codec.active_key_id == "k1" and codec.trust.network == NET
    assert pki.codec("bob", encryption=group_keys("k1")).decode(
        codec.encode(kind="state", body=5)).message.body == 5
    with pytest.raises(ConfigError, match=r"tls\.ca_file"):
        EnvelopeCodec.from_config(NetworkConfig(mode="consortium", company_id="acme",
                                                tls=TLSConfig()))


# -- sealed box ---------------------------------------------------------------------------------

def test_seal_round_trip_and_failures(tmp_path: Path) -> None:
    key = generate_x25519_key()
    opener = SealOpener(key)
    token = seal(key.public_key(), b"sum=42;n=5", aad=b"grocery/dairy")
    # The plaintext is nowhere in the token (its text, or the bytes it encodes: "42" alone
    # turns up in random base64 text one time in fifty).
    assert isinstance(token, str) and b"sum=42" not in unb64(token)
    assert b"sum=42" not in token.encode()
    assert opener.open(token, aad=b"grocery/dairy") == b"sum=42;n=5"
    assert opener.open(seal(opener.public_key, b"")) == b""
    assert seal(key.public_key(), b"x") != seal(key.public_key(), b"x")
    with pytest.raises(DecryptionError):
        opener.open(token)  # aad missing
    with pytest.raises(DecryptionError):
        SealOpener(generate_x25519_key()).open(token, aad=b"grocery/dairy")
    raw = bytearray(unb64(token))
    raw[-1] ^= 1
    with pytest.raises(DecryptionError):
        opener.open(b64(bytes(raw)).decode(), aad=b"grocery/dairy")
    zero_point = b64(b"\x01" + bytes(32) + bytes(20)).decode()
    for bad in ("", "!!!", "AAAA", token[:40], zero_point, 5, None):
        with pytest.raises(DecryptionError):
            opener.open(bad)  # type: ignore[arg-type]


def test_x25519_pem_files(tmp_path: Path) -> None:
    key = generate_x25519_key()
    priv, pub = tmp_path / "agg.key", tmp_path / "agg.pub"
    save_x25519_private_key(key, priv)
    save_x25519_public_key(key.public_key(), pub)
    assert oct(priv.stat().st_mode & 0o777) == "0o600"
    token = seal(load_x25519_public_key(pub), b"hello")
    assert SealOpener(load_x25519_private_key(priv)).open(token) == b"hello"
    assert SealOpener.from_file(priv).open(token) == b"hello"
    with pytest.raises(PKIError, match="refusing to overwrite"):
        save_x25519_private_key(key, priv)
    save_x25519_private_key(generate_x25519_key(), priv, overwrite=True)
    with pytest.raises(DecryptionError):
        SealOpener.from_file(priv).open(token)
    with pytest.raises(PKIError, match="not an X25519"):
        load_x25519_public_key(_write_ed25519_pub(tmp_path / "ed.pub"))
    with pytest.raises(PKIError):
        load_x25519_private_key(pub)
    with pytest.raises(PKIError, match="cannot read"):
        load_x25519_private_key(tmp_path / "nope")


def _write_ed25519_pub(path: Path) -> Path:
    path.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def test_x25519_type_is_checked() -> None:
    with pytest.raises(PKIError):
        SealOpener(ed25519.Ed25519PrivateKey.generate())  # type: ignore[arg-type]
    assert isinstance(generate_x25519_key(), x25519.X25519PrivateKey)


# -- fuzzing: decode raises only EnvelopeError, never accepts a mutation ------------------------

@dataclass
class Fuzz:
    rx: EnvelopeCodec
    valid: list[bytes]


@pytest.fixture(scope="module")
def fuzz(pki: PKI) -> Iterator[Fuzz]:
    keys = group_keys("k1", active="k1")
    tx = pki.codec(encryption=keys)
    p256_ca = CA.make("P CA", "p256")
    p_key, p_cert = p256_ca.issue(key_type="p256", member="initech", node="s3")
    trust = TrustStore(cas=[pki.ca.cert, p256_ca.cert], network=NET)
    tx_p = EnvelopeCodec(signer=Signer(private_key=p_key, certificate=p_cert), trust=trust,
                         clock=Clock(), embed_certificate=False)
    rx = pki.codec("bob", encryption=keys, trust=trust)
    valid = [
        tx.encode(kind="insights", body=items(3), encrypt=False),
        tx.encode(kind="insights", body=items(2)),
        tx.encode(kind="state", body={"k": "v"}, embed_certificate=False),
        tx_p.encode(kind="state", body=[1, 2.5, "x", None, True], embed_certificate=True),
        tx_p.encode(kind="presence", body={}),
    ]
    for wire in valid:
        rx.decode(wire, check_replay=False)
    yield Fuzz(rx=rx, valid=valid)


def _must_drop(rx: EnvelopeCodec, payload: bytes) -> EnvelopeError:
    try:
        rx.decode(payload, check_replay=False)
    except EnvelopeError as exc:
        assert "internal error" not in str(exc), exc
        return exc
    raise AssertionError(f"accepted {payload!r}")


FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(payload=st.binary(max_size=3000))
def test_fuzz_arbitrary_bytes(fuzz: Fuzz, payload: bytes) -> None:
    _must_drop(fuzz.rx, payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30)

envelope_like = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 2, 0, "1", None])},
    optional={"kind": st.sampled_from(["insights", "state", "x"]) | json_values,
              "id": st.text(max_size=30) | json_values,
              "from": st.sampled_from(["acme/store-1", "globex/store-9"]) | json_values,
              "seq": st.integers() | json_values, "ts": st.floats() | json_values,
              "body": json_values, "kid": st.sampled_from(["k1", "k9"]) | json_values,
              "nonce": st.text(max_size=20), "enc": st.text(max_size=40),
              "cert": st.sampled_from(["", "AAAA"]) | st.text(max_size=20),
              "sk": st.text(max_size=50),
              "sig": st.text(alphabet="ABCDEFabcdef0123456789-_", max_size=100)})


@FUZZ
@given(value=json_values | envelope_like)
def test_fuzz_arbitrary_json(fuzz: Fuzz, value: Any) -> None:
    _must_drop(fuzz.rx, json.dumps(value).encode())
    _must_drop(fuzz.rx, json.dumps(value, separators=(",", ":")).encode())


@st.composite
def mutations(draw: st.DrawFn, valid: list[bytes]) -> bytes:
    wire = draw(st.sampled_from(valid))
    how = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
    pos = draw(st.integers(0, len(wire) - 1))
    if how == "flip":
        bit = draw(st.integers(0, 7))
        return wire[:pos] + bytes([wire[pos] ^ (1 << bit)]) + wire[pos + 1:]
    if how == "set":
        byte = draw(st.integers(0, 255).filter(lambda b: b != wire[pos]))
        return wire[:pos] + bytes([byte]) + wire[pos + 1:]
    if how == "truncate":
        return wire[:pos]
    if how == "insert":
        return wire[:pos] + draw(st.binary(min_size=1, max_size=4)) + wire[pos:]
    end = draw(st.integers(pos + 1, min(len(wire), pos + 8)))
    return wire[:pos] + wire[end:]


def test_fuzz_mutations_of_valid_envelopes(fuzz: Fuzz) -> None:
    @settings(max_examples=600, deadline=None)
    @given(payload=mutations(fuzz.valid))
    def run(payload: bytes) -> None:
        if payload not in fuzz.valid:
            _must_drop(fuzz.rx, payload)

    run()


def test_fuzz_inputs_are_valid(fuzz: Fuzz) -> None:
    for wire in fuzz.valid:
        assert fuzz.rx.decode(wire, check_replay=False).raw_size == len(wire)


def test_junk_certificates_do_not_evict_good_ones(pki: PKI) -> None:
    trust = pki.trust(cache_size=2)
    good = trust.verify_certificate(der(pki.alice), now=NOW)
    for i in range(5):
        with pytest.raises(SignatureError):
            trust.verify_certificate(der(CA.make(f"junk {i}").issue()[1]), now=NOW)
        with pytest.raises(MalformedMessage):
            trust.verify_certificate(b"not DER %d" % i, now=NOW)
    assert trust.lookup(good.fingerprint, now=NOW) == good
    assert trust.lookup(b"\x00" * 32, now=NOW) is None


# -- session sealer --------------------------------------------------------------------------

def test_sealer_tokens_open_and_share_one_session_key() -> None:
    from pear_mqtt.security.seal import Sealer, SealOpener, generate_x25519_key

    key = generate_x25519_key()
    sealer = Sealer(key.public_key(), rotate_after=3)
    opener = SealOpener(key)
    tokens = [sealer.seal(f"item {i}".encode(), aad=b"ctx") for i in range(7)]
    assert [opener.open(t, aad=b"ctx") for t in tokens] == [f"item {i}".encode()
                                                              for i in range(7)]
    assert len(set(tokens)) == 7  # fresh nonces: equal plaintexts never repeat on the wire
    raw = [base64.urlsafe_b64decode(t + "=" * (-len(t) % 4)) for t in tokens]
    sessions = {r[1:33] for r in raw}
    assert len(sessions) == 3  # rotated after every 3 tokens
    with pytest.raises(DecryptionError):
        opener.open(tokens[0], aad=b"other")
    with pytest.raises(DecryptionError):
        SealOpener(generate_x25519_key()).open(tokens[0], aad=b"ctx")
    tampered = bytearray(raw[1])
    tampered[-1] ^= 1
    with pytest.raises(DecryptionError):
        opener.open(base64.urlsafe_b64encode(bytes(tampered)).decode().rstrip("="), aad=b"ctx")
