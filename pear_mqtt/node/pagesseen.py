"""Which checkpoint pages of each sender arrived, part by part and in which version: held
against the pages a sender's signed head names, what ``sync()`` still waits for
(docs/DESIGN.md, "Sync and presence")."""

from __future__ import annotations

from collections.abc import Iterable

from ..model.topics import CHECKPOINT_PAGES, checkpoint_slot

__all__ = ["PagesSeen"]


class PagesSeen:
    """Per sender: the newest version seen of each page part, and of each page the newest
    version seen of any of its parts with the number of parts that version has."""

    def __init__(self) -> None:
        self._parts: dict[str, dict[int, int]] = {}  # sender -> page part slot -> newest seq
        self._cuts: dict[str, dict[int, tuple[int, int]]] = {}  # sender -> page -> (seq, parts)

    def seen(self, sender: str, sequence: int, page: int, *, part: int = 0,
             parts: int = 1) -> None:
        """Part ``part`` of ``page`` arrived in the version of envelope ``sequence``, which
        has ``parts`` parts."""
        seen = self._parts.setdefault(sender, {})
        slot = checkpoint_slot(page, part)
        seen[slot] = max(seen.get(slot, -1), sequence)
        cuts = self._cuts.setdefault(sender, {})
        if cuts.get(page, (-1, 0))[0] < sequence:
            cuts[page] = (sequence, parts)

    def senders(self) -> Iterable[str]:
        """The senders any page part came from."""
        return self._parts.keys()

    def count(self) -> int:
        """How many distinct page parts arrived, of every sender."""
        return sum(len(parts) for parts in self._parts.values())

    def missing(self, sender: str, named: dict[int, int]) -> int:
        """How many of the page parts a head names (``slot -> version``) have not arrived
        in that version or a newer one, leaving out parts a newer version of their page no
        longer has."""
        seen = self._parts.get(sender, {})
        cuts = self._cuts.get(sender, {})
        return sum(1 for slot, seq in named.items()
                   if seen.get(slot, -1) < seq and not _recut(cuts, slot, seq))


def _recut(cuts: dict[int, tuple[int, int]], slot: int, sequence: int) -> bool:
    """Whether the page part a head names (``slot``, in version ``sequence``) is gone from a
    newer version of its page that has fewer parts (its topic was cleared since)."""
    page, part = slot % CHECKPOINT_PAGES, slot // CHECKPOINT_PAGES
    newest, parts = cuts.get(page, (-1, 0))
    return newest > sequence and part >= parts
