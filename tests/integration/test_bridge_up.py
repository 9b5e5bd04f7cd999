"""The bridge in ``make up``'s topology: it starts with the brokers and agents, reports
healthy, and publishes aggregates of the simulated consortium to the public broker and, for
the consortium's members, to the consortium broker, price histograms included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from brokers import MqttProbe, free_port

from pear_mqtt.config.models import EncryptionConfig
from pear_mqtt.model.aggregates import AggregateBody, ReceiptBody
from pear_mqtt.security.envelope import EnvelopeCodec
from pear_mqtt.security.pki import CertPaths
from pear_mqtt.security.signing import Signer
from pear_mqtt.security.trust import TrustStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _up(root: Path, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PEAR_UP_PORTS", "PEAR_BACKEND")}
    env["PEAR_BACKEND"] = "local"
    return subprocess.run([sys.executable, "-m", "pear_mqtt.cli", "up", *args, "--dir",
                           str(root / "state")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_make_up_runs_the_bridge_and_it_publishes_aggregates(tmp_path: Path) -> None:
    ports = ",".join(str(free_port()) for _ in range(3))
    # 50 insights/s per store: a simulated day every 2.4 s, the week of history in ~20 s.
    started = _up(tmp_path, "start", "--ports", ports, "--rate", "50")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "bridge: retail-eu -> market" in started.stdout and ", pid " in started.stdout
        state: dict[str, Any] = json.loads((tmp_path / "state" / "up.json").read_text())
        (bridge,) = state["bridges"]
        assert bridge["proc"]["pid"] is not None
        status = _up(tmp_path, "status")
        assert status.returncode == 0, status.stdout
        assert any(line.startswith("bridge public") and "healthy" in line
                   for line in status.stdout.splitlines()), status.stdout

        broker = next(b for b in state["brokers"] if b["name"] == "public")
        node = next(n for n in state["nodes"] if n["network"] == "market")
        reader = MqttProbe(host="localhost", port=broker["port"],
                           certs=CertPaths(cert=Path(node["cert"]), key=Path(node["key"]),
                                           ca=Path(node["ca"])))
        try:
            assert not reader.connect().is_failure
            reader.subscribe("pear/v1/public/market/#")
            # the first simulated day settles (20 s without input) before it is published
            agg, _ = reader.expect(lambda m: "/aggregates/" in m.topic, timeout=90)
            rec, _ = reader.expect(lambda m: "/state/bridge/receipts/" in m.topic, timeout=30)
        finally:
            reader.close()
        body = AggregateBody.model_validate(json.loads(agg.payload)["body"])
        receipt = ReceiptBody.model_validate(json.loads(rec.payload)["body"])
        assert body.network == "market" and body.min_companies == 5
        assert all(f.companies >= 5 for c in body.cells for g in c.groups
                   for f in g.fields.values())
        assert receipt.cells and all(c.contributors >= 5 for c in receipt.cells)
        # publication lag of one day in the demo: nothing of today or yesterday
        assert body.window_end.timestamp() <= time.time() - 86400
        # Under the default policy prices are ranges_only: the signal is the histogram.
        assert any(g.histograms for c in body.cells for g in c.groups), body

        # The members get theirs on the consortium broker, encrypted under their group key.
        members = _consortium_aggregate(tmp_path / "state", state)
        assert members.network == "retail-eu" and members.min_companies == 5
        assert any(g.histograms for c in members.cells for g in c.groups), members
        assert all(h.companies >= 5 for c in members.cells for g in c.groups
                   for h in (g.histograms or {}).values())
        assert members.window_end.timestamp() <= time.time() - 3600
        bridge_status = json.loads(Path(bridge["status_file"]).read_text())
        assert bridge_status["health"] == "ok" and bridge_status["items_counted"] > 0
        assert bridge_status["consortium_connected"] is True
    finally:
        stopped = _up(tmp_path, "stop", "--grace", "5")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "stopped bridge public" in stopped.stdout


def _consortium_aggregate(directory: Path, state: dict[str, Any]) -> AggregateBody:
    """The first retained aggregate a consortium member reads, decrypted and verified with
    what its own configuration holds (its certificate, the CA, the group key)."""
    broker = next(b for b in state["brokers"] if b["name"] == "consortium")
    node = next(n for n in state["nodes"] if n["network"] == "retail-eu")
    certs = CertPaths(cert=Path(node["cert"]), key=Path(node["key"]), ca=Path(node["ca"]))
    member = MqttProbe(host="localhost", port=broker["port"], certs=certs)
    try:
        assert not member.connect().is_failure
        member.subscribe("pear/v1/consortium/retail-eu/aggregates/#")
        agg, _ = member.expect(lambda m: "/aggregates/" in m.topic, timeout=90)
    finally:
        member.close()
    key = json.loads((directory / "secrets.json").read_text())["retail-eu"]["group_key"]
    codec = EnvelopeCodec(signer=Signer.from_files(key_file=certs.key, cert_file=certs.cert),
                          trust=TrustStore.from_files(ca_files=[certs.ca], network="retail-eu"),
                          encryption=EncryptionConfig(keys={"k1": key}))
    assert b'"enc"' in agg.payload
    decoded = codec.decode(agg.payload, check_replay=False, max_age=float("inf"))
    assert decoded.signer.node == "bridge" and decoded.message.kind == "aggregate"
    return AggregateBody.model_validate(decoded.message.body)
