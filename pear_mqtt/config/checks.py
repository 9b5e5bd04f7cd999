"""What the NetworkConfig model cannot check alone (group keys, bucket edges, delays and, before
connecting, the TLS and key files), and what is legal but probably not meant (warnings).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import re
from pathlib import Path

from ..model.insight import FIELD_GROUPS, NetworkMode, SharingLevel
from ..security.identity import Identity
from ..security.tlscheck import tls_problems
from .models import NetworkConfig

__all__ = ["GROUP_KEY_BYTES", "config_problems", "config_warnings", "decode_key",
           "effective_sharing", "identity_mismatch"]

GROUP_KEY_BYTES = 32  # AES-256
# Same floor as PrivacyConfig.range_ratio: narrower buckets would all but give away the value.
_MIN_EDGE_RATIO = 1.01
_TLS_FILES = ("ca_file", "cert_file", "key_file")

_STD_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_URL_B64 = re.compile(r"[A-Za-z0-9_-]*={0,2}")


def decode_key(value: str) -> bytes | None:
    """Standard or url-safe base64, padding optional; None if it is neither."""
    text = value.strip().rstrip("=")
    padded = text + "=" * (-len(text) % 4)
    try:
        if _STD_B64.fullmatch(text):
            return base64.b64decode(padded)
        if _URL_B64.fullmatch(text):
            return base64.urlsafe_b64decode(padded)
    except (binascii.Error, ValueError):
        pass
    return None


def _unreadable(path: Path) -> str | None:
    """Why ``path`` cannot serve as key material, or None if it can."""
    try:
        with path.open("rb") as fh:
            if not fh.read(1):
                return "is empty"
    except FileNotFoundError:
        return "does not exist"
    except IsADirectoryError:
        return "is a directory, not a file"
    except PermissionError:
        return "is not readable (permission denied)"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None


def effective_sharing(config: NetworkConfig) -> dict[str, SharingLevel]:
    """The level of every field group: as configured, else the mode's default."""
    return {group: config.sharing_level(group) for group in FIELD_GROUPS}


def config_problems(config: NetworkConfig, *, for_connect: bool = False) -> list[str]:
    """Every problem :meth:`NetworkConfigManager.validate` reports, one sentence each."""
    problems: list[str] = []
    for key_id, secret in config.encryption.keys.items():
        raw = decode_key(secret.get_secret_value())
        if raw is None:
            problems.append(f"encryption.keys.{key_id}: not valid base64 (an AES-256 group "
                            f"key is {GROUP_KEY_BYTES} bytes, base64-encoded)")
        elif len(raw) != GROUP_KEY_BYTES:
            problems.append(f"encryption.keys.{key_id}: decodes to {len(raw)} bytes; an "
                            f"AES-256 group key must be exactly {GROUP_KEY_BYTES}")
    for category, edges in config.privacy.range_edges.items():
        for low, high in itertools.pairwise(edges):
            if low > 0 and high < low * _MIN_EDGE_RATIO:
                problems.append(
                    f"privacy.range_edges.{category}: bucket [{low}, {high}) is narrower "
                    f"than 1% of its lower edge, which would all but disclose exact values")
                break
    rel = config.reliability
    if rel.reconnect_min_delay > rel.reconnect_max_delay:
        problems.append(f"reliability.reconnect_min_delay ({rel.reconnect_min_delay}) must "
                        f"not exceed reliability.reconnect_max_delay "
                        f"({rel.reconnect_max_delay})")
    if for_connect:
        problems.extend(_connect_problems(config))
    return problems


