"""One repetition of each measurement, against a broker that was started for it alone.

Every function takes a :class:`~bench.env.BenchEnv` pointing at a running broker and returns
plain numbers. Rates are counted at the receiving side: from the moment the sender starts its
timed work (it is already connected, and the receiver already subscribed) until the N-th
message or insight has arrived.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

from .env import NODE, BenchEnv
from .procs import Worker, WorkerError
from .rawclient import PubWindow, SubRead
from .workers import raw_payloads

__all__ = ["RAW_STATE_SIZE", "Params", "run_a", "run_c", "run_p", "run_publish_retained_many",
           "run_publish_retained_raw",
           "run_sync_round"]

# A pear node keeps its states in checkpoint pages only (``reliability.state_topics`` is
# off by default), so nothing of it is on the state filter. The plain-MQTT joiners of the
# sync round read N retained states as raw paho keeps them instead, each the size of pear's
# one-insight state envelope (sync_raw measured pear's per-category state messages at
# 2,084 bytes), and raw paho's "publish N retained" publishes that size too.
RAW_STATE_SIZE = 2084


@dataclass(frozen=True)
class Params:
    """What the measurements share."""

    n: int  # messages / insights for A, C and P
    n_sync: int  # retained states for sync and publish_retained
    size: int = 500  # payload bytes for A and C
    window: int = 1000  # in-flight window of the raw paho publisher and mosquitto_pub -M
    # The raw paho configuration that was fastest here (``python -m bench --explore-a``):
    pub_window: PubWindow = "app"
    sub_read: SubRead = "drain"
    protocol: int = 4  # MQTT version of the raw paho clients (4 = 3.1.1, or 5)
    categories: int = 16  # categories P's publisher cycles through
    outbox: str = "memory"  # pear publishers' outbox: "memory" (default config) or "sqlite"
    timeout: float = 600.0


def run_pair(receiver: Worker, sender: Worker, timeout: float) -> tuple[dict[str, Any],
                                                                     dict[str, Any]]:
    """Start both, wait until both are connected (receiver subscribed), go, collect."""
    with receiver, sender:
        receiver.ready()
        sender.ready()
        sender.go()
        sent = sender.result(timeout)
        got = receiver.result(timeout)
    return got, sent


def run_a(env: BenchEnv, p: Params, *, profile: dict[str, str | None] | None = None
          ) -> dict[str, Any]:
    """A: raw paho QoS 1 publisher → raw paho subscriber, ``p.size``-byte payloads."""
    prof = profile or {}
    topic = f"{env.topic_root('acme')}/insights/bench/a"
    rx = Worker("raw_sub", {"env": env, "member": "globex", "client_id": "bench-a-sub",
                            "topic": topic, "n": p.n, "sub_read": p.sub_read,
                            "protocol": p.protocol, "profile": prof.get("rx")})
    tx = Worker("raw_pub", {"env": env, "member": "acme", "client_id": "bench-a-pub",
                            "topic": topic, "n": p.n, "size": p.size, "window": p.window,
                            "pub_window": p.pub_window, "protocol": p.protocol,
                            "profile": prof.get("tx")})
    got, sent = run_pair(rx, tx, p.timeout)
    if got["received"] != p.n:
        raise WorkerError(f"A: subscriber got {got['received']} of {p.n}")
    elapsed = got["t_last"] - sent["t_start"]
    return {"rate": p.n / elapsed, "seconds": elapsed,
            "ack_rate": p.n / (sent["t_acked"] - sent["t_start"])}


def _mosq_args(env: BenchEnv, member: str) -> list[str]:
    cert, key = env.cert(member)
    return ["-h", env.host, "-p", str(env.port), "--cafile", str(env.ca), "--cert", str(cert),
            "--key", str(key), "-V", "mqttv5"]


class _LineCounter:
    """Reads a child's stdout in large chunks; counts lines, returns the first few."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self._fd = proc.stdout.fileno()
        self._buf = b""

    def line(self) -> bytes:
        while b"\n" not in self._buf:
            chunk = os.read(self._fd, 65536)
            if not chunk:
                raise WorkerError("mosquitto_sub ended early")
            self._buf += chunk
        head, _, self._buf = self._buf.partition(b"\n")
        return head

    def count(self, n: int) -> None:
        seen = self._buf.count(b"\n")
        self._buf = b""
        while seen < n:
            chunk = os.read(self._fd, 1 << 20)
            if not chunk:
                raise WorkerError(f"mosquitto_sub ended after {seen} of {n} messages")
            seen += chunk.count(b"\n")


