"""The certificate authority of one pear_mqtt network: creates the CA, issues broker, node and
bridge certificates, revokes them (CRL) and keeps the registry of what it issued.

A CA directory holds ``ca.crt``, ``ca.key`` (0600), ``ca.crl``, ``registry.json``,
``issued/`` (one copy per serial) and ``.lock`` (flock around every change). The CA of an
anonymising network also holds ``pseudonyms.json`` (0600, :mod:`.pseudonyms`): it enrols each
store under random pseudonyms (:func:`enrol`). Validity periods and key types are explained in
docs/.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import PKIError, TopicError
from ..files import atomic_write
from ..model.topics import CONSORTIUM_RESERVED, validate_identifier
from .identity import identity_of, subject_for
from .keys import SigningKey, issued_by, read_material, spki
from .pseudonyms import PSEUDONYMS, Enrolment, PseudonymBook

__all__ = [
    "CA_CERT",
    "CA_CRL",
    "CA_KEY",
    "CRL_DAYS",
    "DEFAULT_KEY_TYPE",
    "PSEUDONYMS",
    "REGISTRY",
    "CertPaths",
    "CertRecord",
    "Enrolment",
    "KeyType",
    "Role",
    "create_ca",
    "enrol",
    "has_pseudonyms",
    "issue",
    "list_certificates",
    "list_pseudonyms",
    "refresh_crl",
    "revoke",
    "revoked_nodes",
    "rotate_pseudonyms",
]

KeyType = Literal["ed25519", "ec-p256"]
Role = Literal["node", "broker", "bridge", "monitor"]

DEFAULT_KEY_TYPE: KeyType = "ed25519"
"""Key type of new CAs and certificates: Ed25519 (``ec-p256`` for older TLS stacks)."""

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_CRL = "ca.crl"
REGISTRY = "registry.json"
_ISSUED = "issued"
_LOCK = ".lock"

_BACKDATE = dt.timedelta(minutes=5)
CRL_DAYS = 365
"""Days until a freshly signed CRL's ``nextUpdate``."""
_REGISTRY_VERSION = 1