def config_warnings(config: NetworkConfig) -> list[str]:
    """What is allowed but probably not meant, one sentence per finding."""
    out: list[str] = []
    privacy = config.privacy
    if config.mode is NetworkMode.PUBLIC and not privacy.anonymize_data:
        out.append("privacy.anonymize_data is off in a public network: the company "
                   "identity travels with every contribution")
    if config.mode is NetworkMode.CONSORTIUM and config.encryption.active is None:
        out.append("encryption.active is not set: consortium bodies are protected by TLS "
                   "and signatures only, without the group-key encryption layer")
    sharing = effective_sharing(config)
    aggregated = [g for g, level in sharing.items() if level is SharingLevel.AGGREGATED]
    if aggregated and privacy.aggregator_key_file is None:
        out.append(f"privacy.aggregator_key_file is not set: aggregated groups will not "
                   f"leave the node ({', '.join(aggregated)})")
    if privacy.range_edges and SharingLevel.RANGES_ONLY not in sharing.values():
        out.append("privacy.range_edges are set but no field group is 'ranges_only', so "
                   "they are never used")
    rel = config.reliability
    if rel.outbox_max_age > rel.max_message_age:
        out.append(f"reliability.outbox_max_age ({rel.outbox_max_age}s) exceeds "
                   f"reliability.max_message_age ({rel.max_message_age}s): messages held "
                   "that long offline are dropped as stale when finally sent")
    if rel.message_expiry > rel.max_message_age:
        out.append(f"reliability.message_expiry ({rel.message_expiry}s) exceeds "
                   f"reliability.max_message_age ({rel.max_message_age}s): retained state "
                   "older than the age limit is synced only to be dropped as stale")
    if rel.state_topics and config.mode is NetworkMode.PUBLIC:
        out.append("reliability.state_topics is set in a public network, where participants "
                   "keep no state: it has no effect")
    if config.allow_insecure_transport:
        out.append("allow_insecure_transport is set: for local development only, never "
                   "in production")
    return out


def _connect_problems(config: NetworkConfig) -> list[str]:
    """What would stop ``config`` from connecting: TLS material missing or unusable, key
    files unreadable."""
    problems: list[str] = []
    needs_tls = config.broker.tls or config.mode is not NetworkMode.PUBLIC
    if needs_tls:
        missing = config.tls.missing()
        if missing:
            over = " over mqtts://" if config.mode is NetworkMode.PUBLIC else ""
            problems.append(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                            f"required to connect to a {config.mode.value} network{over}")
    files = [(f"tls.{name}", getattr(config.tls, name)) for name in _TLS_FILES]
    files.append(("tls.crl_file", config.tls.crl_file))
    files.append(("privacy.aggregator_key_file", config.privacy.aggregator_key_file))
    readable = True
    for field, path in files:
        if path is None:
            continue
        why = _unreadable(Path(path))
        if why is not None:
            problems.append(f"{field}: {path} {why}")
            readable = readable and not field.startswith("tls.")
    tls = config.tls
    if readable and tls.ca_file and tls.cert_file and tls.key_file:
        # What the broker would refuse only after a handshake (and a node would retry
        # forever): say it now, naming the file.
        problems.extend(tls_problems(ca_file=Path(tls.ca_file),
                                     cert_file=Path(tls.cert_file),
                                     key_file=Path(tls.key_file)))
    return problems


def identity_mismatch(config: NetworkConfig, identity: Identity) -> str | None:
    """Why ``config`` cannot speak for ``identity`` (its certificate's), in one line, or None.

    ``node_id`` must be the certificate's node (OU): peers drop every envelope whose topic
    names another. ``company_id`` must be its member (CN) wherever the company id is
    published: a private network, or ``anonymize_data`` off. An anonymising node publishes
    the certificate's identity, which may be a pseudonym of ``company_id``.
    """
    cert = config.tls.cert_file
    if config.node_id != identity.node:
        return (f"node_id {config.node_id!r} is not the node certificate {cert} names (OU "
                f"{identity.node!r}): set node_id = \"{identity.node}\" in the config")
    publishes_company = (config.mode is NetworkMode.PRIVATE
                         or not config.privacy.anonymize_data)
    if publishes_company and config.company_id != identity.member:
        return (f"company_id {config.company_id!r} is not the member certificate {cert} "
                f"names (CN {identity.member!r}): set company_id = \"{identity.member}\" "
                "in the config")
    return None
