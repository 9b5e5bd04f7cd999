"""Unit tests of pear_mqtt.security.base64url: round trips, and strict decoding of hostile
text (the standard alphabet, padding, whitespace and stray bytes are refused)."""

from __future__ import annotations

import base64
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pear_mqtt.errors import MalformedMessage
from pear_mqtt.security.base64url import b64url_decode, b64url_encode

pytestmark = pytest.mark.unit

_ALPHABET = (string.ascii_letters + string.digits + "-_").encode()


def _reference(text: bytes) -> bytes | None:
    """What strict unpadded base64url decoding must give, from the standard library."""
    if len(text) % 4 == 1 or any(c not in _ALPHABET for c in text):
        return None
    return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))


@given(st.binary(max_size=3000))
def test_round_trip_matches_the_standard_library(data: bytes) -> None:
    text = b64url_encode(data)
    assert text == base64.urlsafe_b64encode(data).rstrip(b"=")
    assert b64url_decode(text, "x") == data


@settings(max_examples=2000)
@given(st.binary(max_size=12) | st.lists(
    st.sampled_from(list(_ALPHABET) + list(b"+/=\n \x00\xff.")), max_size=14).map(bytes))
def test_decoding_accepts_exactly_unpadded_base64url(text: bytes) -> None:
    expected = _reference(text)
    if expected is None:
        with pytest.raises(MalformedMessage, match="'nonce' is not unpadded base64url"):
            b64url_decode(text, "nonce")
    else:
        assert b64url_decode(text, "nonce") == expected


@pytest.mark.parametrize("text", [b"ab+d", b"ab/d", b"abc=", b"ab==", b"abcde", b"ab d",
                                  b"abc\n", b"a\x00cd", b"AAAA" * 5000 + b"+AAA"])
def test_hostile_text_is_refused(text: bytes) -> None:
    with pytest.raises(MalformedMessage):
        b64url_decode(text, "enc")


def test_a_large_value_round_trips() -> None:
    data = bytes(range(256)) * 400  # an envelope's ciphertext is tens of kilobytes
    assert b64url_decode(b64url_encode(data), "enc") == data
