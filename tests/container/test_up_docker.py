"""``pear-mqtt up`` with the docker backend: Compose brings the topology up in the images,
on the host's loopback, and ``status``, ``logs`` and ``stop`` work on the containers."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import MqttProbe, new_unique_id
from upkit import Up, scrape_until

from pear_mqtt.ops.compose import Compose, project_name
from pear_mqtt.ops.up.health import listening
from pear_mqtt.security.pki import CertPaths

pytestmark = [pytest.mark.container, pytest.mark.usefixtures("docker_ready")]

CLI_TIMEOUT = 180.0


class DockerUp(Up):
    """``pear-mqtt up ...`` (the integration tests' runner) with the docker backend."""

    def run(self, *args: str, backend: str | None = "docker",
            timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return super().run(*args, backend=backend, timeout=timeout)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[DockerUp]:
    runner = DockerUp(tmp_path)
    yield runner
    if (runner.dir / "up.json").exists():
        runner.run("stop", "--grace", "3")


def test_docker_backend_lifecycle(up: DockerUp) -> None:
    started = up.run("start", "--ports", ",".join(map(str, up.ports)))
    assert started.returncode == 0, started.stdout + started.stderr
    assert "backend: docker" in started.stdout
    state = up.state()
    assert state["state"] == "up" and state["backend"] == "docker"
    assert [b["port"] for b in state["brokers"]] == up.ports
    assert state["compose"]["project"] == project_name(up.dir)
    expect_agents = "agents: simulated stores" in started.stdout
    archives = [a["name"] for a in state["agents"] if a["name"].endswith("-archive")]
    if expect_agents:
        assert len(state["agents"]) - len(archives) == 8
        assert archives == ["private-acme-archive", "consortium-operator-archive"]
    else:
        assert state["agents"] == []

    compose = Compose.from_json(state["compose"])
    containers = compose.containers()
    assert {f"broker-{b['name']}" for b in state["brokers"]} <= set(containers)
    for c in containers.values():
        attrs = json.loads(subprocess.run(["docker", "inspect", c.name], capture_output=True,
                                          text=True, check=True).stdout)[0]
        assert attrs["HostConfig"]["NetworkMode"] == "host", c.name
        assert c.running, c

    status = up.run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "compose project" in status.stdout

    # Containers share the host's loopback: each serves its metrics where up.json says, and
    # the dashboard each broker's $SYS figures.
    if expect_agents:
        served = [a for a in state["agents"] + state["bridges"] if a.get("metrics_url")]
        assert len(served) == len(state["agents"]) + len(state["bridges"])
        samples = scrape_until(served[0]["metrics_url"], "pear_connected")
        assert "pear_messages_out_total" in {k.split("{", 1)[0] for k in samples}
    assert all(b["metrics_url"] for b in state["brokers"])
    figures = scrape_until(state["brokers"][0]["metrics_url"], "pear_broker_uptime_seconds")
    assert figures[f'pear_broker_sys_connected{{broker="{state["brokers"][0]["name"]}"}}'] == 1

    # A consortium member's certificate from up.json gets in and reads its own writes.
    node = next(n for n in state["nodes"] if n["name"] == "consortium-globex-store-1")
    broker = next(b for b in state["brokers"] if b["name"] == node["broker"])
    certs = CertPaths(cert=Path(node["cert"]), key=Path(node["key"]), ca=Path(node["ca"]))
    topic = f"pear/v1/consortium/{node['network']}/{node['member']}/probe/{new_unique_id()}"
    p = MqttProbe(host=broker["host"], port=broker["port"], certs=certs)
    try:
        assert not p.connect().is_failure
        p.subscribe(topic)
        p.publish(topic, b"hello from a container test")
        msg, _ = p.expect(topic)
        assert msg.payload == b"hello from a container test"
    finally:
        p.close()

    logs = up.run("logs", "-n", "5")
    assert logs.returncode == 0, logs.stderr
    assert "broker-consortium" in logs.stdout and "agent-" in logs.stdout if \
        expect_agents else "broker-consortium" in logs.stdout

    again = up.run("start")
    assert again.returncode == 0 and "already up" in again.stdout

    stopped = up.run("stop", "--grace", "5")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert compose.containers() == {}
    for port in up.ports:
        assert not listening(port), f"port {port} still has a listener"
    after = up.run("status")
    assert after.returncode != 0 and "stopped" in after.stdout


def test_broken_broker_fails_start_with_its_container_log(up: DockerUp) -> None:
    first = up.run("start", "--no-agents", "--ports", ",".join(map(str, up.ports)))
    assert first.returncode == 0, first.stdout + first.stderr
    assert up.run("stop", "--grace", "3").returncode == 0
    key = Path(next(b for b in up.state()["brokers"] if b["name"] == "public")["key"])
    key.write_text("not a key\n")

    result = up.run("start", "--no-agents", "--timeout", "20")
    assert result.returncode == 1
    assert "broker public" in result.stderr
    assert "Unable to load server key" in result.stderr  # mosquitto's words, via docker logs
    assert up.state()["state"] == "failed"
    assert Compose.from_json(up.state()["compose"]).containers() == {}
    for port in up.ports:
        assert not listening(port)
