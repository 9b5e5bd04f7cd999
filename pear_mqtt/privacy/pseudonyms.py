"""Keyed pseudonyms for company and store identities: stable inside one network, unlinkable
across networks (:class:`Pseudonymizer`)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Literal

from ..config.models import NetworkConfig
from ..errors import ConfigError, PrivacyError, TopicError
from ..model.topics import validate_identifier

__all__ = ["Pseudonymizer"]

_PSEUDONYM_DOMAIN = b"pear_mqtt/pseudonym/v1"
_PSEUDONYM_CHARS = 24  # base32 characters: 120 bits of the HMAC


class Pseudonymizer:
    """Keyed pseudonyms for company and store identities, scoped to one network.

    ``pseudonym(kind, value)`` is ``"p"`` followed by 24 lowercase base32 characters of
    HMAC-SHA256(secret, domain || network_id || kind || value), each part length-prefixed so no
    two different (network, kind, value) triples frame to the same bytes. The result is a valid
    topic identifier.

    The same secret and network give the same pseudonym every time (stable inside a network);
    a different network id or secret gives an unrelated one (unlinkable across networks).
    Company ids are easy to guess, so unlinkability rests entirely on the secret: use at least
    32 random bytes and share it only inside the network.
    """

    __slots__ = ("_cache", "_key", "_network_id")

    def __init__(self, *, secret: bytes | str, network_id: str) -> None:
        key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        if not key:
            raise ConfigError("privacy.pseudonym_secret must not be empty")
        try:
            validate_identifier(network_id, what="network_id")
        except TopicError as exc:
            raise ConfigError(str(exc)) from None
        self._key = key
        self._network_id = network_id
        self._cache: dict[tuple[str, str], str] = {}

    def __repr__(self) -> str:
        # The secret stays out of logs and tracebacks.
        return f"Pseudonymizer(network_id={self._network_id!r}, secret=<hidden>)"

    @property
    def network_id(self) -> str:
        """The network these pseudonyms belong to."""
        return self._network_id

    def pseudonym(self, kind: Literal["company", "store"], value: str) -> str:
        """The pseudonym of ``value`` as a ``kind`` identity in this network."""
        cached = self._cache.get((kind, value))
        if cached is not None:
            return cached
        if kind not in ("company", "store"):
            raise PrivacyError(f"pseudonym kind must be 'company' or 'store', got {kind!r}")
        if not isinstance(value, str) or not value:
            raise PrivacyError(f"the {kind} identity to pseudonymise must be a non-empty string")
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (_PSEUDONYM_DOMAIN, self._network_id.encode(), kind.encode(),
                     value.encode("utf-8")):
            mac.update(len(part).to_bytes(4, "big"))
            mac.update(part)
        text = base64.b32encode(mac.digest()).decode("ascii").lower()
        result = "p" + text[:_PSEUDONYM_CHARS]
        # A node pseudonymises the same few identities for every insight it sends.
        if len(self._cache) < 4096:
            self._cache[(kind, value)] = result
        return result

    def store_pseudonym(self, company: str, store: str) -> str:
        """The pseudonym of ``store`` of ``company``.

        Store ids are often only unique inside a company ("store-1"), so the company is part
        of the input: two companies' "store-1" get different pseudonyms. ``/`` cannot occur in
        an identifier, which keeps the joined value unambiguous.
        """
        return self.pseudonym("store", f"{company}/{store}")

    @classmethod
    def from_config(cls, config: NetworkConfig) -> Pseudonymizer | None:
        """The pseudonymizer of ``config``'s network, or None when it has no secret."""
        secret = config.privacy.pseudonym_secret
        if secret is None:
            return None
        return cls(secret=secret.get_secret_value(), network_id=config.network_id)
