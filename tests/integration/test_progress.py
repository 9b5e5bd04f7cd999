"""Progress of long command-line work: `pear-mqtt agent --input`, bulk `pki enrol`, `log
verify` and the archive's history backfill draw bars (count, rate, time left) on a terminal,
and nothing in a pipe or a log."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from terminal import Terminal, terminal_env

from pear_mqtt.config.manager import NetworkConfigManager
from pear_mqtt.config.models import NetworkConfig
from pear_mqtt.model.insight import MarketInsight
from pear_mqtt.node.network import PearNetwork

pytestmark = pytest.mark.integration

_ROWS = 300
_T0 = datetime(2026, 11, 2, tzinfo=UTC)


def _input(path: Path) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i in range(_ROWS):
            start = _T0 + timedelta(hours=i)
            f.write(json.dumps({"category": "grocery/dairy", "product_id": f"p{i}",
                                "window_start": start.isoformat(),
                                "window_end": (start + timedelta(hours=1)).isoformat(),
                                "price_data": {"price": 1.5 + i / 100}}) + "\n")
    return path


def _agent(config: Path, data: Path, outbox: Path) -> list[str]:
    return [sys.executable, "-m", "pear_mqtt", "agent", "--config", str(config), "--input",
            str(data), "--outbox", str(outbox), "--status-interval", "0"]


def test_agent_input_shows_bars_on_a_terminal_and_nothing_in_a_pipe(
        make_config: Callable[..., NetworkConfig], tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    NetworkConfigManager.save(make_config("acme"), config, include_secrets=True)
    data = _input(tmp_path / "rows.jsonl")

    term = Terminal(_agent(config, data, tmp_path / "tty.db"))
    code, _ = term.finish()
    assert code == 0
    assert "━" in term.drawn and f"{_ROWS}/{_ROWS}" in term.drawn, term.drawn[-2000:]
    assert "read" in term.drawn and "acknowledged" in term.drawn

    piped = subprocess.run(_agent(config, data, tmp_path / "pipe.db"), capture_output=True,
                           text=True, env=terminal_env(), timeout=60)
    assert piped.returncode == 0, piped.stderr
    assert "━" not in piped.stderr and f"{_ROWS}/{_ROWS}" not in piped.stderr
    assert f"read {_ROWS}" in piped.stderr  # the run's own summary line is all there is


def _cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "pear_mqtt", *map(str, args)]


def test_enrolling_many_stores_at_once_shows_a_bar_and_lists_their_pseudonyms(
        tmp_path: Path) -> None:
    ca, out = tmp_path / "ca", tmp_path / "certs"
    subprocess.run(_cli("pki", "init", "--dir", ca, "--network", "n1", "--pseudonyms"),
                   check=True, capture_output=True, timeout=60)
    listed = tmp_path / "stores.txt"
    listed.write_text("# the north region\ns3\ns4\n\ns5\ns1\ns6\n", encoding="utf-8")
    term = Terminal(_cli("pki", "enrol", "--dir", ca, "--out", out, "--company", "acme",
                         "--store", "s1", "--store", "s2", "--stores-file", listed))
    code, printed = term.finish()
    assert code == 0, term.drawn[-2000:]
    assert "enrolling acme's stores" in term.drawn and "6/6" in term.drawn, term.drawn[-2000:]
    rows = [line.split() for line in printed.splitlines()[2:]]
    assert [r[0] for r in rows] == ["s1", "s2", "s3", "s4", "s5", "s6"]  # s1 once
    nodes = {r[1] for r in rows}
    assert len(nodes) == 6 and not nodes & {"s1", "s2", "s3", "s4", "s5", "s6"}
    assert {p.stem for p in out.glob("*.crt")} - {"ca"} == {r[2][:-4] for r in rows}

    missing = subprocess.run(_cli("pki", "enrol", "--dir", ca, "--out", out, "--company",
                                  "acme"), capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0
    assert "--store ID" in missing.stderr and "Traceback" not in missing.stderr


async def test_log_verify_and_the_archives_backfill_show_bars_on_a_terminal(
        make_config: Callable[..., NetworkConfig], tmp_path: Path,
        insight: Callable[..., MarketInsight]) -> None:
    archive = make_config("initech", node="archive", archive_path=tmp_path / "archive")
    conf = tmp_path / "archive.toml"
    NetworkConfigManager.save(archive, conf, include_secrets=True)
    async with PearNetwork(make_config("acme", outbox=tmp_path / "acme.sqlite")) as tx:
        for k in range(12):
            await tx.broadcast_many([insight(product=f"p{k}-{i}") for i in range(5)])
            await tx.flush(timeout=10)
        # The archive starts after the sender published: all of it is backfill, to the
        # length of the sender's signed head.
        term = Terminal(_cli("archive", "--config", conf, "--status-interval", "1"))
        try:
            done = await asyncio.to_thread(term.wait_for,
                                           r"history backfill.*?(?<!\d)([1-9]\d*)/\1(?!\d)")
            held = int(done.group(1))
        finally:
            code, _ = await asyncio.to_thread(term.finish, stop=True)
    assert code == 0, term.drawn[-2000:]
    assert held >= 12  # an entry per flushed batch, at least

    term = Terminal(_cli("log", "verify", tmp_path / "acme.sqlite.history"))
    code, printed = term.finish()
    assert code == 0 and ": ok: " in printed, printed
    assert "verifying entries" in term.drawn and f"{held}/{held}" in term.drawn
