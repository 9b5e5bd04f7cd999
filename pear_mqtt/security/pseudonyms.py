"""The operator's pseudonym registry of a CA that anonymises its network: the random
pseudonym that stands for each company (a node certificate's CN) and store (its OU).

Kept in ``pseudonyms.json`` in the CA directory (0600, replaced atomically); only the operator
reads it. A pseudonym is drawn at random when a company or store is first enrolled, so no
member can compute one from a name: it stays the same for every re-issue until the network's
pseudonyms are rotated, and each network's CA draws its own (unlinkable across networks).
The caller holds the CA's lock (:mod:`pear_mqtt.security.pki`).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PKIError, TopicError
from ..files import atomic_write
from ..model.topics import validate_identifier
from .keys import read_material

__all__ = ["PSEUDONYMS", "Enrolment", "PseudonymBook", "draw_pseudonym"]

PSEUDONYMS = "pseudonyms.json"
_VERSION = 1
_RANDOM_BYTES = 15  # 120 bits: 24 base32 characters


def draw_pseudonym() -> str:
    """A fresh random pseudonym: ``p`` and 24 lowercase base32 characters (a topic level)."""
    return "p" + base64.b32encode(secrets.token_bytes(_RANDOM_BYTES)).decode("ascii").lower()


@dataclass(frozen=True, slots=True)
class Enrolment:
    """One store of one company, and the identity its node certificate carries."""

    company: str
    store: str
    member: str
    """The company's pseudonym: the certificate's CN, the member in topics."""
    node: str
    """The store's pseudonym: the certificate's OU, the node's ``node_id``."""

    def to_json(self) -> dict[str, str]:
        return {"company": self.company, "store": self.store, "member": self.member,
                "node": self.node}


class PseudonymBook:
    """The pseudonyms of one network: company -> (pseudonym, store -> pseudonym).

    ``generation`` counts rotations (1 for a new book).
    """

    __slots__ = ("_companies", "generation", "network", "rotated_at")

    def __init__(self, *, network: str, generation: int = 1, rotated_at: str | None = None,
                 companies: dict[str, dict[str, Any]] | None = None) -> None:
        self.network = network
        self.generation = generation
        self.rotated_at = rotated_at
        self._companies: dict[str, dict[str, Any]] = companies or {}

    # -- files ------------------------------------------------------------------------------
    @classmethod
    def load(cls, ca_dir: Path) -> PseudonymBook | None:
        """The book of the CA in ``ca_dir``, or None when that CA assigns no pseudonyms."""
        path = ca_dir / PSEUDONYMS
        if not path.exists():
            return None
        try:
            data = json.loads(read_material(path, "pseudonym registry"))
        except json.JSONDecodeError as exc:
            raise PKIError(f"pseudonym registry {path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("version") != _VERSION \
                or not isinstance(data.get("companies"), dict) \
                or not isinstance(data.get("network"), str):
            raise PKIError(f"pseudonym registry {path} has an unknown layout")
        for name, entry in data["companies"].items():
            if not (isinstance(entry, dict) and isinstance(entry.get("member"), str)
                    and isinstance(entry.get("stores"), dict)):
                raise PKIError(f"pseudonym registry {path}: bad entry for company {name!r}")
        return cls(network=data["network"], generation=int(data.get("generation", 1)),
                   rotated_at=data.get("rotated_at"), companies=data["companies"])

    def save(self, ca_dir: Path) -> None:
        data = {"version": _VERSION, "network": self.network, "generation": self.generation,
                "rotated_at": self.rotated_at, "companies": self._companies}
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        atomic_write(ca_dir / PSEUDONYMS, text.encode(), mode=0o600)

    # -- lookups and changes -------------------------------------------------------------------
    def lookup(self, company: str, store: str) -> Enrolment | None:
        """The enrolment of ``store`` of ``company``, if both have pseudonyms already."""
        entry = self._companies.get(company)
        node = entry["stores"].get(store) if entry is not None else None
        if entry is None or node is None:
            return None
        return Enrolment(company=company, store=store, member=entry["member"], node=node)

    def enrol(self, company: str, store: str) -> Enrolment:
        """The enrolment of ``store`` of ``company``, drawing the pseudonyms it lacks."""
        for value, what in ((company, "company"), (store, "store")):
            try:
                validate_identifier(value, what=what)
            except TopicError as exc:
                raise PKIError(str(exc)) from None
        known = self.lookup(company, store)
        if known is not None:
            return known
        entry = self._companies.setdefault(company, {"member": self._fresh(), "stores": {}})
        entry["stores"][store] = self._fresh()
        return Enrolment(company=company, store=store, member=entry["member"],
                         node=entry["stores"][store])

    def enrolments(self) -> list[Enrolment]:
        """Every enrolled store, by company and store name."""
        return [Enrolment(company=c, store=s, member=e["member"], node=n)
                for c, e in sorted(self._companies.items())
                for s, n in sorted(e["stores"].items())]

    def rotate(self) -> list[Enrolment]:
        """Draw new pseudonyms for every company and store (the old ones are never reused);
        return the new enrolments."""
        used = self._used()
        companies: dict[str, dict[str, Any]] = {}
        for company, entry in sorted(self._companies.items()):
            member = self._fresh(avoid=used)
            used.add(member)
            stores: dict[str, str] = {}
            for store in sorted(entry["stores"]):
                stores[store] = self._fresh(avoid=used)
                used.add(stores[store])
            companies[company] = {"member": member, "stores": stores}
        self._companies = companies
        self.generation += 1
        self.rotated_at = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
        return self.enrolments()

    def _used(self) -> set[str]:
        return {p for e in self._companies.values() for p in (e["member"], *e["stores"].values())}

    def _fresh(self, avoid: set[str] | None = None) -> str:
        used = self._used() if avoid is None else avoid
        while True:  # 120 random bits: a repeat is not expected, only excluded
            candidate = draw_pseudonym()
            if candidate not in used:
                return candidate
