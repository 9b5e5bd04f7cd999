"""Runs the repetitions: a fresh broker per measurement, rotating order, optional profile."""

from __future__ import annotations

import functools
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .env import BRIDGE_USER, BenchEnv, Broker, build_env, mosquitto_version
from .history import run_repair
from .loadscenarios import (
    LoadParams,
    run_bridge,
    run_bridge_scale,
    run_fanin,
    run_latency,
    run_rss,
)
from .market import run_market
from .report import machine, profile_summary, summarise, summarise_load
from .scenarios import (
    Params,
    run_a,
    run_c,
    run_p,
    run_publish_retained_many,
    run_publish_retained_raw,
    run_sync_round,
)

__all__ = ["LOAD_UNITS", "explore_a", "run"]

Log = Callable[[str], None]


class _Round:
    """Starts a broker per measurement under ``workdir`` and removes its files afterwards."""

    def __init__(self, env: BenchEnv, workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.settings: dict[str, str] = {}
        self._count = 0

    def broker(self, name: str, **kw: Any) -> Broker:
        self._count += 1
        return Broker(self.env, self.workdir / f"broker-{self._count:03d}-{name}", **kw)

    def measure(self, name: str, fn: Callable[[BenchEnv], dict[str, Any]]) -> dict[str, Any]:
        b = self.broker(name)
        with b:
            self.settings = b.effective_settings()
            out = fn(self.env.with_port(b.port))
        shutil.rmtree(b.workdir, ignore_errors=True)
        return out

    def measure_with(self, name: str, fn: Callable[[BenchEnv, Broker], dict[str, Any]],
                     **broker: Any) -> dict[str, Any]:
        """Like :meth:`measure` with a broker configured by ``broker`` (see
        :class:`~bench.env.Broker`), which ``fn`` also gets (and may restart)."""
        b = self.broker(name, **broker)
        with b:
            out = fn(self.env.with_port(b.port), b)
        shutil.rmtree(b.workdir, ignore_errors=True)
        return out


def run(params: Params, *, reps: int, sync_reps: int, workdir: Path, mode: str,
        mqtt5_baseline: bool, only: list[str] | None = None, profile_dir: Path | None = None,
        load: LoadParams | None = None, load_reps: dict[str, int] | None = None,
        log: Log = print) -> dict[str, Any]:
    """Measure A, C and P ``reps`` times, the sync round ``sync_reps`` times and the load
    measurements (latency, bridge, rss, fanin) ``load_reps[name]`` times; return the results
    document."""
    load = load or LoadParams()
    load_reps = load_reps or {}
    started = datetime.now(UTC)
    t_start = time.monotonic()
    env = build_env(workdir / "pki")
    rnd = _Round(env, workdir)
    a5 = replace(params, protocol=5)
    samples: dict[str, list[dict[str, Any]]] = {
        k: [] for k in ("A", "A_mqtt5", "C", "P", "sync_pear", "sync_raw", "sync_c",
                        "publish_retained_pear", "publish_retained_raw",
                        "publish_retained_many", "P_nostore",
                        "P_log")}

    def unit_a(rep: int) -> None:
        samples["A"].append(rnd.measure("A", lambda e: run_a(e, params)))

    def unit_a5(rep: int) -> None:
        samples["A_mqtt5"].append(rnd.measure("A5", lambda e: run_a(e, a5)))

    def unit_c(rep: int) -> None:
        samples["C"].append(rnd.measure("C", lambda e: run_c(e, params)))

    def unit_p(rep: int) -> None:
        # P, P with the receiver's market store off, and P with the sender keeping its
        # history log, taking turns: what the store and the log cost the stream.
        variants = [("P", True, False), ("P_nostore", False, False), ("P_log", True, True)]
        for i in range(len(variants)):
            name, store, history = variants[(i + rep) % len(variants)]
            samples[name].append(rnd.measure("P", functools.partial(
                _run_p, params=params, market=store, history=history)))

    def unit_sync(rep: int) -> None:
        out = rnd.measure("sync", lambda e: run_sync_round(e, params, rep=rep))
        for k, v in out.items():
            samples[k].append(v)
        size = round(out["sync_raw"]["mean_payload"])
        samples["publish_retained_raw"].append(
            rnd.measure("retained", lambda e: run_publish_retained_raw(e, params, size)))
        samples["publish_retained_many"].append(
            rnd.measure("retained", lambda e: run_publish_retained_many(e, params)))

    lat_variants = ["raw", "pear"] + (["pear_default"] if load.lat_default_linger else [])
    lat: dict[str, list[dict[str, Any]]] = {v: [] for v in lat_variants}
    load_samples: dict[str, list[dict[str, Any]]] = {"bridge": [], "bridge_scale": [],
                                                     "rss": [], "fanin": [], "market": [],
                                                     "repair": []}

    def unit_latency(rep: int) -> None:
        # The variants take turns, each on a fresh broker, starting one further each round.
        for i in range(len(lat_variants)):
            v = lat_variants[(i + rep) % len(lat_variants)]
            lat[v].append(rnd.measure(f"lat-{v}", functools.partial(run_latency, lp=load,
                                                                    variant=v)))

    def unit_bridge(rep: int) -> None:
        load_samples["bridge"].append(rnd.measure_with(
            "bridge", lambda e, b: run_bridge(e, load, b.workdir / "bridge"),
            acl_modes=("consortium", "public"), bridge_users=(BRIDGE_USER,)))

    def unit_bridge_scale(rep: int) -> None:
        load_samples["bridge_scale"].append(rnd.measure_with(
            "bridge-scale", lambda e, b: run_bridge_scale(e, load, b.workdir / "bridge-scale"),
            acl_modes=("consortium", "public"), bridge_users=(BRIDGE_USER,)))

    def unit_rss(rep: int) -> None:
        load_samples["rss"].append(rnd.measure_with(
            "rss", lambda e, b: run_rss(e, load, b.workdir / "agent")))

    def unit_fanin(rep: int) -> None:
        # Certificates outlive the broker: later repetitions reuse them.
        load_samples["fanin"].append(rnd.measure_with(
            "fanin", lambda e, b: run_fanin(e, load, b, workdir / "fanin-pki"),
            mode=load.fanin_mode, persistence=True))

    def unit_market(rep: int) -> None:
        load_samples["market"].append(run_market(workdir / "market", rows=load.market_rows))

    def unit_repair(rep: int) -> None:
        load_samples["repair"].append(rnd.measure_with(
            "repair", lambda e, b: run_repair(e, b.workdir / "repair", load.n_repair)))

    units: list[tuple[str, Callable[[int], None]]] = [
        ("A", unit_a), ("C", unit_c), ("P", unit_p), ("sync", unit_sync),
        ("latency", unit_latency), ("bridge", unit_bridge),
        ("bridge_scale", unit_bridge_scale), ("rss", unit_rss),
        ("fanin", unit_fanin), ("market", unit_market), ("repair", unit_repair)]
    if mqtt5_baseline:
        units.insert(1, ("A5", unit_a5))
    if only:
        units = [u for u in units if u[0] in only]

    def reps_of(name: str) -> int:
        if name in LOAD_UNITS:
            return load_reps.get(name, reps)
        return sync_reps if name == "sync" else reps

    rounds = max(reps_of(name) for name, _unit in units) if units else 0
    for rep in range(rounds):
        todo = [(name, unit) for name, unit in units if rep < reps_of(name)]
        for i in range(len(todo)):
            name, unit = todo[(i + rep) % len(todo)]
            t0 = time.monotonic()
            unit(rep)
            brief = (_brief_load(name, lat, load_samples) if name in LOAD_UNITS
                     else _brief(name, samples))
            log(f"  round {rep + 1}/{rounds} {name:<5} {brief} "
                f"({time.monotonic() - t0:.1f} s)")

    measured_s = time.monotonic() - t_start
    profile: dict[str, Any] = {}
    if profile_dir is not None:
        profile = _profile(rnd, params, profile_dir, log)
    measurements, ratios = summarise(samples)
    loads = summarise_load(lat, load_samples, asdict(load))
    mosq = mosquitto_version()
    return {
        "schema": 1,
        "mode": mode,
        "started": started.isoformat(timespec="seconds"),
        "duration_s": time.monotonic() - t_start,
        "measure_s": measured_s,  # without the profiling rounds
        "params": {**asdict(params), "reps": reps, "sync_reps": sync_reps,
                   "mqtt5_baseline": mqtt5_baseline, "only": only,
                   "load": asdict(load), "load_reps": {n: reps_of(n) for n in LOAD_UNITS}},
        "machine": machine(mosq),
        "broker": {"version": mosq, "config": "pear_mqtt.ops.brokerconf.render(mode='consortium')",
                   "settings": rnd.settings},
        "measurements": measurements,
        "ratios": ratios,
        **loads,
        "profile": profile,
    }


def _run_p(env: BenchEnv, *, params: Params, market: bool,
           history: bool = False) -> dict[str, Any]:
    return run_p(env, params, market=market, history=history)


LOAD_UNITS = ("latency", "bridge", "bridge_scale", "rss", "fanin", "market", "repair")
"""The load measurements (each repeated ``load_reps`` times, not ``reps``)."""


def _brief_load(name: str, lat: dict[str, list[dict[str, Any]]],
                s: dict[str, list[dict[str, Any]]]) -> str:
    if name == "latency":
        return ", ".join(f"{v} p50 {r[-1]['p50_ms']:.2f} / p99 {r[-1]['p99_ms']:.2f} ms"
                         for v, r in lat.items() if r)
    last = s[name][-1]
    if name == "bridge":
        return (f"{last['rate']:,.0f} insights per CPU-second, {last['wall_rate']:,.0f}/s "
                f"wall, {last['items']:,} from {last['companies']} companies")
    if name == "bridge_scale":
        return (f"{last['instances']} instances {last['scaled_wall_rate']:,.0f}/s wall vs one "
                f"{last['single_wall_rate']:,.0f}/s: {last['speedup']:.2f}x")
    if name == "repair":
        items = (f"{last['item_rate']:,.0f} items/s in " if "item_rate" in last else "")
        return (f"{items}{last['rate']:,.0f} log entries/s repaired and proven, "
                f"{last['entries']:,} entries; their insights delivered at "
                f"{last['insight_rate']:,.0f}/s")
    if name == "market":
        return (f"{last['ingest_rate']:,.0f} rows/s in, over {last['rows']:,} rows: grouped "
                f"p50 {last['grouped_p50_ms']:.2f} ms, position p50 "
                f"{last['position_p50_ms']:.2f} ms")
    if name == "rss":
        return f"peak RSS {last['peak_mb']:.1f} MB, {last['rate']:,.0f} insights/s"
    return (f"{last['agents']} agents connected in {last['connect_all_s']:.2f} s, "
            f"reconnected over {last['spread_s']:.2f} s, max {last['max_per_50ms']} per 50 ms")


def _brief(name: str, samples: dict[str, list[dict[str, Any]]]) -> str:
    if name == "sync":
        s = samples
        return (f"pear publish {s['publish_retained_pear'][-1]['rate']:,.0f}/s "
                f"({s['publish_retained_many'][-1]['rate']:,.0f}/s in batches), "
                f"raw publish {s['publish_retained_raw'][-1]['rate']:,.0f}/s, "
                f"sync pear {s['sync_pear'][-1]['seconds']:.2f} s, "
                f"raw {s['sync_raw'][-1]['seconds']:.2f} s, "
                f"C {s['sync_c'][-1]['seconds']:.2f} s")
    key = {"A5": "A_mqtt5"}.get(name, name)
    return f"{samples[key][-1]['rate']:,.0f}/s"


def _profile(rnd: _Round, params: Params, out: Path, log: Log) -> dict[str, Any]:
    """One extra round of P and of sync with cProfile in the pear_mqtt processes."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"{k}.prof" for k in ("P_publisher", "P_receiver", "sync_publisher",
                                             "sync_joiner")}
    log("  profiling P ...")
    rnd.measure("profile-P", lambda e: run_p(e, params, profile={
        "tx": str(paths["P_publisher"]), "rx": str(paths["P_receiver"])}))
    log("  profiling sync ...")
    rnd.measure("profile-sync", lambda e: run_sync_round(e, params, rep=0, profile={
        "publish": str(paths["sync_publisher"]), "sync": str(paths["sync_joiner"])}))
    what = {
        "P_publisher": f"P publisher: {params.n:,} broadcast_market_insight + flush",
        "P_receiver": f"P receiver: {params.n:,} verified insights via insights()",
        "sync_publisher": f"publishing {params.n_sync:,} retained states + flush",
        "sync_joiner": f"late joiner's sync() of {params.n_sync:,} retained states",
    }
    return {k: {"what": what[k], "file": str(p), "top": profile_summary(p)}
            for k, p in paths.items()}


def explore_a(params: Params, *, reps: int, workdir: Path, log: Log = print) -> None:
    """Print A for every raw paho variant (window keeper, subscriber read, protocol)."""
    env = build_env(workdir / "pki")
    rnd = _Round(env, workdir)
    variants = [(w, r, pr) for w in ("app", "paho") for r in ("loop", "drain") for pr in (4, 5)]
    results: dict[tuple[str, str, int], list[float]] = {v: [] for v in variants}
    for _rep in range(reps):
        for w, r, pr in variants:
            p = replace(params, pub_window=w, sub_read=r, protocol=pr)  # type: ignore[arg-type]

            def measure(e: BenchEnv, p: Params = p) -> dict[str, Any]:
                return run_a(e, p)

            results[(w, r, pr)].append(rnd.measure("explore", measure)["rate"])
    for (w, r, pr), rates in sorted(results.items(), key=lambda kv: -statistics.median(kv[1])):
        rates.sort()
        log(f"  window kept by {w:<4} subscriber {r:<5} MQTT {'5' if pr == 5 else '3.1.1':<5} "
            f"median {statistics.median(rates):>8,.0f} msgs/s  (min {rates[0]:,.0f}, "
            f"max {rates[-1]:,.0f})")
