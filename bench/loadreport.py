"""The load measurements' part of the report (latency, bridge, bridge scale-out, agent
memory and ingest, fan-in, market store, history repair): their summaries, the targets table
and their sections of BENCHMARKS.md."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["LAT_LABELS", "TARGETS", "agent_rate_key", "load_rows", "md_load", "md_targets",
           "render_load_table", "stats", "summarise_load"]




# What the agent's ingest target is judged on, best first: the run from a file (the
# production path), the run from a simulation, or (older results) the whole process.
_AGENT_RATES = {
    "input_run_rate": "`agent --input FILE.jsonl`, SQLite outbox, worker processes as the "
                      "agent chooses them (one fewer than the CPUs), the agent's run without "
                      "start-up",
    "run_rate": "`agent --simulate --rate 0`, SQLite outbox, the agent's run without start-up",
    "rate": "`agent --simulate --rate 0`, SQLite outbox",
}


def agent_rate_key(rss: Mapping[str, Any]) -> str:
    """The key of ``rss``'s results the agent ingest target is judged on."""
    return next(key for key in _AGENT_RATES if key in rss)

def _repair_key(st: dict[str, Any]) -> str:
    """The repair figure the target is judged on: items per second (results of older runs
    have only entries per second)."""
    return "item_rate" if "item_rate" in st else "rate"