def run_c(env: BenchEnv, p: Params) -> dict[str, Any]:
    """C: ``mosquitto_pub -l -M <window> -q 1`` into ``mosquitto_sub -C N -q 1``.

    Synchronisation without sleeps: a retained READY on the topic reaches ``mosquitto_sub`` as
    soon as it is subscribed; then a MARK line through the already connected ``mosquitto_pub``
    shows the publisher is connected; the clock starts when the N payload lines are written.
    ``mosquitto_sub -F %l`` prints only each payload's length, flushed per message.
    """
    topic = f"{env.topic_root('initech')}/insights/bench/c"
    subprocess.run(["mosquitto_pub", *_mosq_args(env, "initech"), "-t", topic, "-m", "READY",
                    "-r", "-q", "1"], check=True, capture_output=True, timeout=30)
    sub = subprocess.Popen(["mosquitto_sub", *_mosq_args(env, "globex"), "-t", topic, "-q", "1",
                            "-C", str(p.n + 2), "-F", "%l"], stdout=subprocess.PIPE)
    pub: subprocess.Popen[bytes] | None = None
    try:
        lines = _LineCounter(sub)
        if lines.line() != b"5":
            raise WorkerError("mosquitto_sub: expected the retained READY first")
        pub = subprocess.Popen(["mosquitto_pub", *_mosq_args(env, "initech"), "-t", topic,
                                "-q", "1", "-l", "-M", str(p.window)], stdin=subprocess.PIPE)
        assert pub.stdin is not None
        pub.stdin.write(b"MARK\n")
        pub.stdin.flush()
        if lines.line() != b"4":
            raise WorkerError("mosquitto_sub: expected MARK second")
        data = b"\n".join(raw_payloads(p.n, p.size)) + b"\n"
        stdin = pub.stdin

        def feed() -> None:
            stdin.write(data)
            stdin.close()

        writer = threading.Thread(target=feed, daemon=True)
        t0 = time.monotonic()
        writer.start()
        lines.count(p.n)
        t1 = time.monotonic()
        writer.join(p.timeout)
        if pub.wait(p.timeout) != 0 or sub.wait(p.timeout) != 0:
            raise WorkerError(f"C: mosquitto_pub exit {pub.returncode}, "
                              f"mosquitto_sub exit {sub.returncode}")
    finally:
        for proc in (pub, sub):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    return {"rate": p.n / (t1 - t0), "seconds": t1 - t0}


def run_p(env: BenchEnv, p: Params, *, profile: dict[str, str | None] | None = None,
          market: bool = True, history: bool = False) -> dict[str, Any]:
    """P: ``broadcast_market_insight`` (consortium policy) → receiving ``PearNetwork``
    (keeping its market store unless ``market`` is false; the sender keeping its history
    log when ``history`` is true)."""
    prof = profile or {}
    rx = Worker("pear_rx", {"env": env, "member": "globex", "n": p.n, "timeout": p.timeout,
                            "profile": prof.get("rx"), "market": market})
    tx = Worker("pear_pub", {"env": env, "member": "acme", "n": p.n,
                             "categories": p.categories, "outbox": p.outbox,
                             "history": history,
                             "profile": prof.get("tx")})
    got, sent = run_pair(rx, tx, p.timeout)
    if got["received"] != p.n or got["distinct"] != p.n:
        raise WorkerError(f"P: receiver got {got['received']} ({got['distinct']} distinct) "
                          f"of {p.n}")
    elapsed = got["t_last"] - sent["t_start"]
    return {"rate": p.n / elapsed, "seconds": elapsed,
            "stored_rate": p.n / (got["t_stored"] - sent["t_start"]),
            "broadcast_rate": p.n / (sent["t_queued"] - sent["t_start"]),
            "ack_rate": p.n / (sent["t_acked"] - sent["t_start"]),
            "envelopes": sent["messages_out"], "receiver_dropped": got["dropped"]}


def _solo(worker: Worker, timeout: float) -> dict[str, Any]:
    with worker:
        worker.ready()
        worker.go()
        return worker.result(timeout)


def _sync_c(env: BenchEnv, n: int, timeout: float) -> float:
    """``mosquitto_sub -C n`` on the state filter: seconds from spawn to exit."""
    t0 = time.monotonic()
    proc = subprocess.run(["mosquitto_sub", *_mosq_args(env, "initech"), "-i", "bench-sync-c",
                           "-t", env.state_filter(), "-q", "1", "-C", str(n), "-F", "%l"],
                          stdout=subprocess.DEVNULL, timeout=timeout, check=False)
    elapsed = time.monotonic() - t0
    if proc.returncode != 0:
        raise WorkerError(f"sync C: mosquitto_sub exit {proc.returncode}")
    return elapsed


