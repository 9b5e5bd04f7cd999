"""``pear-mqtt agent`` end to end: a real agent process, a real mosquitto over mutual TLS, and
a PearNetwork of another company (consortium mode) receiving what the agent shares.

Nothing sleeps to wait for messages: the tests wait on the receiver's stream and on the
agent's stderr lines, each with a timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from agent_process import AgentProcess
from brokers import GROUP_KEY, MosquittoBroker, NetworkPKI

from pear_mqtt.config.manager import NetworkConfigManager
from pear_mqtt.config.models import (
    EncryptionConfig,
    NetworkConfig,
    PrivacyConfig,
    ReliabilityConfig,
)
from pear_mqtt.model.insight import NetworkMode, NetworkStatus
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.node.outbox import Outbox
from pear_mqtt.node.records import ReceivedInsight
from pear_mqtt.privacy.ranges import ValueRange
from pear_mqtt.security.seal import generate_x25519_key, save_x25519_public_key

QUEUED = re.compile(r"\bqueued=(\d+)\b")


@pytest.fixture
def aggregator_key(tmp_path: Path) -> Path:
    path = tmp_path / "aggregator.pub"
    save_x25519_public_key(generate_x25519_key().public_key(), path)
    return path


@pytest.fixture
def make_config(pki: NetworkPKI, aggregator_key: Path) -> Callable[..., NetworkConfig]:
    def make(member: str, broker: MosquittoBroker, *, outbox: Path | None = None
             ) -> NetworkConfig:
        return NetworkConfig(
            mode=NetworkMode.CONSORTIUM, company_id=member, network_id=pki.network,
            node_id="store-1", broker_url=broker.tls_url, tls=pki.tls(member),
            privacy=PrivacyConfig(aggregator_key_file=aggregator_key),
            encryption=EncryptionConfig(keys={"k1": GROUP_KEY}, active="k1"),
            reliability=ReliabilityConfig(outbox_path=outbox, reconnect_min_delay=0.05,
                                          reconnect_max_delay=0.5))
    return make


@pytest.fixture
def agent_config(make_config: Callable[..., NetworkConfig], tmp_path: Path
                 ) -> Callable[[MosquittoBroker], Path]:
    """The acme store agent's config file for ``broker``, as an operator would keep it."""
    def write(broker: MosquittoBroker) -> Path:
        path = tmp_path / "store" / "agent.toml"
        path.parent.mkdir(exist_ok=True)
        NetworkConfigManager.save(make_config("acme", broker), path, include_secrets=True)
        return path
    return write


async def collect(stream: AsyncIterator[ReceivedInsight], into: dict[str, ReceivedInsight],
                  total: int, timeout: float) -> None:
    """Read ``stream`` into ``into`` (by item id) until it holds ``total`` distinct items."""
    async def run() -> None:
        while len(into) < total:
            got = await anext(stream)
            into[got.item_id] = got
    try:
        await asyncio.wait_for(run(), timeout)
    except TimeoutError:
        raise AssertionError(f"received {len(into)} of {total} insights") from None


async def test_simulated_agent_delivers_every_insight(
        mosquitto: MosquittoBroker, make_config: Callable[..., NetworkConfig],
        agent_config: Callable[[MosquittoBroker], Path], tmp_path: Path) -> None:
    config_file = agent_config(mosquitto)
    status_file = tmp_path / "status.json"
    received: dict[str, ReceivedInsight] = {}
    async with PearNetwork(make_config("globex", mosquitto)) as rx:
        stream = rx.insights()
        agent = await AgentProcess.start(
            "--config", config_file, "--simulate", "--count", "200", "--rate", "0",
            "--seed", "11", "--status-interval", "0.2", "--status-file", status_file,
            "--drain-timeout", "30")
        await collect(stream, received, 200, timeout=60)
        code, report = await agent.finish(timeout=60)
    assert code == 0, agent.stderr
    assert (report["read"], report["queued"], report["sent"], report["rejected"],
            report["failed"]) == (200, 200, 200, 0, 0)
    assert report["drained"] and report["outbox_depth"] == 0 and not report["stopped"]
    assert len(received) == 200
    got = list(received.values())
    assert {r.member for r in got} == {"acme"}
    assert len({r.insight.category for r in got}) == 8  # --categories defaults to 8
    # Shared under the consortium policy: prices as ranges, never exact.
    assert all(isinstance(r.insight.groups["price_data"]["price"], ValueRange) for r in got)
    # The outbox defaults to .pear/ next to the config, and the status file is a
    # NetworkStatus written at the end (the node is then offline).
    assert (config_file.parent / ".pear" / "outbox-store-1.sqlite").is_file()
    status = NetworkStatus.model_validate_json(status_file.read_text())
    assert not status.connected and status.messages_out >= 1 and status.outbox_depth == 0
    assert any(QUEUED.search(line) for line in agent.stderr)
    # The last status line shows the run as it ended, not the closed connection.
    last = [line for line in agent.stderr if QUEUED.search(line)][-1]
    assert "connected=yes" in last and "sent=200" in last
    assert any("simulating 8 categories with seed 11" in line for line in agent.stderr)


