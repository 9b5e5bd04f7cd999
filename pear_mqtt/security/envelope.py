"""The signed, optionally encrypted, versioned JSON envelope every payload travels in.

Wire format
-----------
A UTF-8 JSON object, readable by any MQTT client, with its members in this fixed order::

    {"v":1,"kind":K,"id":I,"from":F,"seq":N,"ts":T,
     ( "body":B  |  "kid":KID,"nonce":NONCE,"enc":CT ),
     ( "cert":CERT  |  "sk":SK ),
     "sig":SIG}

- ``v`` schema version (1); ``kind`` one of :data:`pear_mqtt.types.MessageKind`; ``id`` 128 random
  bits as url-safe text; ``from`` the sender ``<member>/<node>`` of the signing certificate;
  ``seq`` the per-sender sequence number; ``ts`` seconds since the epoch.
- ``body`` is plain JSON. Encrypted envelopes carry ``kid`` (group key id), ``nonce`` (96 bits)
  and ``enc`` (AES-256-GCM ciphertext of the body's JSON bytes); the additional authenticated
  data is the wire bytes from ``{`` up to and including the ``kid`` member, so a ciphertext
  cannot be moved under another header.
- ``cert`` is the signer's DER certificate, so any receiver can verify without a directory.
  Senders may leave it out and send ``sk`` instead: the SHA-256 of that DER certificate. A
  receiver accepts ``sk`` only for a certificate it has already validated (from an earlier
  envelope with ``cert``, or :meth:`TrustStore.verify_certificate`); otherwise it drops the
  message as unverifiable. There is no third form: every envelope names its signer.
- ``sig`` is always the last member. It signs the exact wire bytes *without* the
  ``,"sig":"…"`` member, closed by ``}``: ``signed = wire[:start_of_sig_member] + b"}"``.
  Receivers slice the bytes and verify before parsing anything, so untrusted input never reaches
  the JSON parser, and nothing is serialised twice.

All binary fields (``nonce``, ``enc``, ``cert``, ``sk``, ``sig``) are base64url without padding.
Signatures are Ed25519 (default) or ECDSA P-256 with SHA-256 (DER), following the key type of
the certificate.

Sequence numbers start at ``int(now * 1000) * 1000`` when a codec is created and grow by one per
message. That keeps them increasing across restarts without stored state (as long as a process
averages fewer than a million messages per second over its life and the clock does not step
back), while consecutive messages stay consecutive so the receiver's replay window covers the
last ``replay_window`` messages rather than the last few milliseconds.

Receiving, in order (the first failure decides the drop reason): size limit (before looking at
the bytes) → canonical shape, else a diagnosis (not JSON / other version / unsigned) → signer
certificate (CA, CRL, key type, network, validity window; verdicts cached) → signature → one
JSON parse of the envelope members, with duplicate keys rejected → layout, types and ``from``
against the certificate → timestamp window → replay window → decryption → body. A plain body
is parsed once on its own without the duplicate-key hook (which would cost ~70 % on a large
batch); it is authenticated content, read the way Python's ``json`` reads it.

Receivers never crash on input: :meth:`EnvelopeCodec.decode` raises only
:class:`~pear_mqtt.errors.EnvelopeError` subclasses, whose ``reason`` names a drop counter.

The module also holds the *sealed box* used for ``aggregated`` data: :func:`seal` encrypts to
the aggregator's X25519 public key (ephemeral ECDH, HKDF-SHA256, AES-256-GCM) so that only the
aggregator can open it with :class:`SealOpener`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import math
import os
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar, get_args

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.bindings import crypto_sign, crypto_sign_open, crypto_sign_seed_keypair
from nacl.exceptions import BadSignatureError
from pydantic import SecretStr, ValidationError

from ..config.models import EncryptionConfig
from ..errors import (
    ConfigError,
    DecryptionError,
    EnvelopeError,
    MalformedMessage,
    OversizedMessage,
    PKIError,
    ReplayedMessage,
    SignatureError,
    StaleMessage,
    TopicError,
    UnknownKeyError,
    UnsupportedVersion,
)
from ..model.insight import MessageKind, NetworkMessage
from ..model.topics import validate_identifier
from .identity import Identity, identity_of

if TYPE_CHECKING:
    from ..config.models import NetworkConfig

__all__ = [
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_BYTES",
    "VERSION",
    "Decoded",
    "EnvelopeCodec",
    "SealOpener",
    "Signer",
    "SigningKey",
    "TrustStore",
    "VerifiedSigner",
    "VerifyingKey",
    "generate_x25519_key",
    "load_x25519_private_key",
    "load_x25519_public_key",
    "save_x25519_private_key",
    "save_x25519_public_key",
    "seal",
]

log = logging.getLogger(__name__)

VERSION = 1
_SEQ_BLOCK = 100_000  # sequence numbers reserved per write of the reservation file
DEFAULT_MAX_BYTES = 1024 * 1024
DEFAULT_MAX_AGE = 30 * 86400.0

SigningKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
VerifyingKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey

_KINDS: frozenset[str] = frozenset(get_args(MessageKind))

_PREFIX = b'{"v":1,'
_SIG_OPEN = b',"sig":"'
_TAIL = b'"}'
_CERT_OPEN = b',"cert":"'
_SK_OPEN = b',"sk":"'
_NONCE_OPEN = b',"nonce":"'
_BODY_OPEN = b',"body":'
# Ed25519 signatures are 64 bytes and DER ECDSA P-256 ones at most 72; the bound is looser so
# that a certificate with an unsupported key type is reported as such, not as a bad "sig".
_MAX_SIGNATURE = 160
_ED25519_SIGNATURE = 64
_MAX_SEQ = 2**63 - 1
_NONCE_BYTES = 12
_GCM_TAG_BYTES = 16

_HEAD = ("v", "kind", "id", "from", "seq", "ts")
_LAYOUTS: frozenset[tuple[str, ...]] = frozenset(
    (*_HEAD, *payload, ref, "sig")
    for payload in (("body",), ("kid", "nonce", "enc"))
    for ref in ("cert", "sk")
)

# Maps base64url onto the standard alphabet and poisons the standard-only characters, so that
# binascii's strict decoder accepts exactly the url-safe alphabet.
_URLSAFE_TO_STD = bytes.maketrans(b"-_+/", b"+/!!")


# -- small helpers ------------------------------------------------------------------------


def _b64e(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _b64d(text: bytes, what: str) -> bytes:
    """Strict base64url (no padding) decoding; :class:`MalformedMessage` on anything else."""
    pad = -len(text) % 4
    if pad == 3 or b"=" in text:
        raise MalformedMessage(f"{what!r} is not unpadded base64url")
    try:
        return binascii.a2b_base64(text.translate(_URLSAFE_TO_STD) + b"=" * pad,
                                   strict_mode=True)
    except binascii.Error:
        raise MalformedMessage(f"{what!r} is not unpadded base64url") from None


def _ascii(value: str, what: str) -> bytes:
    try:
        return value.encode("ascii")
    except UnicodeEncodeError:
        raise MalformedMessage(f"{what!r} is not base64url text") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise MalformedMessage(f"duplicate key {key!r} in a JSON object")
            seen.add(key)
    return obj


def _no_constants(name: str) -> Any:
    raise MalformedMessage(f"{name} is not valid JSON")


_strict_decoder = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constants)
# Detecting duplicate keys forces a Python call per JSON object, which makes a large batch
# parse ~70 % slower; used for the envelope's own members, not for authenticated bodies.
_fast_decoder = json.JSONDecoder(parse_constant=_no_constants)


def _parse_json(data: bytes, what: str, *, unique_keys: bool = True) -> Any:
    """Strict UTF-8 and JSON (no NaN/Infinity; duplicate keys rejected if ``unique_keys``)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedMessage(f"{what} is not valid UTF-8") from None
    try:
        return (_strict_decoder if unique_keys else _fast_decoder).decode(text)
    except MalformedMessage:
        raise
    except RecursionError:
        raise MalformedMessage(f"{what} nests too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and ints longer than Python's digit limit
        raise MalformedMessage(f"{what} is not valid JSON: {exc}") from None


def _spki(key: Any) -> bytes:
    der: bytes = key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def _algorithm(key: object) -> str | None:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and isinstance(
            key.curve, ec.SECP256R1):
        return "ecdsa-p256"
    return None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise PKIError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None


_K = TypeVar("_K")
_V = TypeVar("_V")


class _LRU(Generic[_K, _V]):
    """A bounded mapping that forgets the least recently used entry (callers hold the lock)."""

    __slots__ = ("_data", "_max")

    def __init__(self, max_entries: int) -> None:
        self._data: OrderedDict[_K, _V] = OrderedDict()
        self._max = max_entries

    def get(self, key: _K) -> _V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: _K, value: _V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


# -- signing ------------------------------------------------------------------------------

class Signer:
    """A node's signing key and the certificate that vouches for it.

    The key must be Ed25519 (the default everywhere) or ECDSA on P-256, and must match the
    certificate. The certificate's subject must follow :mod:`pear_mqtt.identity`.
    """

    __slots__ = ("_algorithm", "_certificate", "_der", "_fingerprint", "_identity", "_key",
                 "_sodium_key")

    def __init__(self, *, private_key: SigningKey, certificate: x509.Certificate) -> None:
        algorithm = _algorithm(private_key)
        if algorithm is None:
            raise PKIError(f"signing key type {type(private_key).__name__} is not supported; "
                           "use Ed25519 or ECDSA P-256")
        try:
            cert_key = certificate.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise PKIError(f"certificate public key is unreadable: {exc}") from None
        if _spki(private_key.public_key()) != _spki(cert_key):
            raise PKIError("the private key does not belong to the certificate "
                           f"{certificate.subject.rfc4514_string()}")
        self._identity = identity_of(certificate)
        self._algorithm = algorithm
        self._key = private_key
        self._certificate = certificate
        self._der = certificate.public_bytes(serialization.Encoding.DER)
        self._fingerprint = hashlib.sha256(self._der).digest()
        # Ed25519 is deterministic: libsodium makes the same signature as OpenSSL, in about
        # two thirds of the time (and verifies in half), so both ends use it for Ed25519.
        self._sodium_key: bytes | None = None
        if isinstance(private_key, ed25519.Ed25519PrivateKey):
            self._sodium_key = crypto_sign_seed_keypair(private_key.private_bytes_raw())[1]

    @classmethod
    def from_files(cls, *, key_file: Path, cert_file: Path,
                   password: bytes | None = None) -> Signer:
        """Load a PEM private key and its PEM certificate; :class:`PKIError` on any problem."""
        key_pem = _read(key_file, "key file")
        cert_pem = _read(cert_file, "certificate file")
        try:
            key = serialization.load_pem_private_key(key_pem, password=password)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise PKIError(f"cannot load private key {str(key_file)!r}: {exc}") from None
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except (ValueError, x509.InvalidVersion) as exc:
            raise PKIError(f"cannot load certificate {str(cert_file)!r}: {exc}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise PKIError(f"key {str(key_file)!r} is {type(key).__name__}; use Ed25519 or "
                           "ECDSA P-256")
        return cls(private_key=key, certificate=cert)

    @property
    def identity(self) -> Identity:
        """The (network, member, node) the certificate names."""
        return self._identity

    @property
    def sender(self) -> str:
        """The ``from`` of every envelope this signer signs."""
        return self._identity.sender

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate

    @property
    def certificate_der(self) -> bytes:
        return self._der

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of the DER certificate (the ``sk`` of cert-less envelopes)."""
        return self._fingerprint

    @property
    def algorithm(self) -> str:
        """``"ed25519"`` or ``"ecdsa-p256"``."""
        return self._algorithm

    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` with the node key."""
        if self._sodium_key is not None:
            return crypto_sign(data, self._sodium_key)[:_ED25519_SIGNATURE]
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(data)
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))


