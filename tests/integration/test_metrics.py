"""Prometheus metrics of a node and the archive CLI, scraped over HTTP from real processes
on a real broker."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pear_mqtt.config.manager import NetworkConfigManager
from pear_mqtt.config.models import NetworkConfig
from pear_mqtt.model.insight import MarketInsight
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.ops.metrics import NodeCollector, serve


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_a_nodes_counters_are_served_as_prometheus_metrics(
        make_config: Callable[..., NetworkConfig],
        insight: Callable[..., MarketInsight]) -> None:
    config = make_config("acme")
    async with PearNetwork(config) as net:
        server = serve(NodeCollector(net.status, cert_file=config.tls.cert_file))
        try:
            before = await asyncio.to_thread(_scrape, server.url)
            await net.broadcast_many([insight(product=f"p{i}") for i in range(5)])
            await net.flush(timeout=10)
            after = await asyncio.to_thread(_scrape, server.url)
        finally:
            server.close()
    assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/metrics")
    assert after["pear_connected"] == 1 and after["pear_insights_out_total"] == 5
    assert after["pear_insights_acknowledged_total"] == 5
    assert after["pear_messages_out_total"] > before["pear_messages_out_total"]
    assert 0 < after["pear_certificate_expiry_seconds"] < 3 * 366 * 86400


def test_the_archive_command_serves_metrics_and_stops_on_sigterm(
        make_config: Callable[..., NetworkConfig], tmp_path: Path) -> None:
    config = make_config("initech", node="archive", archive_path=tmp_path / "archive")
    conf = tmp_path / "archive.toml"
    NetworkConfigManager.save(config, conf, include_secrets=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pear_mqtt", "archive", "--config", str(conf),
         "--metrics-port", "0", "--status-interval", "1"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stderr is not None
        url = None
        said = []
        for line in proc.stderr:  # the command says where its metrics are
            said.append(line)
            if "metrics at " in line:
                url = line.rsplit("metrics at ", 1)[1].strip()
                break
        assert url is not None, said
        got = _scrape(url)
        assert "pear_connected" in got and "pear_log_gaps_total" in got
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
    assert proc.returncode == 0, rest
    assert "stopped" in rest


async def test_delivery_latency_and_sync_durations_are_histograms(
        make_config: Callable[..., NetworkConfig], insight: Callable[..., MarketInsight],
        take: Callable[..., Any]) -> None:
    async with PearNetwork(make_config("acme", node="hq")) as rx:
        stream = rx.insights()
        server = serve(NodeCollector(rx.status))
        try:
            async with PearNetwork(make_config("acme")) as tx:
                await tx.broadcast_many([insight(product=f"p{i}") for i in range(5)])
                await take(stream, 5, timeout=30)
            await rx.sync(timeout=10)
            got = await asyncio.to_thread(_scrape, server.url)
        finally:
            server.close()
    # One envelope carried the five: at least one observation, each bucket cumulative.
    assert got["pear_delivery_latency_seconds_count"] >= 1
    assert got["pear_delivery_latency_seconds_bucket{le=+Inf}"] == \
        got["pear_delivery_latency_seconds_count"]
    assert 0 < got["pear_delivery_latency_seconds_sum"] < 30
    assert got["pear_sync_duration_seconds_count"] == 1
    assert got["pear_sync_duration_seconds_bucket{le=0.0005}"] <= \
        got["pear_sync_duration_seconds_bucket{le=60.0}"] == 1


async def test_any_pear_network_serves_its_metrics_when_asked(
        make_config: Callable[..., NetworkConfig]) -> None:
    async with PearNetwork(make_config("acme", node="asks")) as net:
        url = net.serve_metrics()
        assert net.serve_metrics() == url  # once per node
        got = await asyncio.to_thread(_scrape, url)
    assert got["pear_connected"] == 1 and "pear_delivery_latency_seconds_count" in got
    with pytest.raises(OSError):  # disconnect() stopped the endpoint
        await asyncio.to_thread(_scrape, url)