async def test_sigterm_while_offline_keeps_the_outbox_and_a_later_run_delivers_it(
        mosquitto_factory: Callable[..., MosquittoBroker],
        make_config: Callable[..., NetworkConfig],
        agent_config: Callable[[MosquittoBroker], Path], tmp_path: Path) -> None:
    # Persistence: the receiver's queued messages survive the broker's stop, so any loss
    # would be the agent's.
    broker = mosquitto_factory(persistence=True)
    config_file = agent_config(broker)
    outbox = tmp_path / "agent-outbox.sqlite"
    received: dict[str, ReceivedInsight] = {}
    async with PearNetwork(make_config("globex", broker)) as rx:
        stream = rx.insights()
        agent = await AgentProcess.start(
            "--config", config_file, "--outbox", outbox, "--simulate", "--count", "100000",
            "--rate", "50", "--seed", "5", "--status-interval", "0.05",
            "--drain-timeout", "1")
        await collect(stream, received, 10, timeout=30)  # the agent is live

        agent.forget()
        await asyncio.to_thread(broker.stop)
        first_offline = await agent.wait_line(lambda s: "connected=no" in s, timeout=20)
        offline_from = int(QUEUED.findall(first_offline)[0])
        await agent.wait_line(lambda s: "connected=no" in s
                              and int(QUEUED.findall(s)[0]) >= offline_from + 25, timeout=20)
        agent.terminate()
        code, report = await agent.finish(timeout=30)
        assert code == 0, agent.stderr
        assert report["stopped"] and not report["drained"] and report["rejected"] == 0
        total = report["queued"]
        assert report["sent"] <= offline_from  # only what a broker acknowledged
        assert total >= offline_from + 25 and report["outbox_depth"] > 0

        # What never reached the broker is on disk.
        with Outbox(path=outbox, max_bytes=64 << 20, max_age=86400.0) as box:
            rows = box.pending(limit=1_000_000)
        assert len(rows) == report["outbox_depth"]
        waiting = {json.loads(r.payload)["iid"] for r in rows if r.kind == "insight"}
        live_rows = sum(1 for r in rows if r.kind != "state")
        assert len(waiting) >= total - offline_from

        # Broker back, then a run that only empties the outbox: zero loss.
        await asyncio.to_thread(broker.start)
        drainer = await AgentProcess.start(
            "--config", config_file, "--outbox", outbox, "--drain-only",
            "--drain-timeout", "60", "--status-interval", "0")
        code, drained = await drainer.finish(timeout=90)
        assert code == 0, drainer.stderr
        assert drained["drained"] and drained["outbox_depth"] == 0
        assert (drained["queued"], drained["sent"]) == (0, live_rows)
        await collect(stream, received, total, timeout=60)
    assert len(received) == total
    assert waiting <= received.keys()
    assert {r.member for r in received.values()} == {"acme"}


