"""One repetition of each of issue #8's load measurements: latency at a fixed rate, bridge
ingest per core, an edge agent's peak RSS, and fan-in of many agents with a broker restart.

Like :mod:`bench.scenarios`, every function gets an environment pointing at a broker that
was started for it alone (the fan-in also gets the :class:`~bench.env.Broker` itself, to kill
and restart it) and returns plain numbers.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .env import BRIDGE_COMPANIES, BenchEnv, Broker
from .procs import Worker, WorkerError
from .scenarios import run_pair
from .workers import pear_config

__all__ = ["LoadParams", "cdf_points", "percentile", "run_bridge", "run_bridge_scale",
           "run_fanin", "run_latency", "run_rss"]

# Roughly the size of pear's envelope for one insight under the consortium policy: sync_raw
# measures pear's state envelopes (one insight each) at 2,084 bytes; an insights envelope
# holding one item adds its {"items":[...]} wrapper.
LAT_PAYLOAD = 2100


@dataclass(frozen=True)
class LoadParams:
    """What the load measurements share (see ``python -m bench --help``)."""

    lat_rate: float = 1000.0  # insights / messages per second, paced
    lat_seconds: float = 6.0  # measured seconds per repetition and side
    lat_warmup: float = 1.0  # seconds sent first and left out (connections, caches warm up)
    lat_size: int = LAT_PAYLOAD  # raw paho payload bytes
    lat_linger: float = 0.0  # pear's batch_linger for the latency run (latency-sensitive)
    lat_default_linger: bool = True  # also measure pear with its default batch_linger
    n_bridge: int = 20_000  # contributions the bridge ingests
    n_rss: int = 10_000  # insights the agent sends
    n_ingest: int = 30_000  # insights in the file `agent --input` reads
    agents: int = 1000  # fan-in nodes
    fanin_workers: int = 4  # processes the nodes are spread over
    fanin_mode: str = "public"
    fanin_downtime: float = 0.5  # seconds between the kill and the restart
    market_rows: int = 1_000_000  # insights the market store holds when it is queried
    n_repair: int = 20_000  # insights in the log a late joiner repairs
    timeout: float = 300.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of sorted ``values``."""
    if not values:
        return math.nan
    k = max(0, min(len(values) - 1, math.ceil(q / 100 * len(values)) - 1))
    return values[k]


def cdf_points(values: list[float], points: int = 200) -> list[list[float]]:
    """[latency, fraction] pairs of the sorted ``values``: evenly spaced ranks plus the tail
    (a plot's x axis is log, so the last 1 % gets its own points)."""
    n = len(values)
    if n == 0:
        return []
    ranks = {min(n - 1, int(i * n / points)) for i in range(points)}
    ranks |= {min(n - 1, int(n * (0.99 + 0.01 * i / 50))) for i in range(50)} | {n - 1}
    return [[round(values[r], 4), round((r + 1) / n, 6)] for r in sorted(ranks)]


def _summary(lat: list[float]) -> dict[str, Any]:
    lat = sorted(lat)
    return {"n": len(lat), "p50_ms": percentile(lat, 50), "p90_ms": percentile(lat, 90),
            "p99_ms": percentile(lat, 99), "p999_ms": percentile(lat, 99.9),
            "max_ms": lat[-1] if lat else math.nan, "mean_ms": sum(lat) / len(lat)
            if lat else math.nan, "sorted": lat}


