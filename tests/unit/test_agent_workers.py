"""The agent's worker processes, without a broker: what a worker returns for a chunk of
lines, and a real forked worker preparing exactly what the agent's own process would."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest

from pear_mqtt.agent.prepare import PreparedChunk, prepare_lines
from pear_mqtt.agent.records import RecordFile, RecordParser, Rejection
from pear_mqtt.agent.workers import WorkerLost, WorkerPool, default_workers
from pear_mqtt.config.models import NetworkConfig, PrivacyConfig, TLSConfig
from pear_mqtt.errors import PrivacyError
from pear_mqtt.model.insight import MarketInsight, NetworkMode
from pear_mqtt.node.producer import PreparedBatch, Preparer
from pear_mqtt.security import pki
from pear_mqtt.security.seal import generate_x25519_key, save_x25519_public_key

pytestmark = pytest.mark.unit

LINE = ('{"category": "grocery/%s", "product_id": "p%d", "window_start": '
        '"2026-11-02T09:00:00Z", "window_end": "2026-11-02T10:00:00Z", '
        '"price_data": {"price": %s}, "sales_data": {"units": 4}}')


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> NetworkConfig:
    root = tmp_path_factory.mktemp("pki")
    pki.create_ca(directory=root / "ca", network="net1")
    node = pki.issue(ca_dir=root / "ca", out_dir=root / "acme", role="node", member="acme",
                     node="store-1")
    key = root / "aggregator.pub"
    save_x25519_public_key(generate_x25519_key().public_key(), key)
    return NetworkConfig(
        mode=NetworkMode.CONSORTIUM, company_id="acme", network_id="net1", node_id="store-1",
        broker_url="mqtts://localhost:8883",
        tls=TLSConfig(ca_file=node.ca, cert_file=node.cert, key_file=node.key),
        privacy=PrivacyConfig(aggregator_key_file=key))


def lines(n: int) -> list[tuple[int, str]]:
    return [(i, LINE % (("dairy", "bakery")[i % 2], i, 1.5 + i / 100)) for i in range(1, n + 1)]


class _Refusing:
    """A preparer that refuses the bakery: stands in for a policy rule that fails."""

    origin = "net1/acme/store-1"

    def __init__(self, real: Preparer) -> None:
        self._real = real

    def prepare_many(self, insights: list[MarketInsight]) -> PreparedBatch:
        if any(i.category == "grocery/bakery" for i in insights):
            raise PrivacyError("insight 1 of the batch: refused")
        return self._real.prepare_many(insights)

    def prepare(self, insight: MarketInsight) -> object:
        if insight.category == "grocery/bakery":
            raise PrivacyError("bakery is refused")
        return self._real.prepare(insight)


def test_a_chunk_reports_bad_lines_and_prepares_the_rest(config: NetworkConfig) -> None:
    parser = RecordParser(fmt="jsonl", label="f.jsonl")
    chunk = prepare_lines(Preparer.from_config(config), parser,
                          [*lines(3), (4, "{broken"), (5, "[]")])
    assert chunk.read == 3 and chunk.refused == []
    assert [(r.source, r.line) for r in chunk.rejections] == [("f.jsonl", 4), ("f.jsonl", 5)]
    assert len(chunk.batch.ids) == len(chunk.batch.items) == 3
    assert chunk.batch.origin == "net1/acme/store-1"


def test_a_refused_insight_is_reported_and_the_others_still_go(config: NetworkConfig) -> None:
    refusing = _Refusing(Preparer.from_config(config))
    chunk = prepare_lines(refusing, RecordParser(fmt="jsonl", label="f"),  # type: ignore[arg-type]
                          lines(4))
    assert chunk.read == 4
    assert [r.split(":")[0] for r in chunk.refused] == ["grocery/bakery 2026-11-02T09", ] * 2
    assert all("bakery is refused" in r for r in chunk.refused)
    assert len(chunk.batch.ids) == 2  # the dairy lines


def test_csv_parser_spec_rebuilds_an_equal_parser(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("category,window_start,window_end,price\n"
                    "grocery/dairy,2026-11-02T09:00:00Z,2026-11-02T10:00:00Z,2.5\n")
    records = RecordFile(path)
    (item,) = list(records.lines())
    assert not isinstance(item, Rejection) and records.parser is not None
    again = RecordParser(**json.loads(json.dumps(records.parser.spec)))
    assert again.parse(*item) == records.parser.parse(*item)


def test_default_workers_leave_the_agent_a_cpu() -> None:
    assert 0 <= default_workers() <= 4


def test_a_forked_worker_prepares_what_the_agent_would(config: NetworkConfig) -> None:
    spec = RecordParser(fmt="jsonl", label="f").spec

    async def prepare(pool: WorkerPool) -> PreparedChunk:
        fut = pool.submit(spec, lines(50))
        assert fut is not None
        return await asyncio.wait_for(fut, 30)

    with WorkerPool(config=config, workers=1) as pool:
        pool.start()
        assert pool.running and pool.size == 1
        there = asyncio.run(prepare(pool))
        here = pool.local(spec, lines(50))
    assert not pool.running
    assert there.batch.ids == here.batch.ids and there.batch.origin == here.batch.origin
    # Same topics and shared parts; the sealed parts differ only by their random nonces.
    for (topic, payload, state), (topic2, payload2, state2) in zip(
            there.batch.items, here.batch.items, strict=True):
        assert (topic, state) == (topic2, state2)
        assert json.loads(payload)["insight"] == json.loads(payload2)["insight"]
        assert json.loads(payload)["sealed"] != json.loads(payload2)["sealed"]


def test_a_worker_that_dies_fails_its_chunks_and_the_pool(config: NetworkConfig) -> None:
    spec = RecordParser(fmt="jsonl", label="f").spec

    async def run(pool: WorkerPool) -> None:
        first = pool.submit(spec, lines(5))
        assert first is not None
        await asyncio.wait_for(first, 30)
        os.kill(pool.pids[0], signal.SIGKILL)
        second = pool.submit(spec, lines(5))
        if second is not None:  # handed over before the pool noticed
            with pytest.raises(WorkerLost, match="killed by SIGKILL"):
                await asyncio.wait_for(second, 30)
        assert not pool.running
        assert pool.submit(spec, lines(5)) is None

    with WorkerPool(config=config, workers=1) as pool:
        pool.start()
        asyncio.run(run(pool))


def test_a_pool_that_cannot_start_prepares_in_the_agent(config: NetworkConfig,
                                                          tmp_path: Path) -> None:
    broken = config.model_copy(update={"tls": config.tls.model_copy(
        update={"key_file": tmp_path / "missing.key"})})
    with WorkerPool(config=broken, workers=1) as pool:
        pool.start()
        assert not pool.running
        assert pool.submit(RecordParser(fmt="jsonl", label="f").spec, lines(1)) is None