def run_sync_round(env: BenchEnv, p: Params, *, rep: int,
                   profile: dict[str, str | None] | None = None) -> dict[str, Any]:
    """Raw paho publishes ``n_sync`` retained messages of :data:`RAW_STATE_SIZE` bytes (not
    timed here) and pear ``n_sync`` retained states (one category each, kept in its
    checkpoint pages); then three late joiners take them: ``PearNetwork.sync()`` pear's, a
    raw paho subscriber and ``mosquitto_sub`` raw paho's.

    The joiners' order rotates with ``rep`` so that none always goes first.
    """
    prof = profile or {}
    n = p.n_sync
    # The joiners' processes start while the state is filled (their start-up is not what is
    # measured): the raw one connects and idles, the pear one connects only when let through.
    filler = Worker("pear_pub", {"env": env, "member": "acme", "n": n, "categories": None,
                                 "outbox": p.outbox, "profile": prof.get("publish")})
    joiner = Worker("pear_sync", {"env": env, "member": "globex", "n": n, "gate": True,
                                  "profile": prof.get("sync")})
    raw_joiner = Worker("raw_sync", {"env": env, "member": "initech", "n": n,
                                     "client_id": "bench-sync-raw", "sub_read": p.sub_read,
                                     "protocol": p.protocol})
    out: dict[str, Any] = {}
    with filler, joiner, raw_joiner:
        raw_joiner.ready()
        filler.ready()
        # Raw paho's states go first, on the topics pear's per-category states would have
        # (state/<node>/bench/c<i>); pear's traffic then passes the broker after them, as
        # it did when the raw joiners read pear's own state messages.
        _solo(Worker("raw_pub", {"env": env, "member": "acme", "client_id": "bench-sync-fill",
                                 "topic": f"{env.topic_root('acme')}/state/{NODE}/bench",
                                 "n": n,
                                 "size": RAW_STATE_SIZE, "window": p.window,
                                 "pub_window": p.pub_window, "protocol": p.protocol,
                                 "retain": True, "distinct_topics": True}), p.timeout)
        filler.go()
        sent = filler.result(p.timeout)
        out["publish_retained_pear"] = {"rate": n / (sent["t_acked"] - sent["t_start"]),
                                        "seconds": sent["t_acked"] - sent["t_start"],
                                        "envelopes": sent["messages_out"]}
        joiner.open_gate()
        joiner.ready()

        def pear() -> None:
            joiner.go()
            got = joiner.result(p.timeout)
            if got["received"] != n:
                raise WorkerError(f"sync: PearNetwork.sync() returned {got['received']} of {n}")
            secs = got["t_last"] - got["t_start"]
            out["sync_pear"] = {"seconds": secs, "rate": n / secs}

        def raw() -> None:
            raw_joiner.go()
            got = raw_joiner.result(p.timeout)
            if got["retained"] != n:
                raise WorkerError(f"sync: raw subscriber got {got['retained']} retained of {n}")
            secs = got["t_last"] - got["t_start"]
            out["sync_raw"] = {"seconds": secs, "rate": n / secs,
                               "mean_payload": got["bytes"] / got["received"]}

        def native() -> None:
            secs = _sync_c(env, n, p.timeout)
            out["sync_c"] = {"seconds": secs, "rate": n / secs}

        steps = [pear, raw, native]
        for i in range(len(steps)):
            steps[(i + rep) % len(steps)]()
    return out


MANY_BATCH = 1000
"""States per ``broadcast_many`` call in ``publish_retained_many``."""


def run_publish_retained_many(env: BenchEnv, p: Params) -> dict[str, Any]:
    """pear publishes ``n_sync`` retained states (one category each) with
    ``broadcast_many`` in batches of :data:`MANY_BATCH`, then ``flush()``."""
    n = p.n_sync
    sent = _solo(Worker("pear_pub", {"env": env, "member": "acme", "n": n, "categories": None,
                                     "outbox": p.outbox, "many": MANY_BATCH}), p.timeout)
    secs = sent["t_acked"] - sent["t_start"]
    return {"rate": n / secs, "seconds": secs, "envelopes": sent["messages_out"]}


def run_publish_retained_raw(env: BenchEnv, p: Params, size: int) -> dict[str, Any]:
    """Raw paho publishes ``n_sync`` retained messages of ``size`` bytes, one topic each."""
    n = p.n_sync
    sent = _solo(Worker("raw_pub", {"env": env, "member": "acme", "client_id": "bench-ret-raw",
                                    "topic": f"{env.topic_root('acme')}/state/raw", "n": n,
                                    "size": size, "window": p.window,
                                    "pub_window": p.pub_window, "protocol": p.protocol,
                                    "retain": True,
                                    "distinct_topics": True}), p.timeout)
    secs = sent["t_acked"] - sent["t_start"]
    return {"rate": n / secs, "seconds": secs, "size": size}