def run_latency(env: BenchEnv, lp: LoadParams, variant: str) -> dict[str, Any]:
    """One-way latency at ``lat_rate``/s: ``raw`` paho QoS 1, or ``pear`` with
    ``batch_linger = lat_linger``, or ``pear_default`` with pear's default linger."""
    skip = round(lp.lat_warmup * lp.lat_rate)
    total = skip + round(lp.lat_seconds * lp.lat_rate)
    timeout = lp.lat_warmup + lp.lat_seconds + 60
    if variant == "raw":
        topic = f"{env.topic_root('acme')}/insights/bench/latency"
        common = {"env": env, "topic": topic, "total": total, "protocol": 5}
        rx = Worker("lat_raw_sub", {**common, "member": "globex", "client_id": "bench-lat-sub",
                                    "skip": skip, "timeout": timeout})
        tx = Worker("lat_raw_pub", {**common, "member": "acme", "client_id": "bench-lat-pub",
                                    "rate": lp.lat_rate, "size": lp.lat_size})
        got, sent = run_pair(rx, tx, timeout + 30)
        if got["received"] != total:
            raise WorkerError(f"latency raw: subscriber got {got['received']} of {total}")
        lat = got["latency_ms"]
        extra: dict[str, Any] = {}
    else:
        linger = lp.lat_linger if variant == "pear" else None
        rx = Worker("lat_pear_rx", {"env": env, "member": "globex", "total": total,
                                    "timeout": timeout})
        tx = Worker("lat_pear_pub", {"env": env, "member": "acme", "total": total,
                                     "skip": skip, "rate": lp.lat_rate, "categories": 16,
                                     "linger": linger})
        got, sent = run_pair(rx, tx, timeout + 30)
        if got["received"] != total:
            raise WorkerError(f"latency {variant}: receiver got {got['received']} of {total}")
        at, cb = got["at_iterator"], got["at_callback"]
        lat = [1000 * (at[iid] - t) for iid, t in sent["sent_at"].items()]
        lat_cb = sorted(1000 * (cb[iid] - t) for iid, t in sent["sent_at"].items())
        extra = {"callback_p50_ms": percentile(lat_cb, 50),
                 "callback_p99_ms": percentile(lat_cb, 99),
                 "envelopes_per_insight": sent["messages_out"] / total,
                 # 0 when flush() returned; else what was still unacknowledged after 30 s.
                 "unflushed": 0 if sent["flushed"] else max(1, sent["outbox_depth"])}
    return {**_summary(lat), **extra, "late_p99_ms": sent["late_p99_ms"],
            "late_max_ms": sent["late_max_ms"], "late_over_1ms": sent["late_over_1ms"]}


# -- bridge ----------------------------------------------------------------------------------

