"""Statistics, machine description, ``results.json``, the stdout table and BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
import pstats
import ssl
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from .loadreport import (
    TARGETS,
    agent_rate_key,
    md_load,
    md_targets,
    render_load_table,
    stats,
    summarise_load,
)

__all__ = ["LABELS", "RATIOS", "TARGETS", "machine", "profile_summary", "render_load_table",
           "render_markdown", "render_plot", "render_table", "summarise", "summarise_load",
           "write_json"]

# measurement -> (label, unit of the primary value, higher is better)
LABELS: dict[str, tuple[str, str, bool]] = {
    "A": ("A  raw paho, best config (QoS 1, 500 B)", "msgs/s", True),
    "A_mqtt5": ("A5 raw paho, same over MQTT 5", "msgs/s", True),
    "C": ("C  mosquitto_pub -l into mosquitto_sub", "msgs/s", True),
    "P": ("P  pear broadcast -> verified insights", "insights/s", True),
    "P_nostore": ("P  same, receiver without its market store", "insights/s", True),
    "P_log": ("P  same, sender keeping its history log", "insights/s", True),
    "sync_pear": ("sync: PearNetwork.sync() of N states", "s", False),
    "sync_raw": ("sync: raw paho subscriber, same N", "s", False),
    "sync_c": ("sync: mosquitto_sub -C N (incl. start)", "s", False),
    "publish_retained_pear": ("publish N retained: pear states", "states/s", True),
    "publish_retained_raw": ("publish N retained: raw paho", "msgs/s", True),
    "publish_retained_many": ("publish N retained: pear, broadcast_many of 1,000", "states/s",
                              True),
}

# ratio name -> (numerator, denominator, meaning)
RATIOS: dict[str, tuple[str, str, str]] = {
    "P/A": ("P", "A", "pear verified insights/s over raw paho msgs/s"),
    "P/C": ("P", "C", "pear verified insights/s over mosquitto C clients msgs/s"),
    "A/C": ("A", "C", "raw paho over mosquitto C clients"),
    "P/A_mqtt5": ("P", "A_mqtt5", "pear over raw paho on MQTT 5"),
    "P/P_nostore": ("P", "P_nostore", "P with the receiver's market store over P without"),
    "P_log/P": ("P_log", "P", "P with the sender's history log over P without"),
    "sync_pear/sync_raw": ("sync_pear", "sync_raw",
                           "times longer PearNetwork.sync() takes than a raw paho subscriber"),
    "sync_pear/sync_c": ("sync_pear", "sync_c", "times longer than mosquitto_sub"),
    "publish_retained_pear/publish_retained_raw": (
        "publish_retained_pear", "publish_retained_raw",
        "pear retained states/s over raw paho retained msgs/s"),
    "publish_retained_many/publish_retained_raw": (
        "publish_retained_many", "publish_retained_raw",
        "the same, the states given to broadcast_many 1,000 at a time"),
}


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
                extra[k] = stats([float(r[k]) for r in reps])
        measurements[name] = {"label": label, "unit": unit, "higher_is_better": higher,
                              "samples": values, **stats(values), "extra": extra}
    ratios: dict[str, Any] = {}
    for rname, (num, den, meaning) in RATIOS.items():
        if num not in measurements or den not in measurements:
            continue
        a, b = measurements[num], measurements[den]
        paired = [x / y for x, y in zip(a["samples"], b["samples"], strict=False) if y > 0]
        ratios[rname] = {"value": a["median"] / b["median"], "meaning": meaning,
                         "per_round": stats(paired) if paired else None}
    stored = [r["stored_rate"] for r in samples.get("P", []) if "stored_rate" in r]
    if "P_nostore" in measurements and stored and len(stored) == len(samples["P"]):
        # The store writes behind the stream: counted until its last row is written too.
        den = measurements["P_nostore"]
        paired = [float(x) / y for x, y in zip(stored, den["samples"], strict=False) if y > 0]
        ratios["P_stored/P_nostore"] = {
            "value": stats([float(x) for x in stored])["median"] / den["median"],
            "meaning": "P counted until the receiver's store holds the last insight, over "
                       "P without a store", "per_round": stats(paired) if paired else None}
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
    load = render_load_table(results)
    if not ms:
        return load
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
    if load:
        lines += ["", load]
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


def _md_throughput(results: Mapping[str, Any]) -> list[str]:
    pa = results["params"]
    return [
        "### Throughput",
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
    ]


def render_markdown(results: Mapping[str, Any], plot: str | None = None) -> str:
    """docs/BENCHMARKS.md, regenerated from one run's results; ``plot`` is the PNG's path
    relative to the markdown file, if one was drawn."""
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
        ".venv/bin/python -m bench --quick   # N=10,000 (5,000 states) x3, small load runs "
        "once (< 1 min)",
        ".venv/bin/python -m bench           # A/C/P: N=30,000 x5; sync: N=100,000 x3; load "
        "runs x2-3 (~3 min of it)",
        ".venv/bin/python -m bench --sync-reps 5   # five 100,000-state sync rounds (~15 min)",
        ".venv/bin/python -m bench --quick --profile   # also cProfile pear's P and sync "
        "workers",
        ".venv/bin/python -m bench --n 500 --reps 1 --out /tmp/r.json --no-doc  # smoke size",
        ".venv/bin/python -m bench --quick --only P,sync --outbox sqlite  # durable outbox",
        ".venv/bin/python -m bench --explore-a --n 10000 --reps 3  # raw paho variants",
        ".venv/bin/python -m bench --render   # table + this file from bench/results.json",
        ".venv/bin/python -m bench --only latency,bridge,rss,fanin   # issue #8's load "
        "measurements",
        ".venv/bin/python -m bench --only fanin --agents 200 --fanin-mode consortium  "
        "# presence fan-out",
        "```",
        "",
        "`make bench` / `make bench-quick` install the `bench` extra (matplotlib, for the "
        "plot) first. `--help` lists every option. The smoke test "
        "`tests/integration/test_bench_smoke.py` runs the harness at N=500 with tiny load "
        "measurements.",
        "",
        "Each run starts its own mosquitto with the configuration rendered by "
        "`pear_mqtt.ops.brokerconf.render` (consortium mode, mutual TLS, generated ACL) and "
        "throw-away certificates from `pear_mqtt.security.pki`. Every repetition of every "
        "measurement "
        "gets a freshly started broker; the order of the measurements rotates between "
        "repetitions so that no one always runs first. Publisher and subscriber run in "
        "separate spawned processes, synchronised over pipes: the receiver reports after its "
        "SUBACK, the sender starts on a `go` sent after both are connected. No sleeps. "
        "Every worker, raw or pear, freezes the objects its setup allocated (`gc.freeze()`) "
        "before it reports ready, as a long-running application does (pear's agent and "
        "bridge commands do too).",
        "",
        f"Broker settings as rendered: {', '.join(f'`{k} {v}`' for k, v in settings.items())}.",
        "",
        f"## Results ({results['mode']} run, {results['started']}, "
        f"{results.get('measure_s', results['duration_s']):.0f} s)",
        "",
        *md_targets(results),
        *(_md_throughput(results) if results["measurements"] else []),
        *md_load(results, plot),
        *_limits(results),
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
        "- **sync**: pear publishes N retained states (one category each: N insight "
        "envelopes, the states kept in the node's checkpoint pages, pear's default "
        "`reliability.state_topics = false`), after raw paho has put N retained messages of "
        "2,084 bytes (the size of pear's one-insight state envelope) on the topics pear's "
        "per-category states would have; then, in "
        "rotating order, a late-joining `PearNetwork.sync()` takes pear's N states, a raw "
        "paho subscriber (QoS 1, timed from SUBSCRIBE to the N-th retained message) and "
        "`mosquitto_sub -C N` (process start included) raw paho's N retained messages.",
        "- **publish N retained**: pear = N / (first `broadcast_market_insight` to `flush()` "
        "done, pages included); raw paho publishes N retained messages, one topic each, of "
        "the size its joiners read (`size` in the secondary metrics), on a fresh broker. "
        "`publish_retained_many`: pear again, on a fresh broker of its own, the same N states "
        "given to `broadcast_many` 1,000 at a time (the bulk API, as `agent --input` uses "
        "it).",
        "- **latency**: a publisher paced against scheduled send times (`t0 + i / rate`, so "
        "a late send never shifts the next ones) for the warm-up plus the measured seconds; "
        "the subscriber in another process. Latency = arrival at the subscriber - start of "
        "the publish call, both `time.monotonic()` of the same host. Raw paho: QoS 1, MQTT 5 "
        "(pear's protocol), TCP_NODELAY on the client socket (the broker renders "
        "`set_tcp_nodelay true`), a payload of roughly pear's one-insight envelope "
        "(2,100 bytes) carrying its send time. pear: `broadcast_market_insight` under the "
        "consortium policy into a `PearNetwork` that verifies and yields the insight from "
        "`insights()`; the publisher reports each item id with its call time. pear batches "
        "only under load: an insight that arrives alone is signed and sent at once, and "
        "`ReliabilityConfig.batch_linger` (default 2 ms) applies when several arrived since "
        "the sender's last round; `pear` is measured with `batch_linger = 0`, `pear_default` "
        "with the default (at 1,000/s the two should match). `late sends` counts "
        "publish calls that started more than 1 ms after their scheduled time.",
        "- **bridge**: the real `pear-mqtt bridge --config FILE` (consortium source with the "
        "aggregator's private key and the group key; public output on the same all-in-one "
        "broker, which renders the consortium and public ACLs with the bridge user). Once it "
        "is subscribed it is stopped (SIGSTOP); one `PearNetwork` node per company publishes "
        "its share of N (sales sealed to the aggregator) and flushes; the broker queues them "
        "in the bridge's session. Then SIGCONT, and the status file (`--status-file`, every "
        "0.2 s) is polled until `items_received` reaches N; all N must be counted. The rate "
        "is N over the bridge process's own CPU time (utime + stime from /proc/<pid>/stat), "
        "so it is insights aggregated per core whatever else runs on the machine.",
        "- **bridge_scale** (issue #20): the same N contributions, ingested as in **bridge** "
        "(status every 0.05 s), once by one bridge process and once by two scale-out "
        "instances (`pear-mqtt bridge --instance I --instances 2`, one process each, own "
        "sessions and state files; instance 0 also runs the merger). Each instance reads "
        "every message and opens only its partition's (docs/BRIDGE.md, Scale-out). The "
        "figure is wall-clock: N over the time from SIGCONT until the instances' statuses "
        "together count N; the speedup is the one bridge's time over the two instances'. "
        "On a machine with fewer free cores than instances it cannot reach 2x.",
        "- **rss**: `pear-mqtt agent --simulate --rate 0 --count N` with its on-disk SQLite "
        "outbox, to completion, then `pear-mqtt agent --input FILE.jsonl` of `--n-ingest` "
        "insights (30,000 in a full run; written by the same simulation beforehand, one "
        "`model_dump_json` line each, outside the timing), with the worker processes the "
        "agent chooses and again with `--workers 0`: the ingest rates are the insights over "
        "each run's own duration (its final report's). Peak RSS is the agent's own "
        "high-water mark (VmHWM in /proc/<pid>/status, sampled every 10 ms until it exits). "
        "VmHWM also counts the pages "
        "of shared libraries the agent has mapped, which varies with the page cache (58 and "
        "60 MB for one build in two checkouts, its anonymous memory equal), so `peak_anon_mb` "
        "gives the sampled peak of the agent's own memory (RssAnon). `wait4`'s ru_maxrss is "
        "shown too but overstates: Linux carries the spawning benchmark process's high-water "
        "mark across execve.",
        "- **fanin**: the agents are `PearNetwork` nodes, one certificate each (issued with "
        "`pear_mqtt.security.pki.issue` into per-process copies of the CA, because one CA "
        "directory's "
        "registry makes issuing quadratic), a few hundred per process on one asyncio loop "
        "with pear's default reconnect settings. The broker runs with persistence on and as "
        "many file descriptors as the hard limit allows. No reconnect storm means: no 50 ms "
        "window holds more than 10 % of the agents' reconnects, and the restarted broker "
        "accepts at most 1.1 connections per agent.",
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


# What holds each target back when a run misses it, as profiled (py-spy, cProfile and
# per-step timings) on this machine; static text, so it names per-step costs rather than a
# run's figures.
_LIMITS: dict[str, str] = {
    "P/A": (
        "- **P over raw paho (1x)**: pear carries the privacy filter, sealing, signing, "
        "encryption and validation that raw paho's bytes do not, in the same CPU-bound "
        "Python; what makes up for it is batching (one envelope, publish and PUBACK per ~20 "
        "insights under load). Without the receiver's market store P is above raw paho "
        "(`P_nostore`); with it, the receiving process also carries the store's writer "
        "(see the market store below). Compare the rounds of A and P."),
    "P/C": (
        "- **P over C (0.8x)**: both pear processes are CPU-bound Python, each on its own core: "
        "the sender ~40 us per insight (its `broadcast_rate`: the privacy filter about half, "
        "then the item id, sealing, its share of signing, encrypting and publishing the "
        "batch), the receiver ~40 us without its store (validating the `SharedInsight` ~10 us, "
        "its share of the envelope's verification, decryption and JSON, delivery), and the "
        "store's ~9 us a row beside it (the market store below). That caps P "
        "near 20,000-27,000 insights/s on two cores shared with the broker, about raw paho's "
        "rate (A) and two thirds of what mosquitto's C clients move. Signatures are no longer "
        "the limit (one per ~20 insights under load, libsodium)."),
    "latency": (
        "- **latency (1.5x / 2x raw paho)**: at 1,000/s every insight is its own envelope, so "
        "the path carries the filter, one Ed25519 signature (~25 us) and one verification "
        "(~60 us), AES-GCM and validation; warm that is ~0.2 ms of CPU, and at 1,000/s "
        "(processes idle between messages, caches cold, two cores shared by three busy "
        "processes) each step costs 2-3x its warm time. Traced in the receiver: handling one "
        "single-insight envelope takes 0.3 ms at the median (0.2-0.56 ms p10-p99), paho's read "
        "and TLS another ~0.15 ms, about as long as raw paho's whole one-way trip (0.3 ms). "
        "With verification switched off the p50 fell only ~0.1 ms, so no cheaper authenticator "
        "would close the gap. Fixed on the way (each from a trace): held-back states no longer "
        "go all at once once a second (they stalled a paced stream for ~2 ms), a publish is "
        "written inside the call, reading yields after 1 ms so `insights()` readers are not "
        "starved while a receiver catches up (~40 ms seen), and a full garbage collection over "
        "the startup objects (15-40 ms, once per run in one of the processes) is avoided with "
        "`gc.freeze()` in every worker, raw and pear alike, and in the agent and bridge "
        "commands. What remains of the p99 are scattered stalls of a few ms that coincide with "
        "the other processes' bursts on the two shared cores."),
    "bridge": (
        "- **bridge (20,000 per CPU-second)**: profiled over 60,000 contributions (docs/BRIDGE.md, "
        "Cost per insight), ingesting an insight costs ~60 us: the store's transaction ~11 us, "
        "validating the `SharedInsight` ~9 us and the opened `Contribution` ~6.5 us, the rest "
        "of admitting it ~6 us, the receipt digest over canonical JSON ~6 us, its share of the "
        "envelope's verification, decryption and parsing ~11 us, opening the sealed part ~3 us, "
        "the policy check ~3 us, paho and TLS ~2 us. No step is a fifth of it; 50 us needs the "
        "Python work per item itself to shrink. The CPU time counts from the release of the "
        "stopped bridge, so its start-up is not in it. The digest would cost ~1 us printed by "
        "pydantic-core in the order the item was sent, but that needs a new digest version, "
        "which the windows open during an upgrade could not carry (docs/BRIDGE.md)."),
    "publish": (
        "- **publishing N retained states (0.6x raw paho)**: a state is its live insight plus "
        "its share of a checkpoint page (the per-category retained copy is off by default, "
        "`reliability.state_topics`). N states of N distinct categories go several categories "
        "to an envelope (docs/DESIGN.md, Envelope; before, each was its own envelope, publish "
        "and PUBACK: 0.21x), and the 256 pages are signed about once each, at the end (a loop "
        "the sender catches up with is not the end of a burst; before, every page went again "
        "each second). In a profile of the per-call loop (30,000 states) what remains is paid "
        "per state: the privacy filter ~30 %, the item id, the sealed sales part and topics "
        "~16 %, recording the state in its page ~14 %, the outbox ~5 %, against live "
        "envelopes ~11 % and pages ~9 % (signing ~7 % of it all, before envelope v2 signed "
        "a digest of each); `broadcast_many` saves the per-call overhead and filters a "
        "batch's identities and bucket edges once. Raw paho "
        "publishes a prepared payload per message."),
    "sync": (
        "- **sync of N retained states (1.2x raw paho)**: a late joiner reads the 256 checkpoint "
        "pages (each verified once) and validates every state it holds as a `SharedInsight`, as a"
        " live insight is, before handing it on and storing it; raw paho only counts messages. "
        "Per state that is the page's JSON, the model's validators (identifiers, UTC, the "
        "disclosure rules) and the market row. Much of the gap was the joiner's market store: "
        "with it switched off the same sync took 2.98-3.22 s against raw paho's 3.54-3.79 s "
        "(0.85x, two rounds of 100,000 states). Its writer summed the roll-up in Python and went "
        "back for the interpreter after every row, so it fell behind the page decoding and the "
        "node stopped reading at `HOLD_AT` (docs/MARKET.md) once or twice per sync; now SQLite "
        "sums the roll-up and rows go in 256 to a statement: no hold, and 14,000-24,000 rows "
        "still to write when sync() returns (docs/MARKET.md, \"The roll-up in SQLite\"). What is "
        "left is the row each state becomes in the event loop (~2 us) and the writer's CPU on the"
        " shared cores: with the writer doing nothing (rows made, then dropped) the ratio was "
        "1.04 and 0.98 in two rounds that gave 1.39 and 1.46 with it. Each state here is its "
        "own category, so every row adds a roll-up cell, a members row and a `latest` row at "
        "a random place in those trees, and a commit writes pages all over them: the writer "
        "alone took ~20 us a row of a joiner's states, ~16 us since the store has 16 KiB pages "
        "and its roll-up reads each figure's ends once (docs/MARKET.md). The states the joiner "
        "keeps are ~9 objects each that Python's cyclic "
        "collector tracks, so its full collections grow with the snapshot: with the collector "
        "paused only while a page's states were loaded, collections ran while the next page's "
        "JSON was decoded and took ~1.1 s of a 4.8 s sync of 100,000 states; paused while a page "
        "is also verified and decoded, ~0.65 s (measured with `gc.callbacks`), most of it 3 full "
        "collections between pages. Pausing the collector for the whole `sync()` would run fewer "
        "of them, after it returns, but stop collection for every other task of the process "
        "meanwhile."),
    "store": (
        "- **the receiver's market store (0.9x)**: its writer is a thread of the receiving "
        "process, ~9 us a row measured alone: the row built in the event loop ~2.1 us, then "
        "the writer ~6.5 us over rows captured from P's receiver (the `INSERT` and its item "
        "index ~3.4 us, each sender's latest row ~1.3 us, the lookup of held items ~0.6 us, "
        "the commit ~0.5 us, the roll-up of the batch's counted cells ~0.6 us; ~7.5 us before "
        "the store's 16 KiB pages, `latest` without a sort and the roll-up reading each "
        "figure's ends once). So "
        "on this two-core machine it takes CPU from the sender, the broker and the receiver "
        "that P keeps busy. The faster the receiver without it, the larger its share: in "
        "alternating runs before and after group values were validated by their type and "
        "the send path's item ids and outbox rows got cheaper, `P_nostore` rose from "
        "23,200-24,100 to 26,400-27,300 insights/s while P with the store stayed at ~20,000, "
        "so the ratio fell from ~0.87 to ~0.75. Inside the benchmark it costs more than "
        "alone. The receiving process's threads' CPU time (/proc, `--only P` of 90,000 "
        "insights, one run with the store's writer and one with a writer that drops the "
        "rows): the writer thread ~10 us a row; the event loop's thread ~7.6 us an insight "
        "more than in the same run's `P_nostore` with the dropping writer, and ~14.2 us more "
        "with the real one. So about half of the loop's extra comes from sharing the process "
        "with a busy writer (the interpreter's lock and the caches). A 1 ms switch interval "
        "in the receiving process (against 5 ms) did not move P (two alternating pairs of "
        "`--only P`). A writer process, as the agent's workers are, would take the lock out "
        "of it but not the CPU on two saturated cores, and every node would fork one with "
        "its event loop already running."),
    "log": (
        "- **the sender's history log (0.9x)**: each envelope is appended to the log (its bytes "
        "to the data file, an offset to the index file, a leaf hash into the Merkle tree) and "
        "a signed head goes out at intervals; the receiver hashes each envelope into its copy "
        "of the sender's tree (SHA-256 over the envelope, ~12 us for 20 KB) and checks each "
        "head's root once. Until a receiver stopped computing that root again for every "
        "envelope after a head (~24 us an envelope), four alternating runs of `--only P` had "
        "P_log/P at 0.80-0.97 (median 0.91); after, 0.94-1.01 (median 0.97)."),
    "bridge_scale": (
        "- **bridge scale-out (1.7x)**: each instance receives every message of the source "
        "and leaves the other partitions' unopened, told apart by topic (docs/BRIDGE.md, "
        "Scale-out), so reading every message from the socket (and verifying envelopes of "
        "several categories) is paid by both; on this two-core machine the two instances also "
        "share the cores with the broker. Full runs have measured 1.61x to 1.80x (the lower on "
        "an Intel Xeon, the higher on an AMD EPYC), so the target sits inside the spread "
        "between runs and machines."),
    "rss": (
        "- **agent peak RSS (60 MB)**: the third-party and standard modules the agent needs "
        "(pydantic, cryptography, paho, PyNaCl, SQLite, asyncio, ssl) are ~46 MB here once "
        "imported, most of it mapped libraries (cryptography's Rust module alone ~8.6 MB "
        "resident, libpython ~5 MB, pydantic-core ~4 MB, OpenSSL ~4 MB); pear_mqtt's own "
        "modules add ~7 MB (their pydantic schemas among them), and running adds ~9 MB "
        "(~5 MB of its own memory, ~4 MB more of the libraries' pages touched). The "
        "environment layer no longer loads pydantic-settings unless a `PEAR_` variable could "
        "set a field (1.4 MB); `peak_anon_mb` is the agent's own memory. Building the insight "
        "and aggregate models only on first use (pydantic's `defer_build`) changed nothing "
        "measurable (62.2-62.9 MB against 62.4-62.9). The `--input` run's worker processes "
        "are not in this figure; their row in the targets table shows their own."),
}


def _missed(results: Mapping[str, Any]) -> set[str]:
    """The keys of :data:`_LIMITS` (and ``agent``) whose targets this run missed."""
    ratios = results.get("ratios", {})
    out: set[str] = set()
    for key, name, wanted, at_least in (
            ("P/A", "P/A", TARGETS["p_over_a"], True),
            ("P/C", "P/C", TARGETS["p_over_c"], True),
            ("sync", "sync_pear/sync_raw", TARGETS["sync_over_raw"], False),
            ("publish", "publish_retained_pear/publish_retained_raw",
             TARGETS["publish_retained"], True),
            ("store", "P/P_nostore", TARGETS["store_cost"], True),
            ("log", "P_log/P", TARGETS["log_cost"], True)):
        r = ratios.get(name)
        if r and not (r["value"] >= wanted if at_least else r["value"] <= wanted):
            out.add(key)
    lat = results.get("latency")
    if lat and any(r.get("ok") is False for r in lat["ratios"].values()):
        out.add("latency")
    for key in ("bridge", "bridge_scale", "rss"):
        if (results.get(key) or {}).get("ok") is False:
            out.add(key)
    rss = results.get("rss")
    if rss and rss[agent_rate_key(rss)]["median"] < TARGETS["agent_rate"]:
        out.add("agent")
    return out


def _limits(results: Mapping[str, Any]) -> list[str]:
    """"What limits the targets that are missed", for those this run missed."""
    missed = _missed(results)
    bullets = [text for key, text in _LIMITS.items() if key in missed]
    if "agent" in missed:
        bullets += _agent_limits(results)
    if not bullets:
        return []
    return ["## What limits the targets that are missed", "", *bullets, ""]


def _agent_limits(results: Mapping[str, Any]) -> list[str]:
    """The agent's bullet of "What limits", from the stages this run measured."""
    rss = results.get("rss") or {}
    text = ("- **edge agent ingest (25,000/s, 40 us an insight)**: the target is judged on "
            "the agent's own run (its report's duration: connected, every insight stored and "
            "acknowledged), without the interpreter's start-up and imports (~0.4 s of CPU)")
    if "stage_input_run_us" in rss:
        items = rss.get("input_items", rss.get("items", {})).get("max", 0)
        text += (f", reading a JSON-lines file of {items:,.0f} insights (`--input`), as a "
                 "store's export arrives; the simulation (`--simulate`) is shown beside it.")
    else:
        text += "."

    def us(key: str) -> str:
        return f"{rss[key]['median']:.0f} us"
    workers = rss.get("input_workers", {}).get("median", 0)
    if "input_alone_run_rate" in rss and not workers:
        text += (" The file was prepared in the agent's own process (no worker processes: "
                 "one CPU, or a file under 1 MiB).")
    elif "input_alone_run_rate" in rss:
        text += (f" By default {workers:.0f} worker process(es) (one fewer than the CPUs) "
                 "read, validate, filter and seal the file's lines while the agent's process "
                 "stores and sends them in file order (docs/DESIGN.md, Edge agent): "
                 f"{rss['input_run_rate']['median']:,.0f}/s, against "
                 f"{rss['input_alone_run_rate']['median']:,.0f}/s with `--workers 0`. CPU "
                 "per insight in the run with workers: the agent's process "
                 f"{us('input_cpu_us')} (its start-up and imports included), the workers "
                 f"{us('input_workers_cpu_us')}; alone, the agent's process "
                 f"{us('input_alone_cpu_us')}. The two processes and the broker share the "
                 "machine's cores, so the rate is bounded by the busier of them and by what "
                 "the other needs of the second core.")
    if "stage_input_run_us" in rss:
        text += (" Per insight the run from the file in one process took "
                 f"{us('stage_input_run_us')}: "
                 f"reading and validating the line {us('stage_read_us')} (pydantic-core "
                 "parses and validates in one pass), the privacy filter "
                 f"{us('stage_filter_us')} (per batch: identities and bucket edges once; per "
                 "insight its groups, buckets and the rule check it ends with), the SQLite "
                 f"outbox {us('stage_outbox_us')} (put and commit, read back, delete), and "
                 f"{us('stage_input_rest_us')} the rest (item id and sealed part, and per "
                 "envelope the signature, encryption, history log and socket write; "
                 "docs/DESIGN.md, Edge agent). From the simulation it took "
                 f"{us('stage_run_us')}, simulating {us('stage_simulate_us')} of it (the "
                 "random walk and the pydantic model each insight is). The stages are timed "
                 "warm in the benchmark process; the rest is the run's time less theirs, so it "
                 "also holds what the stages cost more inside the agent.")
    elif "stage_run_us" in rss:
        text += (f" Per insight the run took {us('stage_run_us')}: simulating it "
                 f"{us('stage_simulate_us')}, the privacy filter {us('stage_filter_us')}, the "
                 f"SQLite outbox {us('stage_outbox_us')} and {us('stage_rest_us')} the rest.")
    return [text]


