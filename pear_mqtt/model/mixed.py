"""The body of an ``insights`` envelope of several categories (on a ``$mixed`` topic): its
items, and which category each belongs to, named before anything is opened.

``{"items": [...], "categories": [["<category>", <count>], ...]}``: the items in runs of
one category, in order. docs/DESIGN.md, "Batching", says when a node sends one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..errors import TopicError
from .topics import validate_category

__all__ = ["item_categories", "mixed_body"]

MAX_ITEMS = 1_000_000  # far over any envelope's size limit: a count past it is hostile


def mixed_body(runs: Sequence[tuple[str, Sequence[bytes]]]) -> bytes:
    """The body's JSON from runs of (category, the items' JSON as the outbox keeps them)."""
    items = b",".join(b",".join(payloads) for _, payloads in runs)
    names = json.dumps([[category, len(payloads)] for category, payloads in runs],
                       separators=(",", ":"), ensure_ascii=False).encode()
    return b'{"items":[' + items + b'],"categories":' + names + b"}"


def item_categories(body: Any, count: int) -> list[str] | None:
    """Each of the ``count`` items' category as ``body`` names them; None when it does not
    name exactly ``count`` valid ones."""
    runs = body.get("categories") if isinstance(body, dict) else None
    if not isinstance(runs, list):
        return None
    out: list[str] = []
    for run in runs:
        if not (isinstance(run, list) and len(run) == 2 and type(run[1]) is int
                and 0 < run[1] <= count - len(out) <= MAX_ITEMS):
            return None
        try:
            category = validate_category(run[0])
        except TopicError:
            return None
        out.extend([category] * run[1])
    return out if len(out) == count else None
