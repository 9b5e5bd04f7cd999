"""``pear-mqtt watch``: a read-only session with a node's certificate prints what that node may
read, verified and decrypted, in plain form, and leaves no trace (no presence, no session)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from brokers import MosquittoBroker, MqttProbe, NetworkPKI, new_unique_id

from pear_mqtt.config.manager import NetworkConfigManager
from pear_mqtt.config.models import NetworkConfig
from pear_mqtt.errors import ConfigError
from pear_mqtt.model.insight import MarketInsight, NetworkMode
from pear_mqtt.model.topics import TopicScheme
from pear_mqtt.node.network import PearNetwork

pytestmark = pytest.mark.integration


class Watcher:
    """``pear-mqtt watch --json --count N`` in a subprocess, ready once it said so."""

    def __init__(self, config: NetworkConfig, path: Path, *, count: int) -> None:
        NetworkConfigManager.save(config, path, include_secrets=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PEAR_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pear_mqtt", "watch", "--config", str(path), "--json",
             "--count", str(count), "--timeout", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**env, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stderr is not None
        said = []
        for line in self.proc.stderr:  # it subscribes before it says it is watching
            said.append(line)
            if line.startswith("watching "):
                break
        assert said and said[-1].startswith("watching "), said

    def finish(self) -> tuple[list[dict[str, Any]], str]:
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        return [json.loads(line) for line in out.splitlines()], err


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    started: list[Watcher] = []
    yield started
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.communicate()


async def test_a_private_watcher_prints_the_exact_values_and_leaves_no_presence(
        make_config: Callable[..., NetworkConfig], insight: Callable[..., MarketInsight],
        mosquitto: MosquittoBroker, pki: NetworkPKI, tmp_path: Path,
        watchers: list[Watcher]) -> None:
    node = f"watch-{new_unique_id()}"
    config = make_config("acme", mode=NetworkMode.PRIVATE, node=node)
    watcher = Watcher(config, tmp_path / "watch.toml", count=1)
    watchers.append(watcher)
    async with PearNetwork(make_config("acme", mode=NetworkMode.PRIVATE)) as tx:
        await tx.broadcast_market_insight(insight(product="sku-w", price=2.4567))
        (item,), err = await asyncio.to_thread(watcher.finish)
    assert item["kind"] == "insight" and item["mode"] == "private"
    assert (item["member"], item["node"], item["product"]) == ("acme", "store-1", "sku-w")
    assert item["values"]["price_data.price"] == 2.4567
    assert "watched 1 insight(s)" in err
    # No presence of the borrowed node, retained or not: a marker published after the
    # watcher left comes back alone.
    presence = TopicScheme(mode="private", network=pki.network, member="acme").presence(node)
    probe = MqttProbe(host="localhost", port=mosquitto.tls_port, certs=pki.node("acme", "x"),
                      ca=pki.ca)
    try:
        assert not probe.connect().is_failure
        marker = f"pear/v1/private/acme/probe/{new_unique_id()}"
        probe.subscribe(presence)
        probe.subscribe(marker)
        probe.publish(marker, b"m")
        _, before = probe.expect(marker)
    finally:
        probe.close()
    assert before == []


async def test_a_consortium_watcher_sees_what_a_member_may_read(
        make_config: Callable[..., NetworkConfig], insight: Callable[..., MarketInsight],
        tmp_path: Path, watchers: list[Watcher]) -> None:
    watcher = Watcher(make_config("initech", node=f"watch-{new_unique_id()}"),
                      tmp_path / "watch.toml", count=1)
    watchers.append(watcher)
    async with PearNetwork(make_config("acme")) as tx:
        await tx.broadcast_market_insight(insight(product="sku-c", price=2.4567))
        (item,), _ = await asyncio.to_thread(watcher.finish)
    assert item["member"] == "acme" and item["mode"] == "consortium"
    price = item["values"]["price_data.price"]
    # The consortium policy shares a bucket, decrypted for the member; never the price.
    assert isinstance(price, dict) and price["lo"] <= 2.4567 < price["hi"]
    assert "2.4567" not in json.dumps(item)


async def test_a_read_only_network_refuses_to_publish(
        make_config: Callable[..., NetworkConfig], insight: Callable[..., MarketInsight]
        ) -> None:
    async with PearNetwork(make_config("acme", node="reader"), read_only=True) as net:
        with pytest.raises(ConfigError, match="read-only"):
            await net.broadcast_market_insight(insight())
        assert net.status().connected and net.status().messages_out == 0
