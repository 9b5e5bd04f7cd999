"""Live counters: what the bridge and agents write to their status files, and the
``pear_…`` samples of each component's Prometheus endpoint (``metrics_url`` in up.json)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Final

from prometheus_client.parser import text_string_to_metric_families

from .topology import Topology

__all__ = ["counters"]

_SCRAPE_TIMEOUT: Final = 1.0
_MAX_SAMPLES: Final = 200  # per endpoint: the page shows counters, not a metrics browser


def _status(path: str) -> dict[str, Any]:
    file = Path(path)
    try:
        age = time.time() - file.stat().st_mtime
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"error": "no status file yet"}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {"error": f"status file unreadable ({exc})"}
    if isinstance(data, dict) and isinstance(data.get("status"), dict):
        data = data["status"]
    if not isinstance(data, dict):
        return {"error": "status file holds no JSON object"}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float):
            values[key] = value
        elif isinstance(value, dict) and all(isinstance(v, int | float) for v in value.values()):
            values.update({f"{key}.{k}": v for k, v in value.items()})
    return {"age_seconds": round(age, 1), "health": data.get("health"),
            "connected": data.get("connected"), "values": values}


def _scrape(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=_SCRAPE_TIMEOUT) as response:
            text = response.read(4 * 1024 * 1024).decode("utf-8", errors="replace")
    except (OSError, urllib.error.URLError) as exc:
        return {"url": url, "error": f"{type(exc).__name__}: {exc}"}
    samples: list[dict[str, Any]] = []
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith("pear_") and len(samples) < _MAX_SAMPLES:
                    samples.append({"name": s.name, "labels": dict(s.labels),
                                    "value": s.value})
    except ValueError as exc:
        return {"url": url, "error": f"not Prometheus text: {exc}"}
    return {"url": url, "samples": samples}


def _metrics_urls(raw: dict[str, Any]) -> dict[str, str]:
    """``metrics_url`` of every component entry in up.json, by component."""
    urls: dict[str, str] = {}
    for group, kind in (("brokers", "broker"), ("bridges", "bridge"), ("agents", "agent"),
                        ("archives", "archive")):
        entries = raw.get(group)
        for entry in entries if isinstance(entries, list) else ():
            if isinstance(entry, dict) and isinstance(entry.get("metrics_url"), str):
                urls[f"{kind} {entry.get('name', '?')}"] = entry["metrics_url"]
    return urls


def counters(topology: Topology) -> dict[str, Any]:
    """Per component: its status file's numbers and, where it serves them, its metrics."""
    state = topology.state
    components: list[dict[str, Any]] = []
    for kind, entries in (("bridge", state.bridges), ("agent", state.agents)):
        for entry in entries:
            components.append({"kind": kind, "name": entry.name,
                               "status": _status(entry.status_file)})
    for name, status_file in sorted(_archive_status_files(topology.raw).items()):
        components.append({"kind": "archive", "name": name, "status": _status(status_file)})
    metrics = {name: _scrape(url) for name, url in sorted(_metrics_urls(topology.raw).items())}
    return {"components": components, "metrics": metrics, "read_at": time.time()}


def _archive_status_files(raw: dict[str, Any]) -> dict[str, str]:
    """The archive nodes' status files, once ``up.json`` lists them (``archives``)."""
    entries = raw.get("archives")
    return {str(e.get("name", "?")): e["status_file"]
            for e in (entries if isinstance(entries, list) else ())
            if isinstance(e, dict) and isinstance(e.get("status_file"), str)}
