"""The container backend of the broker harness runs mosquitto in the broker image, on the
host's loopback, and keeps its ports and files across kill/start."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from brokers import MqttProbe, NetworkPKI, build_pki, probe
from container_backend import IMAGE, ContainerMosquittoBroker

from pear_mqtt.errors import BrokerError

pytestmark = [pytest.mark.container, pytest.mark.usefixtures("docker_ready")]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> NetworkPKI:
    return build_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker(pki: NetworkPKI, tmp_path: Path) -> Iterator[ContainerMosquittoBroker]:
    b = ContainerMosquittoBroker(workdir=tmp_path / "broker", pki=pki, persistence=True)
    try:
        yield b.start()
    finally:
        b.stop()
        b.close()


def _attrs(broker: ContainerMosquittoBroker) -> dict[str, Any]:
    attrs: dict[str, Any] = broker.docker().attrs
    return attrs


def test_runs_in_the_broker_image_with_host_networking(broker: ContainerMosquittoBroker,
                                                       pki: NetworkPKI) -> None:
    attrs = _attrs(broker)
    assert attrs["Config"]["Image"] == IMAGE
    assert attrs["HostConfig"]["NetworkMode"] == "host"
    assert not attrs["HostConfig"]["PortBindings"]
    # The host sees the containerised mosquitto as a process in the container's cgroup.
    pid = broker.pid
    assert pid is not None and attrs["Id"] in Path(f"/proc/{pid}/cgroup").read_text()
    with probe(broker, pki.nodes["acme"]) as p:
        assert p.is_connected
    assert "u'acme'" in broker.log_text()


def test_stop_kill_and_start_keep_container_ports_and_retained_state(
        broker: ContainerMosquittoBroker, pki: NetworkPKI) -> None:
    before = (_attrs(broker)["Id"], broker.port, broker.tls_port)
    topic = "pear/v1/consortium/testnet/acme/state/probe"
    with probe(broker, pki.nodes["acme"]) as p:
        p.publish(topic, b"kept", retain=True)
    broker.stop()  # SIGTERM: mosquitto saves its database on the way out
    assert not broker.running
    broker.start()
    broker.restart(kill=True)  # nothing new since the save: nothing lost
    assert (_attrs(broker)["Id"], broker.port, broker.tls_port) == before
    with probe(broker, pki.nodes["globex"], subscribe=[topic]) as p:
        msg, _ = p.expect(topic)
    assert msg.payload == b"kept" and msg.retain


def test_pause_holds_the_socket_and_answers_nothing(broker: ContainerMosquittoBroker) -> None:
    broker.pause()
    try:
        stuck = MqttProbe(host=broker.host, port=broker.port)
        with pytest.raises(TimeoutError):
            stuck.connect(timeout=1.0)
    finally:
        broker.resume()
    with probe(broker) as p:
        assert p.is_connected


def test_failed_start_reports_the_container_output(pki: NetworkPKI, tmp_path: Path) -> None:
    b = ContainerMosquittoBroker(workdir=tmp_path / "bad", pki=pki, start_timeout=5.0,
                                 log_types=("not-a-log-type",))  # mosquitto refuses it
    try:
        with pytest.raises(BrokerError, match="exited with status") as info:
            b.start()
        assert "log_type" in str(info.value)  # mosquitto's own complaint, from docker logs
    finally:
        b.close()
