"""The benchmark harness runs end to end at a tiny size and writes a complete results file.

Only the shape is checked (every measurement present, every number positive): timings on a
shared test machine prove nothing.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

MEASUREMENTS = {"A", "C", "P", "sync_pear", "sync_raw", "sync_c", "publish_retained_pear",
                "publish_retained_raw"}
RATIOS = {"P/A", "P/C", "A/C", "sync_pear/sync_raw", "sync_pear/sync_c",
          "publish_retained_pear/publish_retained_raw"}


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_quick_bench_at_tiny_size_writes_every_measurement(tmp_path: Path) -> None:
    for tool in ("mosquitto_pub", "mosquitto_sub"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: apt-get install mosquitto-clients")
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--n", "500", "--reps", "1",
         "--out", str(out), "--no-doc", "--workdir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "P/A" in proc.stdout  # the table was printed

    results = json.loads(out.read_text(encoding="utf-8"))
    assert results["params"]["n"] == 500 and results["params"]["n_sync"] == 500
    assert results["params"]["reps"] == 1
    ms = results["measurements"]
    assert set(ms) >= MEASUREMENTS
    for name in MEASUREMENTS:
        m = ms[name]
        assert len(m["samples"]) == 1, name
        assert all(_positive(v) for v in m["samples"]), (name, m["samples"])
        assert all(_positive(m[k]) for k in ("min", "median", "max")), (name, m)
    assert ms["sync_raw"]["extra"]["mean_payload"]["median"] > 0
    assert set(results["ratios"]) >= RATIOS
    assert all(_positive(r["value"]) for r in results["ratios"].values())
    # The broker ran the project's rendered configuration with the benchmark's limits.
    settings = results["broker"]["settings"]
    assert settings["max_queued_messages"] == "0"
    assert settings["max_inflight_messages"] == "0"
    assert settings["set_tcp_nodelay"] == "true"
    assert results["machine"]["nproc"] >= 1 and "mosquitto" in results["machine"]["mosquitto"]
