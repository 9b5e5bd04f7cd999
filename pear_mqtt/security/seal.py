"""Sealed boxes for the aggregator: :func:`seal` and :class:`Sealer` encrypt to its X25519
public key (ephemeral ECDH, HKDF-SHA256, AES-256-GCM); only :class:`SealOpener`, holding the
private key, opens them. Also the X25519 key files."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import DecryptionError, MalformedMessage, PKIError
from .base64url import b64url_decode, b64url_encode
from .keys import read_material, write_key_file
from .lru import LRU

__all__ = [
    "SealOpener",
    "Sealer",
    "generate_x25519_key",
    "load_x25519_private_key",
    "load_x25519_public_key",
    "save_x25519_private_key",
    "save_x25519_public_key",
    "seal",
]

_NONCE_BYTES = 12
_GCM_TAG_BYTES = 16
_SEAL_VERSION = b"\x01"  # one token, one ephemeral key (seal)
_SEAL_INFO = b"pear_mqtt seal v1"
_SEAL_SESSION_VERSION = b"\x02"  # many tokens under one ephemeral key (Sealer)
_SEAL_SESSION_INFO = b"pear_mqtt seal session v2"
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
    token = _SEAL_VERSION + eph_pub + aead.encrypt(nonce, plaintext, aad)
    return b64url_encode(token).decode("ascii")


def _session_cipher(shared: bytes, ephemeral: bytes, recipient: bytes) -> AESGCM:
    okm = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=_SEAL_SESSION_INFO + ephemeral + recipient).derive(shared)
    return AESGCM(okm)


class Sealer:
    """Seals many tokens to one recipient at a fraction of :func:`seal`'s cost.

    A fresh X25519 key and exchange per token (what :func:`seal` does) would take most of
    the time of a node that seals every insight it sends. A sealer keeps one
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
        return b64url_encode(_SEAL_SESSION_VERSION + self._eph_pub + nonce
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
        self._sessions: LRU[bytes, AESGCM] = LRU(4096)

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
            raw = b64url_decode(token.encode("ascii"), "sealed token")
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


def save_x25519_private_key(key: x25519.X25519PrivateKey, path: Path, *,
                            overwrite: bool = False) -> None:
    """Write the private key as unencrypted PKCS#8 PEM, readable by the owner only."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_key_file(path, pem, mode=0o600, overwrite=overwrite)


def save_x25519_public_key(key: x25519.X25519PublicKey, path: Path, *,
                           overwrite: bool = False) -> None:
    """Write the public key as SubjectPublicKeyInfo PEM (what nodes configure)."""
    pem = key.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    write_key_file(path, pem, mode=0o644, overwrite=overwrite)


def load_x25519_private_key(path: Path) -> x25519.X25519PrivateKey:
    """Read a PEM X25519 private key; :class:`PKIError` if it is missing or another type."""
    try:
        key = serialization.load_pem_private_key(read_material(path, "X25519 key file"),
                                                 password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PKIError(f"cannot load X25519 private key {str(path)!r}: {exc}") from None
    if not isinstance(key, x25519.X25519PrivateKey):
        raise PKIError(f"{str(path)!r} holds a {type(key).__name__}, not an X25519 key")
    return key


def load_x25519_public_key(path: Path) -> x25519.X25519PublicKey:
    """Read a PEM X25519 public key; :class:`PKIError` if it is missing or another type."""
    try:
        key = serialization.load_pem_public_key(read_material(path, "X25519 public key file"))
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PKIError(f"cannot load X25519 public key {str(path)!r}: {exc}") from None
    if not isinstance(key, x25519.X25519PublicKey):
        raise PKIError(f"{str(path)!r} holds a {type(key).__name__}, not an X25519 key")
    return key
