"""Unpadded base64url, the text form of every binary field on the wire (envelopes, sealed
tokens); decoding is strict and fails as :class:`~pear_mqtt.errors.MalformedMessage`."""

from __future__ import annotations

import binascii

from ..errors import MalformedMessage

__all__ = ["ascii_field", "b64url_decode", "b64url_encode"]

# Maps base64url onto the standard alphabet and poisons the standard-only characters, so that
# binascii's strict decoder accepts exactly the url-safe alphabet.
_URLSAFE_TO_STD = bytes.maketrans(b"-_+/", b"+/!!")


_STD_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


def b64url_encode(data: bytes) -> bytes:
    text = binascii.b2a_base64(data, newline=False).translate(_STD_TO_URLSAFE)
    pad = -len(data) % 3  # how many '=' end it
    return text[:-pad] if pad else text


def b64url_decode(text: bytes, what: str) -> bytes:
    """Strict base64url (no padding) decoding; :class:`MalformedMessage` naming ``what``."""
    pad = -len(text) % 4
    if pad == 3 or b"=" in text:
        raise MalformedMessage(f"{what!r} is not unpadded base64url")
    try:
        return binascii.a2b_base64(text.translate(_URLSAFE_TO_STD) + b"=" * pad,
                                   strict_mode=True)
    except binascii.Error:
        raise MalformedMessage(f"{what!r} is not unpadded base64url") from None


def ascii_field(value: str, what: str) -> bytes:
    """A parsed JSON string that must hold base64url text, as bytes."""
    try:
        return value.encode("ascii")
    except UnicodeEncodeError:
        raise MalformedMessage(f"{what!r} is not base64url text") from None
