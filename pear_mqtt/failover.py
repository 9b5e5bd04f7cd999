"""Which broker of a network to connect to next, when its config names several (the nodes of
a clustered broker): the current one until an attempt to reach it fails, then the next."""

from __future__ import annotations

from collections.abc import Sequence

from .config.models import BrokerURL

__all__ = ["BrokerRing"]


class BrokerRing:
    """The brokers of one network, tried in turn (deploy/cluster/README.md)."""

    __slots__ = ("_at", "_urls")

    def __init__(self, urls: Sequence[BrokerURL]) -> None:
        if not urls:
            raise ValueError("a broker ring needs at least one broker URL")
        self._urls = tuple(urls)
        self._at = 0

    @classmethod
    def of(cls, text: str) -> BrokerRing:
        """The ring of a ``broker_url`` setting (one URL or several, comma-separated)."""
        return cls(BrokerURL.parse_list(text))

    @property
    def current(self) -> BrokerURL:
        return self._urls[self._at]

    def failed(self) -> BrokerURL:
        """The attempt on :attr:`current` failed: move on to the next; return it."""
        self._at = (self._at + 1) % len(self._urls)
        return self._urls[self._at]

    def __len__(self) -> int:
        return len(self._urls)
