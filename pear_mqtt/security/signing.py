"""Who signs an envelope: this node's :class:`Signer`, and :class:`VerifiedSigner`, a sender's
certificate after the trust store accepted it. Ed25519 (through libsodium) or ECDSA P-256."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from nacl.bindings import crypto_sign, crypto_sign_open, crypto_sign_seed_keypair
from nacl.exceptions import BadSignatureError

from ..errors import PKIError, SignatureError
from .identity import Identity, identity_of
from .keys import SigningKey, VerifyingKey, read_material, signature_algorithm, spki

__all__ = ["Signer", "VerifiedSigner"]

_ED25519_SIGNATURE = 64


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


class Signer:
    """A node's signing key and the certificate that vouches for it.

    The key must be Ed25519 (the default everywhere) or ECDSA on P-256, and must match the
    certificate. The certificate's subject must follow :mod:`pear_mqtt.security.identity`.
    """

    __slots__ = ("_algorithm", "_certificate", "_der", "_fingerprint", "_identity", "_key",
                 "_sodium_key")

    def __init__(self, *, private_key: SigningKey, certificate: x509.Certificate) -> None:
        algorithm = signature_algorithm(private_key)
        if algorithm is None:
            raise PKIError(f"signing key type {type(private_key).__name__} is not supported; "
                           "use Ed25519 or ECDSA P-256")
        try:
            cert_key = certificate.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise PKIError(f"certificate public key is unreadable: {exc}") from None
        if spki(private_key.public_key()) != spki(cert_key):
            raise PKIError("the private key does not belong to the certificate "
                           f"{certificate.subject.rfc4514_string()}")
        self._identity = identity_of(certificate)
        self._algorithm = algorithm
        self._key = private_key
        self._certificate = certificate
        self._der = certificate.public_bytes(serialization.Encoding.DER)
        self._fingerprint = hashlib.sha256(self._der).digest()
        # Ed25519 is deterministic: libsodium makes the same signature as OpenSSL and signs
        # and verifies faster, so both ends use it for Ed25519 (docs/BENCHMARKS.md).
        self._sodium_key: bytes | None = None
        if isinstance(private_key, ed25519.Ed25519PrivateKey):
            self._sodium_key = crypto_sign_seed_keypair(private_key.private_bytes_raw())[1]

    @classmethod
    def from_files(cls, *, key_file: Path, cert_file: Path,
                   password: bytes | None = None) -> Signer:
        """Load a PEM private key and its PEM certificate; :class:`PKIError` on any problem."""
        key_pem = read_material(key_file, "key file")
        cert_pem = read_material(cert_file, "certificate file")
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

    def derive_secret(self, label: bytes) -> bytes:
        """A 32-byte secret for ``label``, derived from the private key (keyed BLAKE2b): stable
        for this key, unpredictable to anyone without it, and unrelated across labels."""
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            material = self._key.private_bytes_raw()
        else:
            material = self._key.private_numbers().private_value.to_bytes(32, "big")
        return hashlib.blake2b(label, key=material, digest_size=32,
                               person=b"pear_mqtt secret").digest()

    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` with the node key."""
        if self._sodium_key is not None:
            return crypto_sign(data, self._sodium_key)[:_ED25519_SIGNATURE]
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(data)
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))


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