# -- trust --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedSigner:
    """A certificate that chains to a trusted CA, is not revoked and fits the identity scheme.

    ``not_before``/``not_after`` (seconds since the epoch) already include the issuing CA's own
    validity; the window is checked again on every use because a cached entry outlives it.
    """

    identity: Identity
    fingerprint: bytes
    public_key: VerifyingKey
    algorithm: str
    serial: int
    not_before: float
    not_after: float
    raw_ed25519: bytes | None = None  # the Ed25519 public key's 32 bytes (libsodium's form)

    def verify(self, signature: bytes, data: bytes) -> None:
        """Check ``signature`` over ``data``; :class:`SignatureError` if it does not hold."""
        try:
            if self.raw_ed25519 is not None:
                # libsodium takes signature and message as one buffer: an exact length keeps
                # a short "signature" from borrowing the message's first bytes.
                if len(signature) != _ED25519_SIGNATURE:
                    raise ValueError("an Ed25519 signature is 64 bytes")
                crypto_sign_open(signature + data, self.raw_ed25519)
            elif isinstance(self.public_key, ed25519.Ed25519PublicKey):
                self.public_key.verify(signature, data)
            else:
                self.public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, BadSignatureError, ValueError):
            raise SignatureError(
                f"signature does not verify with the certificate of {self.identity.sender}"
            ) from None

    def check_time(self, now: float) -> None:
        """:class:`SignatureError` unless ``now`` lies in the certificate's validity window."""
        if now < self.not_before:
            raise SignatureError(f"certificate of {self.identity.sender} is not valid before "
                                 f"{_iso(self.not_before)}")
        if now > self.not_after:
            raise SignatureError(f"certificate of {self.identity.sender} expired at "
                                 f"{_iso(self.not_after)}")


