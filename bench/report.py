"""Statistics, machine description, ``results.json``, the stdout table and BENCHMARKS.md."""

from __future__ import annotations

import json
import math
import os
import platform
import pstats
import ssl
import statistics
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

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
        *_md_targets(results),
        *(_md_throughput(results) if results["measurements"] else []),
        *_md_load(results, plot),
        *_LIMITS,
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
        "outbox, to completion; peak RSS is the agent's own high-water mark (VmHWM in "
        "/proc/<pid>/status, sampled every 10 ms until it exits). VmHWM also counts the pages "
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


# What holds the missed targets back, as profiled (py-spy, cProfile and per-step timings) on
# this machine; static text, so it names per-step costs rather than a run's figures.
_LIMITS = [
    "## What limits the targets that are missed",
    "",
    "- **P over C (0.8x)**: both pear processes are CPU-bound Python, each on its own core: "
    "the sender spends ~50 us per insight (privacy filter ~19 us, sealing the aggregated "
    "groups ~5 us, outbox and bookkeeping ~15 us, its share of signing, encrypting and "
    "publishing the batch ~8 us), the receiver ~45 us (validating the `SharedInsight` ~9 us, "
    "JSON ~4 us, decryption and base64 ~4 us, its share of one Ed25519 verification ~3 us, "
    "delivery ~10 us). That caps P near 20,000 insights/s on two cores, above raw paho (A) "
    "but about half of what mosquitto's C clients move. Signatures are no longer the limit "
    "(one per ~20 insights under load, libsodium).",
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
    "the other processes' bursts on the two shared cores.",
    "- **bridge (20,000 per CPU-second)**: per insight it decodes its share of an envelope "
    "(~8 us), validates the `SharedInsight` (~9 us) and the opened `Contribution` (~6 us), "
    "opens the sealed token (~5 us), computes the receipt digest over canonical JSON "
    "(~10 us), checks policy and window (~5 us) and stores the row (~6 us, 64 messages per "
    "transaction), besides paho and TLS: ~75-90 us. A quick run (3,000 items) also charges "
    "the process's start-up (~0.5 s of CPU: imports, pydantic schemas) to the rate.",
    "- **history repair (20,000 entries/s)**: entries are proven a range at a time against "
    "the sender's signed head (no signature per entry) and travel raw behind a signed "
    "answer, up to 8 MB per request; what is left is per byte, on one core for both nodes: "
    "the sender's disk read and TLS writes, the receiver's TLS reads (paho, one 16 kB record "
    "per call) and the SHA-256 of every entry (its leaf hash). The bench's entries average "
    "~7.3 kB, so the rate is ~120 MB/s of log; on this shared machine it ranged from "
    "7,000 to 18,000 entries/s between runs. The insights in them are delivered behind the "
    "repair at the receiver's validation speed (`insight_rate`), from a backlog bounded at "
    "64 MB: a repair longer than that runs at the delivery rate (docs/HISTORY.md).",
    "- **publishing N retained states (0.6x raw paho)**: a state that is the first of its "
    "category costs two signed envelopes, the live insight and the retained state (two "
    "Ed25519 signatures, two AES-GCM encryptions, two MQTT 5 publishes with paho's property "
    "objects), plus its share of a checkpoint page; raw paho publishes one message. Profiled "
    "(cProfile, 10,000 categories): signing ~60 us, paho's publish path and TLS write "
    "~250 us, PUBACK handling ~110 us per message; the flusher's scan of every dirty "
    "checkpoint page per round (~20 % of the run) is gone (only pages due mid-stream are "
    "looked at). Reaching 0.6x needs one message per state, i.e. the retained state doubling "
    "as the live insight: a wire change left for a later release.",
    "- **edge agent ingest (25,000/s)**: per insight, in process (20,000 insights, SQLite "
    "outbox): privacy filter, sealing and item id ~80 us, the outbox rows (insight and "
    "state) ~70 us, deleting acknowledged rows ~65 us when each PUBACK had its own "
    "transaction. Now the agent reads its sources in batches and stores each with "
    "`broadcast_many` (one transaction per 128 insights) and the PUBACKs of one socket read "
    "are deleted in one transaction: ~4-5x the rate before, still CPU-bound on the filter "
    "and SQLite's per-row work.",
    "",
]


# -- load measurements (latency, bridge, rss, fanin) ----------------------------------------

