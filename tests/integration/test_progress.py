"""Progress of long command-line work: `pear-mqtt agent --input` draws bars (count, rate, time
left) on a terminal, and nothing in a pipe or a log."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pear_mqtt.config.manager import NetworkConfigManager
from pear_mqtt.config.models import NetworkConfig

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


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEAR_")}
    return {**env, "COLUMNS": "120", "TERM": "xterm"}


def test_agent_input_shows_bars_on_a_terminal_and_nothing_in_a_pipe(
        make_config: Callable[..., NetworkConfig], tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    NetworkConfigManager.save(make_config("acme"), config, include_secrets=True)
    data = _input(tmp_path / "rows.jsonl")

    leader, follower = pty.openpty()
    proc = subprocess.Popen(_agent(config, data, tmp_path / "tty.db"), stdout=subprocess.PIPE,
                            stderr=follower, env=_env())
    os.close(follower)
    seen = b""
    while True:  # until the agent exits and the terminal closes
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    drawn = seen.decode("utf-8", "replace")
    assert "━" in drawn and f"{_ROWS}/{_ROWS}" in drawn, drawn[-2000:]
    assert "read" in drawn and "acknowledged" in drawn

    piped = subprocess.run(_agent(config, data, tmp_path / "pipe.db"), capture_output=True,
                           text=True, env=_env(), timeout=60)
    assert piped.returncode == 0, piped.stderr
    assert "━" not in piped.stderr and f"{_ROWS}/{_ROWS}" not in piped.stderr
    assert f"read {_ROWS}" in piped.stderr  # the run's own summary line is all there is
