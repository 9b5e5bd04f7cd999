"""Checks a node's TLS files before it connects (:func:`tls_problems`), so that a node with
unusable certificates refuses to start with a reason instead of retrying a broker forever."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from .keys import issued_by, spki

__all__ = ["tls_problems"]


def tls_problems(*, ca_file: Path, cert_file: Path, key_file: Path,
                 now: dt.datetime | None = None) -> list[str]:
    """What is wrong with a node's TLS files, one line per problem naming the config field.

    Checked without a network round trip, so that a node refuses to start with a clear reason
    instead of retrying a broker that will never accept it: each file parses (PEM); the CA
    file holds a CA certificate (not a leaf); the certificate was issued by that CA and is
    within its validity window; the key belongs to the certificate. The files must be
    readable (the caller checks that first). An empty list means nothing was found.
    """
    problems: list[str] = []
    at = now or dt.datetime.now(dt.UTC).replace(microsecond=0)
    cas: list[x509.Certificate] = []
    try:
        cas = x509.load_pem_x509_certificates(Path(ca_file).read_bytes())
    except (ValueError, OSError):
        problems.append(f"tls.ca_file: {ca_file} is not a PEM certificate file")
    else:
        authorities = [c for c in cas if _is_ca(c)]
        if not authorities:
            problems.append(f"tls.ca_file: {ca_file} holds no CA certificate (it holds "
                            f"{cas[0].subject.rfc4514_string()!r}, not a certificate "
                            "authority: use the network's ca.crt)")
        cas = authorities
    cert: x509.Certificate | None = None
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except (ValueError, OSError):
        problems.append(f"tls.cert_file: {cert_file} is not a PEM certificate")
    if cert is not None:
        subject = cert.subject.rfc4514_string()
        if at < cert.not_valid_before_utc:
            problems.append(f"tls.cert_file: {cert_file} ({subject}) is not valid before "
                            f"{cert.not_valid_before_utc.isoformat()}")
        if at > cert.not_valid_after_utc:
            problems.append(f"tls.cert_file: {cert_file} ({subject}) expired on "
                            f"{cert.not_valid_after_utc.isoformat()}")
        if cas and not any(issued_by(cert, ca) for ca in cas):
            problems.append(f"tls.cert_file: {cert_file} ({subject}) was not issued by the CA "
                            f"in tls.ca_file ({cas[0].subject.rfc4514_string()})")
    try:
        key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    except TypeError:
        problems.append(f"tls.key_file: {key_file} is encrypted; pear_mqtt needs an "
                        "unencrypted key file (mode 0600)")
    except (ValueError, OSError, UnsupportedAlgorithm):
        problems.append(f"tls.key_file: {key_file} is not a PEM private key")
    else:
        if cert is not None and spki(key.public_key()) != spki(cert.public_key()):
            problems.append(f"tls.key_file: {key_file} does not belong to the certificate in "
                            f"tls.cert_file ({cert.subject.rfc4514_string()})")
    return problems


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False
