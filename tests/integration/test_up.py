"""``pear-mqtt up``: the whole topology comes up healthy, admits its nodes, and goes away.

Each test drives the real command line in a subprocess, as ``make up`` does, with its state
directory under ``tmp_path`` and brokers on free loopback ports (never the 1888x defaults,
which a developer's own ``make up`` may hold). A fixture runs ``up stop`` afterwards whatever
happened, so a failing test leaves no broker behind.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from brokers import MqttProbe, new_unique_id
from paho.mqtt.enums import MQTTProtocolVersion
from upkit import Up, scrape_until

from pear_mqtt.config.manager import NetworkConfigManager
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.ops.up.health import listening
from pear_mqtt.security import pki as pkimod
from pear_mqtt.security.pki import CertPaths

pytestmark = pytest.mark.integration


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    runner = Up(tmp_path)
    yield runner
    if (runner.dir / "up.json").exists():
        runner.run("stop", "--grace", "3")


def _node(state: dict[str, Any], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    node = next(n for n in state["nodes"] if n["name"] == name)
    broker = next(b for b in state["brokers"] if b["name"] == node["broker"])
    return node, broker


def _publish_and_receive(state: dict[str, Any], *, protocol: MQTTProtocolVersion) -> None:
    """A consortium member's certificate from up.json connects over mutual TLS, may write
    its own subtree, and reads it back: identity mapping and ACL are live."""
    node, broker = _node(state, "consortium-globex-store-1")
    certs = CertPaths(cert=Path(node["cert"]), key=Path(node["key"]), ca=Path(node["ca"]))
    assert node["member"] != "globex"  # the consortium knows members by pseudonym only
    topic = f"pear/v1/consortium/{node['network']}/{node['member']}/probe/{new_unique_id()}"
    probe = MqttProbe(host=broker["host"], port=broker["port"], certs=certs,
                      protocol=protocol)
    try:
        rc = probe.connect()
        assert not rc.is_failure, rc
        probe.subscribe(topic)
        probe.publish(topic, b"hello from test_up")
        msg, _ = probe.expect(topic)
        assert msg.payload == b"hello from test_up"
    finally:
        probe.close()


def _lifecycle(up: Up, *, backend: str, agents: bool,
               protocol: MQTTProtocolVersion) -> None:
    began = time.monotonic()
    args = () if agents else ("--no-agents",)
    started = up.start(*args, backend=backend)
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"backend: {backend}" in started.stdout
    assert "bridge: retail-eu -> market" in started.stdout
    startup = time.monotonic() - began
    state = up.state()
    assert state["state"] == "up" and state["backend"] == backend
    assert [b["port"] for b in state["brokers"]] == up.ports
    assert all(b["host"] == "127.0.0.1" for b in state["brokers"])
    assert {b["network"] for b in state["brokers"]} == {"acme-private", "retail-eu", "market"}
    consortium = {n["company"] for n in state["nodes"] if n["mode"] == "consortium"}
    assert len(consortium) >= 6  # enough members for k = 5 aggregates
    pids = [b["proc"]["pid"] for b in state["brokers"]] + \
        [a["proc"]["pid"] for a in state["agents"]]
    if agents and "agents: simulated stores" in started.stdout:
        archives = [a["name"] for a in state["agents"] if a["name"].endswith("-archive")]
        assert len(state["agents"]) - len(archives) == 8
        assert archives == ["private-acme-archive", "consortium-operator-archive"]
        # Every process of this machine serves its metrics on loopback.
        assert all(a["metrics_url"].startswith("http://127.0.0.1:")
                   for a in state["agents"] + state["bridges"])
        # The line `start` suggests: a member's view of the live traffic, in plain form.
        assert "try: pear-mqtt watch --node consortium-" in started.stdout
        name = started.stdout.split("try: pear-mqtt watch --node ", 1)[1].split()[0]
        watched = subprocess.run(
            [sys.executable, "-m", "pear_mqtt", "watch", "--node", name, "--up-file",
             str(up.dir / "up.json"), "--json", "--count", "1", "--timeout", "30"],
            capture_output=True, text=True, timeout=60)
        assert watched.returncode == 0, watched.stderr
        (item,) = [json.loads(line) for line in watched.stdout.splitlines()]
        assert item["mode"] == "consortium" and item["kind"] in ("insight", "aggregate")
    else:
        assert state["agents"] == []
    if backend == "local":
        # Each mosquitto's $SYS figures, read by the dashboard with the monitor identity.
        urls = [b["metrics_url"] for b in state["brokers"]]
        assert all(u and u.endswith(f"/metrics/brokers/{b['name']}")
                   for u, b in zip(urls, state["brokers"], strict=True))
        sys_figures = scrape_until(urls[1], "pear_broker_uptime_seconds")
        assert sys_figures['pear_broker_sys_connected{broker="consortium"}'] == 1.0
        assert sys_figures['pear_broker_uptime_seconds{broker="consortium"}'] >= 0
    else:
        assert all(b.get("metrics_url") is None for b in state["brokers"])
    if backend == "cluster":
        # Each network's broker is two nodes; the clients list both, half of them node 2
        # first, so they spread over the cluster and fail over to the other node.
        assert all(len(b["url"].split(",")) == 2 for b in state["brokers"])
        orders = {n["url"] for n in state["nodes"] if n["mode"] == "consortium"}
        assert len(orders) == 2
        first, second = orders
        assert first.split(",") == second.split(",")[::-1]

    again = up.start(*args, backend=backend)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already up" in again.stdout
    assert [b["proc"]["pid"] for b in up.state()["brokers"]] == pids[:3]

    status = up.run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("healthy") >= 3

    _publish_and_receive(state, protocol=protocol)

    logs = up.run("logs", "-n", "5")
    assert logs.returncode == 0, logs.stderr
    assert "broker-consortium.log" in logs.stdout

    stopped = up.run("stop", "--grace", "4")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
    assert all(p["proc"]["pid"] is None for p in up.state()["brokers"])
    for port in up.ports:
        assert not listening(port), f"port {port} still has a listener"
    for url in (u for b in state["brokers"] for u in b["url"].split(",")):
        assert not listening(int(url.rsplit(":", 1)[1])), f"{url} still has a listener"

    after = up.run("status")
    assert after.returncode != 0
    assert "stopped" in after.stdout
    again = up.run("stop")
    assert again.returncode == 0 and "already down" in again.stdout
    print(f"{backend}: healthy after {startup:.1f}s (recorded "
          f"{state['startup_seconds']:.2f}s)")


def test_local_backend_lifecycle(up: Up) -> None:
    _lifecycle(up, backend="local", agents=True, protocol=MQTTProtocolVersion.MQTTv5)


def test_cluster_backend_lifecycle(up: Up) -> None:
    _lifecycle(up, backend="cluster", agents=True, protocol=MQTTProtocolVersion.MQTTv311)


def test_embedded_backend_lifecycle(up: Up) -> None:
    _lifecycle(up, backend="embedded", agents=False, protocol=MQTTProtocolVersion.MQTTv311)


def test_embedded_backend_with_agents(up: Up) -> None:
    started = up.start("--timeout", "20", backend="embedded")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "agents: simulated stores" in started.stdout + started.stderr
    assert up.run("status").returncode == 0


def test_commands_before_any_start(up: Up) -> None:
    status = up.run("status")
    assert status.returncode != 0 and "not up" in status.stdout
    logs = up.run("logs")
    assert logs.returncode != 0 and "no logs" in logs.stdout
    stop = up.run("stop")
    assert stop.returncode == 0 and "already down" in stop.stdout


def test_docker_backend_without_engine_or_images_is_refused_clearly(
        up: Up, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pear_mqtt.ops.compose import docker_problem

    # Whatever this machine has, a missing Compose file is one thing the backend lacks (the
    # docker backend itself runs in tests/container/test_up_docker.py).
    monkeypatch.setenv("PEAR_COMPOSE_FILE", str(tmp_path / "no-compose.yaml"))
    problem = docker_problem()
    assert problem is not None
    result = up.start(backend="docker")
    assert result.returncode != 0
    assert f"docker backend: {problem}" in result.stderr
    assert not (up.dir / "up.json").exists() or up.state()["state"] != "up"


def test_busy_port_is_refused_before_starting_anything(up: Up) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", up.ports[1]))
        squatter.listen()
        result = up.start("--no-agents", backend="embedded")
    assert result.returncode == 1
    assert f"[{up.ports[1]}]" in result.stderr and "PEAR_UP_PORTS=" in result.stderr
    assert not listening(up.ports[0]) and not listening(up.ports[2])


def test_a_taken_default_port_is_replaced_by_a_free_one(up: Up) -> None:
    """With no ports asked for, a default that something else holds does not stop `make up`:
    it takes a free port instead and says which."""
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            squatter.bind(("127.0.0.1", 18883))
            squatter.listen()
        except OSError:
            pass  # already held by someone else: the same situation
        result = up.run("start", "--no-agents", backend="embedded")
        assert result.returncode == 0, result.stdout + result.stderr
        ports = [b["port"] for b in up.state()["brokers"]]
        assert ports[0] != 18883 and len(set(ports)) == 3
        assert f"port 18883 is taken on 127.0.0.1; using {ports[0]} instead" in result.stdout
        assert all(listening(p) for p in ports)


def test_failed_start_prints_log_tail_and_cleans_up(up: Up) -> None:
    first = up.start("--no-agents", backend="local")
    assert first.returncode == 0, first.stdout + first.stderr
    assert up.run("stop").returncode == 0
    key = Path(next(b for b in up.state()["brokers"] if b["name"] == "public")["key"])
    key.write_text("not a key\n")

    result = up.start("--no-agents", backend="local")
    assert result.returncode == 1
    assert "broker public: process not running" in result.stderr
    assert "tail of" in result.stderr and "Unable to load server key" in result.stderr
    assert up.state()["state"] == "failed"
    for port in up.ports:
        assert not listening(port)
    assert up.run("status").returncode != 0


def test_an_old_state_directory_is_migrated_to_certificate_pseudonyms(up: Up) -> None:
    """`make up` over a `.pear/` made before pseudonyms came from certificates (one pseudonym
    secret in secrets.json and in every member's config, CAs issuing node certificates under
    the pseudonyms it computed and the stores' own ids): the running topology is stopped,
    the secret dropped, every store enrolled under its CA's random pseudonyms (the old
    certificates revoked), the configs rewritten, and the bridge counts afresh."""
    first = up.start("--no-agents", backend="local")
    assert first.returncode == 0, first.stdout + first.stderr
    # Turn the running topology's state back into what the older code left.
    secrets_file = up.dir / "secrets.json"
    data = json.loads(secrets_file.read_text())
    for entry in data.values():
        entry["pseudonym_secret"] = "shared-with-every-member-0123456789"
    secrets_file.write_text(json.dumps(data))
    ca_dir = up.dir / "pki" / "retail-eu" / "ca"
    (ca_dir / pkimod.PSEUDONYMS).unlink()
    old = pkimod.issue(ca_dir=ca_dir, out_dir=ca_dir.parent / "nodes", role="node",
                       member="p" + "a" * 24, node="store-1")
    old_serial = _cert_serial(old.cert.read_bytes())
    config_file = up.dir / "nodes" / "consortium-globex-store-1.toml"
    text = config_file.read_text()
    text = re.sub(r'(?m)^node_id = ".*"$', 'node_id = "store-1"', text)
    text = text.replace("[privacy]\n", '[privacy]\npseudonym_secret = "shared"\n', 1)
    config_file.write_text(text)
    (up.dir / "bridge").mkdir(exist_ok=True)
    (up.dir / "bridge" / "state.sqlite").write_bytes(b"counted under the old pseudonyms")

    again = up.start("--no-agents", backend="local")
    out = again.stdout + again.stderr
    assert again.returncode == 0, out
    assert "pseudonym secret shared with every member" in out and "stopping it to migrate" in out
    assert out.count("migrated:") >= 3, out
    assert "pseudonym_secret" not in secrets_file.read_text()
    assert pkimod.has_pseudonyms(ca_dir=ca_dir)
    revoked = {r.serial for r in pkimod.list_certificates(ca_dir=ca_dir) if r.revoked}
    assert old_serial in revoked
    assert not old.cert.exists()
    assert (up.dir / "bridge" / "state.sqlite.before-pseudonyms").is_file()

    state = up.state()
    registry = {(e.company, e.store): e for e in pkimod.list_pseudonyms(ca_dir=ca_dir)}
    for node in (n for n in state["nodes"] if n["network"] == "retail-eu"):
        enrolment = registry[(node["company"],
                              "archive" if node["role"] == "archive" else "store-1")]
        assert (node["member"], node["node"]) == (enrolment.member, enrolment.node)
    for path in (up.dir / "nodes").glob("*.toml"):
        assert "pseudonym_secret" not in path.read_text(), path
    config = NetworkConfigManager.load(file=config_file, env={})
    assert config.company_id == "globex"
    assert config.node_id == registry[("globex", "store-1")].node != "store-1"
    assert config.tls.crl_file == (ca_dir / pkimod.CA_CRL).resolve()
    _publish_and_receive(state, protocol=MQTTProtocolVersion.MQTTv5)

    current = up.start("--no-agents", backend="local")
    assert current.returncode == 0 and "already up" in current.stdout
    assert "migrated" not in current.stdout


def _cert_serial(pem: bytes) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem).serial_number


def test_the_first_public_aggregates_come_when_start_says(up: Up) -> None:
    """`start` names when the bridge's first public window is due; a public node from
    up.json has it by then (within half as long again)."""
    started = up.start("--rate", "10", backend="local")
    assert started.returncode == 0, started.stdout + started.stderr
    began = time.monotonic()
    said = re.search(r"first public aggregates expected in ~(\d+) s", started.stdout)
    assert said is not None, started.stdout
    expected = float(said.group(1))
    public = next(n for n in reversed(up.state()["nodes"]) if n["mode"] == "public")
    assert f"pear-mqtt market aggregates --config {public['config']} --sync" in started.stdout

    async def first_aggregate() -> float:
        config = NetworkConfigManager.load(file=public["config"], env={})
        async with PearNetwork(config) as node:
            stream = node.aggregates()
            await asyncio.wait_for(anext(aiter(stream)), timeout=expected * 1.5 + 10)
        return time.monotonic() - began

    took = asyncio.run(first_aggregate())
    assert took <= expected * 1.5 + 10, (took, expected)