@dataclass(frozen=True, slots=True)
class CertPaths:
    """Where an issued certificate, its private key and the network CA certificate live."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True, slots=True)
class CertRecord:
    """One certificate in a CA's registry."""

    serial: int
    role: Role
    member: str
    node: str
    not_before: dt.datetime
    not_after: dt.datetime
    revoked: bool
    revoked_at: dt.datetime | None
    key_type: KeyType
    fingerprint_sha256: str
    cert_path: Path | None

    def status(self, at: dt.datetime) -> str:
        """``revoked``, ``expired``, ``not-yet-valid`` or ``valid`` at time ``at``."""
        if self.revoked:
            return "revoked"
        if self.not_after <= at:
            return "expired"
        return "not-yet-valid" if self.not_before > at else "valid"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (serial as decimal and hex, times in ISO 8601 UTC)."""
        data = asdict(self)
        data["serial"] = str(self.serial)
        data["serial_hex"] = f"{self.serial:x}"
        for key in ("not_before", "not_after", "revoked_at"):
            value = data[key]
            data[key] = value.isoformat() if value is not None else None
        data["cert_path"] = str(self.cert_path) if self.cert_path is not None else None
        return data


# -- low-level helpers ------------------------------------------------------------------

def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _check_key_type(key_type: str) -> KeyType:
    if key_type not in get_args(KeyType):
        raise PKIError(f"key type must be one of {list(get_args(KeyType))}, got {key_type!r}")
    return key_type  # type: ignore[return-value]


def _new_key(key_type: KeyType) -> SigningKey:
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _sign_algorithm(key: SigningKey) -> hashes.SHA256 | None:
    # Ed25519 hashes internally; cryptography wants no digest for it.
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _key_type_of(cert: x509.Certificate) -> KeyType:
    return "ed25519" if isinstance(cert.public_key(), ed25519.Ed25519PublicKey) else "ec-p256"


def _key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_cert(path: Path, what: str = "certificate") -> x509.Certificate:
    data = read_material(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except (ValueError, x509.InvalidVersion) as exc:
        raise PKIError(f"{what} {path} is not a PEM certificate: {exc}") from None


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, SigningKey]:
    cert = _load_cert(ca_dir / CA_CERT, "CA certificate")
    data = read_material(ca_dir / CA_KEY, "CA key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"CA key {ca_dir / CA_KEY} cannot be loaded: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise PKIError(f"CA key {ca_dir / CA_KEY} is neither Ed25519 nor EC")
    if spki(key.public_key()) != spki(cert.public_key()):
        raise PKIError(f"CA key {ca_dir / CA_KEY} does not match {ca_dir / CA_CERT}")
    return cert, key


def _ca_network(ca_cert: x509.Certificate) -> str:
    attrs = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if len(attrs) != 1 or not isinstance(attrs[0].value, str):
        raise PKIError("CA certificate subject has no single O (network) attribute")
    return attrs[0].value


@contextlib.contextmanager
def _locked(ca_dir: Path) -> Iterator[None]:
    # Two operators (or two test workers) issuing at once must not lose each other's records.
    if not ca_dir.is_dir():
        raise PKIError(f"CA directory {ca_dir} does not exist (create it with "
                       "`pear-mqtt pki init`)")
    try:
        fd = os.open(ca_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise PKIError(f"cannot open lock file in {ca_dir}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_registry(ca_dir: Path) -> dict[str, Any]:
    path = ca_dir / REGISTRY
    try:
        data = json.loads(read_material(path, "CA registry"))
    except json.JSONDecodeError as exc:
        raise PKIError(f"CA registry {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != _REGISTRY_VERSION \
            or not isinstance(data.get("certificates"), list):
        raise PKIError(f"CA registry {path} has an unknown layout")
    return data


def _save_registry(ca_dir: Path, registry: dict[str, Any]) -> None:
    text = json.dumps(registry, indent=2, sort_keys=True) + "\n"
    # Under pseudonyms the registry's certificate paths may name the company an operator
    # filed them under: it is as private as the pseudonym registry itself.
    mode = 0o600 if (ca_dir / PSEUDONYMS).exists() else 0o644
    atomic_write(ca_dir / REGISTRY, text.encode(), mode=mode)


def _record_of(entry: dict[str, Any]) -> CertRecord:
    revoked_at = entry.get("revoked_at")
    return CertRecord(
        serial=int(entry["serial"], 16),
        role=entry["role"],
        member=entry["member"],
        node=entry["node"],
        not_before=dt.datetime.fromisoformat(entry["not_before"]),
        not_after=dt.datetime.fromisoformat(entry["not_after"]),
        revoked=revoked_at is not None,
        revoked_at=dt.datetime.fromisoformat(revoked_at) if revoked_at else None,
        key_type=entry["key_type"],
        fingerprint_sha256=entry["fingerprint_sha256"],
        cert_path=Path(entry["cert_path"]) if entry.get("cert_path") else None,
    )


def _sign_crl(ca_dir: Path, registry: dict[str, Any], *, days: int = CRL_DAYS) -> Path:
    ca_cert, ca_key = _load_ca(ca_dir)
    now = _now()
    number = int(registry.get("crl_number", 0)) + 1
    registry["crl_number"] = number
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _BACKDATE)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_cert.public_key()), critical=False)  # type: ignore[arg-type]
    )
    for entry in registry["certificates"]:
        if entry.get("revoked_at"):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(entry["serial"], 16))
                .revocation_date(dt.datetime.fromisoformat(entry["revoked_at"]))
                .build())
    crl = builder.sign(ca_key, _sign_algorithm(ca_key))
    path = ca_dir / CA_CRL
    atomic_write(path, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return path


# -- public API ---------------------------------------------------------------------------

def create_ca(*, directory: Path, network: str, days: int = 3650,
              key_type: KeyType = DEFAULT_KEY_TYPE, force: bool = False,
              pseudonyms: bool = False) -> Path:
    """Create the CA of ``network`` in ``directory``; return the CA certificate's path.

    Writes ``ca.crt``, ``ca.key`` (0600), an empty ``registry.json`` and an empty ``ca.crl``;
    with ``pseudonyms`` (an anonymising network: consortium, public) also an empty pseudonym
    registry, so that stores are enrolled under random pseudonyms (:func:`enrol`).
    Refuses (:class:`PKIError` naming the file) to overwrite an existing CA unless ``force``,
    because replacing a CA silently invalidates every certificate of the network; a replaced
    CA's pseudonyms go with it.
    """
    try:
        validate_identifier(network, what="network")
    except TopicError as exc:
        raise PKIError(str(exc)) from None
    key_type = _check_key_type(key_type)
    if days < 1:
        raise PKIError(f"days must be at least 1, got {days}")
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PKIError(f"cannot create CA directory {directory}: {exc.strerror or exc}") from None
    if not force:
        for name in (CA_CERT, CA_KEY, REGISTRY):
            if (directory / name).exists():
                raise PKIError(f"{directory / name} already exists; pass force=True "
                               "(--force) to replace the CA and invalidate its certificates")
    with _locked(directory):
        key = _new_key(key_type)
        now = _now()
        ca_name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, network),
            x509.NameAttribute(NameOID.COMMON_NAME, f"pear-mqtt CA {network}"),
        ])
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + dt.timedelta(days=days))
            # path_length 0: this CA signs end-entity certificates only, never sub-CAs.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, _sign_algorithm(key))
        )
        shutil.rmtree(directory / _ISSUED, ignore_errors=True)
        (directory / _ISSUED).mkdir()
        (directory / PSEUDONYMS).unlink(missing_ok=True)
        if pseudonyms:
            PseudonymBook(network=network).save(directory)
        atomic_write(directory / CA_KEY, _key_pem(key), mode=0o600)
        atomic_write(directory / CA_CERT, _cert_pem(cert), mode=0o644)
        registry: dict[str, Any] = {"version": _REGISTRY_VERSION, "network": network,
                                    "crl_number": 0, "certificates": []}
        _sign_crl(directory, registry)
        _save_registry(directory, registry)
    return directory / CA_CERT


def _validity(*, ca_cert: x509.Certificate, days: int, not_before: dt.datetime | None,
              not_after: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    for label, value in (("not_before", not_before), ("not_after", not_after)):
        if value is not None and value.tzinfo is None:
            raise PKIError(f"{label} must be timezone-aware")
    now = _now()
    start = not_before if not_before is not None else now - _BACKDATE
    end = not_after if not_after is not None else max(start, now) + dt.timedelta(days=days)
    ca_end = ca_cert.not_valid_after_utc
    if end > ca_end:
        if not_after is not None:
            raise PKIError(f"not_after {end.isoformat()} is after the CA expires "
                           f"({ca_end.isoformat()})")
        # A leaf outliving its CA would fail verification anyway; end it with the CA.
        end = ca_end
    if end <= start:
        raise PKIError(f"validity ends ({end.isoformat()}) before it starts "
                       f"({start.isoformat()})")
    return start, end


def issue(*, ca_dir: Path, out_dir: Path, role: Role, member: str, node: str | None = None,
          hosts: Sequence[str] = ("localhost", "127.0.0.1"), days: int = 397,
          key_type: KeyType = DEFAULT_KEY_TYPE, not_before: dt.datetime | None = None,
          not_after: dt.datetime | None = None, force: bool = False) -> CertPaths:
    """Issue a certificate signed by the CA in ``ca_dir``; write it, its key and the CA to
    ``out_dir``.

    - ``role="node"``: a store agent. Subject ``CN=member, OU=node, O=network``; extended key
      usage clientAuth. ``member`` is the company id, ``node`` the store, as given: in an
      anonymising network enrol stores with :func:`enrol` instead, which issues under the
      pseudonyms the CA assigns (``pear-mqtt pki issue`` refuses node certificates there).
    - ``role="broker"``: ``member`` names the broker; OU is ``broker``; ``hosts`` become DNS
      and IP subject alternative names; extended key usage serverAuth.
    - ``role="bridge"``: ``member`` is the bridge's MQTT username (list it in the broker's
      ``bridge_users``); OU is ``bridge``; clientAuth.
    - ``role="monitor"``: an operator's read-only view of the broker's own ``$SYS`` figures
      (list ``member`` in the broker's ``monitor_users``); OU is ``monitor``; clientAuth.

    For broker, bridge and monitor ``node`` may be omitted; if given it must equal the role.
    ``not_before``/``not_after`` override ``days`` (tests mint expired or future certificates
    with them). Files: ``<role>-<member>[-<node>].crt``/``.key`` (key 0600) and ``ca.crt``.
    Existing files are not overwritten unless ``force``. A member name already used by a
    live certificate of another role is refused, so a node can never share a bridge's
    username and inherit its ACL rights.
    """
    if role not in get_args(Role):
        raise PKIError(f"role must be one of {list(get_args(Role))}, got {role!r}")
    key_type = _check_key_type(key_type)
    if role == "node":
        if node is None:
            raise PKIError("a node certificate needs node= (the store / node id)")
        if member in CONSORTIUM_RESERVED:
            raise PKIError(f"member {member!r} is reserved (a topic level of the bridge's "
                           "consortium aggregates and receipts)")
    elif node is None:
        node = role
    elif node != role:
        raise PKIError(f"a {role} certificate has OU={role!r}; got node={node!r}")
    if days < 1:
        raise PKIError(f"days must be at least 1, got {days}")
    ca_dir, out_dir = Path(ca_dir), Path(out_dir)
    sans: list[x509.GeneralName] = []
    if role == "broker":
        if not hosts:
            raise PKIError("a broker certificate needs at least one host name or address")
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                if not host or any(c.isspace() or c in "/\\" for c in host):
                    raise PKIError(f"host {host!r} is neither an IP address nor a DNS name") \
                        from None
                sans.append(x509.DNSName(host))

    with _locked(ca_dir):
        return _issue_locked(ca_dir=ca_dir, out_dir=out_dir, role=role, member=member,
                             node=node, sans=sans, days=days, key_type=key_type,
                             not_before=not_before, not_after=not_after, force=force)


def _issue_locked(*, ca_dir: Path, out_dir: Path, role: Role, member: str, node: str,
                  sans: list[x509.GeneralName], days: int, key_type: KeyType,
                  not_before: dt.datetime | None, not_after: dt.datetime | None,
                  force: bool) -> CertPaths:
    # issue() under the CA lock, its arguments checked.
    ca_cert, ca_key = _load_ca(ca_dir)
    network = _ca_network(ca_cert)
    try:
        subject = subject_for(network=network, member=member, node=node)
    except TopicError as exc:
        raise PKIError(str(exc)) from None
    registry = _load_registry(ca_dir)
    now = _now()
    for entry in registry["certificates"]:
        if entry["member"] == member and entry["role"] != role \
                and not entry.get("revoked_at") \
                and dt.datetime.fromisoformat(entry["not_after"]) > now:
            raise PKIError(f"member {member!r} already holds a {entry['role']} certificate "
                           f"(serial {entry['serial']}); one name cannot serve two roles")
    start, end = _validity(ca_cert=ca_cert, days=days, not_before=not_before,
                           not_after=not_after)

    stem = f"{role}-{member}" if role != "node" else f"node-{member}-{node}"
    cert_path, key_path = out_dir / f"{stem}.crt", out_dir / f"{stem}.key"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PKIError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    if not force:
        for path in (cert_path, key_path):
            if path.exists():
                raise PKIError(f"{path} already exists; pass force=True (--force) "
                               "to replace it")

    key = _new_key(key_type)
    public = key.public_key()
    eku = ExtendedKeyUsageOID.SERVER_AUTH if role == "broker" \
        else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=False, crl_sign=False,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_cert.public_key()), critical=False)  # type: ignore[arg-type]
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, _sign_algorithm(ca_key))

    atomic_write(key_path, _key_pem(key), mode=0o600)
    atomic_write(cert_path, _cert_pem(cert), mode=0o644)
    ca_copy = out_dir / CA_CERT
    if ca_copy.resolve() != (ca_dir / CA_CERT).resolve():
        atomic_write(ca_copy, _cert_pem(ca_cert), mode=0o644)
    (ca_dir / _ISSUED).mkdir(exist_ok=True)
    atomic_write(ca_dir / _ISSUED / f"{cert.serial_number:x}.pem", _cert_pem(cert),
                  mode=0o644)
    registry["certificates"].append({
        "serial": f"{cert.serial_number:x}",
        "role": role,
        "member": member,
        "node": node,
        "not_before": start.isoformat(),
        "not_after": end.isoformat(),
        "revoked_at": None,
        "key_type": key_type,
        "fingerprint_sha256": cert.fingerprint(hashes.SHA256()).hex(),
        "cert_path": str(cert_path.resolve()),
    })
    _save_registry(ca_dir, registry)
    return CertPaths(cert=cert_path, key=key_path, ca=ca_copy)


def revoke(*, ca_dir: Path, cert: Path | int) -> Path:
    """Revoke a certificate (by file or serial number); re-sign and return ``ca.crl``.

    Revoking twice keeps the first revocation date. A certificate file this CA did not sign
    is refused; a serial must be in the registry (pass the certificate file if the registry
    lost it). Brokers read the CRL when they start: restart or SIGHUP them afterwards.

    The CRL only stops new connections. For a node certificate, also re-render the mosquitto
    configuration (:func:`pear_mqtt.ops.brokerconf.render` with ``ca_dir``) before the SIGHUP:
    its ACL denies the node's topics (:func:`revoked_nodes`), which stops the broker from
    serving the retained state the node published before. The embedded broker does that
    by itself on :meth:`~pear_mqtt.ops.embedded.EmbeddedBroker.reload_crl`.
    """
    ca_dir = Path(ca_dir)
    with _locked(ca_dir):
        ca_cert, _ = _load_ca(ca_dir)
        registry = _load_registry(ca_dir)
        parsed: x509.Certificate | None = None
        if isinstance(cert, int):
            serial = cert
        else:
            cert_file = Path(cert)
            parsed = _load_cert(cert_file)
            if not issued_by(parsed, ca_cert):
                raise PKIError(f"{cert} was not issued by the CA in {ca_dir}")
            serial = parsed.serial_number
        entry = next((e for e in registry["certificates"] if int(e["serial"], 16) == serial),
                     None)
        if entry is None:
            if parsed is None:
                raise PKIError(f"serial {serial} ({serial:x}) is not in {ca_dir / REGISTRY}; "
                               "pass the certificate file instead")
            ident = identity_of(parsed)
            role: Role = ident.node if ident.node in ("broker", "bridge", "monitor") \
                else "node"  # type: ignore[assignment]
            entry = {
                "serial": f"{serial:x}", "role": role, "member": ident.member,
                "node": ident.node, "not_before": parsed.not_valid_before_utc.isoformat(),
                "not_after": parsed.not_valid_after_utc.isoformat(), "revoked_at": None,
                "key_type": _key_type_of(parsed),
                "fingerprint_sha256": parsed.fingerprint(hashes.SHA256()).hex(),
                "cert_path": str(cert_file.resolve()),
            }
            registry["certificates"].append(entry)
        if not entry.get("revoked_at"):
            entry["revoked_at"] = _now().isoformat()
        path = _sign_crl(ca_dir, registry)
        _save_registry(ca_dir, registry)
    return path


def refresh_crl(*, ca_dir: Path, days: int = CRL_DAYS) -> Path:
    """Re-sign ``ca.crl`` with a fresh ``nextUpdate`` ``days`` ahead; return its path."""
    if days < 1:
        raise PKIError(f"days must be at least 1, got {days}")
    ca_dir = Path(ca_dir)
    with _locked(ca_dir):
        registry = _load_registry(ca_dir)
        path = _sign_crl(ca_dir, registry, days=days)
        _save_registry(ca_dir, registry)
    return path


def list_certificates(*, ca_dir: Path) -> list[CertRecord]:
    """Every certificate the CA in ``ca_dir`` issued, oldest first."""
    registry = _load_registry(Path(ca_dir))
    try:
        return [_record_of(e) for e in registry["certificates"]]
    except (KeyError, ValueError, TypeError) as exc:
        raise PKIError(f"CA registry {Path(ca_dir) / REGISTRY} holds a bad entry: {exc}") \
            from None


def revoked_nodes(*, ca_dir: Path) -> list[tuple[str, str]]:
    """``(member, node)`` of every node whose newest node certificate is revoked, sorted.

    This is what a broker must deny (:func:`pear_mqtt.model.acl.revoked_node_rules`): the node's
    retained state and presence stop being served, and nobody of the member writes there.
    mosquitto can only tell publishers apart by username, which is the member, so the deny is
    per node topic, not per certificate.

    Only the newest certificate of a node counts (issue time, then registry order):

    - re-keying a node after a revocation (``issue`` again with the same node id) lifts the
      deny, so the node can publish its state again. Until it overwrites them, the retained
      messages the revoked key published are served again; receivers still drop them, since
      they check each envelope's certificate against the CRL. Give the replacement a new node
      id where even that must not happen.
    - revoking an *older* certificate of a node that already has a newer one denies nothing:
      the node lives on under the new key.

    Broker and bridge certificates are not nodes and are never listed.
    """
    newest: dict[tuple[str, str], tuple[dt.datetime, int, bool]] = {}
    for index, record in enumerate(list_certificates(ca_dir=ca_dir)):
        if record.role != "node":
            continue
        key = (record.member, record.node)
        candidate = (record.not_before, index, record.revoked)
        if key not in newest or candidate[:2] > newest[key][:2]:
            newest[key] = candidate
    return sorted(key for key, (_, _, revoked) in newest.items() if revoked)


# -- pseudonyms -----------------------------------------------------------------------------

def has_pseudonyms(*, ca_dir: Path) -> bool:
    """Whether the CA in ``ca_dir`` enrols stores under pseudonyms."""
    return (Path(ca_dir) / PSEUDONYMS).is_file()


def _book(ca_dir: Path) -> PseudonymBook:
    book = PseudonymBook.load(ca_dir)
    if book is None:
        raise PKIError(f"the CA in {ca_dir} assigns no pseudonyms (create it with "
                       "`pear-mqtt pki init --pseudonyms`, or turn them on for this CA with "
                       "`pear-mqtt pki rotate-pseudonyms`)")
    return book


def enrol(*, ca_dir: Path, out_dir: Path, company: str, store: str, days: int = 397,
          key_type: KeyType = DEFAULT_KEY_TYPE, not_before: dt.datetime | None = None,
          not_after: dt.datetime | None = None,
          force: bool = False) -> tuple[CertPaths, Enrolment]:
    """Issue the node certificate of ``store`` of ``company`` under the pseudonyms the CA
    assigns (``CN`` = the company's, ``OU`` = the store's); return its files and enrolment.

    A company or store enrolled for the first time gets a fresh random pseudonym; later
    enrolments (re-issues) reuse it until :func:`rotate_pseudonyms`. The names stay in the
    CA's pseudonym registry; nothing issued or written to ``out_dir`` holds them (files are
    named by pseudonym). The node's ``node_id`` must be ``enrolment.node``. Other arguments
    as for :func:`issue`.
    """
    if days < 1:
        raise PKIError(f"days must be at least 1, got {days}")
    key_type = _check_key_type(key_type)
    ca_dir, out_dir = Path(ca_dir), Path(out_dir)
    with _locked(ca_dir):
        book = _book(ca_dir)
        enrolment = book.enrol(company, store)
        book.save(ca_dir)
        paths = _issue_locked(ca_dir=ca_dir, out_dir=out_dir, role="node",
                              member=enrolment.member, node=enrolment.node, sans=[], days=days,
                              key_type=key_type, not_before=not_before, not_after=not_after,
                              force=force)
    return paths, enrolment


def list_pseudonyms(*, ca_dir: Path) -> list[Enrolment]:
    """Every enrolled store and its pseudonyms (operator only: this maps names to
    pseudonyms)."""
    ca_dir = Path(ca_dir)
    with _locked(ca_dir):
        return _book(ca_dir).enrolments()


def rotate_pseudonyms(*, ca_dir: Path) -> list[Enrolment]:
    """Give every company and store of the network new pseudonyms; return the new enrolments.

    Every live node certificate is revoked (its subject names the old pseudonyms, or the
    plain names of a CA that had none: this turns pseudonyms on for it), so each store must
    be enrolled again (:func:`enrol`), and the brokers need the new CRL and ACL as after any
    revocation. The old and new pseudonyms of a company are not linked by anything a member
    holds.
    """
    ca_dir = Path(ca_dir)
    with _locked(ca_dir):
        ca_cert, _ = _load_ca(ca_dir)
        book = PseudonymBook.load(ca_dir) or PseudonymBook(network=_ca_network(ca_cert))
        enrolments = book.rotate()
        book.save(ca_dir)
        registry = _load_registry(ca_dir)
        now = _now()
        for entry in registry["certificates"]:
            if entry["role"] == "node" and not entry.get("revoked_at"):
                entry["revoked_at"] = now.isoformat()
        _sign_crl(ca_dir, registry)
        _save_registry(ca_dir, registry)
    return enrolments