def render_plot(results: Mapping[str, Any], path: Path) -> bool:
    """A PNG of throughput (A, C, P, sync ratio with min/max) and latency (CDF pear vs raw
    paho, plus the reconnect histogram when measured); False when matplotlib is missing or
    there is nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ms = results.get("measurements", {})
    lat = results.get("latency")
    fi = results.get("fanin")
    panels = [p for p, ok in (("throughput", bool(ms)), ("latency", bool(lat)),
                              ("fanin", bool(fi))) if ok]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "throughput":
            names = [k for k in ("A", "A_mqtt5", "C", "P") if k in ms]
            labels = [{"A_mqtt5": "A5"}.get(k, k) for k in names]
            med = [ms[k]["median"] for k in names]
            err = [[m - ms[k]["min"] for k, m in zip(names, med, strict=True)],
                   [ms[k]["max"] - m for k, m in zip(names, med, strict=True)]]
            ax.bar(labels, med, yerr=err, capsize=4, color="#4c72b0")
            if "sync_pear" in ms and "sync_raw" in ms:
                rate = [ms[k]["extra"]["rate"] for k in ("sync_pear", "sync_raw")]
                ax.bar(["sync pear", "sync raw"], [r["median"] for r in rate],
                       yerr=[[r["median"] - r["min"] for r in rate],
                             [r["max"] - r["median"] for r in rate]],
                       capsize=4, color="#dd8452")
            ax.set_ylabel("messages / insights / states per second")
            ax.set_title("Throughput (median, min..max)")
        elif panel == "latency":
            assert lat is not None
            for v, m in lat["variants"].items():
                pts = m["cdf"]
                ax.plot([p[0] for p in pts], [1 - p[1] + 1e-6 for p in pts], label=v)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("one-way latency (ms)")
            ax.set_ylabel("fraction slower (1 - CDF)")
            ax.set_title(f"Latency at {lat['rate']:,.0f}/s (all repetitions)")
            ax.legend()
        else:
            assert fi is not None
            h = fi["histogram"]
            xs = [h["start_after_up_s"] + i * h["bin_ms"] / 1000 for i in range(len(h["counts"]))]
            ax.bar(xs, h["counts"], width=h["bin_ms"] / 1000, align="edge", color="#55a868")
            ax.set_xlabel("seconds after the broker was back")
            ax.set_ylabel(f"reconnects per {h['bin_ms']:.0f} ms")
            ax.set_title(f"Reconnects of {fi['agents']['max']:.0f} agents after a restart")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
