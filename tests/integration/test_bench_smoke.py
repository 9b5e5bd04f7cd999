"""The benchmark harness runs end to end at a tiny size and writes a complete results file.

Only the shape is checked (every measurement present, every number positive and sane):
timings on a shared test machine prove nothing, and no target of issue #8 is asserted.
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
         # The load measurements at their smallest: 1 s of latency per side, 300
         # contributions, 300 agent insights, 20 agents over 2 processes.
         "--lat-seconds", "1", "--n-bridge", "300", "--n-rss", "300", "--agents", "20",
         "--fanin-workers", "2", "--fanin-downtime", "0.2", "--market-rows", "3000",
         "--n-repair", "300",
         "--out", str(out), "--no-doc", "--plot", str(tmp_path / "bench.png"),
         "--workdir", str(tmp_path / "work")],
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

    # Latency: both sides measured every message after the warm-up, in a plausible range.
    lat = results["latency"]
    assert lat["rate"] == 1000 and lat["seconds"] == 1
    assert set(lat["variants"]) == {"raw", "pear"}
    for name, v in lat["variants"].items():
        assert v["n"]["median"] == 1000, name
        p50, p99, p999 = (v[f"{q}_ms"]["median"] for q in ("p50", "p99", "p999"))
        assert 0 < p50 <= p99 <= p999 <= v["max_ms"]["median"] < 60_000, (name, v)
        assert v["cdf"] and v["cdf"][-1][1] == 1.0
    assert {"pear/raw p50", "pear/raw p99"} <= set(lat["ratios"])
    assert all(_positive(r["value"]) for r in lat["ratios"].values())
    # The market store: filled, queried, with its figures and verdicts.
    market = results["market"]
    assert market["rows"]["max"] == 3000 and set(market["ok"]) == {"ingest", "grouped",
                                                                    "position"}
    assert all(_positive(market[k]["median"]) for k in (
        "ingest_rate", "grouped_p50_ms", "position_p50_ms", "bytes_per_insight"))
    assert _positive(ms["P_nostore"]["median"]) and "P/P_nostore" in results["ratios"]
    assert _positive(ms["P_log"]["median"]) and "P_log/P" in results["ratios"]
    # Bridge: every contribution counted, a positive rate per CPU-second.
    bridge = results["bridge"]
    assert bridge["items"]["max"] == 300 and bridge["companies"]["max"] >= 5
    assert _positive(bridge["rate"]["median"]) and _positive(bridge["cpu_s"]["median"])
    assert bridge["target"] == 20_000 and isinstance(bridge["ok"], bool)
    # Bridge scale-out: one bridge and two instances each counted all of the same input.
    scale = results["bridge_scale"]
    assert scale["items"]["max"] == 300 and scale["instances"]["max"] == 2
    assert _positive(scale["single_wall_rate"]["median"])
    assert _positive(scale["scaled_wall_rate"]["median"])
    assert 0.5 <= scale["largest_share"]["max"] < 1
    assert scale["target"] == 1.7 and isinstance(scale["ok"], bool)
    # Agent RSS: a Python process with pear_mqtt loaded is tens of MB, not bytes or GB.
    rss = results["rss"]
    assert 10 < rss["peak_mb"]["median"] < 2000 and rss["items"]["max"] == 300
    # ... and where its time per insight went: each stage took some, and together less
    # than the agent's run (at 300 insights its connection and drain alone take more).
    stages = [rss[f"stage_{s}_us"]["samples"] for s in ("simulate", "filter", "outbox")]
    assert all(_positive(x) for stage in stages for x in stage)
    assert all(_positive(x) for x in rss["stage_rest_us"]["samples"])
    # Fan-in: every agent connected and came back after the restart.
    fanin = results["fanin"]
    assert fanin["agents"]["max"] == 20 and fanin["workers"]["max"] == 2
    assert 0 < fanin["connect_p50_ms"]["median"] <= fanin["connect_p99_ms"]["median"]
    assert fanin["spread_s"]["median"] >= 0 and fanin["max_per_50ms"]["median"] >= 1
    assert sum(fanin["histogram"]["counts"]) == 20
    assert fanin["accepted_after_restart"]["median"] >= 20
    assert isinstance(fanin["storm"], bool)
    assert set(results["params"]["load_reps"]) == {"latency", "bridge", "bridge_scale", "rss",
                                                   "fanin", "market", "repair"}
    repair = results["repair"]
    assert repair["entries"]["max"] > 0 and _positive(repair["rate"]["median"])
    # The plot was drawn (matplotlib is in the bench extra) or skipped without it.
    png = tmp_path / "bench.png"
    assert png.exists() == ("plot:    " + str(png) in proc.stdout)
    if png.exists():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