@dataclass(frozen=True, slots=True)
class _Rejected:
    """A cached verdict against a certificate (re-raised as a fresh exception)."""

    error: type[EnvelopeError]
    message: str


class TrustStore:
    """The network CA(s), optional CRLs and expected network id a receiver trusts.

    Certificate verdicts are cached by the SHA-256 of the DER bytes (bounded LRU), so the chain
    signature is checked once per certificate, not once per message. The validity window is
    compared with ``now`` on every call. CRLs are taken as given (their ``next_update`` is not
    enforced); call :meth:`update_crls` with fresh ones, which also empties the cache.
    """

    __slots__ = ("_by_subject", "_by_text", "_cache", "_cas", "_lock", "_network", "_rejected",
                 "_revoked")

    def __init__(self, *, cas: Sequence[x509.Certificate],
                 crls: Sequence[x509.CertificateRevocationList] = (),
                 network: str | None = None, cache_size: int = 4096) -> None:
        if not cas:
            raise ConfigError("a trust store needs at least one CA certificate")
        if cache_size < 1:
            raise ConfigError(f"cache_size must be at least 1, got {cache_size}")
        if network is not None:
            try:
                validate_identifier(network, what="network_id")
            except TopicError as exc:
                raise ConfigError(str(exc)) from None
        self._cas = tuple(cas)
        self._network = network
        self._by_subject: dict[x509.Name, list[x509.Certificate]] = {}
        for ca in self._cas:
            self._by_subject.setdefault(ca.subject, []).append(ca)
        self._lock = threading.Lock()
        self._cache: _LRU[bytes, VerifiedSigner] = _LRU(cache_size)
        # Kept apart so that a flood of junk certificates cannot push out the good ones (which
        # cert-less "sk" envelopes depend on).
        self._rejected: _LRU[bytes, _Rejected] = _LRU(cache_size)
        self._by_text: _LRU[bytes, bytes] = _LRU(cache_size)
        self._revoked: dict[bytes, frozenset[int]] = {}
        self.update_crls(crls)

    @classmethod
    def from_files(cls, *, ca_files: Sequence[Path], crl_files: Sequence[Path] = (),
                   network: str | None = None) -> TrustStore:
        """Load PEM CA certificates (several per file allowed) and PEM or DER CRLs."""
        cas: list[x509.Certificate] = []
        for path in ca_files:
            try:
                cas.extend(x509.load_pem_x509_certificates(_read(path, "CA file")))
            except (ValueError, x509.InvalidVersion) as exc:
                raise PKIError(f"cannot load CA certificates from {str(path)!r}: {exc}") from None
        crls: list[x509.CertificateRevocationList] = []
        for path in crl_files:
            data = _read(path, "CRL file")
            try:
                crls.append(x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----")
                            else x509.load_der_x509_crl(data))
            except ValueError as exc:
                raise PKIError(f"cannot load CRL {str(path)!r}: {exc}") from None
        return cls(cas=cas, crls=crls, network=network)

    @property
    def network(self) -> str | None:
        """The network id certificates must name (their O), or None for any."""
        return self._network

    @property
    def cas(self) -> tuple[x509.Certificate, ...]:
        return self._cas

    def update_crls(self, crls: Sequence[x509.CertificateRevocationList]) -> None:
        """Replace the revocation lists; each must be signed by one of the CAs."""
        revoked: dict[bytes, set[int]] = {}
        for crl in crls:
            issuer = next((ca for ca in self._by_subject.get(crl.issuer, ())
                           if self._crl_signed_by(crl, ca)), None)
            if issuer is None:
                raise PKIError(f"CRL of {crl.issuer.rfc4514_string()} is not signed by any "
                               "trusted CA")
            revoked.setdefault(issuer.fingerprint(hashes.SHA256()), set()).update(
                r.serial_number for r in crl)
        with self._lock:
            self._revoked = {k: frozenset(v) for k, v in revoked.items()}
            self._cache.clear()
            self._rejected.clear()
            self._by_text.clear()

    @staticmethod
    def _crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
        try:
            key = ca.public_key()
            return isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey) \
                and crl.is_signature_valid(key)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            return False

    def verify_certificate(self, der: bytes, *, now: float) -> VerifiedSigner:
        """Validate a DER certificate for signing envelopes at time ``now`` (cached).

        Raises :class:`SignatureError` naming the reason (not from a trusted CA, revoked, wrong
        key type, wrong network, subject outside the identity scheme, outside its validity
        window) or :class:`MalformedMessage` if ``der`` is not a certificate.
        """
        fingerprint = hashlib.sha256(der).digest()
        with self._lock:
            entry: VerifiedSigner | _Rejected | None = (
                self._cache.get(fingerprint) or self._rejected.get(fingerprint))
        if entry is None:
            entry = self._validate(der, fingerprint)
            with self._lock:
                if isinstance(entry, _Rejected):
                    self._rejected.put(fingerprint, entry)
                else:
                    self._cache.put(fingerprint, entry)
        return self._admit(entry, now)

    def verify_encoded(self, text: bytes, *, now: float) -> VerifiedSigner:
        """:meth:`verify_certificate` for the base64url text of an envelope's ``cert``.

        Keyed on the text itself so that a known certificate costs one dictionary lookup.
        """
        with self._lock:
            fingerprint = self._by_text.get(text)
            entry = None if fingerprint is None else self._cache.get(fingerprint)
        if entry is not None:
            return self._admit(entry, now)
        der = _b64d(text, "cert")
        signer = self.verify_certificate(der, now=now)
        with self._lock:
            self._by_text.put(text, signer.fingerprint)
        return signer

    def lookup(self, fingerprint: bytes, *, now: float) -> VerifiedSigner | None:
        """The already validated certificate with this SHA-256, if it is still cached and valid.

        Raises :class:`SignatureError` if that certificate was rejected or is out of its window.
        """
        with self._lock:
            entry: VerifiedSigner | _Rejected | None = (
                self._cache.get(fingerprint) or self._rejected.get(fingerprint))
        return None if entry is None else self._admit(entry, now)

    @staticmethod
    def _admit(entry: VerifiedSigner | _Rejected, now: float) -> VerifiedSigner:
        if isinstance(entry, _Rejected):
            raise entry.error(entry.message)
        entry.check_time(now)
        return entry

    def _validate(self, der: bytes, fingerprint: bytes) -> VerifiedSigner | _Rejected:
        try:
            cert = x509.load_der_x509_certificate(der)
            return self._validate_cert(cert, fingerprint)
        except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
            # cryptography parses lazily: a broken field surfaces on first access.
            return _Rejected(MalformedMessage, f"'cert' is not a usable X.509 certificate: {exc}")

    def _validate_cert(self, cert: x509.Certificate,
                       fingerprint: bytes) -> VerifiedSigner | _Rejected:
        subject = cert.subject.rfc4514_string()
        issuer: x509.Certificate | None = None
        for ca in self._by_subject.get(cert.issuer, ()):
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                continue
            issuer = ca
            break
        if issuer is None:
            return _Rejected(SignatureError,
                             f"certificate {subject!r} is not issued by a trusted CA")
        if cert.serial_number in self._revoked.get(issuer.fingerprint(hashes.SHA256()), ()):
            return _Rejected(SignatureError, f"certificate {subject!r} (serial "
                                             f"{cert.serial_number:x}) is revoked")
        key = cert.public_key()
        algorithm = _algorithm(key)
        if algorithm is None or not isinstance(
                key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
            return _Rejected(SignatureError, f"certificate {subject!r} has a "
                                             f"{type(key).__name__} key; envelopes are signed "
                                             "with Ed25519 or ECDSA P-256")
        try:
            identity = identity_of(cert)
        except PKIError as exc:
            return _Rejected(SignatureError, f"certificate {subject!r}: {exc}")
        if self._network is not None and identity.network != self._network:
            return _Rejected(SignatureError, f"certificate {subject!r} belongs to network "
                                             f"{identity.network!r}, not {self._network!r}")
        return VerifiedSigner(
            identity=identity, fingerprint=fingerprint, public_key=key, algorithm=algorithm,
            serial=cert.serial_number,
            not_before=max(cert.not_valid_before_utc, issuer.not_valid_before_utc).timestamp(),
            not_after=min(cert.not_valid_after_utc, issuer.not_valid_after_utc).timestamp(),
            raw_ed25519=(key.public_bytes_raw() if isinstance(key, ed25519.Ed25519PublicKey)
                         else None),
        )


# -- replay protection --------------------------------------------------------------------

class _ReplayGuard:
    """Per-sender highest sequence number plus a bitmap of the ``window`` below it.

    Bit ``i`` of the bitmap stands for ``high - i``. Senders are tracked in an LRU of
    ``max_senders``; a sender pushed out of it starts afresh, so its old messages are then only
    held off by the age limit.
    """

    __slots__ = ("_lock", "_mask", "_senders", "_window")

    def __init__(self, *, window: int, max_senders: int) -> None:
        self._window = window
        self._mask = (1 << window) - 1
        self._senders: _LRU[Identity, list[int]] = _LRU(max_senders)
        self._lock = threading.Lock()

    def admit(self, sender: Identity, seq: int, *, check: bool, record: bool) -> None:
        """With ``check``, raise :class:`ReplayedMessage` unless ``seq`` is new; with
        ``record``, remember it."""
        with self._lock:
            state = self._senders.get(sender)
            if state is None:
                if record:
                    self._senders.put(sender, [seq, 1])
                return
            high, bits = state
            if not record:
                if check and (high - seq >= self._window
                              or (seq <= high and bits >> (high - seq) & 1)):
                    raise ReplayedMessage(f"sequence {seq} of {sender.sender} is not new")
                return
            if seq > high:
                shift = seq - high
                state[0] = seq
                state[1] = ((bits << shift) | 1) & self._mask if shift < self._window else 1
                return
            offset = high - seq
            if offset >= self._window:
                if check:
                    raise ReplayedMessage(
                        f"sequence {seq} of {sender.sender} is {offset} behind the newest; the "
                        f"replay window holds {self._window}")
                return
            bit = 1 << offset
            if bits & bit:
                if check:
                    raise ReplayedMessage(f"sequence {seq} of {sender.sender} was already seen")
                return
            state[1] = bits | bit

    def __len__(self) -> int:
        return len(self._senders)


# -- the codec ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Decoded:
    """A verified envelope: the message, who signed it, and its size on the wire."""

    message: NetworkMessage
    signer: Identity
    raw_size: int


def _group_key(kid: str, secret: SecretStr) -> AESGCM:
    text = secret.get_secret_value().strip().replace("-", "+").replace("_", "/").rstrip("=")
    try:
        raw = binascii.a2b_base64(text + "=" * (-len(text) % 4), strict_mode=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"encryption key {kid!r} is not valid base64") from None
    if len(raw) != 32:
        raise ConfigError(f"encryption key {kid!r} decodes to {len(raw)} bytes; AES-256-GCM "
                          "needs exactly 32")
    return AESGCM(raw)


class EnvelopeCodec:
    """Encodes this node's envelopes and decodes (verifies, decrypts, de-duplicates) others'.

    Safe to share between threads. ``stats`` counts decoded envelopes (``"decoded"``) and
    drops by :attr:`EnvelopeError.reason`.

    ``max_senders`` bounds the replay state (one window per sender identity); replay state is
    keyed by the identity the certificate names, not the certificate, so a node whose
    certificate is renewed keeps its window.
    """

    def __init__(
        self,
        *,
        signer: Signer,
        trust: TrustStore,
        encryption: EncryptionConfig | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_clock_skew: float = 300.0,
        max_age: float = DEFAULT_MAX_AGE,
        replay_window: int = 4096,
        embed_certificate: bool = True,
        clock: Callable[[], float] = time.time,
        max_senders: int = 10_000,
    ) -> None:
        if max_bytes < 256:
            raise ConfigError(f"max_bytes must be at least 256, got {max_bytes}")
        if not (max_clock_skew >= 0 and math.isfinite(max_clock_skew)):
            raise ConfigError(f"max_clock_skew must be a finite number >= 0, got {max_clock_skew}")
        if not max_age > 0:
            raise ConfigError(f"max_age must be > 0, got {max_age}")
        if replay_window < 1 or max_senders < 1:
            raise ConfigError("replay_window and max_senders must be at least 1")
        self._signer = signer
        self._trust = trust
        self._max_bytes = max_bytes
        self._max_skew = float(max_clock_skew)
        self._max_age = float(max_age)
        self._embed = embed_certificate
        self._clock = clock
        self._keys: dict[str, tuple[bytes, AESGCM]] = {}
        self._active: str | None = None
        if encryption is not None:
            for kid, secret in encryption.keys.items():
                self._keys[kid] = (json.dumps(kid, ensure_ascii=False).encode(),
                                   _group_key(kid, secret))
            self._active = encryption.active
        self._from = json.dumps(signer.sender, ensure_ascii=False).encode()
        self._cert_member = _CERT_OPEN + _b64e(signer.certificate_der) + b'"'
        self._sk_member = _SK_OPEN + _b64e(signer.fingerprint) + b'"'
        self._replay = _ReplayGuard(window=replay_window, max_senders=max_senders)
        self._lock = threading.Lock()
        self._seq = int(self._now() * 1000) * 1000
        self._seq_file: Path | None = None
        self._seq_reserved = 0
        self._stats: Counter[str] = Counter()
        # Lets this node read its own cert-less envelopes; a signer from another CA (a bridge
        # that signs for one network and reads another) is simply not pre-registered.
        with contextlib.suppress(EnvelopeError):
            trust.verify_certificate(signer.certificate_der, now=self._now())

    @classmethod
    def from_config(cls, config: NetworkConfig, *, crl_files: Sequence[Path] = (),
                    clock: Callable[[], float] = time.time,
                    embed_certificate: bool = True) -> EnvelopeCodec:
        """Build the codec a node of ``config`` uses (its TLS material signs and verifies)."""
        missing = config.tls.missing()
        if missing:
            raise ConfigError(f"envelopes need {', '.join(missing)} to sign and verify")
        assert config.tls.ca_file and config.tls.cert_file and config.tls.key_file
        rel = config.reliability
        return cls(
            signer=Signer.from_files(key_file=config.tls.key_file, cert_file=config.tls.cert_file),
            trust=TrustStore.from_files(ca_files=[config.tls.ca_file], crl_files=crl_files,
                                        network=config.network_id),
            encryption=config.encryption, max_bytes=rel.max_message_bytes,
            max_clock_skew=rel.max_clock_skew, max_age=rel.max_message_age,
            embed_certificate=embed_certificate, clock=clock,
        )

    # -- properties -----------------------------------------------------------------------
    def persist_sequence(self, path: Path) -> None:
        """Keep sequence numbers growing across restarts even if the clock steps back.

        Numbers start from the clock (ms x 1000), so a node restarted after its clock was
        corrected backwards would send numbers its receivers already saw and have every
        message dropped as a replay. ``path`` records a reserved upper bound, rewritten
        (atomically, fsynced) once per ``_SEQ_BLOCK`` messages; a restart continues above it.
        :class:`ConfigError` if the file cannot be read or written.
        """
        floor = 0
        try:
            text = path.read_text(encoding="ascii").strip()
            floor = int(text) if text else 0
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read the sequence reservation ({exc})") from exc
        with self._lock:
            self._seq = max(self._seq, floor)
            self._seq_file = path
            self._reserve(self._seq + _SEQ_BLOCK)

    def _reserve(self, upto: int) -> None:
        assert self._seq_file is not None
        tmp = self._seq_file.with_name(self._seq_file.name + ".tmp")
        try:
            with tmp.open("w", encoding="ascii") as fh:
                fh.write(f"{upto}\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._seq_file)
        except OSError as exc:
            # Without the record a restart could reuse numbers; refuse to go on silently.
            raise ConfigError(f"{self._seq_file}: cannot record the sequence reservation "
                              f"({exc})") from exc
        self._seq_reserved = upto

    @property
    def signer(self) -> Signer:
        return self._signer

    @property
    def trust(self) -> TrustStore:
        return self._trust

    @property
    def active_key_id(self) -> str | None:
        """The group key new envelopes are encrypted with by default, if any."""
        return self._active

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def stats(self) -> dict[str, int]:
        """``{"decoded": n, "<reason>": n, ...}`` since the codec was created."""
        with self._lock:
            return dict(self._stats)

    @property
    def tracked_senders(self) -> int:
        """How many senders the replay guard currently remembers."""
        return len(self._replay)

    def _now(self) -> float:
        now = float(self._clock())
        if not (math.isfinite(now) and now >= 0):
            raise ConfigError(f"the codec clock returned {now!r}")
        return now

    # -- encode ---------------------------------------------------------------------------
    def encode(self, *, kind: str, body: Any, encrypt: bool | None = None,
               embed_certificate: bool | None = None) -> bytes:
        """Sign (and by default, when a group key is active, encrypt) one envelope.

        ``body`` must be JSON-serialisable (finite numbers only). Raises
        :class:`MalformedMessage` for an unknown ``kind`` or a body that is not JSON,
        :class:`OversizedMessage` if the envelope would exceed ``max_bytes`` (split the
        batch), and :class:`ConfigError` for ``encrypt=True`` without an active key.
        """
        try:
            body_json = json.dumps(body, ensure_ascii=False, allow_nan=False,
                                   separators=(",", ":")).encode("utf-8")
        except (TypeError, ValueError, RecursionError) as exc:
            raise MalformedMessage(f"cannot encode body as JSON: {exc}") from None
        return self.encode_json(kind=kind, body_json=body_json, encrypt=encrypt,
                                embed_certificate=embed_certificate)

    def encode_json(self, *, kind: str, body_json: bytes, encrypt: bool | None = None,
                    embed_certificate: bool | None = None) -> bytes:
        """:meth:`encode` for a body that is already JSON text (UTF-8 bytes).

        For a sender that stored its items as JSON (the outbox): a batch is their join, with
        no parse and re-serialise per item. The caller vouches that ``body_json`` is one JSON
        value; receivers drop the envelope as malformed otherwise.
        """
        if kind not in _KINDS:
            raise MalformedMessage(f"cannot encode kind {kind!r}; known kinds: {sorted(_KINDS)}")
        if encrypt is None:
            kid = self._active
        elif encrypt:
            if self._active is None:
                raise ConfigError("encrypt=True but no active group key is configured "
                                  "(encryption.active)")
            kid = self._active
        else:
            kid = None
        ts = self._now()
        with self._lock:
            self._seq += 1
            seq = self._seq
            if self._seq_file is not None and seq >= self._seq_reserved:
                try:
                    self._reserve(seq + _SEQ_BLOCK)
                except ConfigError as exc:
                    # Sending goes on (a full disk must not stop it); only a restart after a
                    # backwards clock step could then reuse numbers. Retried next block.
                    log.error("%s", exc)
                    self._seq_reserved = seq + _SEQ_BLOCK
        head = b"".join((b'{"v":1,"kind":"', kind.encode("ascii"), b'","id":"',
                         secrets.token_urlsafe(16).encode("ascii"), b'","from":', self._from,
                         b',"seq":', str(seq).encode("ascii"), b',"ts":',
                         repr(ts).encode("ascii")))
        embed = self._embed if embed_certificate is None else embed_certificate
        ref = self._cert_member if embed else self._sk_member
        if kid is None:
            unsigned = b"".join((head, b',"body":', body_json, ref))
        else:
            kid_json, aead = self._keys[kid]
            aad = head + b',"kid":' + kid_json
            nonce = os.urandom(_NONCE_BYTES)
            sealed = aead.encrypt(nonce, body_json, aad)
            unsigned = b"".join((aad, _NONCE_OPEN, _b64e(nonce), b'","enc":"', _b64e(sealed),
                                 b'"', ref))
        signature = self._signer.sign(unsigned + b"}")
        wire = b"".join((unsigned, _SIG_OPEN, _b64e(signature), _TAIL))
        if len(wire) > self._max_bytes:
            raise OversizedMessage(f"envelope of {len(wire)} bytes exceeds the limit of "
                                   f"{self._max_bytes}; split the batch")
        return wire

    # -- decode ---------------------------------------------------------------------------
    def decode(self, payload: bytes | bytearray | memoryview, *, check_replay: bool = True,
               max_age: float | None = None) -> Decoded:
        """Verify, decrypt and de-duplicate one received payload.

        ``check_replay=False`` accepts a sequence number already seen (retained messages
        re-delivered on a new subscription); the number is still recorded. ``max_age``
        overrides the codec's age limit for this call.

        Raises only :class:`EnvelopeError` subclasses, for any input.
        """
        try:
            decoded = self._decode(payload, check_replay, max_age)
        except EnvelopeError as exc:
            with self._lock:
                self._stats[exc.reason] += 1
            raise
        except Exception as exc:
            # Last line of defence for the "never crash on input" contract; the unit tests
            # assert this path is never taken.
            with self._lock:
                self._stats[MalformedMessage.reason] += 1
            raise MalformedMessage(f"internal error while decoding: "
                                   f"{type(exc).__name__}: {exc}") from exc
        with self._lock:
            self._stats["decoded"] += 1
        return decoded

    def _decode(self, payload: bytes | bytearray | memoryview, check_replay: bool,
                max_age: float | None) -> Decoded:
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise MalformedMessage(f"payload must be bytes, got {type(payload).__name__}")
        data = bytes(payload)
        size = len(data)
        if size > self._max_bytes:
            raise OversizedMessage(f"payload of {size} bytes exceeds the limit of "
                                   f"{self._max_bytes}")
        sig_at = data.rfind(_SIG_OPEN)
        if not (data.startswith(_PREFIX) and data.endswith(_TAIL)) or sig_at < 0:
            self._diagnose(data)
        sig_text = data[sig_at + len(_SIG_OPEN):-len(_TAIL)]
        if len(sig_text) > (_MAX_SIGNATURE * 4 + 2) // 3:
            raise MalformedMessage("'sig' is too long to be a signature")
        signature = _b64d(sig_text, "sig")
        if _b64e(signature) != sig_text:
            raise MalformedMessage("'sig' is not canonical base64url")
        head = data[:sig_at]

        # The signer reference is the member right before "sig"; base64 never holds ',"'.
        ref_at = head.rfind(b',"')
        ref = head[ref_at:]
        now = self._now()
        if ref.startswith(_CERT_OPEN) and ref.endswith(b'"'):
            ref_name, ref_text = "cert", ref[len(_CERT_OPEN):-1]
            signer = self._trust.verify_encoded(ref_text, now=now)
        elif ref.startswith(_SK_OPEN) and ref.endswith(b'"'):
            ref_name, ref_text = "sk", ref[len(_SK_OPEN):-1]
            known = self._trust.lookup(_b64d(ref_text, "sk"), now=now)
            if known is None:
                raise SignatureError("envelope names its signer by 'sk' only and that "
                                     "certificate has not been seen yet; the sender must "
                                     "embed 'cert'")
            signer = known
        else:
            raise MalformedMessage("no 'cert' or 'sk' member before 'sig'")
        signer.verify(signature, head + b"}")

        # Authentic from here on. The envelope's members are parsed with duplicate-key checks
        # (a second "from" or "seq" must not slip past other JSON readers); a plain body, the
        # bulk of a batch, is sliced out and parsed once at full speed. Neither ',"body":' nor
        # ',"nonce":"' can occur inside a JSON string, and the header before them is flat, so
        # the first of them is the real member (the layout check below confirms it).
        body_at = head.find(_BODY_OPEN)
        nonce_at = head.find(_NONCE_OPEN)
        plain = body_at >= 0 and (nonce_at < 0 or body_at < nonce_at)
        body_from = body_at + len(_BODY_OPEN)
        if plain:
            obj = _parse_json(data[:body_from] + b"0" + data[ref_at:], "envelope")
        else:
            obj = _parse_json(data, "envelope")
        if type(obj) is not dict or tuple(obj) not in _LAYOUTS:
            raise MalformedMessage("envelope members are not in the v1 layout "
                                   f"(got {list(obj) if type(obj) is dict else type(obj)})")
        if obj["sig"] != sig_text.decode("ascii") or obj[ref_name] != ref_text.decode("ascii"):
            raise MalformedMessage("'sig' or the signer reference is not where the layout "
                                   "puts it")
        sender = obj["from"]
        if sender != signer.identity.sender:
            raise SignatureError(f"'from' {sender!r} does not match the signing certificate "
                                 f"({signer.identity.sender!r})")
        seq, ts = obj["seq"], obj["ts"]
        if type(seq) is not int or not 0 <= seq <= _MAX_SEQ:
            raise MalformedMessage(f"'seq' must be an integer in [0, 2**63), got {seq!r}")
        if type(ts) is not float and type(ts) is not int:
            raise MalformedMessage(f"'ts' must be a number, got {type(ts).__name__}")
        ts = float(ts)
        if not (math.isfinite(ts) and ts >= 0):
            raise MalformedMessage(f"'ts' must be a finite, non-negative number, got {ts!r}")
        if ts > now + self._max_skew:
            raise StaleMessage(f"timestamp lies {ts - now:.1f} s in the future (max clock "
                               f"skew {self._max_skew:g} s)")
        limit = self._max_age if max_age is None else max_age
        if now - ts > limit:
            raise StaleMessage(f"message is {now - ts:.0f} s old (max age {limit:g} s)")

        if type(obj["kind"]) is not str or type(obj["id"]) is not str:
            raise MalformedMessage("'kind' and 'id' must be strings")
        if check_replay:
            # Cheap early drop for the common case (QoS 1 re-delivery) before decrypting and
            # parsing the body; the authoritative check-and-record comes last.
            self._replay.admit(signer.identity, seq, check=True, record=False)
        if "enc" in obj:
            kid: str | None = obj["kid"]
            body = self._decrypt(data, obj)
        elif plain:
            kid = None
            body = _parse_json(data[body_from:ref_at], "body", unique_keys=False)
        else:
            raise MalformedMessage("'body' is not where the layout puts it")
        try:
            message = NetworkMessage(kind=obj["kind"], message_id=obj["id"], sender=sender,
                                     sequence=seq, timestamp=ts, body=body, key_id=kid)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                 for e in exc.errors(include_url=False, include_input=False))
            raise MalformedMessage(f"envelope fields are invalid: {problems}") from None
        # Last, so a message dropped for any other reason does not burn its sequence number.
        self._replay.admit(signer.identity, seq, check=check_replay, record=True)
        return Decoded(message=message, signer=signer.identity, raw_size=size)

    def _decrypt(self, data: bytes, obj: dict[str, Any]) -> Any:
        kid, nonce_text, enc_text = obj["kid"], obj["nonce"], obj["enc"]
        if type(kid) is not str or type(nonce_text) is not str or type(enc_text) is not str:
            raise MalformedMessage("'kid', 'nonce' and 'enc' must be strings")
        held = self._keys.get(kid)
        if held is None:
            raise UnknownKeyError(f"encrypted with group key {kid!r}, which this node does not "
                                  f"hold (held: {sorted(self._keys)})")
        nonce = _b64d(_ascii(nonce_text, "nonce"), "nonce")
        sealed = _b64d(_ascii(enc_text, "enc"), "enc")
        if len(nonce) != _NONCE_BYTES or len(sealed) < _GCM_TAG_BYTES:
            raise MalformedMessage("'nonce' must be 12 bytes and 'enc' at least 16")
        # The layout is verified, so the first ',"nonce":"' ends the header (it cannot occur
        # inside a JSON string).
        aad = data[:data.find(_NONCE_OPEN)]
        try:
            plain = held[1].decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise DecryptionError(f"ciphertext under group key {kid!r} failed "
                                  "authentication") from None
        # Authenticated by the signature and the GCM tag: parsed at full speed, like a plain
        # body (receivers validate its content with their own models).
        return _parse_json(plain, "decrypted body", unique_keys=False)

    def _diagnose(self, data: bytes) -> NoReturn:
        """Explain why ``data`` is not a signed v1 envelope (always raises)."""
        obj = _parse_json(data, "payload")
        if type(obj) is not dict:
            raise MalformedMessage(f"payload is a JSON {type(obj).__name__}, not an object")
        if "v" not in obj:
            raise MalformedMessage("payload has no schema version 'v'")
        version = obj["v"]
        if type(version) is not int:
            raise MalformedMessage(f"schema version 'v' must be an integer, got {version!r}")
        if version != VERSION:
            raise UnsupportedVersion(f"envelope schema version {version}; this build reads "
                                     f"{VERSION}")
        if "sig" not in obj:
            raise SignatureError("unsigned message (no 'sig')")
        raise MalformedMessage('envelope is not in canonical v1 form: it must start with '
                               '{"v":1, and end with the "sig" member')


# -- sealed box for the aggregator ---------------------------------------------------------

_SEAL_VERSION = b"\x01"
_SEAL_INFO = b"pear_mqtt seal v1"
_X25519_BYTES = 32


def _seal_cipher(shared: bytes, ephemeral: bytes, recipient: bytes) -> tuple[AESGCM, bytes]:
    # Both public keys go into the KDF so a token is bound to the recipient it was made for.
    okm = HKDF(algorithm=hashes.SHA256(), length=32 + _NONCE_BYTES, salt=None,
               info=_SEAL_INFO + ephemeral + recipient).derive(shared)
    return AESGCM(okm[:32]), okm[32:]


def seal(public_key: x25519.X25519PublicKey, plaintext: bytes, *, aad: bytes = b"") -> str:
    """Encrypt ``plaintext`` so that only the holder of ``public_key``'s private key can read it.

    A fresh X25519 key per call makes each token's AES key unique, so the GCM nonce is derived
    with it. ``aad`` (optional) must be given again to :meth:`SealOpener.open`. The token is
    base64url text: version byte, ephemeral public key, ciphertext and tag.
    """
    ephemeral = x25519.X25519PrivateKey.generate()
    eph_pub = ephemeral.public_key().public_bytes_raw()
    aead, nonce = _seal_cipher(ephemeral.exchange(public_key), eph_pub,
                               public_key.public_bytes_raw())
    return _b64e(_SEAL_VERSION + eph_pub + aead.encrypt(nonce, plaintext, aad)).decode("ascii")


_SEAL_SESSION_VERSION = b"\x02"
_SEAL_SESSION_INFO = b"pear_mqtt seal session v2"


def _session_cipher(shared: bytes, ephemeral: bytes, recipient: bytes) -> AESGCM:
    okm = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=_SEAL_SESSION_INFO + ephemeral + recipient).derive(shared)
    return AESGCM(okm)