def stats(values: Sequence[float]) -> dict[str, float]:
    """min, median and max of ``values``."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}

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
    # issue #17: items repaired and verified per second (the entries are items; the
    # log packs a batch's items into one entry, its envelope: docs/HISTORY.md, "Repair")
    "repair_rate": 20_000.0,
}

LAT_LABELS = {
    "raw": "raw paho, QoS 1, MQTT 5, TCP_NODELAY",
    "pear": "pear broadcast -> insights(), batch_linger 0",
    "pear_default": "pear, default batch_linger (2 ms)",
}


def _numericstats(reps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """min / median / max (and the samples) of every numeric key the repetitions share."""
    out: dict[str, Any] = {}
    for k in reps[0]:
        vals = [r.get(k) for r in reps]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals):
            floats = [float(v) for v in vals]  # type: ignore[arg-type]
            out[k] = {**stats(floats), "samples": floats}
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
            variants[v] = {"label": LAT_LABELS.get(v, v), **_numericstats(plain),
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
                    "value": value, "per_round": stats(paired), "target": target,
                    "ok": None if target is None else value <= target}
        out["latency"] = {"rate": params["lat_rate"], "seconds": params["lat_seconds"],
                          "warmup": params["lat_warmup"], "raw_payload": params["lat_size"],
                          "linger": params["lat_linger"], "variants": variants,
                          "ratios": ratios}
    if samples.get("bridge"):
        st = _numericstats(samples["bridge"])
        med = st["rate"]["median"]
        out["bridge"] = {**st, "target": TARGETS["bridge_per_core"],
                         "ok": med >= TARGETS["bridge_per_core"]}
    if samples.get("bridge_scale"):
        st = _numericstats(samples["bridge_scale"])
        out["bridge_scale"] = {**st, "target": TARGETS["bridge_scale"],
                               "ok": st["speedup"]["median"] >= TARGETS["bridge_scale"]}
    if samples.get("rss"):
        st = _numericstats(samples["rss"])
        out["rss"] = {**st, "target_mb": TARGETS["rss_mb"],
                      "ok": st["peak_mb"]["max"] <= TARGETS["rss_mb"]}
    if samples.get("market"):
        reps = samples["market"]
        st = _numericstats(reps)
        out["market"] = {**st, "duckdb": reps[-1].get("duckdb"),
                         "ok": {"ingest": _med(st, "ingest_rate") >= TARGETS["market_ingest"],
                                "grouped": _med(st, "grouped_p50_ms")
                                <= TARGETS["market_grouped_ms"],
                                "position": _med(st, "position_p50_ms")
                                <= TARGETS["market_position_ms"]}}
    if samples.get("repair"):
        st = _numericstats(samples["repair"])
        out["repair"] = {**st, "target": TARGETS["repair_rate"],
                         "ok": _med(st, _repair_key(st)) >= TARGETS["repair_rate"]}
    if samples.get("fanin"):
        reps = samples["fanin"]
        st = _numericstats(reps)
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
        if "run_rate" in rss:
            row("agent send rate (its run: stored and acknowledged, no start-up)",
                "insights/s", rss["run_rate"], ",.0f")
        if "input_run_rate" in rss:
            row("agent ingest from a JSON-lines file (its run, no start-up)", "insights/s",
                rss["input_run_rate"], ",.0f")
        if "input_alone_run_rate" in rss:
            row("the same with --workers 0", "insights/s", rss["input_alone_run_rate"],
                ",.0f")
    rp = results.get("repair")
    if rp:
        if "item_rate" in rp:
            row("history repair: items in the log entries fetched and verified", "items/s",
                rp["item_rate"], ",.0f", f">= {rp['target']:,.0f} {_verdict(rp['ok'])}")
            row("history repair: the same in log entries (envelopes)", "entries/s",
                rp["rate"], ",.0f")
        else:
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


def _stat_md(rows: Sequence[Sequence[str]]) -> list[str]:
    """A (metric, min, median, max) table of :func:`_stat_rows`."""
    return _md_rows(rows, ("metric", "min", "median", "max"), ("---", "---:", "---:", "---:"))


def md_targets(results: Mapping[str, Any]) -> list[str]:
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
            ("publish_retained_many/publish_retained_raw",
             "the same with `broadcast_many` (1,000 states a call)",
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
    r = ratios.get("P_stored/P_nostore")
    if r:
        rows.append(["the same, P counted until the receiver's store holds the last insight "
                     "(its writer catches up behind the stream)", "-",
                     f"{r['value']:.2f}x (rounds {r['per_round']['min']:.2f}.."
                     f"{r['per_round']['max']:.2f})", _verdict(None)])
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
        key = agent_rate_key(rss)
        rate = _med(rss, key)
        rows.append(["edge agent durable ingest (" + _AGENT_RATES[key] + ")",
                     f">= {TARGETS['agent_rate']:,.0f}/s", f"{rate:,.0f}/s",
                     _verdict(rate >= TARGETS["agent_rate"])])
        if key == "input_run_rate" and "input_alone_run_rate" in rss:
            rows.append(["the same with no worker processes (`--workers 0`, all in the "
                         "agent's process)", "-",
                         f"{_med(rss, 'input_alone_run_rate'):,.0f}/s", "-"])
        if key == "input_run_rate":
            rows.append(["the same from a simulation (" + _AGENT_RATES["run_rate"] + ")", "-",
                         f"{_med(rss, 'run_rate'):,.0f}/s", "-"])
        if rss.get("workers_peak_mb"):
            rows.append([f"the --input run's {_med(rss, 'input_workers'):.0f} worker "
                         "process(es), peak RSS summed (each counts the pages it shares with "
                         "the agent since the fork)", "-",
                         f"{rss['workers_peak_mb']['max']:.1f} MB "
                         f"({rss['workers_peak_anon_mb']['max']:.1f} MB anonymous)", "-"])
    rp = results.get("repair")
    if rp:
        key = _repair_key(rp)
        rows.append([f"history repair by a late joiner, "
                     f"{'items in verified log entries' if key == 'item_rate' else 'log entries'}"
                     f"/s", f">= {rp['target']:,.0f}/s",
                     f"{_med(rp, key):,.0f}/s" + (f" ({_med(rp, 'rate'):,.0f} entries/s)"
                                                   if key == "item_rate" else ""),
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


def md_load(results: Mapping[str, Any], plot: str | None) -> list[str]:
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
                *_stat_md(rows), ""]
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
                *_stat_md(rows), ""]
    rss = results.get("rss")
    if rss:
        rows = _stat_rows(rss, (("peak_mb", 1), ("peak_anon_mb", 1), ("ru_maxrss_mb", 1),
                             ("median_rss_mb", 1), ("rate", 0), ("run_rate", 0),
                             ("input_run_rate", 0), ("input_alone_run_rate", 0),
                             ("input_workers", 0), ("input_peak_mb", 1),
                             ("input_alone_peak_mb", 1), ("workers_peak_mb", 1),
                             ("workers_peak_anon_mb", 1), ("seconds", 2)))
        out += ["### Edge agent memory", "",
                f"`pear-mqtt agent --simulate --rate 0 --count {rss['items']['max']:,.0f}` "
                "with its on-disk outbox, then `agent --input` of "
                + (f"{rss['input_items']['max']:,.0f} insights of the same simulation "
                   if "input_items" in rss else "the same insights ")
                + "from a JSON-lines file, once with the worker processes the agent chooses "
                "and once with `--workers 0` "
                f"({lr.get('rss', '?')} repetition(s)); the peaks are the highest of the "
                "runs' (the agent's process; its workers' are shown apart), the median RSS and "
                "`ru_maxrss_mb` the simulation's.", "",
                *_stat_md(rows), ""]
        stages = _stat_rows(rss, (("stage_simulate_us", 1), ("stage_read_us", 1),
                                  ("stage_filter_us", 1), ("stage_outbox_us", 1),
                                  ("stage_rest_us", 1), ("stage_run_us", 1),
                                  ("stage_input_rest_us", 1), ("stage_input_run_us", 1)))
        if stages:
            out += ["Where the agent's time per insight goes (us): simulating it, reading it "
                    "from a JSON-lines file, the privacy filter and the on-disk outbox (a "
                    "batch's rows put in one transaction, read back and acknowledged a few "
                    "batches later) timed alone in the benchmark process on the agent's "
                    "configuration and batch size (best of three, streamed as the agent reads "
                    "them); `stage_run_us` is the agent's run per insight from the simulation "
                    "and `stage_input_run_us` from the file, `stage_rest_us` and "
                    "`stage_input_rest_us` what each takes beyond its source, the filter and "
                    "the outbox: item ids and sealing, signing and encrypting envelopes, the "
                    "history log and MQTT.", "", *_stat_md(stages), ""]
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
                *_stat_md(rows), "",
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
                *_stat_md(rows), ""]
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
            ("insights", 0), ("entries", 0), ("seconds", 2), ("item_rate", 0), ("rate", 0),
            ("mb_rate", 1),
            ("delivered_seconds", 2), ("insight_rate", 0)) if k in rp))
        out += ["### History repair", "",
                "A sender broadcasts the insights (64 per `broadcast_many`) and flushes; then "
                "a node that was never there connects and the clock runs until it holds the "
                "sender's log up to its signed head, every entry fetched by log requests and "
                "proven against that head by range proofs (`item_rate` counts the insights in "
                "them, `rate` the entries, each an envelope of a batch, `mb_rate` their bytes); "
                "the insights "
                "in them are delivered behind the repair, through decryption and validation "
                "(`delivered_seconds` from the same start, `insight_rate`). Both nodes share "
                "this process and one core. docs/HISTORY.md, \"Repair\", says how.", "",
                *_stat_md(rows), ""]
    if plot:
        out += [f"![throughput and latency]({plot})", ""]
    return out