# Issue #8's targets. Benchmarks are not tests: a miss is reported, never fails anything.
TARGETS = {
    "latency_p50": 1.5,  # pear p50 / raw paho p50 at 1,000/s, at most
    "latency_p99": 2.0,  # pear p99 / raw paho p99, at most
    "bridge_per_core": 20_000.0,  # insights aggregated per CPU-second, at least
    "bridge_scale": 1.7,  # issue #20: 2 bridge instances' wall-clock ingest over one's, at least
    "p_over_a": 1.0,  # P / A, at least
    "p_over_c": 0.8,  # P / C, at least
    "sync_over_raw": 1.2,  # pear sync() time / raw paho time for N retained states, at most
    "rss_mb": 60.0,  # an edge agent's peak RSS under load, at most
    "agent_rate": 25_000.0,  # issue #21: durable agent ingest, insights/s, at least
    "publish_retained": 0.6,  # issue #21: pear retained states/s over raw paho's, at least
    "storm_share": 0.10,  # share of the agents reconnecting in one 50 ms window, at most
    "storm_accepts": 1.10,  # connections the restarted broker accepted per agent, at most
    "log_cost": 0.9,  # issue #17: P with the sender's history log / P without, at least
    "store_cost": 0.9,  # issue #18: P with the market store / P without, at least
    "market_ingest": 50_000.0,  # issue #18: verified rows/s into the store, at least
    "market_grouped_ms": 20.0,  # issue #18: category x 90 days grouped query p50, at most
    "market_position_ms": 5.0,  # issue #18: price_position p50, at most
    "repair_rate": 20_000.0,  # issue #17: log entries repaired and verified per second
}

LAT_LABELS = {
    "raw": "raw paho, QoS 1, MQTT 5, TCP_NODELAY",
    "pear": "pear broadcast -> insights(), batch_linger 0",
    "pear_default": "pear, default batch_linger (2 ms)",
}


def _numeric_stats(reps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """min / median / max (and the samples) of every numeric key the repetitions share."""
    out: dict[str, Any] = {}
    for k in reps[0]:
        vals = [r.get(k) for r in reps]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals):
            floats = [float(v) for v in vals]  # type: ignore[arg-type]
            out[k] = {**_stats(floats), "samples": floats}
    return out


