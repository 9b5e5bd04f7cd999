"""What a receiver trusts: the network CA(s), their CRLs and the network id; a sender's
certificate is validated once and its verdict cached (:class:`TrustStore`)."""

from __future__ import annotations

import hashlib
import logging
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ..errors import (
    ConfigError,
    EnvelopeError,
    MalformedMessage,
    PKIError,
    RevokedCertificate,
    SignatureError,
    TopicError,
)
from ..model.topics import validate_identifier
from .base64url import b64url_decode
from .identity import identity_of
from .keys import issued_by, read_material, signature_algorithm
from .lru import LRU
from .revocation import CRL_CHECK_INTERVAL, CrlFiles
from .signing import VerifiedSigner

__all__ = ["TrustStore"]

log = logging.getLogger(__name__)


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
    enforced); :meth:`update_crls` replaces them and drops the verdicts they change. With
    ``revocation`` (CRL files, :meth:`from_files`) every check first looks whether a file
    changed, at most once per its interval, and takes the new revocations in.
    """

    __slots__ = ("_by_subject", "_by_text", "_cache", "_cas", "_lock", "_network", "_rejected",
                 "_revocation", "_revoked", "_validations")

    def __init__(self, *, cas: Sequence[x509.Certificate],
                 crls: Sequence[x509.CertificateRevocationList] = (),
                 network: str | None = None, cache_size: int = 4096,
                 revocation: CrlFiles | None = None) -> None:
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
        self._cache: LRU[bytes, VerifiedSigner] = LRU(cache_size)
        # Kept apart so that a flood of junk certificates cannot push out the good ones (which
        # cert-less "sk" envelopes depend on).
        self._rejected: LRU[bytes, _Rejected] = LRU(cache_size)
        self._by_text: LRU[bytes, bytes] = LRU(cache_size)
        self._revoked: dict[bytes, frozenset[int]] = {}
        self._validations = 0
        self.update_crls(crls)
        self._revocation = revocation

    @classmethod
    def from_files(cls, *, ca_files: Sequence[Path], crl_files: Sequence[Path] = (),
                   network: str | None = None,
                   crl_check_interval: float = CRL_CHECK_INTERVAL) -> TrustStore:
        """Load PEM CA certificates (several per file allowed) and PEM or DER CRLs; the CRL
        files are looked at again every ``crl_check_interval`` seconds and re-read when they
        changed."""
        cas: list[x509.Certificate] = []
        for path in ca_files:
            try:
                cas.extend(x509.load_pem_x509_certificates(read_material(path, "CA file")))
            except (ValueError, x509.InvalidVersion) as exc:
                raise PKIError(f"cannot load CA certificates from {str(path)!r}: {exc}") from None
        files = CrlFiles(crl_files, interval=crl_check_interval) if crl_files else None
        crls = files.load() if files is not None else []
        return cls(cas=cas, crls=crls, network=network, revocation=files)

    @property
    def network(self) -> str | None:
        """The network id certificates must name (their O), or None for any."""
        return self._network

    @property
    def cas(self) -> tuple[x509.Certificate, ...]:
        return self._cas

    @property
    def validations(self) -> int:
        """How many certificates were validated in full so far (cache misses), accepted or
        rejected; a known certificate costs none."""
        return self._validations

    @property
    def revocation(self) -> CrlFiles | None:
        """The CRL files this store re-reads when they change, if any."""
        return self._revocation

    def refresh_crls(self) -> bool:
        """Take in the CRL files' revocations if it is time to look and one changed; True
        when the revocations were replaced. A CRL that is not signed by a trusted CA is
        refused (logged), keeping the revocations loaded before. Every check calls this."""
        files = self._revocation
        crls = files.poll() if files is not None else None
        if crls is None:
            return False
        try:
            self.update_crls(crls)
        except PKIError as exc:
            log.warning("keeping the revocations loaded before: %s", exc)
            return False
        return True

    def update_crls(self, crls: Sequence[x509.CertificateRevocationList]) -> None:
        """Replace the revocation lists; each must be signed by one of the CAs.

        Cached verdicts of certificates these lists revoke are dropped, and every refusal is
        forgotten, so the next message of each is judged again.
        """
        revoked: dict[bytes, set[int]] = {}
        for crl in crls:
            issuer = next((ca for ca in self._by_subject.get(crl.issuer, ())
                           if self._crl_signed_by(crl, ca)), None)
            if issuer is None:
                raise PKIError(f"CRL of {crl.issuer.rfc4514_string()} is not signed by any "
                               "trusted CA")
            revoked.setdefault(issuer.fingerprint(hashes.SHA256()), set()).update(
                r.serial_number for r in crl)
        serials = frozenset().union(*revoked.values())
        with self._lock:
            self._revoked = {k: frozenset(v) for k, v in revoked.items()}
            self._cache.discard_where(lambda signer: signer.serial in serials)
            self._rejected.clear()

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
        if self._revocation is not None and self._revocation.due():
            self.refresh_crls()
        fingerprint = hashlib.sha256(der).digest()
        with self._lock:
            entry: VerifiedSigner | _Rejected | None = (
                self._cache.get(fingerprint) or self._rejected.get(fingerprint))
        if entry is None:
            entry = self._validate(der, fingerprint)
            with self._lock:
                self._validations += 1
                if isinstance(entry, _Rejected):
                    self._rejected.put(fingerprint, entry)
                else:
                    self._cache.put(fingerprint, entry)
        return self._admit(entry, now)

    def verify_encoded(self, text: bytes, *, now: float) -> VerifiedSigner:
        """:meth:`verify_certificate` for the base64url text of an envelope's ``cert``.

        Keyed on the text itself so that a known certificate costs one dictionary lookup.
        """
        if self._revocation is not None and self._revocation.due():
            self.refresh_crls()
        with self._lock:
            fingerprint = self._by_text.get(text)
            entry = None if fingerprint is None else self._cache.get(fingerprint)
        if entry is not None:
            return self._admit(entry, now)
        der = b64url_decode(text, "cert")
        signer = self.verify_certificate(der, now=now)
        with self._lock:
            self._by_text.put(text, signer.fingerprint)
        return signer

    def lookup(self, fingerprint: bytes, *, now: float) -> VerifiedSigner | None:
        """The already validated certificate with this SHA-256, if it is still cached and valid.

        Raises :class:`SignatureError` if that certificate was rejected or is out of its window.
        """
        if self._revocation is not None and self._revocation.due():
            self.refresh_crls()
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
            # cryptography warns as it reads a malformed name (a fuzzed certificate's): the
            # verdict says what is wrong with the certificate, a warning would only let any
            # sender write to this process's log.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                cert = x509.load_der_x509_certificate(der)
                return self._validate_cert(cert, fingerprint)
        except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
            # cryptography parses lazily: a broken field surfaces on first access.
            return _Rejected(MalformedMessage, f"'cert' is not a usable X.509 certificate: {exc}")

    def _validate_cert(self, cert: x509.Certificate,
                       fingerprint: bytes) -> VerifiedSigner | _Rejected:
        subject = cert.subject.rfc4514_string()
        issuer = next((ca for ca in self._by_subject.get(cert.issuer, ())
                       if issued_by(cert, ca)), None)
        if issuer is None:
            return _Rejected(SignatureError,
                             f"certificate {subject!r} is not issued by a trusted CA")
        if cert.serial_number in self._revoked.get(issuer.fingerprint(hashes.SHA256()), ()):
            return _Rejected(RevokedCertificate, f"certificate {subject!r} (serial "
                                                 f"{cert.serial_number:x}) is revoked")
        key = cert.public_key()
        algorithm = signature_algorithm(key)
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

