"""Certificate expiry of every certificate ``up.json`` names (CAs, brokers, bridge, nodes)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.x509.oid import NameOID

from .topology import Topology

__all__ = ["WARN_DAYS", "cert_expiry"]

WARN_DAYS: Final = 30  # prepare.py renews at 30 days before expiry; warn from then on


def _paths(topology: Topology) -> list[tuple[str, str]]:
    """(what it is, path) for each certificate, each path once."""
    state = topology.state
    found: list[tuple[str, str]] = []
    for b in state.brokers:
        found += [(f"CA {b.network}", b.ca), (f"broker {b.name}", b.cert)]
    for network, ident in sorted(state.bridge.get("identities", {}).items()):
        if isinstance(ident, dict) and ident.get("cert"):
            found.append((f"bridge {network}", str(ident["cert"])))
    found += [(f"node {n.name}", n.cert) for n in state.nodes]
    seen: set[str] = set()
    unique: list[tuple[str, str]] = []
    for label, path in found:
        if path not in seen:
            seen.add(path)
            unique.append((label, path))
    return unique


def _one(label: str, path: str, now: dt.datetime) -> dict[str, Any]:
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        return {"name": label, "path": path, "ok": False, "status": "unreadable",
                "detail": f"{type(exc).__name__}: {exc}", "days_left": None}
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    days = (cert.not_valid_after_utc - now).total_seconds() / 86400
    status = "expired" if days <= 0 else "expiring" if days < WARN_DAYS else "ok"
    return {"name": label, "path": path, "ok": status == "ok", "status": status,
            "subject": str(cn[0].value) if cn else cert.subject.rfc4514_string(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "days_left": round(days, 1)}


def cert_expiry(topology: Topology, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """Days left per certificate, soonest first."""
    at = now or dt.datetime.now(dt.UTC)
    certs = [_one(label, path, at) for label, path in _paths(topology)]
    certs.sort(key=lambda c: (c["days_left"] is not None, c["days_left"] or 0.0))
    return {"warn_days": WARN_DAYS, "certificates": certs}
