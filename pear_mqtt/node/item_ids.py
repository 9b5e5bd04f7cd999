"""Item ids derived from what an insight describes, so that a re-sent or re-read observation
keeps its id: receivers see a repeat as a duplicate and the bridge replaces the earlier copy
instead of counting it again (docs/DESIGN.md, "Item ids")."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Final

from ..model.insight import MarketInsight
from ..security.signing import Signer

__all__ = ["ItemIds"]

_LABEL = b"pear_mqtt item id v1"
_TIMES_KEPT: Final = 256  # window bounds whose text is kept (a store's windows repeat)


class ItemIds:
    """The id of each insight a node sends: 128 bits (hex) of keyed BLAKE2b over the node's
    identity (network, member, node, as its certificate names them) and the observation's
    category, product, region and window.

    The key is derived from the node's private key: the same node always gives the same
    observation the same id, while nobody else can compute it, so an id that travels next to
    sealed values does not let a reader confirm guesses of what they describe.
    """

    __slots__ = ("_keyed", "_prefix", "_times")

    def __init__(self, signer: Signer) -> None:
        # Copied per id: cheaper than keying a new hash each time.
        self._keyed = hashlib.blake2b(key=signer.derive_secret(_LABEL), digest_size=16)
        self._times: dict[datetime, str] = {}
        identity = signer.identity
        # NUL never occurs in an identifier, a category or an ISO timestamp: the framing is
        # unambiguous.
        self._prefix = b"\x00".join(
            part.encode() for part in (identity.network, identity.member, identity.node))

    def of(self, insight: MarketInsight) -> str:
        """The id of ``insight``'s observation."""
        parts = (insight.category, insight.product_id or "", insight.region,
                 self._text(insight.window_start), self._text(insight.window_end))
        h = self._keyed.copy()
        h.update(self._prefix + b"\x00" + "\x00".join(parts).encode())
        return h.hexdigest()

    def _text(self, t: datetime) -> str:
        """``t.isoformat()``, remembered for UTC times (a MarketInsight's always are; equal
        times in other zones would print differently)."""
        if t.tzinfo is not UTC:
            return t.isoformat()
        text = self._times.get(t)
        if text is None:
            if len(self._times) >= _TIMES_KEPT:
                self._times.clear()
            text = self._times[t] = t.isoformat()
        return text