class Sealer:
    """Seals many tokens to one recipient at a fraction of :func:`seal`'s cost.

    :func:`seal` spends ~90 µs on a fresh X25519 key and exchange per token; a node that
    seals every insight it sends would spend most of its time there. A sealer keeps one
    ephemeral key (and so one derived AES key) for ``rotate_after`` tokens or
    ``rotate_seconds``, and gives each token a random 96-bit nonce, far below GCM's limit for
    random nonces under one key. Tokens name their ephemeral key, so :class:`SealOpener`
    opens them like any other.
    """

    __slots__ = (
        "_aead",
        "_clock",
        "_eph_pub",
        "_made",
        "_public_key",
        "_recipient",
        "_rotate_after",
        "_rotate_seconds",
        "_since",
    )

    def __init__(self, public_key: x25519.X25519PublicKey, *, rotate_after: int = 100_000,
                 rotate_seconds: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(public_key, x25519.X25519PublicKey):
            raise PKIError(f"a sealed box needs an X25519 public key, got "
                           f"{type(public_key).__name__}")
        self._public_key = public_key
        self._recipient = public_key.public_bytes_raw()
        self._rotate_after = rotate_after
        self._rotate_seconds = rotate_seconds
        self._clock = clock
        self._aead: AESGCM | None = None
        self._eph_pub = b""
        self._made = 0
        self._since = 0.0

    def _rotate(self) -> AESGCM:
        ephemeral = x25519.X25519PrivateKey.generate()
        self._eph_pub = ephemeral.public_key().public_bytes_raw()
        self._aead = _session_cipher(ephemeral.exchange(self._public_key), self._eph_pub,
                                     self._recipient)
        self._made, self._since = 0, self._clock()
        return self._aead

    def seal(self, plaintext: bytes, *, aad: bytes = b"") -> str:
        """A token only the recipient's private key opens (``aad`` must match on open)."""
        aead = self._aead
        if (aead is None or self._made >= self._rotate_after
                or self._clock() - self._since >= self._rotate_seconds):
            aead = self._rotate()
        self._made += 1
        nonce = os.urandom(_NONCE_BYTES)
        return _b64e(_SEAL_SESSION_VERSION + self._eph_pub + nonce
                     + aead.encrypt(nonce, plaintext, aad)).decode("ascii")


class SealOpener:
    """Opens tokens made by :func:`seal` or a :class:`Sealer` for this X25519 private key
    (the aggregator's)."""

    __slots__ = ("_key", "_public", "_sessions")

    def __init__(self, private_key: x25519.X25519PrivateKey) -> None:
        if not isinstance(private_key, x25519.X25519PrivateKey):
            raise PKIError(f"a sealed box needs an X25519 private key, got "
                           f"{type(private_key).__name__}")
        self._key = private_key
        self._public = private_key.public_key().public_bytes_raw()
        # Derived keys of recent sealer sessions: one X25519 exchange per session, not token.
        self._sessions: _LRU[bytes, AESGCM] = _LRU(4096)

    @classmethod
    def from_file(cls, path: Path) -> SealOpener:
        """Load the private key from a PEM file."""
        return cls(load_x25519_private_key(path))

    @property
    def public_key(self) -> x25519.X25519PublicKey:
        return self._key.public_key()

    def _open_session(self, raw: bytes, aad: bytes) -> bytes:
        head = 1 + _X25519_BYTES + _NONCE_BYTES
        if len(raw) < head + _GCM_TAG_BYTES:
            raise DecryptionError("sealed token is truncated")
        eph_pub = raw[1:1 + _X25519_BYTES]
        nonce, body = raw[1 + _X25519_BYTES:head], raw[head:]
        try:
            aead = self._sessions.get(eph_pub)
            if aead is not None:
                return aead.decrypt(nonce, body, aad)
            shared = self._key.exchange(x25519.X25519PublicKey.from_public_bytes(eph_pub))
            aead = _session_cipher(shared, eph_pub, self._public)
            plaintext = aead.decrypt(nonce, body, aad)
        except (InvalidTag, ValueError):
            raise DecryptionError("sealed token does not open with this key") from None
        self._sessions.put(eph_pub, aead)  # only keys that opened a token are kept
        return plaintext

    def open(self, token: str, *, aad: bytes = b"") -> bytes:
        """The plaintext of ``token``; :class:`DecryptionError` if it is not one for this key."""
        try:
            raw = _b64d(token.encode("ascii"), "sealed token")
        except (MalformedMessage, UnicodeEncodeError, AttributeError):
            raise DecryptionError("sealed token is not base64url text") from None
        if raw[:1] == _SEAL_SESSION_VERSION:
            return self._open_session(raw, aad)
        if len(raw) < 1 + _X25519_BYTES + _GCM_TAG_BYTES or raw[:1] != _SEAL_VERSION:
            raise DecryptionError("sealed token is truncated or of an unknown version")
        eph_pub = raw[1:1 + _X25519_BYTES]
        try:
            shared = self._key.exchange(x25519.X25519PublicKey.from_public_bytes(eph_pub))
            aead, nonce = _seal_cipher(shared, eph_pub, self._public)
            return aead.decrypt(nonce, raw[1 + _X25519_BYTES:], aad)
        except (InvalidTag, ValueError):
            raise DecryptionError("sealed token does not open with this key") from None


def generate_x25519_key() -> x25519.X25519PrivateKey:
    """A new aggregator key pair."""
    return x25519.X25519PrivateKey.generate()


def _write(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except FileExistsError:
        raise PKIError(f"{str(path)!r} exists; refusing to overwrite key material") from None
    except OSError as exc:
        raise PKIError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None


def save_x25519_private_key(key: x25519.X25519PrivateKey, path: Path, *,
                            overwrite: bool = False) -> None:
    """Write the private key as unencrypted PKCS#8 PEM, readable by the owner only."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    _write(Path(path), pem, mode=0o600, overwrite=overwrite)


def save_x25519_public_key(key: x25519.X25519PublicKey, path: Path, *,
                           overwrite: bool = False) -> None:
    """Write the public key as SubjectPublicKeyInfo PEM (what nodes configure)."""
    pem = key.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    _write(Path(path), pem, mode=0o644, overwrite=overwrite)


def load_x25519_private_key(path: Path) -> x25519.X25519PrivateKey:
    """Read a PEM X25519 private key; :class:`PKIError` if it is missing or another type."""
    try:
        key = serialization.load_pem_private_key(_read(path, "X25519 key file"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PKIError(f"cannot load X25519 private key {str(path)!r}: {exc}") from None
    if not isinstance(key, x25519.X25519PrivateKey):
        raise PKIError(f"{str(path)!r} holds a {type(key).__name__}, not an X25519 key")
    return key


def load_x25519_public_key(path: Path) -> x25519.X25519PublicKey:
    """Read a PEM X25519 public key; :class:`PKIError` if it is missing or another type."""
    try:
        key = serialization.load_pem_public_key(_read(path, "X25519 public key file"))
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PKIError(f"cannot load X25519 public key {str(path)!r}: {exc}") from None
    if not isinstance(key, x25519.X25519PublicKey):
        raise PKIError(f"{str(path)!r} holds a {type(key).__name__}, not an X25519 key")
    return key
