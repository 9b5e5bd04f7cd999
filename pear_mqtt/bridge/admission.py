"""What may enter a window: the policy check of one item, its window, and the digests that
let a receipt's input hash be recomputed by anyone who received the items."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from ..model.insight import SharingLevel
from ..privacy.disclosure import field_level, sample_size_level
from ..privacy.filter import Contribution, SharedInsight

__all__ = ["check_item", "input_hash", "item_digest", "window_of"]

_DIGEST_DOMAIN = b"pear_mqtt bridge item v1"
# json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False) without building an
# encoder per call: the same bytes, ~1 µs less per item.
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"),
                                   ensure_ascii=False).encode


def check_item(*, shared: SharedInsight | None, contribution: Contribution | None,
               policy: Mapping[str, SharingLevel],
               announced: Mapping[str, SharingLevel] | None = None) -> str | None:
    """Why an item must be dropped, or None when it discloses no more than allowed.

    ``shared`` is the published part (None when the item is a sealed part alone). The
    published part obeys the disclosure rules by construction (:class:`SharedInsight` refuses
    anything else, derived fields included), given the levels it names; those must be the
    policy's.

    - ``policy_violation``: a group is shared at another level than ``policy`` says (e.g. an
      exact ``full`` price where the policy says ``ranges_only``, or any shared group the
      policy keeps ``aggregated`` or ``none``), or a sealed field whose effective level under
      the policy is not ``aggregated`` (a derived field follows its source, ``sample_size``
      follows ``sales_data``);
    - ``presence_mismatch``: the same, against the levels the sender's node announced in its
      presence (``announced``; not checked when unknown);
    - ``mismatch``: the sealed contribution describes another category, product, region or
      window than the insight that carries it.
    """
    # The fields a contribution seals: their verdict under a set of levels is looked up, not
    # recomputed, since a sender seals the same fields item after item.
    sealed = None if contribution is None else (
        contribution.sample_size is not None,
        tuple([(group, tuple(fields)) for group, fields in contribution.values.items()]))
    for levels, reason in ((policy, "policy_violation"), (announced, "presence_mismatch")):
        if levels is None:
            continue
        if shared is not None:
            for group, level in shared.levels.items():
                if levels.get(group) is not level:
                    return reason
        if sealed is not None and not _sealable(tuple(levels.items()), *sealed):
            return reason
    if shared is not None and contribution is not None and (
            contribution.category != shared.category
            or contribution.product_id != shared.product_id
            or contribution.region != shared.region
            or contribution.window_start != shared.window_start
            or contribution.window_end != shared.window_end):
        return "mismatch"
    return None


@functools.lru_cache(maxsize=4096)
def _sealable(levels: tuple[tuple[str, SharingLevel], ...], sample_size: bool,
              fields: tuple[tuple[str, tuple[str, ...]], ...]) -> bool:
    """Whether a contribution sealing ``fields`` (per group) and, with ``sample_size``, a
    sample size seals only what is ``aggregated`` under ``levels``."""
    by_group = dict(levels)
    if sample_size and sample_size_level(by_group) is not SharingLevel.AGGREGATED:
        return False
    return all(field_level(by_group, group, name) is SharingLevel.AGGREGATED
               for group, names in fields for name in names)


def window_of(start: datetime, end: datetime, *, window_seconds: int) -> int | None:
    """The bridge window (epoch seconds of its start) that holds the observation window
    ``[start, end]``, or None when it spans more than one bridge window."""
    ws = int(start.timestamp() // window_seconds) * window_seconds
    return ws if end.timestamp() <= ws + window_seconds else None


def item_digest(*, network: str, member: str, item: Mapping[str, Any]) -> bytes:
    """The digest of one received item, as the receipt's input hash covers it.

    SHA-256 over a domain tag, the network, the sending member, the item id, the insight as
    canonical JSON (sorted keys, no spaces) and the sealed token, NUL-separated. Any member
    who received the item (consortium members read each other's items) can recompute it.
    """
    insight = _CANONICAL_JSON(item.get("insight"))
    sealed = item.get("sealed")
    parts = [_DIGEST_DOMAIN, network.encode(), member.encode(), str(item.get("iid")).encode(),
             insight.encode(), sealed.encode() if isinstance(sealed, str) else b""]
    return hashlib.sha256(b"\x00".join(parts)).digest()


def input_hash(digests: Iterable[bytes]) -> str:
    """The input hash of a cell: SHA-256 of its item digests in ascending order (hex)."""
    h = hashlib.sha256()
    for d in sorted(digests):
        h.update(d)
    return h.hexdigest()
