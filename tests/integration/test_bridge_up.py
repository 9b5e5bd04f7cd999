"""The bridge in ``make up``'s topology: it starts with the brokers and agents, reports
healthy, and publishes aggregates of the simulated consortium to the public broker (with
price histograms) and to the consortium's own members."""

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

from pear_mqtt.model.aggregates import AggregateBody, ReceiptBody
from pear_mqtt.security.pki import CertPaths

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
        # the consortium's own aggregates reach its members (encrypted under the group key)
        cbroker = next(b for b in state["brokers"] if b["name"] == "consortium")
        cnode = next(n for n in state["nodes"] if n["network"] == "retail-eu")
        member = MqttProbe(host="localhost", port=cbroker["port"],
                           certs=CertPaths(cert=Path(cnode["cert"]), key=Path(cnode["key"]),
                                           ca=Path(cnode["ca"])))
        try:
            assert not member.connect().is_failure
            member.subscribe("pear/v1/consortium/retail-eu/aggregates/#")
            cagg, _ = member.expect(lambda m: "/aggregates/" in m.topic, timeout=30)
        finally:
            member.close()
        head = json.loads(cagg.payload)
        assert head["kind"] == "aggregate" and "enc" in head
        body = AggregateBody.model_validate(json.loads(agg.payload)["body"])
        receipt = ReceiptBody.model_validate(json.loads(rec.payload)["body"])
        assert body.network == "market" and body.min_companies == 5
        assert all(f.companies >= 5 for c in body.cells for g in c.groups
                   for f in g.fields.values())
        # prices are ranges_only in the consortium, and still the public gets a price signal
        assert all(h.companies >= 5 for c in body.cells for h in c.histograms or ())
        assert any(c.histograms for c in body.cells), body
        assert receipt.cells and all(c.contributors >= 5 for c in receipt.cells)
        # publication lag of one day in the demo: nothing of today or yesterday
        assert body.window_end.timestamp() <= time.time() - 86400
        bridge_status = json.loads(Path(bridge["status_file"]).read_text())
        assert bridge_status["health"] == "ok" and bridge_status["items_counted"] > 0
    finally:
        stopped = _up(tmp_path, "stop", "--grace", "5")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "stopped bridge public" in stopped.stdout