def summarise_load(lat: Mapping[str, list[dict[str, Any]]],
                   samples: Mapping[str, list[dict[str, Any]]],
                   params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``latency``, ``bridge``, ``rss`` and ``fanin`` sections of results.json (only
    those measured), each with its target and verdict."""
    from .loadscenarios import cdf_points, percentile

    out: dict[str, Any] = {}
    if any(lat.values()):
        variants: dict[str, Any] = {}
        for v, reps in lat.items():
            if not reps:
                continue
            pooled = sorted(x for r in reps for x in r["sorted"])
            plain = [{k: x for k, x in r.items() if k != "sorted"} for r in reps]
            variants[v] = {"label": LAT_LABELS.get(v, v), **_numeric_stats(plain),
                           "pooled": {"n": len(pooled), "p50_ms": percentile(pooled, 50),
                                      "p99_ms": percentile(pooled, 99),
                                      "p999_ms": percentile(pooled, 99.9),
                                      "max_ms": pooled[-1] if pooled else math.nan},
                           "cdf": cdf_points(pooled)}
        ratios: dict[str, Any] = {}
        for name in ("pear", "pear_default"):
            if name not in variants or "raw" not in variants:
                continue
            for q, target in (("p50", TARGETS["latency_p50"]), ("p99", TARGETS["latency_p99"]),
                              ("p999", None), ("max", None)):
                a = variants[name][f"{q}_ms"]
                b = variants["raw"][f"{q}_ms"]
                value = a["median"] / b["median"]
                paired = [x / y for x, y in zip(a["samples"], b["samples"], strict=False)]
                ratios[f"{name}/raw {q}"] = {
                    "value": value, "per_round": _stats(paired), "target": target,
                    "ok": None if target is None else value <= target}
        out["latency"] = {"rate": params["lat_rate"], "seconds": params["lat_seconds"],
                          "warmup": params["lat_warmup"], "raw_payload": params["lat_size"],
                          "linger": params["lat_linger"], "variants": variants,
                          "ratios": ratios}
    if samples.get("bridge"):
        st = _numeric_stats(samples["bridge"])
        med = st["rate"]["median"]
        out["bridge"] = {**st, "target": TARGETS["bridge_per_core"],
                         "ok": med >= TARGETS["bridge_per_core"]}
    if samples.get("bridge_scale"):
        st = _numeric_stats(samples["bridge_scale"])
        out["bridge_scale"] = {**st, "target": TARGETS["bridge_scale"],
                               "ok": st["speedup"]["median"] >= TARGETS["bridge_scale"]}
    if samples.get("rss"):
        st = _numeric_stats(samples["rss"])
        out["rss"] = {**st, "target_mb": TARGETS["rss_mb"],
                      "ok": st["peak_mb"]["max"] <= TARGETS["rss_mb"]}
    if samples.get("market"):
        reps = samples["market"]
        st = _numeric_stats(reps)
        out["market"] = {**st, "duckdb": reps[-1].get("duckdb"),
                         "ok": {"ingest": _med(st, "ingest_rate") >= TARGETS["market_ingest"],
                                "grouped": _med(st, "grouped_p50_ms")
                                <= TARGETS["market_grouped_ms"],
                                "position": _med(st, "position_p50_ms")
                                <= TARGETS["market_position_ms"]}}
    if samples.get("repair"):
        st = _numeric_stats(samples["repair"])
        out["repair"] = {**st, "target": TARGETS["repair_rate"],
                         "ok": _med(st, "rate") >= TARGETS["repair_rate"]}
    if samples.get("fanin"):
        reps = samples["fanin"]
        st = _numeric_stats(reps)
        share = st["max_per_50ms_share"]["max"]
        accepts = st["accepted_after_restart"]["max"] / st["agents"]["max"]
        out["fanin"] = {**st, "mode": params["fanin_mode"],
                        "downtime_s": params["fanin_downtime"],
                        "histogram": reps[-1]["histogram"],
                        "storm_criterion": {"max_share_per_50ms": TARGETS["storm_share"],
                                            "max_accepts_per_agent": TARGETS["storm_accepts"]},
                        "storm": share > TARGETS["storm_share"]
                        or accepts > TARGETS["storm_accepts"]}
    return out


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "MISSED")


def _med(section: Mapping[str, Any], key: str) -> float:
    return float(section[key]["median"])


def load_rows(results: Mapping[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """(measurement, unit, min, median, max, target / verdict) rows of the load sections."""
    rows: list[tuple[str, str, str, str, str, str]] = []

    def row(label: str, unit: str, s: Mapping[str, Any], fmt: str, target: str = "") -> None:
        rows.append((label, unit, format(s["min"], fmt), format(s["median"], fmt),
                     format(s["max"], fmt), target))

    lat = results.get("latency")
    if lat:
        for v, m in lat["variants"].items():
            for q in ("p50", "p99", "p999", "max"):
                row(f"latency {v}: {q.replace('p999', 'p99.9')}", "ms", m[f"{q}_ms"], ".2f")
        for name, r in lat["ratios"].items():
            if r["target"] is not None:
                rows.append((f"latency ratio {name}", "x", f"{r['per_round']['min']:.2f}",
                             f"{r['value']:.2f}", f"{r['per_round']['max']:.2f}",
                             f"<= {r['target']:g}x {_verdict(r['ok'])}"))
    br = results.get("bridge")
    if br:
        row("bridge: insights per CPU-second", "insights/s", br["rate"], ",.0f",
            f">= {br['target']:,.0f} {_verdict(br['ok'])}")
        row("bridge: wall-clock ingest rate", "insights/s", br["wall_rate"], ",.0f")
    bs = results.get("bridge_scale")
    if bs:
        row("bridge scale-out: one instance, wall", "insights/s", bs["single_wall_rate"],
            ",.0f")
        row(f"bridge scale-out: {bs['instances']['max']:.0f} instances, wall", "insights/s",
            bs["scaled_wall_rate"], ",.0f")
        row("bridge scale-out: speedup", "x", bs["speedup"], ".2f",
            f">= {bs['target']:g}x {_verdict(bs['ok'])}")
    rss = results.get("rss")
    if rss:
        row("agent peak RSS (VmHWM)", "MB", rss["peak_mb"], ".1f",
            f"<= {rss['target_mb']:g} {_verdict(rss['ok'])}")
        if "peak_anon_mb" in rss:
            row("agent peak own memory (RssAnon, sampled)", "MB", rss["peak_anon_mb"], ".1f")
        row("agent send rate (--rate 0, incl. start-up)", "insights/s", rss["rate"], ",.0f")
    rp = results.get("repair")
    if rp:
        row("history repair: log entries fetched and verified", "entries/s", rp["rate"],
            ",.0f", f">= {rp['target']:,.0f} {_verdict(rp['ok'])}")
        if "mb_rate" in rp:
            row("history repair: the same in MB of log", "MB/s", rp["mb_rate"], ",.1f")
        row("history repair: their insights delivered (behind it)", "insights/s",
            rp["insight_rate"], ",.0f")
    mk = results.get("market")
    if mk:
        n = int(mk["rows"]["max"])
        row("market store: verified rows in (batches of 5,000)", "rows/s", mk["ingest_rate"],
            ",.0f", f">= {TARGETS['market_ingest']:,.0f} {_verdict(mk['ok']['ingest'])}")
        row(f"market store: category x 90 days by day, {n:,} rows", "ms p50",
            mk["grouped_p50_ms"], ".2f",
            f"<= {TARGETS['market_grouped_ms']:g} {_verdict(mk['ok']['grouped'])}")
        row(f"market store: price_position, {n:,} rows", "ms p50", mk["position_p50_ms"],
            ".2f", f"<= {TARGETS['market_position_ms']:g} {_verdict(mk['ok']['position'])}")
        row("market store: bytes on disk per insight", "B", mk["bytes_per_insight"], ",.0f")
    fi = results.get("fanin")
    if fi:
        n = int(fi["agents"]["max"])
        row(f"fan-in: {n} agents all connected", "s", fi["connect_all_s"], ".2f")
        row("fan-in: connect p50 per agent", "ms", fi["connect_p50_ms"], ",.0f")
        row("fan-in: connect p99 per agent", "ms", fi["connect_p99_ms"], ",.0f")
        row("fan-in: reconnect spread (first..last)", "s", fi["spread_s"], ".2f")
        row("fan-in: last reconnect after broker up", "s", fi["last_after_up_s"], ".2f")
        row("fan-in: max reconnects in 50 ms", "agents", fi["max_per_50ms"], ".0f",
            f"<= {TARGETS['storm_share']:.0%} of agents "
            f"{_verdict(not fi['storm'])}")
        row("fan-in: connections accepted after restart", "conns",
            fi["accepted_after_restart"], ".0f")
    return rows


def render_load_table(results: Mapping[str, Any]) -> str:
    rows = load_rows(results)
    if not rows:
        return ""
    head = ("load measurement", "unit", "min", "median", "max", "target")
    allr = [head, *rows]
    widths = [max(len(r[i]) for r in allr) for i in range(6)]
    lines = []
    for i, r in enumerate(allr):
        lines.append("  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]),
                                *(c.rjust(w) for c, w in zip(r[2:5], widths[2:5], strict=True)),
                                r[5]]))
        if i == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def _md_rows(rows: Sequence[Sequence[str]], head: Sequence[str],
             align: Sequence[str]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _md_targets(results: Mapping[str, Any]) -> list[str]:
    rows: list[list[str]] = []
    ratios = results.get("ratios", {})
    for key, label, wanted, at_least in (
            ("P/A", "P: pear verified insights/s over raw paho (A)", TARGETS["p_over_a"], True),
            ("P/C", "P over mosquitto's C clients (C)", TARGETS["p_over_c"], True),
            ("sync_pear/sync_raw", "sync of N retained states, pear time / raw paho time",
             TARGETS["sync_over_raw"], False),
            ("publish_retained_pear/publish_retained_raw",
             "publishing N retained states, pear states/s over raw paho msgs/s",
             TARGETS["publish_retained"], True),
            ("P/P_nostore", "P with the receiver's market store over P without it",
             TARGETS["store_cost"], True),
            ("P_log/P", "P with the sender's history log (logging, leaf hashes, signed "
             "heads) over P without it", TARGETS["log_cost"], True)):
        r = ratios.get(key)
        if r:
            ok = r["value"] >= wanted if at_least else r["value"] <= wanted
            rows.append([label, f"{'>=' if at_least else '<='} {wanted:g}x",
                         f"{r['value']:.2f}x (rounds {r['per_round']['min']:.2f}.."
                         f"{r['per_round']['max']:.2f})", _verdict(ok)])
    lat = results.get("latency")
    if lat:
        for q, label in (("p50", "latency p50, pear / raw paho at 1,000/s"),
                         ("p99", "latency p99, pear / raw paho at 1,000/s")):
            r = lat["ratios"].get(f"pear/raw {q}")
            if r:
                rows.append([label, f"<= {r['target']:g}x", f"{r['value']:.2f}x",
                             _verdict(r["ok"])])
    br = results.get("bridge")
    if br:
        rows.append(["bridge, insights aggregated per CPU-second",
                     f">= {br['target']:,.0f}", f"{_med(br, 'rate'):,.0f}", _verdict(br["ok"])])
    bs = results.get("bridge_scale")
    if bs:
        rows.append([f"bridge scale-out, {bs['instances']['max']:.0f} instances over one, "
                     "insights aggregated per second of wall time",
                     f">= {bs['target']:g}x", f"{_med(bs, 'speedup'):.2f}x",
                     _verdict(bs["ok"])])
    rss = results.get("rss")
    if rss:
        rows.append(["edge agent peak RSS under load (max of runs)",
                     f"<= {rss['target_mb']:g} MB", f"{rss['peak_mb']['max']:.1f} MB",
                     _verdict(rss["ok"])])
        rate = _med(rss, "rate")
        rows.append(["edge agent durable ingest (`agent --simulate --rate 0`, SQLite outbox)",
                     f">= {TARGETS['agent_rate']:,.0f}/s", f"{rate:,.0f}/s",
                     _verdict(rate >= TARGETS["agent_rate"])])
    rp = results.get("repair")
    if rp:
        rows.append(["history repair by a late joiner, log entries/s (verified)",
                     f">= {rp['target']:,.0f}/s", f"{_med(rp, 'rate'):,.0f}/s",
                     _verdict(rp["ok"])])
    mk = results.get("market")
    if mk:
        n = int(mk["rows"]["max"])
        for key, label, goal, ok in (
                ("ingest_rate", "market store: verified rows/s in (batched commits)",
                 f">= {TARGETS['market_ingest']:,.0f}/s", mk["ok"]["ingest"]),
                ("grouped_p50_ms", f"market store: category x 90 days by day over {n:,} "
                 "insights, p50", f"<= {TARGETS['market_grouped_ms']:g} ms",
                 mk["ok"]["grouped"]),
                ("position_p50_ms", f"market store: `price_position` over {n:,} insights, "
                 "p50", f"<= {TARGETS['market_position_ms']:g} ms", mk["ok"]["position"])):
            unit = "/s" if key == "ingest_rate" else " ms"
            fmt = ",.0f" if key == "ingest_rate" else ".2f"
            rows.append([label, goal, f"{_med(mk, key):{fmt}}{unit}", _verdict(ok)])
    fi = results.get("fanin")
    if fi:
        n = int(fi["agents"]["max"])
        rows.append([f"{n} agents connect, no reconnect storm after a broker restart",
                     f"<= {TARGETS['storm_share']:.0%} of agents per 50 ms, "
                     f"<= {TARGETS['storm_accepts']:g} accepted connections per agent",
                     f"max {fi['max_per_50ms_share']['max']:.1%} per 50 ms, "
                     f"{fi['accepted_after_restart']['max'] / n:.2f} per agent",
                     _verdict(not fi["storm"])])
    if not rows:
        return []
    return ["### Targets (issues #8, #17, #18 and #21)", "",
            "Benchmarks are not tests: a missed target is reported here, nothing fails on it.",
            "", *_md_rows(rows, ("target", "wanted", "measured (median)", "verdict"),
                          ("---", "---", "---:", "---")), ""]


def _stat_rows(section: Mapping[str, Any], keys: Sequence[tuple[str, int]]) -> list[list[str]]:
    """(metric, min, median, max) rows of the ``keys`` a section has, ``d`` decimals each."""
    return [[k, *(f"{section[k][q]:,.{d}f}" for q in ("min", "median", "max"))]
            for k, d in keys if k in section]


def _md_load(results: Mapping[str, Any], plot: str | None) -> list[str]:
    out: list[str] = []
    lat = results.get("latency")
    lr = results["params"].get("load_reps", {})
    if lat:
        rows = []
        for v, m in lat["variants"].items():
            rows.append([f"`{v}`: {m['label']}", *(f"{m[f'{q}_ms']['median']:.2f}"
                                        for q in ("p50", "p90", "p99", "p999", "max")),
                         f"{m['pooled']['p999_ms']:.2f}",
                         f"{m['late_over_1ms']['max']:.0f}"])
        out += ["### Latency at a fixed rate", "",
                f"{lat['rate']:,.0f} messages / insights per second for {lat['seconds']:g} s "
                f"after {lat['warmup']:g} s of warm-up, {lr.get('latency', '?')} "
                "repetition(s) per variant; one-way, publisher process to subscriber process; "
                "each cell is the median over repetitions (the pooled p99.9 column takes all "
                "repetitions' samples together).", "",
                *_md_rows(rows, ("variant", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms",
                                 "pooled p99.9 ms", "late sends (>1 ms)"),
                          ("---", "---:", "---:", "---:", "---:", "---:", "---:", "---:")), ""]
        rrows = []
        for name, r in lat["ratios"].items():
            pr = r["per_round"]
            tgt = f"<= {r['target']:g}x" if r["target"] is not None else "-"
            rrows.append([name, f"{r['value']:.2f}", f"{pr['min']:.2f}..{pr['max']:.2f}", tgt,
                          _verdict(r["ok"])])
        out += [*_md_rows(rrows, ("ratio", "median / median", "paired per round", "target",
                                  "verdict"), ("---", "---:", "---:", "---", "---")), ""]
        pear = lat["variants"].get("pear")
        if pear and "callback_p50_ms" in pear:
            out += [f"pear's `on_insight` callback sees an insight before `insights()` yields "
                    f"it: callback p50 {pear['callback_p50_ms']['median']:.2f} ms, p99 "
                    f"{pear['callback_p99_ms']['median']:.2f} ms. pear sends "
                    f"{pear['envelopes_per_insight']['median']:.2f} envelopes per insight at "
                    "this rate (the insight and the category's retained state).", ""]
        stuck = {v: m["unflushed"]["max"] for v, m in lat["variants"].items()
                 if "unflushed" in m and m["unflushed"]["max"] > 0}
        if stuck:
            out += ["**`flush()` did not return within 30 s after a latency run** (rows "
                    "still unacknowledged, max over repetitions): "
                    + ", ".join(f"`{v}` {n:.0f}" for v, n in stuck.items())
                    + ". Every insight had reached the receiver.", ""]
    br = results.get("bridge")
    if br:
        rows = _stat_rows(br, (("rate", 0), ("wall_rate", 0), ("cpu_s", 2), ("cpu_share", 2)))
        out += ["### Bridge ingest", "",
                f"`pear-mqtt bridge` ingesting {br['items']['max']:,.0f} consortium "
                f"contributions from {br['companies']['max']:.0f} companies "
                f"({lr.get('bridge', '?')} repetition(s)): `rate` = insights per CPU-second "
                "of the bridge process, `wall_rate` = its own `items_per_second`, `cpu_s` = "
                "its CPU time, `cpu_share` = CPU time over wall time.", "",
                *_md_rows(rows, ("metric", "min", "median", "max"),
                          ("---", "---:", "---:", "---:")), ""]
    bs = results.get("bridge_scale")
    if bs:
        rows = _stat_rows(bs, (("single_wall_rate", 0), ("scaled_wall_rate", 0),
                               ("speedup", 2), ("largest_share", 2), ("single_cpu_s", 2),
                               ("scaled_cpu_s", 2)))
        out += ["### Bridge scale-out", "",
                f"The same {bs['items']['max']:,.0f} consortium contributions ingested once by "
                f"one `pear-mqtt bridge` process and once by {bs['instances']['max']:.0f} "
                "scale-out instances (`--instance I --instances N`, one process each, "
                f"instance 0 also merging) on {bs['cpus']['max']:.0f} CPUs "
                f"({lr.get('bridge_scale', '?')} repetition(s)): wall-clock insights per "
                "second from releasing the stopped bridge until every instance counted its "
                "share; `largest_share` = the busiest instance's part of the input "
                "(docs/BRIDGE.md, Scale-out).", "",
                *_md_rows(rows, ("metric", "min", "median", "max"),
                          ("---", "---:", "---:", "---:")), ""]
    rss = results.get("rss")
    if rss:
        rows = _stat_rows(rss, (("peak_mb", 1), ("peak_anon_mb", 1), ("ru_maxrss_mb", 1),
                             ("median_rss_mb", 1), ("rate", 0), ("seconds", 2)))
        out += ["### Edge agent memory", "",
                f"`pear-mqtt agent --simulate --rate 0 --count {rss['items']['max']:,.0f}` "
                f"with its on-disk outbox ({lr.get('rss', '?')} repetition(s)).", "",
                *_md_rows(rows, ("metric", "min", "median", "max"),
                          ("---", "---:", "---:", "---:")), ""]
    fi = results.get("fanin")
    if fi:
        keys = (("connect_all_s", 2), ("connect_p50_ms", 0), ("connect_p99_ms", 0),
                ("connect_max_ms", 0), ("outage_s", 2), ("first_after_up_s", 2),
                ("last_after_up_s", 2), ("spread_s", 2), ("max_per_50ms", 0),
                ("accepted_after_restart", 0), ("reconnects", 0), ("issue_s", 2))
        rows = _stat_rows(fi, keys)
        h = fi["histogram"]
        out += ["### Fan-in and reconnect after a broker restart", "",
                f"{fi['agents']['max']:.0f} `PearNetwork` nodes ({fi['mode']} mode, one "
                f"certificate each) in {fi['workers']['max']:.0f} processes connect at once "
                "to a broker with persistence on; then the broker is killed (SIGKILL) and "
                f"restarted {fi['downtime_s']:g} s later on the same port "
                f"({lr.get('fanin', '?')} repetition(s)). Connect times are from the start "
                "signal to `connect()` returning; reconnect times are when each node's "
                "`wait_connected()` returned again. `accepted_after_restart` counts "
                "`New client connected` lines of the restarted broker (more than one per "
                "node would be a retry storm).", "",
                *_md_rows(rows, ("metric", "min", "median", "max"),
                          ("---", "---:", "---:", "---:")), "",
                f"Reconnects per {h['bin_ms']:.0f} ms (last repetition, from "
                f"{h['start_after_up_s']:+.2f} s after the broker was back): "
                f"`{' '.join(str(c) for c in h['counts'])}`", ""]
    mk = results.get("market")
    if mk:
        rows = _stat_rows(mk, (("rows", 0), ("ingest_rate", 0), ("grouped_p50_ms", 2),
                             ("position_p50_ms", 2), ("bytes_per_insight", 0)))
        out += ["### Market store", "",
                "`pear_mqtt.market.MarketStore` filled in batches of 5,000 with verified "
                "consortium insights (price buckets, direction, pseudonymous members; 20 "
                "categories, 5 regions, 40 members, a year of windows), as a receiver hands "
                "them over; then a category x 90 days query grouped by day and "
                "`price_position` for 60 categories and windows each "
                f"({results['params'].get('load_reps', {}).get('market', '?')} "
                "repetition(s)). What keeping the store costs a live stream is the ratio "
                "P/P_nostore above.", "",
                *_md_rows(rows, ("metric", "min", "median", "max"),
                          ("---", "---:", "---:", "---:")), ""]
        dk = mk.get("duckdb")
        if dk:
            out += [f"The same workload in DuckDB {dk['version']} ({dk['rows']:,} rows, the "
                    "grouped query over the raw rows, positions as the latest row per sender):"
                    f" {dk['insert_rate']:,.0f} rows/s inserted as Arrow batches of 5,000 "
                    f"({dk['row_insert_rate']:,.0f} rows/s row by row), grouped p50 "
                    f"{dk['grouped_p50_ms']:.2f} ms, position p50 "
                    f"{dk['position_p50_ms']:.2f} ms. Why the store is SQLite nonetheless: "
                    "docs/MARKET.md.", ""]
    rp = results.get("repair")
    if rp:
        rows = _stat_rows(rp, tuple((k, d) for k, d in (
            ("insights", 0), ("entries", 0), ("seconds", 2), ("rate", 0), ("mb_rate", 1),
            ("delivered_seconds", 2), ("insight_rate", 0)) if k in rp))
        out += ["### History repair", "",
                "A sender broadcasts the insights (64 per `broadcast_many`) and flushes; then "
                "a node that was never there connects and the clock runs until it holds the "
                "sender's log up to its signed head, every entry fetched by log requests and "
                "proven against that head by range proofs (`rate`, `mb_rate`); the insights "
                "in them are delivered behind the repair, through decryption and validation "
                "(`delivered_seconds` from the same start, `insight_rate`). Both nodes share "
                "this process and one core. docs/HISTORY.md, \"Repair\", says how.", "",
                *_md_rows(rows, ("metric", "min", "median", "max"),
                          ("---", "---:", "---:", "---:")), ""]
    if plot:
        out += [f"![throughput and latency]({plot})", ""]
    return out


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
