"""The networks ``pear-mqtt up`` runs on loopback: their brokers, members and simulated stores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..brokerconf import Mode

__all__ = [
    "BRIDGE_LINE",
    "BRIDGE_USER",
    "DEFAULT_DIR",
    "DEFAULT_PORTS",
    "HOST",
    "MONITOR_USER",
    "TOPOLOGY",
    "NetworkSpec",
]

DEFAULT_DIR: Final = Path(".pear")
DEFAULT_PORTS: Final = (18883, 18884, 18885)
"""TLS ports of the private, consortium and public brokers (``--ports`` / ``PEAR_UP_PORTS``)."""

HOST: Final = "127.0.0.1"
BRIDGE_USER: Final = "bridge"
MONITOR_USER: Final = "monitor"  # reads each broker's $SYS figures (the dashboard's /metrics)
BRIDGE_LINE: Final = "bridge: retail-eu -> market, k-anonymous aggregates (docs/BRIDGE.md)"


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    """One network of the local topology: its broker, CA, members and simulated stores."""

    mode: Mode
    network: str
    companies: tuple[str, ...]
    stores: tuple[str, ...]
    agents: bool  # start a simulated agent per (company, store)
    bridge: bool  # issue a bridge identity and grant it the bridge's ACL rights
    anonymise: bool  # the CA enrols stores under random pseudonyms (CN, OU)
    # The company whose node "archive" keeps every member's history log (docs/HISTORY.md);
    # None: no archive (public participants keep no logs).
    archive: str | None = None


_CONSORTIUM = ("acme", "globex", "initech", "umbrella", "hooli", "wayne")

TOPOLOGY: Final = (
    NetworkSpec(mode="private", network="acme-private", companies=("acme",),
                stores=("store-1", "store-2"), agents=True, bridge=False, anonymise=False,
                archive="acme"),
    # Six companies: one more than the default k (privacy.min_companies = 5), so aggregates
    # pass the threshold even while one member is offline.
    NetworkSpec(mode="consortium", network="retail-eu", companies=_CONSORTIUM,
                stores=("store-1",), agents=True, bridge=True, anonymise=True,
                archive="operator"),  # the consortium's operator: no store, no insights
    # Public participants get certificates to try things with; they publish nothing useful
    # until the bridge aggregates, so no agents run there yet.
    NetworkSpec(mode="public", network="market", companies=_CONSORTIUM,
                stores=("store-1",), agents=False, bridge=True, anonymise=True),
)
