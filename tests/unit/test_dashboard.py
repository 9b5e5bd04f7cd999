"""``pear-mqtt dashboard``'s JSON endpoints over a fake up.json: health as ``up status``
judges it, counters from status files and a Prometheus endpoint, certificate expiry of the
test PKI's real certificates, and the market series. The page itself is tested in a real
browser in tests/integration/test_dashboard_browser.py."""

from __future__ import annotations

import datetime as dt
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from brokers import NetworkPKI, build_pki
from prometheus_client import CollectorRegistry, Counter, generate_latest

from pear_mqtt.dashboard.market import market_series
from pear_mqtt.dashboard.server import DashboardServer
from pear_mqtt.dashboard.topology import TopologyFile
from pear_mqtt.market import MarketStore
from pear_mqtt.model.aggregates import (
    AggregateBody,
    BucketCount,
    PriceHistogram,
    PublishedCell,
    PublishedGroupBody,
    PublishedStatistic,
)
from pear_mqtt.node.records import ReceivedAggregate
from pear_mqtt.ops.up.state import (
    STATE_FILE,
    STATE_VERSION,
    AgentEntry,
    BrokerEntry,
    NodeEntry,
    Proc,
    UpState,
    save_state,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> NetworkPKI:
    return build_pki(tmp_path_factory.mktemp("dashboard-pki"))


def _proc(log: Path) -> Proc:
    return Proc(pid=None, start_time=None, argv=[], log=str(log))


def _state(root: Path, pki: NetworkPKI) -> UpState:
    brokers = [BrokerEntry(name=mode, mode=mode, network=pki.network, host="127.0.0.1",
                           port=1, url="mqtts://127.0.0.1:1", ca_dir=str(pki.ca_dir),
                           ca=str(pki.ca), crl=str(pki.crl), cert=str(pki.broker.cert),
                           key=str(pki.broker.key), conf=None, probe_node="acme",
                           proc=_proc(root / f"{mode}.log"))
               for mode in ("private", "consortium", "public")]
    nodes = [NodeEntry(name=name, mode="consortium", network=pki.network, company="acme",
                       member="acme", node=name, broker="consortium",
                       url="mqtts://127.0.0.1:1", ca=str(certs.ca), cert=str(certs.cert),
                       key=str(certs.key), config=None)
             for name, certs in (("acme", pki.nodes["acme"]), ("expired", pki.expired))]
    agent = AgentEntry(name="acme", node="acme", config="", proc=_proc(root / "a.log"),
                       status_file=str(root / "agent.status.json"))
    bridge = AgentEntry(name="public", node="bridge", config="", proc=_proc(root / "b.log"),
                        status_file=str(root / "bridge.status.json"))
    return UpState(version=STATE_VERSION, state="up", backend="local", dir=str(root),
                   brokers=brokers, nodes=nodes, agents=[agent], bridges=[bridge],
                   bridge={"identities": {pki.network: {"cert": str(pki.bridge.cert)}}})


class _Metrics(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture
def metrics_url() -> Iterator[str]:
    registry = CollectorRegistry()
    Counter("pear_messages_in", "messages in", ["kind"], registry=registry) \
        .labels(kind="insights").inc(41)
    handler = type("Handler", (_Metrics,), {"body": generate_latest(registry)})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/metrics"
    httpd.shutdown()
    httpd.server_close()


def _body(day: int, *, lo: float, hi: float) -> AggregateBody:
    start = dt.datetime(2026, 11, day, tzinfo=dt.UTC)
    return AggregateBody(
        network="market", category="grocery/dairy", window_start=start,
        window_end=start + dt.timedelta(days=1), policy_version="v1", min_companies=5,
        dominance_cap=0.25,
        cells=[PublishedCell(
            region="global",
            groups=[PublishedGroupBody(group="sales_data", fields={
                "units": PublishedStatistic(count=6, companies=6, mean=10.0 + day)})],
            histograms=[PriceHistogram(
                field="price", currency="EUR", companies=6,
                buckets=[BucketCount(lo=lo, hi=hi, companies=4),
                         BucketCount(lo=hi, hi=hi * 2, companies=2)],
                median=BucketCount(lo=lo, hi=hi, companies=4))])])


class _Market:
    """The page's market source over a real market store holding two aggregate windows, as
    the dashboard's public reader keeps them."""

    def snapshot(self) -> dict[str, Any]:
        with MarketStore.temporary(network="market", mode="public") as store:
            store.add([ReceivedAggregate(topic="t", aggregate=body, retained=False,
                                         received_at=0.0)
                       for body in (_body(3, lo=2.0, hi=3.0), _body(1, lo=1.0, hi=2.0))])
            return {"source": "test",
                    "categories": market_series(store.aggregates(), store.histograms())}


@pytest.fixture
def served(tmp_path: Path, pki: NetworkPKI, metrics_url: str) -> Iterator[str]:
    save_state(tmp_path, _state(tmp_path, pki))
    raw = json.loads((tmp_path / STATE_FILE).read_text())
    # An archive as up.json lists components with a status file and a metrics endpoint.
    raw["archives"] = [{"name": "archive", "status_file": str(tmp_path / "archive.json"),
                        "metrics_url": metrics_url}]
    (tmp_path / STATE_FILE).write_text(json.dumps(raw))
    (tmp_path / "agent.status.json").write_text(json.dumps(
        {"health": "ok", "connected": True, "messages_out": 7,
         "dropped": {"forged": 2}, "last_error": None}))
    (tmp_path / "bridge.status.json").write_text("{not json")
    server = DashboardServer(TopologyFile(tmp_path / STATE_FILE), _Market())
    server.start()
    yield server.url
    server.shutdown()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Cache-Control"] == "no-store"
        return json.loads(response.read())


def test_health_reports_each_component_as_up_status_does(served: str) -> None:
    health = _get(served + "api/health")
    assert health["state"] == "up" and health["backend"] == "local"
    # nothing recorded runs: every component fails, none is called healthy
    assert health["brokers"] == 3 and health["brokers_healthy"] == 0
    assert not health["healthy"]
    kinds = [(c["kind"], c["name"], c["ok"]) for c in health["components"]]
    assert ("broker", "public", False) in kinds and ("bridge", "public", False) in kinds
    assert all(c["detail"] == "process not running" for c in health["components"])


def test_counters_come_from_status_files_and_metrics_endpoints(served: str,
                                                               metrics_url: str) -> None:
    data = _get(served + "api/counters")
    by_name = {(c["kind"], c["name"]): c["status"] for c in data["components"]}
    agent = by_name[("agent", "acme")]
    assert agent["health"] == "ok" and agent["values"] == {"messages_out": 7,
                                                           "dropped.forged": 2}
    assert "unreadable" in by_name[("bridge", "public")]["error"]
    assert by_name[("archive", "archive")]["error"] == "no status file yet"
    metrics = data["metrics"]["archive archive"]
    assert metrics["url"] == metrics_url
    assert {"name": "pear_messages_in_total", "labels": {"kind": "insights"},
            "value": 41.0} in metrics["samples"]


def test_certificate_expiry_in_days_soonest_first(served: str, pki: NetworkPKI) -> None:
    certs = _get(served + "api/certs")["certificates"]
    first = certs[0]
    assert first["name"] == "node expired" and first["status"] == "expired"
    assert -2 < first["days_left"] < 0
    by_path = {c["path"]: c for c in certs}
    assert len(by_path) == len(certs)  # a certificate named twice is listed once
    assert by_path[str(pki.ca)]["ok"] and by_path[str(pki.ca)]["days_left"] > 300
    assert by_path[str(pki.bridge.cert)]["subject"] == pki.bridge_user
    assert [c["days_left"] for c in certs] == sorted(c["days_left"] for c in certs)


def test_market_series_per_category_and_window_in_time_order(served: str) -> None:
    (category,) = _get(served + "api/market")["categories"]
    assert category["category"] == "grocery/dairy"
    (region,) = category["regions"]
    points = region["points"]
    assert [p["window_start"][:10] for p in points] == ["2026-11-01", "2026-11-03"]
    band = points[1]["band"]
    # middle half of six companies: four in [2, 3), two in [3, 6)
    assert (band["lo"], band["hi"], band["median"], band["companies"]) == (2.0, 6.0, 2.5, 6)
    assert points[0]["stats"]["sales_data.units"]["mean"] == 11.0


def test_page_and_vendored_scripts_are_served_and_nothing_else(served: str) -> None:
    with urllib.request.urlopen(served, timeout=10) as response:
        page = response.read().decode()
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assert '<script src="/static/charts.js">' in page and "http" not in page.split(
        "<body>")[1].replace("http://www.w3.org", "")
    with urllib.request.urlopen(served + "static/charts.js", timeout=10) as response:
        assert b"PearCharts" in response.read()
    for path, method in (("static/../server.py", "GET"), ("api/health", "POST")):
        request = urllib.request.Request(served + path, method=method, data=b"" if
                                         method == "POST" else None)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code in (404, 405)


def test_a_rewritten_up_json_is_read_again(served: str, tmp_path: Path) -> None:
    assert _get(served + "api/health")["state"] == "up"
    raw = json.loads((tmp_path / STATE_FILE).read_text())
    raw["state"] = "stopped"
    (tmp_path / STATE_FILE).write_text(json.dumps(raw))
    health = _get(served + "api/health")
    assert health["state"] == "stopped" and health["components"] == []
    assert not health["healthy"]


def test_cli_without_up_json_says_what_to_run(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from pear_mqtt.cli.main import main

    assert main(["dashboard", "--up-file", str(tmp_path / "up.json")]) == 2
    err = capsys.readouterr().err
    assert "up.json: no such file; run `make up`" in err and err.count("\n") == 1
