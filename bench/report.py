"""Statistics, machine description, ``results.json``, the stdout table and BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
import pstats
import ssl
import statistics
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["LABELS", "RATIOS", "machine", "profile_summary", "render_markdown",
           "render_table", "summarise", "write_json"]

# measurement -> (label, unit of the primary value, higher is better)
LABELS: dict[str, tuple[str, str, bool]] = {
    "A": ("A  raw paho, best config (QoS 1, 500 B)", "msgs/s", True),
    "A_mqtt5": ("A5 raw paho, same over MQTT 5", "msgs/s", True),
    "C": ("C  mosquitto_pub -l into mosquitto_sub", "msgs/s", True),
    "P": ("P  pear broadcast -> verified insights", "insights/s", True),
    "sync_pear": ("sync: PearNetwork.sync() of N states", "s", False),
    "sync_raw": ("sync: raw paho subscriber, same N", "s", False),
    "sync_c": ("sync: mosquitto_sub -C N (incl. start)", "s", False),
    "publish_retained_pear": ("publish N retained: pear states", "states/s", True),
    "publish_retained_raw": ("publish N retained: raw paho", "msgs/s", True),
}

# ratio name -> (numerator, denominator, meaning)
RATIOS: dict[str, tuple[str, str, str]] = {
    "P/A": ("P", "A", "pear verified insights/s over raw paho msgs/s"),
    "P/C": ("P", "C", "pear verified insights/s over mosquitto C clients msgs/s"),
    "A/C": ("A", "C", "raw paho over mosquitto C clients"),
    "P/A_mqtt5": ("P", "A_mqtt5", "pear over raw paho on MQTT 5"),
    "sync_pear/sync_raw": ("sync_pear", "sync_raw",
                           "times longer PearNetwork.sync() takes than a raw paho subscriber"),
    "sync_pear/sync_c": ("sync_pear", "sync_c", "times longer than mosquitto_sub"),
    "publish_retained_pear/publish_retained_raw": (
        "publish_retained_pear", "publish_retained_raw",
        "pear retained states/s over raw paho retained msgs/s"),
}


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarise(samples: Mapping[str, list[dict[str, Any]]]) -> tuple[dict[str, Any],
                                                                     dict[str, Any]]:
    """Turn per-repetition dicts into measurement summaries and ratios.

    ``samples[name]`` holds one dict per repetition (in round order); the primary value is
    ``rate`` for throughputs and ``seconds`` for syncs. Other numeric keys are summarised
    under ``extra``. Ratios are medians over medians, with the paired per-round ratios too.
    """
    measurements: dict[str, Any] = {}
    for name, reps in samples.items():
        if not reps:
            continue
        label, unit, higher = LABELS[name]
        key = "seconds" if unit == "s" else "rate"
        values = [float(r[key]) for r in reps]
        extra: dict[str, Any] = {}
        for k in reps[0]:
            if k != key and all(isinstance(r.get(k), int | float) for r in reps):
                extra[k] = _stats([float(r[k]) for r in reps])
        measurements[name] = {"label": label, "unit": unit, "higher_is_better": higher,
                              "samples": values, **_stats(values), "extra": extra}
    ratios: dict[str, Any] = {}
    for rname, (num, den, meaning) in RATIOS.items():
        if num not in measurements or den not in measurements:
            continue
        a, b = measurements[num], measurements[den]
        paired = [x / y for x, y in zip(a["samples"], b["samples"], strict=False) if y > 0]
        ratios[rname] = {"value": a["median"] / b["median"], "meaning": meaning,
                         "per_round": _stats(paired) if paired else None}
    return measurements, ratios


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal"):
                kb = int(line.split()[1])
                return f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return "unknown"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(mosquitto: str) -> dict[str, Any]:
    """Where the numbers were taken."""
    return {
        "cpu": _cpu_model(),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "memory": _mem_total(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "openssl": ssl.OPENSSL_VERSION,
        "mosquitto": mosquitto,
        "paho_mqtt": _version("paho-mqtt"),
        "cryptography": _version("cryptography"),
        "pydantic": _version("pydantic"),
        "pear_mqtt": _version("pear-mqtt"),
        "loadavg_start": list(os.getloadavg()),
    }


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value:.3f}"
    return f"{value:,.0f}"


def render_table(results: Mapping[str, Any]) -> str:
    """The plain-text table printed at the end of a run."""
    ms = results["measurements"]
    rows = [("measurement", "unit", "min", "median", "max")]
    for m in ms.values():
        rows.append((m["label"], m["unit"], _fmt(m["min"], m["unit"]),
                     _fmt(m["median"], m["unit"]), _fmt(m["max"], m["unit"])))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]),
                                *(c.rjust(w) for c, w in zip(r[2:], widths[2:], strict=True))]))
        if i == 0:
            lines.append("-" * len(lines[0]))
    lines.append("")
    for rname, r in results["ratios"].items():
        pr = r["per_round"]
        rng = f" (per round {pr['min']:.3f}..{pr['max']:.3f})" if pr else ""
        lines.append(f"{rname:<46} {r['value']:8.3f}{rng}  {r['meaning']}")
    return "\n".join(lines)


def _md_table(results: Mapping[str, Any]) -> list[str]:
    out = ["| measurement | unit | min | median | max |", "|---|---|---:|---:|---:|"]
    for m in results["measurements"].values():
        out.append(f"| {m['label']} | {m['unit']} | {_fmt(m['min'], m['unit'])} | "
                   f"{_fmt(m['median'], m['unit'])} | {_fmt(m['max'], m['unit'])} |")
    return out


def _md_ratios(results: Mapping[str, Any]) -> list[str]:
    out = ["| ratio | median / median | paired per round (min..max) | meaning |",
           "|---|---:|---:|---|"]
    for name, r in results["ratios"].items():
        pr = r["per_round"]
        rng = f"{pr['min']:.3f}..{pr['max']:.3f}" if pr else "-"
        out.append(f"| {name} | {r['value']:.3f} | {rng} | {r['meaning']} |")
    return out


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3f}"


def _md_extra(results: Mapping[str, Any]) -> list[str]:
    out = ["| measurement | metric | min | median | max |", "|---|---|---:|---:|---:|"]
    for name, m in results["measurements"].items():
        for k, s in m["extra"].items():
            out.append(f"| {name} | {k} | {_num(s['min'])} | {_num(s['median'])} | "
                       f"{_num(s['max'])} |")
    return out


# Blocking waits: time a process spends idle, not working. Left out of the ranking and of
# the shares, and reported on their own.
_IDLE = ("<method 'poll' of 'select.epoll' objects>", "<built-in method select.select>",
         "<method 'acquire' of '_thread.lock' objects>",
         "<method 'control' of 'select.kqueue' objects>")


def profile_summary(path: Path, top: int = 15) -> dict[str, Any]:
    """The ``top`` functions by own time in a cProfile dump, idle waits excluded."""
    st = pstats.Stats(str(path))
    rows = []
    idle = 0.0
    for (file, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        if func in _IDLE:
            idle += tt
            continue
        rows.append((tt, ct, nc, file, line, func))
    busy = sum(r[0] for r in rows)
    rows.sort(reverse=True)
    out = []
    for tt, ct, nc, file, line, func in rows[:top]:
        short = file
        for marker in ("site-packages/", "/work/main/"):
            if marker in file:
                short = file.split(marker, 1)[1]
                break
        else:
            if "/lib/python3" in file:
                short = "stdlib/" + file.split("/lib/python3", 1)[1].split("/", 1)[-1]
        out.append({"function": f"{short}:{line}({func})", "calls": nc,
                    "tottime": round(tt, 4), "cumtime": round(ct, 4),
                    "share": round(tt / busy, 4) if busy else 0.0})
    return {"busy_s": round(busy, 3), "idle_s": round(idle, 3), "rows": out}


def _md_profile(profile: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for name, info in profile.items():
        top = info["top"]
        out += ["", f"#### {name}: {info['what']}", "",
                f"Busy {top['busy_s']:.2f} s of Python/C calls, {top['idle_s']:.2f} s waiting "
                "in epoll (left out).", "",
                "| # | function | calls | own s | cum s | own % of busy |",
                "|---:|---|---:|---:|---:|---:|"]
        for i, row in enumerate(top["rows"], 1):
            out.append(f"| {i} | `{row['function']}` | {row['calls']:,} | {row['tottime']:.3f} | "
                       f"{row['cumtime']:.3f} | {100 * row['share']:.1f} |")
    return out


def render_markdown(results: Mapping[str, Any]) -> str:
    """docs/BENCHMARKS.md, regenerated from one run's results."""
    mc = results["machine"]
    pa = results["params"]
    settings = results["broker"]["settings"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench` from `bench/results.json`; rerun to refresh "
        "(hand edits are overwritten).",
        "",
        "## How to run",
        "",
        "```sh",
        ".venv/bin/python -m bench --quick   # N=10,000, 3 repetitions (about a minute)",
        ".venv/bin/python -m bench           # A/C/P: N=30,000 x5; sync: N=100,000 x3 (~10 min)",
        ".venv/bin/python -m bench --sync-reps 5   # five 100,000-state sync rounds (~15 min)",
        ".venv/bin/python -m bench --quick --profile   # also cProfile pear's P and sync "
        "workers",
        ".venv/bin/python -m bench --n 500 --reps 1 --out /tmp/r.json --no-doc  # smoke size",
        ".venv/bin/python -m bench --quick --only P,sync --outbox sqlite  # durable outbox",
        ".venv/bin/python -m bench --explore-a --n 10000 --reps 3  # raw paho variants",
        ".venv/bin/python -m bench --render   # table + this file from bench/results.json",
        "```",
        "",
        "`--help` lists every option. The smoke test "
        "`tests/integration/test_bench_smoke.py` runs the harness at N=500.",
        "",
        "Each run starts its own mosquitto with the configuration rendered by "
        "`pear_mqtt.brokerconf.render` (consortium mode, mutual TLS, generated ACL) and "
        "throw-away certificates from `pear_mqtt.pki`. Every repetition of every measurement "
        "gets a freshly started broker; the order of the measurements rotates between "
        "repetitions so that no one always runs first. Publisher and subscriber run in "
        "separate spawned processes, synchronised over pipes: the receiver reports after its "
        "SUBACK, the sender starts on a `go` sent after both are connected. No sleeps.",
        "",
        f"Broker settings as rendered: {', '.join(f'`{k} {v}`' for k, v in settings.items())}.",
        "",
        f"## Results ({results['mode']} run, {results['started']}, "
        f"{results.get('measure_s', results['duration_s']):.0f} s)",
        "",
        f"N = {pa['n']:,} messages / insights for A, C and P; N = {pa['n_sync']:,} retained "
        f"states for sync and publish; {pa['reps']} repetitions of A, C and P, "
        f"{pa['sync_reps']} of the sync round; payload {pa['size']} bytes for A and C.",
        "",
        *_md_table(results),
        "",
        "### Ratios (same run)",
        "",
        *_md_ratios(results),
        "",
        "### Secondary metrics",
        "",
        *_md_extra(results),
        "",
        "## What is measured",
        "",
        "- **A**: raw paho-mqtt at its best on this machine: no paho thread, the socket driven "
        f"by `Client.loop()`, {pa['window']} QoS 1 messages in flight (kept by the benchmark, "
        "with paho's own window unlimited: paho's `max_inflight_messages_set` window rescans "
        "every in-flight message on each PUBACK and was 2-3x slower), MQTT "
        f"{'3.1.1' if pa['protocol'] == 4 else '5'} (paho's MQTT 5 property handling costs "
        "~25 %), the subscriber reading every buffered packet per wake-up "
        f"(`{pa['sub_read']}`). `A5` is the same over MQTT 5, the protocol pear_mqtt speaks. "
        "Rate = N / (last message at the subscriber - publisher's first publish).",
        "- **C**: `mosquitto_pub -l -M 1000 -q 1` into `mosquitto_sub -C N -q 1` on the same "
        "listener (MQTT 5). A retained READY tells that the subscriber is subscribed, a MARK "
        "line that the publisher is connected; the clock runs from writing the first of the N "
        "lines to the N-th line printed by `mosquitto_sub`.",
        "- **P**: `PearNetwork.broadcast_market_insight` under the consortium policy "
        "(privacy filter: price ranges only, sales aggregated and sealed to the aggregator, "
        "trends full; pseudonyms; envelope; Ed25519 signature; AES-GCM group encryption) with "
        f"the {pa.get('outbox', 'memory')} outbox, {pa['categories']} categories, into a "
        "`PearNetwork` that verifies, decrypts, validates and hands each insight to "
        "`insights()`. Rate = N / "
        "(N-th distinct verified insight at the receiver - first broadcast call). "
        "`broadcast_rate` is how fast `broadcast_market_insight` returns, `ack_rate` N over "
        "the time until `flush()` returned, `envelopes` the messages published.",
        "- **sync**: pear publishes N retained states (one category each, so N state and N "
        "insight envelopes); then, in rotating order, a late-joining `PearNetwork.sync()`, a "
        "raw paho subscriber (QoS 1, same state filter, timed from SUBSCRIBE to the N-th "
        "retained message) and `mosquitto_sub -C N` (process start included) take the same "
        "N retained messages.",
        "- **publish N retained**: pear = N / (first `broadcast_market_insight` to `flush()` "
        "done); raw paho publishes N retained messages, one topic each, of the mean size of "
        "pear's state envelopes in the same round (`size` in the secondary metrics), on a "
        "fresh broker.",
        "",
        "## Machine",
        "",
        f"- CPU: {mc['cpu']}; {mc['nproc']} usable cores (nproc), {mc['memory']} RAM",
        f"- {mc['kernel']}; {mc['python']}; {mc['openssl']}",
        f"- {mc['mosquitto']}; paho-mqtt {mc['paho_mqtt']}; cryptography {mc['cryptography']}; "
        f"pydantic {mc['pydantic']}; pear-mqtt {mc['pear_mqtt']}",
        f"- load average at start {', '.join(f'{x:.2f}' for x in mc['loadavg_start'])}; "
        "the machine is shared and noisy, so compare ratios from one run rather than absolute "
        "numbers across runs.",
    ]
    if results.get("profile"):
        lines += ["", "## Profile (cProfile, one extra unmeasured round)", "",
                  "Top functions by own time in each pear_mqtt process; cProfile slows Python "
                  "code down, so shares matter, not absolute seconds.",
                  *_md_profile(results["profile"])]
    return "\n".join(lines) + "\n"
