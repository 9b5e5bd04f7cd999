"""``deploy/compose.yaml`` matches the topology ``pear-mqtt up`` prepares (no engine needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pear_mqtt.ops.compose import COMPOSE_FILE
from pear_mqtt.ops.up.topology import TOPOLOGY

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    data = yaml.safe_load(Path(COMPOSE_FILE).read_text(encoding="utf-8"))
    found: dict[str, Any] = data["services"]
    return found


def _agent_names() -> list[str]:
    return [f"agent-{spec.mode}-{company}-{store}" for spec in TOPOLOGY if spec.agents
            for company in spec.companies for store in spec.stores]


def _archive_names() -> list[str]:
    return [f"agent-{spec.mode}-{spec.archive}-archive" for spec in TOPOLOGY
            if spec.agents and spec.archive is not None]


def test_every_broker_and_agent_of_the_topology_is_a_service(services: dict[str, Any]) -> None:
    wanted = ({f"broker-{spec.mode}" for spec in TOPOLOGY} | set(_agent_names())
              | set(_archive_names()) | {"bridge"})
    assert set(services) == wanted


def test_archives_run_their_node_config_with_a_status_file(services: dict[str, Any]) -> None:
    for name in _archive_names():
        node = name.removeprefix("agent-")
        command = services[name]["command"]
        assert command[:3] == ["archive", "--config", f"${{PEAR_DIR}}/nodes/{node}.toml"]
        status = command[command.index("--status-file") + 1]
        assert services[name]["healthcheck"]["test"][-1] == status


def test_host_network_only_and_no_published_ports(services: dict[str, Any]) -> None:
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        assert "ports" not in service and "networks" not in service, name


def test_agents_run_their_node_config_and_wait_for_their_broker(
        services: dict[str, Any]) -> None:
    for name in _agent_names():
        node = name.removeprefix("agent-")
        command = services[name]["command"]
        assert command[:2] == ["agent", "--config"], name
        assert command[2] == f"${{PEAR_DIR}}/nodes/{node}.toml"
        status = command[command.index("--status-file") + 1]
        assert status == f"${{PEAR_DIR}}/run/{node}.status.json"
        assert services[name]["healthcheck"]["test"][-1] == status
        mode = node.split("-", 1)[0]
        assert services[name]["depends_on"] == {
            f"broker-{mode}": {"condition": "service_healthy"}}


def test_brokers_have_a_mutual_tls_health_check(services: dict[str, Any]) -> None:
    for spec in TOPOLOGY:
        broker = services[f"broker-{spec.mode}"]
        assert broker["command"] == ["-c", f"${{PEAR_DIR}}/brokers/{spec.mode}/mosquitto.conf"]
        assert broker["healthcheck"]["test"] == [
            "CMD", "pear-broker-health", f"${{PEAR_DIR}}/brokers/{spec.mode}/health.json"]


def test_bridge_is_defined_but_only_started_with_its_profile(services: dict[str, Any]) -> None:
    bridge = services["bridge"]
    assert bridge["profiles"] == ["bridge"]
    assert set(bridge["depends_on"]) == {"broker-consortium", "broker-public"}
    assert bridge["command"][:3] == ["bridge", "--config", "${PEAR_DIR}/bridge/bridge.toml"]
