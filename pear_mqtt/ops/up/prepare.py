"""Everything ``start`` writes before a process runs: PKI, secrets, node and bridge configs.

In the anonymising networks every store is enrolled under the random pseudonyms its
network's CA assigns (company -> CN, store -> OU); the names stay in the CA's registry, and no
node configuration holds anything that maps them.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509

from ...agent.simulate import DEFAULT_RATE, seconds_per_day
from ...config.manager import NetworkConfigManager
from ...errors import ConfigError
from ...files import atomic_write
from ...security import pki as pkimod
from .backend import Backend
from .state import BrokerEntry, NodeEntry, Proc
from .topology import BRIDGE_LINE, BRIDGE_USER, HOST, MONITOR_USER, TOPOLOGY, NetworkSpec

__all__ = ["Plan", "first_aggregates_in", "prepare"]

_BROKER_HOSTS = ("localhost", "127.0.0.1", "::1")
_RENEW_BEFORE = dt.timedelta(days=30)  # re-issue certificates / re-sign CRLs this close to expiry
# The simulated stores report the last week, so the demo bridge publishes daily windows one
# day after they end; a real deployment keeps pear_mqtt.bridge's 90-day default lag.
_BRIDGE_WINDOW: Final = 86400
_BRIDGE_LAG: Final = 86400
# The consortium's own aggregates come first: a window reaches the members once it
# ended an hour ago (the simulated stores report the last week, so most appear right away).
_BRIDGE_CONSORTIUM_LAG: Final = 3600
_BRIDGE_SETTLE: Final = 20.0


def first_aggregates_in(rate: float | None) -> float | None:
    """Seconds from the agents' start to the bridge's first public window: the simulated
    stores report their history a day at a time, and the bridge publishes a day's window
    once its inputs have been quiet for the settle time (None: agents do not pace)."""
    day = seconds_per_day(rate=DEFAULT_RATE if rate is None else rate)
    return None if day is None else day + _BRIDGE_SETTLE


@dataclass(slots=True)
class Plan:
    """Everything ``start`` prepared before launching a process."""

    brokers: list[BrokerEntry]
    nodes: list[NodeEntry]
    agent_nodes: list[NodeEntry]  # the nodes a simulated agent runs for
    bridge: dict[str, Any]


def _cert_current(path: Path) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    return cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + _RENEW_BEFORE


def _ensure_cert(*, ca_dir: Path, out_dir: Path, role: pkimod.Role, member: str,
                 node: str | None = None) -> pkimod.CertPaths:
    """The certificate of (role, member, node): reused while valid, issued otherwise."""
    stem = f"{role}-{member}" if role != "node" else f"node-{member}-{node}"
    paths = pkimod.CertPaths(cert=out_dir / f"{stem}.crt", key=out_dir / f"{stem}.key",
                             ca=out_dir / pkimod.CA_CERT)
    if paths.key.is_file() and paths.ca.is_file() and _cert_current(paths.cert):
        return paths
    return pkimod.issue(ca_dir=ca_dir, out_dir=out_dir, role=role, member=member, node=node,
                        hosts=_BROKER_HOSTS, force=True)


def _ensure_node(*, ca_dir: Path, out_dir: Path, company: str, store: str,
                 enrolled: dict[tuple[str, str], pkimod.Enrolment] | None
                 ) -> tuple[pkimod.CertPaths, str, str]:
    """The node certificate of ``store`` of ``company`` and the (member, node) it names:
    under the CA's pseudonyms when ``enrolled`` holds the network's enrolments (updated
    here), else under the names. Reused while valid, issued otherwise."""
    if enrolled is None:
        certs = _ensure_cert(ca_dir=ca_dir, out_dir=out_dir, role="node", member=company,
                             node=store)
        return certs, company, store
    known = enrolled.get((company, store))
    if known is not None:
        stem = f"node-{known.member}-{known.node}"
        certs = pkimod.CertPaths(cert=out_dir / f"{stem}.crt", key=out_dir / f"{stem}.key",
                                 ca=out_dir / pkimod.CA_CERT)
        if certs.key.is_file() and certs.ca.is_file() and _cert_current(certs.cert):
            return certs, known.member, known.node
    certs, known = pkimod.enrol(ca_dir=ca_dir, out_dir=out_dir, company=company, store=store,
                                force=True)
    enrolled[(company, store)] = known
    return certs, known.member, known.node


def _ensure_ca(ca_dir: Path, network: str, *, pseudonyms: bool) -> None:
    if not (ca_dir / pkimod.CA_CERT).is_file():
        pkimod.create_ca(directory=ca_dir, network=network, pseudonyms=pseudonyms)
        return
    try:
        crl = x509.load_pem_x509_crl((ca_dir / pkimod.CA_CRL).read_bytes())
        fresh = crl.next_update_utc is not None and \
            crl.next_update_utc > dt.datetime.now(dt.UTC) + _RENEW_BEFORE
    except (OSError, ValueError):
        fresh = False
    if not fresh:
        # Past nextUpdate OpenSSL refuses every client, so a topology left alone for a year
        # would come up locked.
        pkimod.refresh_crl(ca_dir=ca_dir)


def _network_secrets(directory: Path) -> dict[str, dict[str, str]]:
    """The group key per network, made once and kept (0600)."""
    path = directory / "secrets.json"
    try:
        data: dict[str, dict[str, str]] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        data = {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read network secrets ({exc})") from None
    changed = False
    for spec in TOPOLOGY:
        entry = data.setdefault(spec.network, {})
        if "group_key" not in entry:
            entry["group_key"] = base64.b64encode(secrets.token_bytes(32)).decode()
            changed = True
    if changed:
        atomic_write(path, json.dumps(data, indent=2) + "\n", mode=0o600)
    return data


def _aggregator_key(directory: Path) -> Path:
    """The X25519 public key nodes seal ``aggregated`` groups to (the bridge holds the
    private half)."""
    from ...security.seal import (
        generate_x25519_key,
        save_x25519_private_key,
        save_x25519_public_key,
    )

    pub = directory / "aggregator.pub.pem"
    priv = directory / "aggregator.key"
    if pub.is_file() and priv.is_file():
        return pub
    directory.mkdir(parents=True, exist_ok=True)
    key = generate_x25519_key()
    save_x25519_private_key(key, priv, overwrite=True)
    save_x25519_public_key(key.public_key(), pub, overwrite=True)
    return pub


def prepare(directory: Path, ports: Sequence[int], backend: Backend) -> Plan:
    """Create or reuse the PKI, write the brokers' and nodes' configurations.

    Node configurations are written even when no agent will run: they are what a developer
    points their own code (or a later ``pear-mqtt agent``) at.
    """
    pki_root = directory / "pki"
    net_secrets = _network_secrets(directory)
    brokers: list[BrokerEntry] = []
    nodes: list[NodeEntry] = []
    agent_nodes: list[NodeEntry] = []
    bridge: dict[str, Any] = {"status": BRIDGE_LINE.split(": ", 1)[1], "user": BRIDGE_USER,
                              "identities": {}}
    for spec, port in zip(TOPOLOGY, ports, strict=True):
        root = pki_root / spec.network
        ca_dir = root / "ca"
        _ensure_ca(ca_dir, spec.network, pseudonyms=spec.anonymise)
        crl = ca_dir / pkimod.CA_CRL
        url = backend.broker_url(spec=spec, port=port, index=0)
        broker_certs = _ensure_cert(ca_dir=ca_dir, out_dir=root / "broker", role="broker",
                                    member=f"{spec.network}-broker")
        monitor = _ensure_cert(ca_dir=ca_dir, out_dir=root / "monitor", role="monitor",
                               member=MONITOR_USER)
        sec = net_secrets[spec.network]
        enrolled = ({(e.company, e.store): e for e in pkimod.list_pseudonyms(ca_dir=ca_dir)}
                    if spec.anonymise else None)
        aggregator = _aggregator_key(root / "aggregator") if spec.anonymise else None
        if spec.bridge:
            b = _ensure_cert(ca_dir=ca_dir, out_dir=root / "bridge", role="bridge",
                             member=BRIDGE_USER)
            bridge["identities"][spec.network] = {
                "broker": spec.mode, "url": url, "ca": str(b.ca), "cert": str(b.cert),
                "key": str(b.key), "crl": str(crl),
                "aggregator_key": str(root / "aggregator" / "aggregator.key")
                if aggregator else None}
        archive: str | None = None
        members = [(c, s, "store") for c in spec.companies for s in spec.stores]
        if spec.archive is not None:
            members.insert(0, (spec.archive, "archive", "archive"))
        for index, (company, store, role) in enumerate(members):
            # The archive first: the stores' configs name it.
            url = backend.broker_url(spec=spec, port=port, index=index)
            certs, member, node = _ensure_node(ca_dir=ca_dir, out_dir=root / "nodes",
                                               company=company, store=store,
                                               enrolled=enrolled)
            if role == "archive":
                archive = f"{member}/{node}"
            name = f"{spec.mode}-{company}-{store}"
            # Every node gets a config, agent or not: a public participant's is what
            # `pear-mqtt market … --sync` or one's own code connects with.
            config_path = directory / "nodes" / f"{name}.toml"
            _write_node_config(
                path=config_path, spec=spec, company=company, node=node, url=url,
                certs=certs, crl=crl, outbox=directory / "outbox" / f"{name}.db",
                secret=sec, aggregator=aggregator,
                archive=None if role == "archive" else archive,
                archive_path=(directory / "archive" / spec.network
                              if role == "archive" else None))
            entry = NodeEntry(name=name, mode=spec.mode, network=spec.network,
                              company=company, member=member, node=node,
                              broker=spec.mode, url=url, ca=str(certs.ca),
                              cert=str(certs.cert), key=str(certs.key),
                              config=str(config_path), role=role)
            nodes.append(entry)
            if spec.agents:
                agent_nodes.append(entry)
        url = backend.broker_url(spec=spec, port=port, index=0)
        probe = next(n for n in nodes if n.network == spec.network)
        conf, log = backend.broker_config(directory=directory, spec=spec, port=port,
                                          ca_dir=ca_dir, certs=broker_certs, probe=probe)
        brokers.append(BrokerEntry(
            name=spec.mode, mode=spec.mode, network=spec.network, host=HOST, port=port,
            url=url, ca_dir=str(ca_dir), ca=str(ca_dir / pkimod.CA_CERT),
            crl=str(ca_dir / pkimod.CA_CRL), cert=str(broker_certs.cert),
            key=str(broker_certs.key), conf=str(conf) if conf else None,
            probe_node=probe.name, proc=Proc(pid=None, start_time=None, argv=[], log=log),
            monitor_cert=str(monitor.cert) if backend.serves_sys else None,
            monitor_key=str(monitor.key) if backend.serves_sys else None))
    bridge["config"] = str(_write_bridge_config(directory, bridge, net_secrets))
    return Plan(brokers=brokers, nodes=nodes, agent_nodes=agent_nodes, bridge=bridge)


def _write_bridge_config(directory: Path, bridge: dict[str, Any],
                         net_secrets: dict[str, dict[str, str]]) -> Path:
    """``bridge/bridge.toml``: the consortium's insights in, the public network's aggregates
    out and the consortium's own aggregates back to its members, with the identities
    :func:`prepare` issued."""
    # Imported here: only `start` writes it, and `status` / `stop` stay quick to load.
    from ...bridge.config import BridgeConfig, BridgeConfigManager

    ids = bridge["identities"]
    consortium = next(s for s in TOPOLOGY if s.mode == "consortium" and s.bridge)
    public = next(s for s in TOPOLOGY if s.mode == "public" and s.bridge)
    c, p = ids[consortium.network], ids[public.network]
    config = BridgeConfig.model_validate({
        "consortium": {"network_id": consortium.network, "broker_url": c["url"],
                       "tls": {"ca_file": c["ca"], "cert_file": c["cert"], "key_file": c["key"],
                               "crl_file": c["crl"]},
                       "aggregator_key_file": c["aggregator_key"],
                       # active: the consortium's own aggregates go out under it
                       "encryption": {"keys": {
                           "k1": net_secrets[consortium.network]["group_key"]},
                                      "active": "k1"}},
        "public": {"network_id": public.network, "broker_url": p["url"],
                   "tls": {"ca_file": p["ca"], "cert_file": p["cert"], "key_file": p["key"],
                           "crl_file": p["crl"]},
                   "aggregator_key_file": p["aggregator_key"]},
        "window_seconds": _BRIDGE_WINDOW, "publication_lag_seconds": _BRIDGE_LAG,
        "consortium_output": True, "consortium_lag_seconds": _BRIDGE_CONSORTIUM_LAG,
        "settle_seconds": _BRIDGE_SETTLE,
        "state_path": str(directory / "bridge" / "state.sqlite")})
    path = directory / "bridge" / "bridge.toml"
    BridgeConfigManager.save(config, path, include_secrets=True)  # holds the group key: 0600
    return path


def _write_node_config(*, path: Path, spec: NetworkSpec, company: str, node: str, url: str,
                       certs: pkimod.CertPaths, crl: Path, outbox: Path,
                       secret: dict[str, str], aggregator: Path | None,
                       archive: str | None = None, archive_path: Path | None = None) -> None:
    """``node`` is the node its certificate names (the store's pseudonym where the network
    anonymises); ``company_id`` stays the company's own id, which only this file holds."""
    overrides: dict[str, Any] = {
        "network_id": spec.network, "node_id": node, "broker_url": url,
        "tls": {"ca_file": certs.ca.resolve(), "cert_file": certs.cert.resolve(),
                "key_file": certs.key.resolve(), "crl_file": crl.resolve()},
        "reliability": {"outbox_path": outbox.resolve(), "archive": archive,
                        "archive_path": archive_path.resolve() if archive_path else None},
    }
    if spec.anonymise:
        overrides["privacy"] = {"aggregator_key_file": aggregator.resolve() if aggregator
                                else None}
        overrides["encryption"] = {"keys": {"k1": secret["group_key"]}, "active": "k1"}
    config = NetworkConfigManager.default_config(spec.mode, company_id=company, **overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    outbox.parent.mkdir(parents=True, exist_ok=True)
    # The group key belongs in the file: the agent runs from it alone.
    NetworkConfigManager.save(config, path, include_secrets=True)
