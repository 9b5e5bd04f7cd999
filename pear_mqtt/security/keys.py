"""Key material: the supported signature keys, comparing public keys, who issued a
certificate, and reading key and certificate files (as :class:`PKIError` naming the file)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ..errors import PKIError
from ..files import atomic_write

__all__ = [
    "SigningKey",
    "VerifyingKey",
    "issued_by",
    "read_material",
    "signature_algorithm",
    "spki",
    "write_key_file",
]

SigningKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
"""A key that signs certificates and envelopes: Ed25519 or ECDSA."""

VerifyingKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


def spki(key: Any) -> bytes:
    """The DER SubjectPublicKeyInfo of a public key: equal bytes, equal keys."""
    der: bytes = key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def signature_algorithm(key: object) -> str | None:
    """``"ed25519"`` or ``"ecdsa-p256"`` for a key envelopes may be signed with, else None."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and isinstance(
            key.curve, ec.SECP256R1):
        return "ecdsa-p256"
    return None


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` signed ``cert`` (issuer name and signature); False for any failure."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def read_material(path: Path, what: str) -> bytes:
    """The bytes of a key, certificate, CRL or registry file; :class:`PKIError` naming
    ``what`` and the path if it cannot be read."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise PKIError(f"cannot read {what} {str(path)!r}: it does not exist") from None
    except OSError as exc:
        raise PKIError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None


def write_key_file(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    """Write key material whole (:func:`~pear_mqtt.files.atomic_write`), with ``mode``.

    Without ``overwrite`` an existing file is refused with :class:`PKIError`. The name is
    claimed with ``O_EXCL`` first, so two writers racing for one path cannot both succeed;
    the content then replaces the empty claim in one rename.
    """
    path = Path(path)
    if not overwrite:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
        except FileExistsError:
            raise PKIError(f"{str(path)!r} exists; refusing to overwrite key material") \
                from None
        except OSError as exc:
            raise PKIError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    try:
        atomic_write(path, data, mode=mode)
    except OSError as exc:
        if not overwrite:  # give the claimed name back
            with contextlib.suppress(OSError):
                path.unlink()
        raise PKIError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
