"""The v1 envelope's wire layout, shared by the writer and the reader of envelopes: the
byte markers of its members, the member orders it may take, and its bounds. The format is
specified in docs/DESIGN.md ("Envelope")."""

from __future__ import annotations

from typing import get_args

from ..model.insight import MessageKind

__all__ = ["BODY_OPEN", "CERT_OPEN", "GCM_TAG_BYTES", "KINDS", "LAYOUTS", "MAX_SEQ",
           "MAX_SIGNATURE", "NONCE_BYTES", "NONCE_OPEN", "PREFIX", "SIG_OPEN", "SK_OPEN",
           "TAIL", "VERSION"]

VERSION = 1
KINDS: frozenset[str] = frozenset(get_args(MessageKind))

PREFIX = b'{"v":1,'
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
