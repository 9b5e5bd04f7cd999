"""The envelope's wire layout, shared by the writer and the reader of envelopes: the byte
markers of its members, the member orders it may take, its bounds, and what its signature
covers in each version. The format is specified in docs/DESIGN.md ("Envelope")."""

from __future__ import annotations

import hashlib
from typing import get_args

from ..model.insight import MessageKind

__all__ = ["BODY_OPEN", "CERT_OPEN", "GCM_TAG_BYTES", "KINDS", "LAYOUTS", "MAX_SEQ",
           "MAX_SIGNATURE", "NONCE_BYTES", "NONCE_OPEN", "PREFIXES", "PREFIX_BYTES", "SIG_OPEN",
           "SK_OPEN", "TAIL", "VERSION", "signed_bytes"]

VERSION = 2  # what this build writes; it reads every version in PREFIXES
KINDS: frozenset[str] = frozenset(get_args(MessageKind))

PREFIXES: dict[bytes, int] = {b'{"v":%d,' % v: v for v in (2, 1)}
PREFIX_BYTES = len(next(iter(PREFIXES)))
assert all(len(prefix) == PREFIX_BYTES for prefix in PREFIXES)
SIG_OPEN = b',"sig":"'
TAIL = b'"}'
CERT_OPEN = b',"cert":"'
SK_OPEN = b',"sk":"'
NONCE_OPEN = b',"nonce":"'
BODY_OPEN = b',"body":'
# Ed25519 signatures are 64 bytes and DER ECDSA P-256 ones at most 72; the bound is looser so
# that a certificate with an unsupported key type is reported as such, not as a bad "sig".
MAX_SIGNATURE = 160
MAX_SEQ = 2**63 - 1
NONCE_BYTES = 12
GCM_TAG_BYTES = 16

_HEAD = ("v", "kind", "id", "from", "seq", "ts")
# "log": the message's index in its sender's verified-history log (docs/HISTORY.md).
LAYOUTS: frozenset[tuple[str, ...]] = frozenset(
    (*_HEAD, *logged, *payload, ref, "sig")
    for logged in ((), ("log",))
    for payload in (("body",), ("kid", "nonce", "enc"))
    for ref in ("cert", "sk")
)


_V2_DOMAIN = b"pear_mqtt envelope v2 sha256\x00"


def signed_bytes(version: int, head: bytes) -> bytes:
    """What the signature of a ``version`` envelope signs, given ``head`` (its bytes before
    ``,"sig":``): v1 those bytes and a closing ``}``; v2 their SHA-256 after a domain tag.
    Signing with Ed25519 hashes the message twice with SHA-512 (libsodium's, ~0.4 ms for a
    100 kB batch), verifying once: one SHA-256 pass first is a fraction of either."""
    if version == 2:
        digest = hashlib.sha256(head)
        digest.update(b"}")  # the closing brace, without copying the head to append it
        return _V2_DOMAIN + digest.digest()
    if version == 1:
        return head + b"}"
    raise ValueError(f"no signing rule for envelope version {version}")
