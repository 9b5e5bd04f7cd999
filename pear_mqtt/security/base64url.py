"""Unpadded base64url, the text form of every binary field on the wire (envelopes, sealed
tokens); decoding is strict and fails as :class:`~pear_mqtt.errors.MalformedMessage`.

pybase64 (SIMD) does the coding: an envelope's ciphertext is tens of kilobytes, which the
standard library's binascii decodes ~15x slower (docs/ARCHITECTURE.md, dependencies).
"""

from __future__ import annotations

import binascii

import pybase64

from ..errors import MalformedMessage

__all__ = ["ascii_field", "b64url_decode", "b64url_encode"]

_URLSAFE = b"-_"


def b64url_encode(data: bytes) -> bytes:
    # Positional arguments: pybase64's keyword parsing costs more than coding a short value.
    text = pybase64.b64encode(data, _URLSAFE)
    pad = -len(data) % 3  # how many '=' end it
    return text[:-pad] if pad else text


def b64url_decode(text: bytes, what: str) -> bytes:
    """Strict base64url (no padding) decoding; :class:`MalformedMessage` naming ``what``."""
    pad = -len(text) % 4
    # With the url-safe alphabet given, pybase64 would also take the standard '+' and '/'.
    if pad == 3 or b"=" in text or b"+" in text or b"/" in text:
        raise MalformedMessage(f"{what!r} is not unpadded base64url")
    try:
        return pybase64.b64decode(text + b"=" * pad, _URLSAFE, True)
    except (binascii.Error, ValueError):
        raise MalformedMessage(f"{what!r} is not unpadded base64url") from None


def ascii_field(value: str, what: str) -> bytes:
    """A parsed JSON string that must hold base64url text, as bytes."""
    try:
        return value.encode("ascii")
    except UnicodeEncodeError:
        raise MalformedMessage(f"{what!r} is not base64url text") from None
