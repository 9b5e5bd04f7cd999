"""Bringing a state directory made before pseudonyms came from certificates up to date.

The older layout put one shared HMAC secret (``pseudonym_secret``) into ``secrets.json`` and
into every member's node configuration, and issued node certificates under the pseudonyms
it computed (CN) and the stores' own ids (OU): any member could compute every pseudonym.
:func:`migrate` drops the secret, turns pseudonyms on for each anonymising network's CA (all
its node certificates are revoked; :func:`~.prepare.prepare` then enrols every store under
the CA's random pseudonyms and rewrites the node configurations), and starts the bridge's
counting afresh, since contributions counted under the old pseudonyms cannot be told apart
from the same companies' under the new ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ...files import atomic_write
from ...security import pki as pkimod
from .topology import TOPOLOGY

__all__ = ["RETIRED_SECRET", "migrate", "outdated"]

RETIRED_SECRET = "pseudonym_secret"
_SECRETS = "secrets.json"
_BRIDGE_STATE = ("state.sqlite", "state.sqlite-wal", "state.sqlite-shm")


def _secrets(directory: Path) -> dict[str, Any]:
    path = directory / _SECRETS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read network secrets ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a table of network secrets")
    return data


def _plain_cas(directory: Path) -> list[Path]:
    """CA directories of anonymising networks that issue node certificates under names."""
    out: list[Path] = []
    for spec in TOPOLOGY:
        ca_dir = directory / "pki" / spec.network / "ca"
        if spec.anonymise and (ca_dir / pkimod.CA_CERT).is_file() \
                and not pkimod.has_pseudonyms(ca_dir=ca_dir):
            out.append(ca_dir)
    return out


def outdated(directory: Path) -> str | None:
    """Why ``directory`` must be migrated before it runs again (one line), or None."""
    path = directory / _SECRETS
    if any(isinstance(e, dict) and RETIRED_SECRET in e for e in _secrets(directory).values()):
        return (f"{path} holds a pseudonym secret shared with every member (made by an "
                "older pear-mqtt)")
    plain = _plain_cas(directory)
    if plain:
        return f"the CA in {plain[0]} does not assign pseudonyms (made by an older pear-mqtt)"
    for config in sorted((directory / "nodes").glob("*.toml")):
        if RETIRED_SECRET in config.read_text(encoding="utf-8", errors="replace"):
            return f"{config} holds privacy.{RETIRED_SECRET} (made by an older pear-mqtt)"
    return None


def migrate(directory: Path) -> list[str]:
    """Migrate ``directory`` (nothing when it is current); one line per step taken.

    Run with nothing of the topology running: it revokes certificates and moves the
    bridge's state aside.
    """
    if outdated(directory) is None:
        return []
    done: list[str] = []
    data = _secrets(directory)
    if any(isinstance(e, dict) and RETIRED_SECRET in e for e in data.values()):
        for entry in data.values():
            if isinstance(entry, dict):
                entry.pop(RETIRED_SECRET, None)
        atomic_write(directory / _SECRETS, json.dumps(data, indent=2) + "\n", mode=0o600)
        done.append(f"migrated: dropped the shared pseudonym secret from {directory / _SECRETS}")
    for ca_dir in _plain_cas(directory):
        pkimod.rotate_pseudonyms(ca_dir=ca_dir)
        # The revoked certificates' files: every store is enrolled again under new names.
        for path in (ca_dir.parent / "nodes").glob("node-*"):
            path.unlink()
        done.append(f"migrated: the CA in {ca_dir} now enrols stores under random "
                    "pseudonyms; the node certificates issued before are revoked")
    bridge = directory / "bridge"
    if (bridge / _BRIDGE_STATE[0]).exists():
        for name in _BRIDGE_STATE:
            if (bridge / name).exists():
                (bridge / name).replace(bridge / f"{name}.before-pseudonyms")
        done.append(f"migrated: the bridge counts afresh (its earlier state is kept as "
                    f"{bridge / _BRIDGE_STATE[0]}.before-pseudonyms)")
    done.append("migrated: node configurations are rewritten without the secret, with each "
                "store's new node_id")
    return done
