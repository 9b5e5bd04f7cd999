"""The archive node on a real mosquitto: it keeps every member's verified log, survives its
own restart, and serves a late joiner the history of a sender that is offline or whose
retention dropped it; what it serves verifies and reaches the joiner's market store."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pear_mqtt.config.models import NetworkConfig
from pear_mqtt.model.insight import MarketInsight
from pear_mqtt.node.network import PearNetwork

ARCHIVE = "initech/archive"


def _complete(net: PearNetwork, member: str) -> bool:
    views = [v for v in net.logs() if v.sender.startswith(f"{member}/")]
    # The head must cover what is held: a live entry can arrive before its head.
    return bool(views) and all(v.head_length is not None and v.head_length >= v.held
                               and v.verified == v.head_length for v in views)


async def test_history_survives_a_sender_that_is_offline(
        make_config: Callable[..., NetworkConfig], tmp_path: Path,
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]) -> None:
    archive_config = make_config("initech", node="archive", archive_path=tmp_path / "archive")
    sent: list[str] = []
    async with PearNetwork(archive_config) as archive:
        async with PearNetwork(make_config("acme", outbox=tmp_path / "acme.sqlite",
                                           archive=ARCHIVE)) as tx:
            for k in range(3):
                sent += await tx.broadcast_many([insight(product=f"p{k}-{i}")
                                                 for i in range(20)])
                await tx.flush(timeout=10)
        await archive.wait_logs(lambda: _complete(archive, "acme"))
        kept = archive.archived()
    # The archive restarts from its files: nothing to fetch again.
    async with PearNetwork(archive_config) as archive:
        assert archive.archived() == kept and kept["acme/store-1"] > 0
        # acme is gone; a node that was never there learns of its history from the
        # retained head, gets no answer from acme, and asks the archive.
        late_config = make_config("globex", session_expiry=0, archive=ARCHIVE,
                                  outbox=tmp_path / "globex.sqlite")
        async with PearNetwork(late_config) as late:
            stream = late.insights()
            got = await take(stream, len(sent), timeout=40)
            await late.wait_logs(lambda: _complete(late, "acme"), timeout=30)
            await late.market_settled()
            rows = late.market.query(limit=1000).rows
            status = late.status()
    assert {g.item_id for g in got} == set(sent)
    assert {r.item_id for r in rows} == set(sent)  # the backfill is in its market store
    assert status.log_repaired >= 3 and status.log_unrepairable == 0
    assert status.log_forks == 0


async def test_the_archive_keeps_what_the_senders_retention_dropped(
        make_config: Callable[..., NetworkConfig], tmp_path: Path,
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]) -> None:
    sent: list[str] = []
    async with PearNetwork(make_config("initech", node="archive",
                                       archive_path=tmp_path / "archive")) as archive, \
            PearNetwork(make_config("acme", outbox=tmp_path / "acme.sqlite", archive=ARCHIVE,
                                    history_max_bytes=6000, batch_max_items=5)) as tx:
        for k in range(6):
            sent += await tx.broadcast_many([insight(product=f"p{k}-{i}") for i in range(10)])
            await tx.flush(timeout=10)
            # The archive takes each burst before the sender's retention drops it.
            await archive.wait_logs(lambda: _complete(archive, "acme"))
        async with PearNetwork(make_config("globex", session_expiry=0,
                                           archive=ARCHIVE)) as late:
            stream = late.insights()
            got = await take(stream, len(sent), timeout=40)
            await late.wait_logs(lambda: _complete(late, "acme"), timeout=30)
            status = late.status()
    assert {g.item_id for g in got} == set(sent)
    assert status.log_unrepairable == 0 and status.log_forks == 0
