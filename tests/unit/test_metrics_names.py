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
from pear_mqtt.ops.brokerconf import acl_text
from pear_mqtt.ops.brokersys import metric_name
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
                                               outbox_oldest=datetime.now(UTC),
                                               log_refused={"forged_entry": 4}),
                         cert_file=None if tmp is None else _cert(tmp / "node.crt"))
    bridge = BridgeCollector(lambda: BridgeStatus(
        health=Health.OK, connected=True, public_connected=True, sources={},
        policy_version="p", suppressed={"k": 1}, epsilon_spent={"2026-12": 0.5},
        log_id="ab" * 16, log_length=7, log_requests_answered=3))
    return {s.name: s.value for c in (node, bridge) for f in c.collect() for s in f.samples}


def test_names_follow_prometheus_conventions() -> None:
    samples = _samples()
    assert samples["pear_dropped_total"] == 2 and samples["pear_latency_seconds"] == 0.003
    assert samples["pear_log_refused_total"] == 4
    assert samples["pear_bridge_log_length"] == 7
    assert samples["pear_bridge_log_requests_answered_total"] == 3
    assert "pear_bridge_consortium_log_length" not in samples  # consortium_output is off
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


def test_broker_sys_topics_become_prometheus_names() -> None:
    assert metric_name("$SYS/broker/clients/connected") == "pear_broker_clients_connected"
    assert metric_name("$SYS/broker/load/messages/received/1min") == \
        "pear_broker_load_messages_received_1min"
    assert metric_name("$SYS/broker/uptime") == "pear_broker_uptime_seconds"
    assert metric_name("$SYS/broker/") is None and metric_name("pear/v1/x") is None
    assert all(re.fullmatch(r"pear_[a-z0-9_]+", metric_name(t) or "") for t in (
        "$SYS/broker/heap/current size", "$SYS/broker/publish/bytes/sent"))


def test_only_a_monitor_identity_may_read_the_brokers_sys_figures() -> None:
    acl = acl_text(modes=["consortium"], network="retail-eu", bridge_users=["bridge"],
                   monitor_users=["monitor"])
    section = acl.split("user monitor\n", 1)[1].split("\n\n", 1)[0]
    assert section.strip() == "topic read $SYS/broker/#"
    assert acl.count("$SYS") == 1  # no pattern rule: members and the bridge do not get it


def test_the_outbox_age_is_how_long_its_oldest_message_has_waited() -> None:
    waiting = NetworkStatus(connected=False, outbox_depth=3,
                            outbox_oldest=datetime.now(UTC) - timedelta(seconds=90))
    samples = {s.name: s.value for f in NodeCollector(lambda: waiting).collect()
               for s in f.samples}
    assert 89 <= samples["pear_outbox_oldest_age_seconds"] < 120
    empty = {s.name for f in NodeCollector(lambda: NetworkStatus(connected=True)).collect()
             for s in f.samples}
    assert "pear_outbox_oldest_age_seconds" not in empty  # nothing waits: no age