async def test_input_file_with_bad_lines(
        mosquitto: MosquittoBroker, make_config: Callable[..., NetworkConfig],
        agent_config: Callable[[MosquittoBroker], Path], tmp_path: Path) -> None:
    rows = ["category,region,window_start,window_end,price,units",
            "grocery/dairy,north,2026-11-02T09:00:00Z,2026-11-02T10:00:00Z,1.99,12",
            "grocery/dairy,north,2026-11-02T10:00:00Z,2026-11-02T11:00:00Z,abc,12",
            "grocery/bakery,north,2026-11-02T09:00:00Z,2026-11-02T10:00:00Z,2.49,",
            "grocery/bakery,north,2026-11-02T10:00:00Z,2026-11-02T09:00:00Z,2.49,3",
            "household/cleaning,north,2026-11-02T09:00:00Z,2026-11-02T10:00:00Z,,4"]
    data = tmp_path / "till-export.csv"
    data.write_text("\n".join(rows) + "\n")
    received: dict[str, ReceivedInsight] = {}
    async with PearNetwork(make_config("globex", mosquitto)) as rx:
        stream = rx.insights()
        agent = await AgentProcess.start("--config", agent_config(mosquitto), "--input", data,
                                         "--status-interval", "0")
        await collect(stream, received, 2, timeout=30)
        code, report = await agent.finish(timeout=30)
    assert code == 0, agent.stderr
    assert (report["read"], report["sent"], report["rejected"]) == (3, 3, 2)
    assert report["drained"]
    assert [r.split(": ")[0] for r in report["rejections"]] == [f"{data}:3", f"{data}:5"]
    assert report["rejections"][0].startswith(f"{data}:3: price: Input should be a valid number")
    assert "window_end must not be before window_start" in report["rejections"][1]
    assert any(f"rejected {data}:3: price" in line for line in agent.stderr)
    # household/cleaning holds sales only, which the consortium seals: it went to the
    # aggregator as its sealed part alone, and a peer reads nothing of it
    assert sorted(r.insight.category for r in received.values()) == [
        "grocery/bakery", "grocery/dairy"]


@pytest.mark.parametrize("workers", ["0", "1"])
async def test_watch_directory_until_sigterm(
        mosquitto: MosquittoBroker, make_config: Callable[..., NetworkConfig],
        agent_config: Callable[[MosquittoBroker], Path], tmp_path: Path, workers: str) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    # Each line its own observation (product), with a price a peer can read (in ranges).
    line = ('{"category": "grocery/dairy", "product_id": "%s", '
            '"window_start": "2026-11-02T09:00:00Z", "window_end": "2026-11-02T10:00:00Z", '
            '"price_data": {"price": 2.5}, "sales_data": {"units": %d}}')
    received: dict[str, ReceivedInsight] = {}
    async with PearNetwork(make_config("globex", mosquitto)) as rx:
        stream = rx.insights()
        agent = await AgentProcess.start("--config", agent_config(mosquitto), "--watch", inbox,
                                         "--poll-interval", "0.05", "--status-interval", "0",
                                         "--workers", workers)
        for name, n in (("a.jsonl", 3), ("b.jsonl", 2)):
            tmp = inbox / f".{name}.part"
            tmp.write_text("\n".join([line % (f"{name[0]}{i}", i) for i in range(n)]
                                     + ["{broken"]) + "\n")
            tmp.rename(inbox / name)
        await collect(stream, received, 5, timeout=30)
        agent.terminate()
        code, report = await agent.finish(timeout=30)
    assert code == 0, agent.stderr
    assert (report["read"], report["sent"], report["rejected"]) == (5, 5, 2)
    assert report["stopped"] and report["drained"]
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["a.jsonl", "b.jsonl"]
    assert sorted(p.name for p in (inbox / "rejected").iterdir()) == [
        "a.jsonl", "a.jsonl.err", "b.jsonl", "b.jsonl.err"]
    assert "a.jsonl:4: invalid JSON" in (inbox / "rejected" / "a.jsonl.err").read_text()
    assert (inbox / "rejected" / "b.jsonl").read_text() == "{broken\n"
    assert any("1 worker process(es) prepare each watched file" in line
               for line in agent.stderr) == (workers == "1")


