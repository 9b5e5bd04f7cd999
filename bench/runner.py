"""Runs the repetitions: a fresh broker per measurement, rotating order, optional profile."""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .env import BenchEnv, Broker, build_env, mosquitto_version
from .report import machine, profile_summary, summarise
from .scenarios import (
    Params,
    run_a,
    run_c,
    run_p,
    run_publish_retained_raw,
    run_sync_round,
)

__all__ = ["explore_a", "run"]

Log = Callable[[str], None]


class _Round:
    """Starts a broker per measurement under ``workdir`` and removes its files afterwards."""

    def __init__(self, env: BenchEnv, workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.settings: dict[str, str] = {}
        self._count = 0

    def broker(self, name: str) -> Broker:
        self._count += 1
        return Broker(self.env, self.workdir / f"broker-{self._count:03d}-{name}")

    def measure(self, name: str, fn: Callable[[BenchEnv], dict[str, Any]]) -> dict[str, Any]:
        b = self.broker(name)
        with b:
            self.settings = b.effective_settings()
            out = fn(self.env.with_port(b.port))
        shutil.rmtree(b.workdir, ignore_errors=True)
        return out


def run(params: Params, *, reps: int, sync_reps: int, workdir: Path, mode: str,
        mqtt5_baseline: bool, only: list[str] | None = None, profile_dir: Path | None = None,
        log: Log = print) -> dict[str, Any]:
    """Measure A, C and P ``reps`` times and the sync round ``sync_reps`` times; return the
    results document."""
    started = datetime.now(UTC)
    t_start = time.monotonic()
    env = build_env(workdir / "pki")
    rnd = _Round(env, workdir)
    a5 = replace(params, protocol=5)
    samples: dict[str, list[dict[str, Any]]] = {
        k: [] for k in ("A", "A_mqtt5", "C", "P", "sync_pear", "sync_raw", "sync_c",
                        "publish_retained_pear", "publish_retained_raw")}

    def unit_a(rep: int) -> None:
        samples["A"].append(rnd.measure("A", lambda e: run_a(e, params)))

    def unit_a5(rep: int) -> None:
        samples["A_mqtt5"].append(rnd.measure("A5", lambda e: run_a(e, a5)))

    def unit_c(rep: int) -> None:
        samples["C"].append(rnd.measure("C", lambda e: run_c(e, params)))

    def unit_p(rep: int) -> None:
        samples["P"].append(rnd.measure("P", lambda e: run_p(e, params)))

    def unit_sync(rep: int) -> None:
        out = rnd.measure("sync", lambda e: run_sync_round(e, params, rep=rep))
        for k, v in out.items():
            samples[k].append(v)
        size = round(out["sync_raw"]["mean_payload"])
        samples["publish_retained_raw"].append(
            rnd.measure("retained", lambda e: run_publish_retained_raw(e, params, size)))

    units: list[tuple[str, Callable[[int], None]]] = [("A", unit_a), ("C", unit_c),
                                                      ("P", unit_p), ("sync", unit_sync)]
    if mqtt5_baseline:
        units.insert(1, ("A5", unit_a5))
    if only:
        units = [u for u in units if u[0] in only]
    rounds = max(reps, sync_reps)
    for rep in range(rounds):
        todo = [(name, unit) for name, unit in units
                if rep < (sync_reps if name == "sync" else reps)]
        for i in range(len(todo)):
            name, unit = todo[(i + rep) % len(todo)]
            t0 = time.monotonic()
            unit(rep)
            log(f"  round {rep + 1}/{rounds} {name:<5} {_brief(name, samples)} "
                f"({time.monotonic() - t0:.1f} s)")

    measured_s = time.monotonic() - t_start
    profile: dict[str, Any] = {}
    if profile_dir is not None:
        profile = _profile(rnd, params, profile_dir, log)
    measurements, ratios = summarise(samples)
    mosq = mosquitto_version()
    return {
        "schema": 1,
        "mode": mode,
        "started": started.isoformat(timespec="seconds"),
        "duration_s": time.monotonic() - t_start,
        "measure_s": measured_s,  # without the profiling rounds
        "params": {**asdict(params), "reps": reps, "sync_reps": sync_reps,
                   "mqtt5_baseline": mqtt5_baseline, "only": only},
        "machine": machine(mosq),
        "broker": {"version": mosq, "config": "pear_mqtt.brokerconf.render(mode='consortium')",
                   "settings": rnd.settings},
        "measurements": measurements,
        "ratios": ratios,
        "profile": profile,
    }


def _brief(name: str, samples: dict[str, list[dict[str, Any]]]) -> str:
    if name == "sync":
        s = samples
        return (f"pear publish {s['publish_retained_pear'][-1]['rate']:,.0f}/s, "
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
