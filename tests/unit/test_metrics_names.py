"""The metric names the collectors expose follow Prometheus conventions, and every one the
shipped Grafana dashboard asks for exists."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pear_mqtt.bridge.status import BridgeStatus
from pear_mqtt.model.insight import Health, NetworkStatus
from pear_mqtt.ops.metrics import BridgeCollector, NodeCollector

ROOT = Path(__file__).resolve().parents[2]


def _cert(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "acme")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + timedelta(days=30)).sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _samples(tmp: Path | None = None) -> dict[str, float]:
    node = NodeCollector(lambda: NetworkStatus(connected=True, health=Health.OK,
                                               dropped={"malformed": 2}, latency_ms=3.0,
                                               log_refused={"forged_entry": 4}),
                         cert_file=None if tmp is None else _cert(tmp / "node.crt"))
    bridge = BridgeCollector(lambda: BridgeStatus(
        health=Health.OK, connected=True, public_connected=True, sources={},
        policy_version="p", suppressed={"k": 1}, epsilon_spent={"2026-12": 0.5}))
    return {s.name: s.value for c in (node, bridge) for f in c.collect() for s in f.samples}


def test_names_follow_prometheus_conventions() -> None:
    samples = _samples()
    assert samples["pear_dropped_total"] == 2 and samples["pear_latency_seconds"] == 0.003
    assert samples["pear_log_refused_total"] == 4
    assert all(re.fullmatch(r"pear_[a-z_]+", n) for n in samples)
    assert {"pear_messages_in_total", "pear_bridge_cells_suppressed_total",
            "pear_bridge_epsilon_spent", "pear_log_repaired_total"} <= samples.keys()


def test_the_grafana_dashboard_asks_only_for_metrics_that_exist(tmp_path: Path) -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "pear_mqtt.json").read_text())
    wanted = {m for p in dashboard["panels"] for t in p["targets"]
              for m in re.findall(r"pear_[a-z_]+", t["expr"])}
    have = _samples(tmp_path)
    assert wanted and wanted <= have.keys(), wanted - have.keys()
    assert 29 * 86400 < have["pear_certificate_expiry_seconds"] <= 30 * 86400