def _cli() -> str:
    """The ``pear-mqtt`` entry point next to this interpreter (the venv's)."""
    path = Path(sys.executable).with_name("pear-mqtt")
    if not path.exists():
        raise WorkerError(f"{path} not found: install the project (pip install -e .)")
    return str(path)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (/proc/<pid>/stat, clock ticks)."""
    text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    fields = text.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return data
    except (OSError, ValueError):
        return None  # not written yet, or being replaced


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bridge_config(env: BenchEnv, workdir: Path, *, bridge_id: str = "bridge",
                  instances: int = 1) -> Any:
    """The bridge reading the consortium and writing aggregates, both on the one broker."""
    from pear_mqtt.bridge.config import BridgeConfig, PublicConfig, SourceConfig
    from pear_mqtt.config.models import EncryptionConfig, ReliabilityConfig, TLSConfig

    tls = TLSConfig(ca_file=env.ca, cert_file=env.bridge_cert, key_file=env.bridge_key)
    url = f"mqtts://{env.host}:{env.port}"
    # The bridge is stopped (SIGSTOP) while the contributions are published: a keep-alive
    # longer than that keeps the broker from dropping its connection meanwhile.
    rel = ReliabilityConfig(keepalive=600)
    return BridgeConfig(
        bridge_id=bridge_id, instances=instances,
        consortium=SourceConfig(network_id=env.network, broker_url=url, tls=tls,
                                crl_file=env.crl,
                                encryption=EncryptionConfig(keys={"k1": env.group_key}),
                                aggregator_key_file=env.aggregator_key, reliability=rel),
        public=PublicConfig(network_id=env.network, broker_url=url, tls=tls,
                            crl_file=env.crl, contributions=False, reliability=rel),
        state_path=workdir / "bridge.sqlite")


@dataclass(frozen=True)
class _Ingest:
    """One timed ingest by a bridge of ``len(statuses)`` instances, one process each."""

    seconds: float  # from SIGCONT until every instance's status counted its share
    cpu: float  # CPU seconds of all bridge processes meanwhile
    statuses: list[dict[str, Any]]  # each instance's last status


def _ingest(env: BenchEnv, lp: LoadParams, workdir: Path, *, instances: int = 1,
            bridge_id: str = "bridge", status_interval: float = 0.2) -> _Ingest:
    """``pear-mqtt bridge`` (``instances`` processes: ``--instance i --instances N``)
    ingesting ``n_bridge`` contributions of every company in :data:`BRIDGE_COMPANIES`,
    queued on the broker while the bridge was stopped.

    Start the bridge and wait until it is subscribed; SIGSTOP it; let each company's node
    publish its share and flush (the broker queues them in the bridge's sessions); SIGCONT
    and time until the instances' statuses count all N. CPU time is the bridge processes'
    own (/proc/<pid>/stat), so publishers and broker do not enter the per-core rate.
    """
    from pear_mqtt.bridge.config import BridgeConfigManager

    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "bridge.json"
    BridgeConfigManager.save(bridge_config(env, workdir, bridge_id=bridge_id,
                                           instances=instances), conf, include_secrets=True)
    statuses = [workdir / f"bridge-status-{i}.json" for i in range(instances)]
    n = lp.n_bridge
    companies = list(BRIDGE_COMPANIES)
    shares = [n // len(companies) + (1 if i < n % len(companies) else 0)
              for i in range(len(companies))]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, status in enumerate(statuses):
            with (workdir / f"bridge-{i}.log").open("wb") as log:
                procs.append(subprocess.Popen(
                    [_cli(), "bridge", "--config", str(conf), "--instance", str(i),
                     "--status-file", str(status), "--status-interval", str(status_interval)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        for proc, status in zip(procs, statuses, strict=True):
            while True:
                st = _read_json(status)
                if st is not None and st.get("connected"):
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise WorkerError(f"bridge did not connect; see {workdir}/bridge-*.log")
                time.sleep(0.05)  # polling a status file the bridge rewrites, with a deadline
        for proc in procs:
            proc.send_signal(signal.SIGSTOP)
        pubs = [Worker("pear_pub", {"env": env, "member": m, "n": k, "categories": 16,
                                    "outbox": "memory"})
                for m, k in zip(companies, shares, strict=True)]
        for w in pubs:
            w.start()
        try:
            for w in pubs:
                w.ready()
            for w in pubs:
                w.go()
            for w in pubs:
                w.result(lp.timeout)
        finally:
            for w in pubs:
                w.close()
        for status in statuses:
            status.unlink(missing_ok=True)
        cpu0 = sum(_cpu_seconds(p.pid) for p in procs)
        t0 = time.monotonic()
        for proc in procs:
            proc.send_signal(signal.SIGCONT)
        deadline = t0 + lp.timeout
        while True:
            last = [_read_json(status) for status in statuses]
            got = sum(st.get("items_received", 0) for st in last if st is not None)
            if got >= n:
                break
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise WorkerError(f"bridge ingested {got} of {n}")
            time.sleep(0.02)  # polling the status files, with a deadline
        t1 = time.monotonic()
        cpu = sum(_cpu_seconds(p.pid) for p in procs) - cpu0
    finally:
        for proc in procs:
            _stop(proc)
    done = [st for st in last if st is not None]
    counted = sum(st["items_counted"] for st in done)
    if counted != n:
        raise WorkerError(f"bridge counted {counted} of {n}: dropped "
                          f"{[st.get('dropped') for st in done]}, ignored "
                          f"{[st.get('ignored') for st in done]}")
    return _Ingest(seconds=t1 - t0, cpu=cpu, statuses=done)


def run_bridge(env: BenchEnv, lp: LoadParams, workdir: Path) -> dict[str, Any]:
    """One bridge process ingesting ``n_bridge`` contributions (see :func:`_ingest`):
    insights per CPU-second of the bridge, and its wall-clock rate."""
    n = lp.n_bridge
    run = _ingest(env, lp, workdir)
    (st,) = run.statuses
    wall = st.get("items_per_second") or n / run.seconds
    return {"rate": n / run.cpu, "cpu_s": run.cpu, "wall_rate": wall, "seen_s": run.seconds,
            "cpu_share": run.cpu / (n / wall), "companies": len(BRIDGE_COMPANIES), "items": n}


def run_bridge_scale(env: BenchEnv, lp: LoadParams, workdir: Path,
                     instances: int = 2) -> dict[str, Any]:
    """Issue #20: the same ``n_bridge`` contributions ingested once by one bridge process and
    once by ``instances`` scale-out instances (one process each; instance 0 also merges),
    each on a fresh session: insights aggregated per second of wall time, and the speedup."""
    n = lp.n_bridge
    single = _ingest(env, lp, workdir / "single", bridge_id="single", status_interval=0.05)
    scaled = _ingest(env, lp, workdir / "scaled", instances=instances, bridge_id="scaled",
                     status_interval=0.05)
    shares = [st["items_counted"] / n for st in scaled.statuses]
    return {"single_wall_rate": n / single.seconds, "scaled_wall_rate": n / scaled.seconds,
            "speedup": single.seconds / scaled.seconds, "instances": instances,
            "largest_share": max(shares), "single_cpu_s": single.cpu,
            "scaled_cpu_s": scaled.cpu, "items": n, "cpus": os.cpu_count() or 1}


# -- agent RSS -------------------------------------------------------------------------------

def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and RssAnon of ``pid`` in kB ({} once it is gone)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon"):
                out[key] = int(value.split()[0])
    return out


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (the agent's workers)."""
    with contextlib.suppress(OSError, ValueError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


@dataclass(frozen=True, slots=True)
class _AgentRun:
    report: dict[str, Any]
    seconds: float
    hwm_kb: int
    anon_kb: int
    maxrss_kb: int
    samples: list[int]
    workers: int = 0  # worker processes seen
    workers_hwm_kb: int = 0  # their VmHWM, summed
    workers_anon_kb: int = 0  # the peak of their RssAnon, summed
    cpu_s: float = 0.0  # the agent's own CPU time (start-up included), last sampled
    workers_cpu_s: float = 0.0  # its workers' CPU time, summed, last sampled


def _run_agent(args: list[str], workdir: Path, name: str, n: int, timeout: float) -> _AgentRun:
    """``pear-mqtt agent ARGS`` to completion, its RSS sampled every 10 ms; its final report
    must count ``n`` insights sent."""
    with (workdir / f"{name}.log").open("wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [_cli(), "agent", *args, "--outbox", str(workdir / f"{name}.sqlite"),
             "--status-interval", "0", "--drain-timeout", str(timeout)],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
    samples: list[int] = []
    hwm = anon = 0
    kids: dict[int, tuple[int, int]] = {}  # worker pid -> (VmHWM, peak RssAnon)
    kid_cpu: dict[int, float] = {}
    cpu = 0.0
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            st = _proc_status(proc.pid)
            if st:
                samples.append(st.get("VmRSS", 0))
                hwm = max(hwm, st.get("VmHWM", 0))
                anon = max(anon, st.get("RssAnon", 0))
            with contextlib.suppress(OSError):
                cpu = _cpu_seconds(proc.pid)
            for kid in _children(proc.pid):
                ks = _proc_status(kid)
                if ks:
                    k_hwm, k_anon = kids.get(kid, (0, 0))
                    kids[kid] = (max(k_hwm, ks.get("VmHWM", 0)),
                                 max(k_anon, ks.get("RssAnon", 0)))
                with contextlib.suppress(OSError):
                    kid_cpu[kid] = _cpu_seconds(kid)
            if time.monotonic() - t0 > timeout:
                raise WorkerError(f"agent ({name}) did not finish in time")
            time.sleep(0.01)  # sampling RSS (and its high-water mark) while the agent works
        elapsed = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    assert proc.stdout is not None
    report = json.loads(proc.stdout.read().decode().strip().splitlines()[-1])
    proc.stdout.close()
    if proc.returncode != 0 or report.get("sent") != n:
        raise WorkerError(f"agent ({name}) exit {proc.returncode}, report {report}")
    return _AgentRun(report=report, seconds=elapsed, hwm_kb=hwm, anon_kb=anon,
                     maxrss_kb=usage.ru_maxrss, samples=samples, workers=len(kids),
                     workers_hwm_kb=sum(h for h, _ in kids.values()),
                     workers_anon_kb=sum(a for _, a in kids.values()), cpu_s=cpu,
                     workers_cpu_s=sum(kid_cpu.values()))


def run_rss(env: BenchEnv, lp: LoadParams, workdir: Path) -> dict[str, Any]:
    """``pear-mqtt agent --simulate --rate 0 --count N`` (the on-disk outbox, as an agent
    runs): peak RSS is the agent's VmHWM (/proc/<pid>/status), sampled every 10 ms until it
    exits, plus the median RSS sampled while it runs. Then ``n_ingest`` insights of the same
    simulation, written to a JSON-lines file beforehand, ingested with ``agent --input FILE``
    (the production path), once with the worker processes the agent chooses and once with
    ``--workers 0``; the workers' memory and each process's CPU time are sampled too."""
    from pear_mqtt.agent.simulate import SimulatedSource
    from pear_mqtt.config.manager import NetworkConfigManager

    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "agent.json"
    NetworkConfigManager.save(pear_config(env, "acme"), conf, include_secrets=True)
    n = lp.n_rss
    sim = _run_agent(["--config", str(conf), "--simulate", "--rate", "0", "--count", str(n),
                      "--seed", "1"], workdir, "simulate", n, lp.timeout)
    # The file holds more insights than the simulation sends: its rate is the steady one, the
    # run's start (connecting, the first chunk) and drain (the last acknowledgements) a
    # small part of it.
    m = lp.n_ingest
    feed = workdir / "insights.jsonl"
    with feed.open("w", encoding="utf-8") as fh:
        for insight in SimulatedSource(seed=1, rate=0, count=m).generate():
            fh.write(insight.model_dump_json(exclude_none=True) + "\n")
    ingest = _run_agent(["--config", str(conf), "--input", str(feed)], workdir, "input", m,
                        lp.timeout)
    # The same file with no worker processes: all of it in the agent's own process.
    alone = _run_agent(["--config", str(conf), "--input", str(feed), "--workers", "0"],
                       workdir, "input_alone", m, lp.timeout)
    # The peak is the child's own VmHWM. wait4's ru_maxrss is not: Linux carries the
    # high-water mark of the pre-exec address space across execve, so a child spawned by this
    # (by then ~100 MB) process reports the parent's size. ru_maxrss is kept for reference.
    # VmHWM also counts the shared libraries' pages the process has mapped, which depends on
    # the page cache (58 vs 60 MB for one build in two checkouts, anonymous memory equal);
    # the sampled peak of RssAnon is the agent's own memory.
    stages = agent_stages(env, m, workdir / "stages", feed)
    run_us = sim.report["duration"] / n * 1e6
    # The stages are those of one process: the run they are set against is the one alone.
    input_us = alone.report["duration"] / m * 1e6
    samples = sim.samples
    shared = stages["stage_filter_us"] + stages["stage_outbox_us"]  # both runs have them
    return {**stages, "stage_run_us": run_us,
            "stage_rest_us": run_us - stages["stage_simulate_us"] - shared,
            "stage_input_run_us": input_us,
            "stage_input_rest_us": input_us - stages["stage_read_us"] - shared,
            "peak_mb": max(sim.hwm_kb, ingest.hwm_kb, alone.hwm_kb) / 1024,
            "peak_anon_mb": max(sim.anon_kb, ingest.anon_kb, alone.anon_kb) / 1024,
            "ru_maxrss_mb": sim.maxrss_kb / 1024,
            "median_rss_mb": sorted(samples)[len(samples) // 2] / 1024 if samples else 0.0,
            "rate": n / sim.seconds, "seconds": sim.seconds, "items": n,
            # The agent's own run (connected, every insight stored and acknowledged), without
            # the interpreter's start-up and imports, which a long-running agent pays once.
            "run_rate": n / sim.report["duration"],
            "input_items": m,
            "input_run_rate": m / ingest.report["duration"],
            "input_alone_run_rate": m / alone.report["duration"],
            # The agent's worker processes in the --input run (default count): each one's
            # VmHWM and RssAnon count the pages it still shares with the agent since the fork.
            "input_workers": ingest.workers,
            "workers_peak_mb": ingest.workers_hwm_kb / 1024,
            "workers_peak_anon_mb": ingest.workers_anon_kb / 1024,
            "input_peak_mb": ingest.hwm_kb / 1024,
            "input_cpu_us": ingest.cpu_s / m * 1e6,
            "input_workers_cpu_us": ingest.workers_cpu_s / m * 1e6,
            "input_alone_cpu_us": alone.cpu_s / m * 1e6,
            "input_alone_peak_mb": alone.hwm_kb / 1024}


_ACK_LAG = 4  # batches published but not yet acknowledged, in the agent benchmark's runs


def agent_stages(env: BenchEnv, n: int, workdir: Path, feed: Path) -> dict[str, float]:
    """Microseconds per insight of the agent's stages that need no broker, timed in this
    process on the agent's configuration and batch size (best of three): simulating the
    insights, reading them from the JSON-lines ``feed`` (both streamed, as the agent reads
    them), the privacy filter, and the on-disk outbox (each batch's insight rows and its
    categories' state rows put in one transaction, read back to be sent, and the insight
    rows acknowledged a few batches later, as the sender does). What the agent's run takes
    beyond their sum is the rest of its path: item ids and sealing, signing and encrypting
    the envelopes, the history log and MQTT."""
    from pear_mqtt.agent.records import read_insights
    from pear_mqtt.agent.runner import BATCH
    from pear_mqtt.agent.simulate import SimulatedSource
    from pear_mqtt.node.outbox import NewItem, Outbox
    from pear_mqtt.privacy.filter import PrivacyFilter
    from pear_mqtt.security.signing import Signer

    config = pear_config(env, "acme")
    flt = PrivacyFilter(config=config)
    # The identity a node publishes: its certificate's, as PearNetwork attaches it.
    flt.attach(Signer.from_files(key_file=config.tls.key_file,
                                 cert_file=config.tls.cert_file).identity)
    source = SimulatedSource(seed=1, rate=0, count=n)
    insights = list(source.generate())
    batches = [insights[i:i + BATCH] for i in range(0, n, BATCH)]
    encoded = [flt.encode_many(b) for b in batches]
    # The rows as the producer stores them: the item (its id, the published part, a sealed
    # token) on the live topic, and the newest of each category on its state topic.
    filler = b'{"iid":"' + b"0" * 32 + b'","sealed":"' + b"A" * 150 + b'"}'
    rows = [[NewItem(topic=f"live/{i.category}", payload=(r.shared or b"") + filler,
                     kind="insight") for i, r in zip(b, e, strict=True)]
            for b, e in zip(batches, encoded, strict=True)]
    for batch, items in zip(batches, rows, strict=True):
        # Only each category's newest state of a batch is stored (as the producer does).
        newest = {i.category: k for k, i in enumerate(batch)}
        items += [NewItem(topic=f"state/{i.category}", payload=item.payload, kind="state",
                          key=f"state/{i.category}", retain=True)
                  for k, (i, item) in enumerate(zip(batch, list(items), strict=True))
                  if newest[i.category] == k]

    def outbox(box: Outbox) -> None:
        # As the sender works: it reads the new rows back to publish them, and a batch's
        # rows (insights and states alike) are acknowledged a few batches later, once their
        # PUBACKs are in.
        in_flight: list[list[int]] = []
        read = 0
        for items in rows:
            box.put_many(items)
            sent = box.pending(limit=len(items), after_id=read)
            read = sent[-1].id
            in_flight.append([row.id for row in sent])
            if len(in_flight) > _ACK_LAG:
                box.ack(in_flight.pop(0))
        for ids in in_flight:
            box.ack(ids)

    def timed(work: Any) -> float:
        t0 = time.perf_counter()
        work()
        return time.perf_counter() - t0

    def best_outbox() -> float:
        times = []
        for run in range(3):
            # A new file each time, opened before the clock starts.
            with Outbox(path=workdir / f"stages-{run}.sqlite", max_bytes=1 << 30,
                        max_age=86_400) as box:
                times.append(timed(lambda: outbox(box)))
        return min(times) / n * 1e6

    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.glob("stages-*"):
        old.unlink()
    return {"stage_simulate_us": min(timed(lambda: collections.deque(source.generate(),
                                                                     maxlen=0))
                                     for _ in range(3)) / n * 1e6,
            "stage_read_us": min(timed(lambda: collections.deque(read_insights(feed),
                                                                  maxlen=0))
                                 for _ in range(3)) / n * 1e6,
            "stage_filter_us": min(timed(lambda: [flt.encode_many(b) for b in batches])
                                   for _ in range(3)) / n * 1e6,
            "stage_outbox_us": best_outbox()}


# -- fan-in ----------------------------------------------------------------------------------

def _max_in_window(times: list[float], width: float) -> int:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - width:
            j += 1
        best = max(best, i - j + 1)
    return best


def _count_connected(log: Path, offset: int) -> int:
    try:
        with log.open("rb") as f:
            f.seek(offset)
            return f.read().count(b"New client connected")
    except OSError:
        return 0


def run_fanin(env: BenchEnv, lp: LoadParams, broker: Broker, shards: Path) -> dict[str, Any]:
    """``agents`` nodes (``fanin_workers`` processes) connect at once; then the broker is
    killed (SIGKILL), restarted ``fanin_downtime`` s later on the same port with its
    persistence, and every node's reconnect time is taken."""
    k = max(1, min(lp.fanin_workers, lp.agents))
    members = [f"fan{i:05d}" for i in range(lp.agents)]
    groups = [members[w::k] for w in range(k)]
    workers = [Worker("fanin", {"env": env, "members": g, "mode": lp.fanin_mode,
                                "shard": shards / f"shard{w}", "timeout": lp.timeout})
               for w, g in enumerate(groups)]
    for w in workers:
        w.start()
    try:
        issue_s = max(w.ready(timeout=lp.timeout)["issue_s"] for w in workers)
        for w in workers:
            w.go()
        conn = [w.recv("connected", lp.timeout) for w in workers]
        failed = sum(len(c["failed"]) for c in conn)
        if failed:
            raise WorkerError(f"fan-in: {failed} of {lp.agents} nodes did not connect: "
                              f"{next(c['failed'][:1] for c in conn if c['failed'])}")
        t_go = min(c["t_go"] for c in conn)
        done = sorted(t for c in conn for t in c["connected"])
        per = sorted(t - c["t_go"] for c in conn for t in c["connected"])
        offset = broker.log_path.stat().st_size if broker.log_path.exists() else 0
        t_kill = time.monotonic()
        broker.kill()
        time.sleep(lp.fanin_downtime)  # the outage itself, not a synchronisation
        t_restart = time.monotonic()
        broker.restart()
        t_up = time.monotonic()
        res = [w.result(lp.timeout) for w in workers]
    finally:
        for w in workers:
            w.close()
    not_back = sum(r["not_back"] for r in res)
    if not_back:
        raise WorkerError(f"fan-in: {not_back} nodes did not reconnect: "
                          f"{next(r['errors'] for r in res if r['errors'])}")
    back = sorted(t for r in res for t in r["back"])
    lost = sorted(t for r in res for t in r["lost"])
    hist_bin = 0.05
    start = min(back[0], t_up)
    counts = [0] * (int((back[-1] - start) / hist_bin) + 1)
    for t in back:
        counts[int((t - start) / hist_bin)] += 1
    return {
        "agents": lp.agents, "workers": k, "issue_s": issue_s,
        "connect_all_s": done[-1] - t_go, "connect_p50_ms": 1000 * percentile(per, 50),
        "connect_p99_ms": 1000 * percentile(per, 99), "connect_max_ms": 1000 * per[-1],
        "restart_s": t_up - t_restart, "outage_s": t_up - t_kill,
        "loss_seen_s": lost[-1] - t_kill,  # when the last node noticed the broker was gone
        "first_after_up_s": back[0] - t_up, "last_after_up_s": back[-1] - t_up,
        "spread_s": back[-1] - back[0],
        "max_per_50ms": _max_in_window(back, 0.05),
        "max_per_50ms_share": _max_in_window(back, 0.05) / lp.agents,
        "accepted_after_restart": _count_connected(broker.log_path, offset),
        "reconnects": sum(r["reconnects"] for r in res),
        "histogram": {"bin_ms": 1000 * hist_bin, "start_after_up_s": start - t_up,
                      "counts": counts},
    }