async def test_a_one_shot_run_that_cannot_deliver_exits_75_and_says_why(
        mosquitto: MosquittoBroker, agent_config: Callable[[MosquittoBroker], Path],
        tmp_path: Path) -> None:
    config_file = agent_config(mosquitto)
    await asyncio.to_thread(mosquitto.stop)  # the broker is down for the whole run
    data = tmp_path / "rows.jsonl"
    row = ('{{"category": "grocery/dairy", "product_id": "p{}", "window_start": '
           '"2026-11-02T09:00:00Z", "window_end": "2026-11-02T10:00:00Z", '
           '"price_data": {{"price": 2.5}}}}\n')
    data.write_text("".join(row.format(i) for i in range(2)))
    agent = await AgentProcess.start("--config", config_file, "--input", data,
                                     "--drain-timeout", "1", "--status-interval", "0")
    code, report = await agent.finish(timeout=30)
    assert code == 75, agent.stderr
    assert (report["queued"], report["sent"], report["drained"]) == (2, 0, False)
    (line,) = [s for s in agent.stderr if "not delivered" in s]
    assert mosquitto.tls_url in line and f"{report['outbox_depth']} row(s) wait" in line
    assert report["broker"] == mosquitto.tls_url and report["error"]


async def test_many_bad_lines_are_summed_up_by_reason(
        mosquitto: MosquittoBroker, agent_config: Callable[[MosquittoBroker], Path],
        tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text("{broken\n" * 300 + '{"category": "grocery/dairy"}\n' * 200)
    agent = await AgentProcess.start("--config", agent_config(mosquitto), "--input", data,
                                     "--status-interval", "0")
    code, report = await agent.finish(timeout=30)
    assert code == 0, agent.stderr
    assert report["rejected"] == 500 and sum(report["rejected_by_reason"].values()) == 500
    assert len(report["rejected_by_reason"]) == 2
    assert sum(1 for s in agent.stderr if "rejected " in s and ".jsonl:" in s) <= 21
    assert any("rejected 500 line(s): 300 x" in s for s in agent.stderr)


def _insight_lines(n: int, *, bad: dict[int, str]) -> str:
    """``n`` JSON lines of distinct products (prices a peer reads in ranges, sales sealed),
    with the line numbers in ``bad`` replaced by their broken text."""
    row = ('{{"category": "grocery/{cat}", "product_id": "p{i}", "region": "north", '
           '"window_start": "2026-11-02T09:00:00Z", "window_end": "2026-11-02T10:00:00Z", '
           '"price_data": {{"currency": "EUR", "price": {price}, "min_price": 1.0, '
           '"max_price": 9.5}}, "sales_data": {{"units": {units}, "revenue": 10.5, '
           '"transactions": 3}}, "sample_size": 3}}')
    return "".join((bad[i] if i in bad else row.format(
        cat=("dairy", "bakery", "produce")[i % 3], i=i, price=1.5 + (i % 70) / 10,
        units=i % 40 + 1)) + "\n" for i in range(1, n + 1))


async def test_worker_processes_prepare_an_input_file_as_the_agent_would_alone(
        mosquitto: MosquittoBroker, make_config: Callable[..., NetworkConfig],
        agent_config: Callable[[MosquittoBroker], Path], tmp_path: Path) -> None:
    n = 4000
    bad = {7: "{broken", 1500: '{"category": "grocery/dairy"}', 3999: "[1, 2]"}
    data = tmp_path / "export.jsonl"
    data.write_text(_insight_lines(n, bad=bad))
    assert data.stat().st_size > 1 << 20  # large enough for workers to be used
    config_file = agent_config(mosquitto)
    runs: dict[int, tuple[dict[str, Any], dict[str, ReceivedInsight], list[str]]] = {}
    for workers in (2, 0):
        received: dict[str, ReceivedInsight] = {}
        async with PearNetwork(make_config("globex", mosquitto)) as rx:
            stream = rx.insights()
            agent = await AgentProcess.start(
                "--config", config_file, "--input", data, "--workers", str(workers),
                "--outbox", tmp_path / f"outbox-{workers}.sqlite", "--status-interval", "0")
            await collect(stream, received, n - len(bad), timeout=60)
            code, report = await agent.finish(timeout=60)
        assert code == 0, agent.stderr
        runs[workers] = report, received, agent.stderr
    (par, par_rx, par_err), (one, one_rx, one_err) = runs[2], runs[0]
    assert any("2 worker process(es) prepare" in line for line in par_err)
    assert not any("worker process" in line for line in one_err)
    for report in (par, one):
        assert (report["read"], report["queued"], report["sent"], report["rejected"]) == (
            n - len(bad), n - len(bad), n - len(bad), len(bad))
        assert report["drained"] and report["failed"] == 0
    assert sorted(par["rejections"]) == sorted(one["rejections"])
    assert [r.split(": ")[0] for r in sorted(par["rejections"])] == sorted(
        f"{data}:{i}" for i in bad)
    # The same item ids (derived from the node's key) and the same shared content: the
    # workers filter exactly as the agent does.
    assert par_rx.keys() == one_rx.keys()
    for item_id, got in par_rx.items():
        assert got.insight == one_rx[item_id].insight
        assert got.member == "acme"
    assert all(isinstance(g.insight.groups["price_data"]["price"], ValueRange)
               for g in par_rx.values())


async def test_a_worker_process_killed_mid_file_loses_nothing(
        mosquitto: MosquittoBroker, make_config: Callable[..., NetworkConfig],
        agent_config: Callable[[MosquittoBroker], Path], tmp_path: Path) -> None:
    n = 30000
    data = tmp_path / "export.jsonl"
    data.write_text(_insight_lines(n, bad={}))
    received: dict[str, ReceivedInsight] = {}
    async with PearNetwork(make_config("globex", mosquitto)) as rx:
        stream = rx.insights()
        agent = await AgentProcess.start("--config", agent_config(mosquitto), "--input", data,
                                         "--workers", "1", "--status-interval", "0.02")
        await agent.wait_line(lambda s: (m := QUEUED.search(s)) is not None
                              and int(m.group(1)) > 0, timeout=30)
        children = Path(f"/proc/{agent.proc.pid}/task/{agent.proc.pid}/children")
        (worker,) = map(int, (await asyncio.to_thread(children.read_text)).split())
        os.kill(worker, signal.SIGKILL)
        await collect(stream, received, n, timeout=120)
        code, report = await agent.finish(timeout=60)
    assert code == 0, agent.stderr
    assert (report["read"], report["queued"], report["sent"]) == (n, n, n)
    assert report["drained"]
    assert any(re.search(rf"worker process {worker} ended \(killed by SIGKILL.*agent's "
                         "process instead", line) for line in agent.stderr), agent.stderr


async def test_an_agent_killed_outright_leaves_no_worker_behind(
        mosquitto: MosquittoBroker, agent_config: Callable[[MosquittoBroker], Path],
        tmp_path: Path) -> None:
    data = tmp_path / "export.jsonl"
    data.write_text(_insight_lines(30000, bad={}))
    agent = await AgentProcess.start("--config", agent_config(mosquitto), "--input", data,
                                     "--workers", "2", "--status-interval", "0.02")
    await agent.wait_line(lambda s: "queued=" in s, timeout=30)
    children = Path(f"/proc/{agent.proc.pid}/task/{agent.proc.pid}/children")
    workers = [int(p) for p in (await asyncio.to_thread(children.read_text)).split()]
    assert len(workers) == 2
    # A pidfd becomes readable when its process has ended: an event to wait on.
    pidfds = [os.pidfd_open(pid) for pid in workers]
    try:
        agent.proc.kill()
        await agent.proc.wait()
        loop = asyncio.get_running_loop()
        ended: list[asyncio.Future[None]] = [loop.create_future() for _ in pidfds]

        def done(fut: asyncio.Future[None]) -> None:
            if not fut.done():
                fut.set_result(None)
        for fd, fut in zip(pidfds, ended, strict=True):
            loop.add_reader(fd, done, fut)
        try:
            await asyncio.wait_for(asyncio.gather(*ended), 10)
        finally:
            for fd in pidfds:
                loop.remove_reader(fd)
    finally:
        for fd in pidfds:
            os.close(fd)
