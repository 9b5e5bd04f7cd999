"""The bridge's own verified history log on real brokers: every aggregate and receipt it
publishes is an entry; public receivers verify it against its signed head, repair what they
missed and refuse a forged or forked head (docs/HISTORY.md, "The bridge's log")."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from bridgekit import DAY, WAIT, Clock, Input, Net, close_window, insight, publish, wait, yesterday
from brokers import probe

from pear_mqtt.bridge.service import Bridge
from pear_mqtt.cli.main import main
from pear_mqtt.history.head import TreeHead, head_body
from pear_mqtt.history.log import AppendLog
from pear_mqtt.model.insight import NetworkMode
from pear_mqtt.model.topics import TopicScheme
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.security.envelope import EnvelopeCodec
from pear_mqtt.security.signing import Signer
from pear_mqtt.security.trust import TrustStore

CATEGORIES = 3
COMPANIES = 5


def _inputs(start_days_ago: int) -> list[Input]:
    start = yesterday() - timedelta(days=start_days_ago)
    return [Input(company=f"c{n}", store="store-1",
                  insight=insight(f"hist/cat{c}", start=start, units=100.0 + n + c))
            for c in range(CATEGORIES) for n in range(COMPANIES)]


def _bridge_view(node: PearNetwork) -> Any:
    views = [v for v in node.logs() if v.sender.endswith("/bridge")]
    return views[0] if views else None


def _verified(node: PearNetwork, length: int) -> bool:
    v = _bridge_view(node)
    return v is not None and v.head_length == length and v.verified == length


def _reader(net: Net, name: str) -> PearNetwork:
    return PearNetwork(net.node_config(net.member(name), mode=NetworkMode.PUBLIC))


async def _two_windows(net: Net, bridge: Bridge, clock: Clock) -> int:
    """Publish and close two daily windows of every category: 2 x CATEGORIES aggregates and
    as many receipts. Returns the bridge's log length. (The older window is due at once:
    the bridge's ``settle_seconds`` keeps it open until the test moves the clock.)"""
    inputs = _inputs(1) + _inputs(0)
    await publish(net, inputs)
    await wait(bridge, lambda s: s.items_counted >= len(inputs))
    await close_window(bridge, clock, windows=2)
    status = await wait(bridge, lambda s: s.log_length == 4 * CATEGORIES)
    return status.log_length or 0


async def test_a_late_public_receiver_repairs_and_verifies_the_bridges_whole_log(
        net: Net) -> None:
    clock = Clock()
    async with Bridge(net.bridge_config(settle_seconds=60), clock=clock) as bridge:
        # A receiver there from the start sees every entry live: no gap, nothing repaired.
        async with _reader(net, "early") as early:
            length = await _two_windows(net, bridge, clock)
            await early.wait_logs(lambda: _verified(early, length), timeout=WAIT)
            assert early.status().log_repaired == 0
        # One that comes later holds only the retained aggregates and receipts of the
        # latest window: the signed head tells it what it lacks, and it repairs all of it.
        async with _reader(net, "late") as late:
            await late.wait_logs(lambda: _verified(late, length), timeout=WAIT)
            status = late.status()
            view = _bridge_view(late)
        assert bridge.status().log_requests_answered >= 1
    assert length == 4 * CATEGORIES
    assert view.held == view.verified == length and not view.forked
    assert status.log_gaps >= 1 and status.log_repaired >= 2 * CATEGORIES
    assert status.log_forks == 0 and not status.log_refused


async def test_a_forged_or_forked_bridge_head_is_refused_and_counted(net: Net) -> None:
    clock = Clock()
    async with Bridge(net.bridge_config(settle_seconds=60), clock=clock) as bridge, \
            _reader(net, "victim") as victim:
        length = await _two_windows(net, bridge, clock)
        await victim.wait_logs(lambda: _verified(victim, length), timeout=WAIT)
        bridge_status = bridge.status()
        assert bridge_status.log_id is not None
        scheme = TopicScheme(mode="public", network=net.pki.network, member=net.pki.bridge_user)
        head_topic = scheme.log_head("bridge")
        other = TreeHead(log=bridge_status.log_id, length=length, root=b"\x01" * 32,
                         time=time.time())

        def signed(certs: Any) -> bytes:
            codec = EnvelopeCodec(
                signer=Signer.from_files(key_file=certs.key, cert_file=certs.cert),
                trust=TrustStore.from_files(ca_files=[net.pki.ca], network=net.pki.network))
            return codec.encode(kind="loghead", body=head_body(other), encrypt=False)

        # (written on the broker's listener without ACL: what a compromised broker could do)
        with probe(net.public) as attacker:
            # A participant's signature on the bridge's head topic.
            attacker.publish(head_topic, signed(net.pki.node(net.member("mallory"))))
            await victim.wait_logs(
                lambda: victim.status().log_refused.get("foreign_head", 0) == 1, timeout=WAIT)
            assert victim.status().log_forks == 0 and not _bridge_view(victim).forked
            # The bridge's own signature on a second root for a length it already signed.
            attacker.publish(head_topic, signed(net.pki.bridge))
            await victim.wait_logs(lambda: victim.status().log_forks == 1, timeout=WAIT)
        status = victim.status()
        assert status.log_refused.get("forked_head") == 1
        assert _bridge_view(victim).forked
        assert [f.sender for f in victim.forks] == [_bridge_view(victim).sender]


async def test_log_verify_and_show_read_the_bridges_log(
        net: Net, capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    run = uuid.uuid4().hex[:8]
    config = net.bridge_config(state=f"{run}.sqlite", settle_seconds=60)
    async with Bridge(config, clock=clock) as bridge:
        length = await _two_windows(net, bridge, clock)
    path = config.history_dir("single")
    assert path == net.root / f"{run}.sqlite.history"
    with AppendLog.open(path) as held:
        root = held.root().hex()
    assert await asyncio.to_thread(main, ["log", "verify", str(path), "--root", root,
                                          "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["ok"], report["length"]) == (True, length)
    assert await asyncio.to_thread(main, ["log", "show", str(path), "--json"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    kinds = [entry["kind"] for entry in shown]
    assert kinds.count("aggregate") == kinds.count("receipt") == 2 * CATEGORIES


async def test_history_off_keeps_no_log_and_publishes_no_head(net: Net) -> None:
    clock = Clock()
    config = net.bridge_config(settle_seconds=60)
    config = config.model_copy(update={"public": config.public.model_copy(update={
        "reliability": config.public.reliability.model_copy(update={"history": False})})})
    async with Bridge(config, clock=clock) as bridge:
        await publish(net, _inputs(0))
        await wait(bridge, lambda s: s.items_counted >= CATEGORIES * COMPANIES)
        status = await close_window(bridge, clock)
    assert status.log_length is None and config.history_dir("single") is None
    seen = net.marker()
    assert not [m for m in seen if "/nodes/" in m.topic and "/log/" in m.topic]
    assert all(b'"log":' not in m.payload for m in seen if "/aggregates/" in m.topic)


async def test_the_public_archive_keeps_the_bridges_log_and_serves_it_when_the_bridge_is_gone(
        net: Net) -> None:
    clock = Clock()
    archive_member = net.member("archive")
    archive_config = net.node_config(archive_member, node="archive", mode=NetworkMode.PUBLIC)
    archive_config = archive_config.model_copy(update={
        "reliability": archive_config.reliability.model_copy(update={
            "archive_path": net.root / "archive"})})
    async with PearNetwork(archive_config) as archive:
        async with Bridge(net.bridge_config(settle_seconds=60), clock=clock) as bridge:
            length = await _two_windows(net, bridge, clock)
            await archive.wait_logs(lambda: _verified(archive, length), timeout=WAIT)
        assert list(archive.archived().values()) == [length]
        # The bridge is gone; a newcomer asks it, hears nothing, and asks the archive.
        late_config = net.node_config(net.member("late"), mode=NetworkMode.PUBLIC)
        late_config = late_config.model_copy(update={
            "reliability": late_config.reliability.model_copy(update={
                "archive": f"{archive_member}/archive"})})
        async with PearNetwork(late_config) as late:
            await late.wait_logs(lambda: _verified(late, length), timeout=WAIT)
            assert late.status().log_repaired >= length - 2 * CATEGORIES


async def test_consortium_members_verify_and_repair_the_bridges_consortium_log(
        net: Net) -> None:
    """With ``consortium_output`` the consortium's own aggregates and receipts form a second
    log, on the consortium broker, which members follow as they follow each other's."""
    clock = Clock()
    config = net.bridge_config(consortium_output=True, active="k1", settle_seconds=60,
                               consortium_lag_seconds=DAY, publication_lag_seconds=3 * DAY)
    inputs = _inputs(1) + _inputs(0)
    async with Bridge(config, clock=clock) as bridge, \
            PearNetwork(net.node_config(net.member("early"))) as early:
        await publish(net, inputs)
        await wait(bridge, lambda s: s.items_counted >= len(inputs))
        clock.advance(2 * DAY + 1)  # past the consortium lag of both windows
        bridge.poke()
        status = await wait(bridge, lambda s: s.consortium_log_length == 4 * CATEGORIES
                            and s.consortium_outbox_depth == 0)
        length = 4 * CATEGORIES
        await early.wait_logs(lambda: _verified(early, length), timeout=WAIT)
        assert early.status().log_repaired == 0
        async with PearNetwork(net.node_config(net.member("late"))) as late:
            await late.wait_logs(lambda: _verified(late, length), timeout=WAIT)
            late_status = late.status()
    assert status.consortium_log_length == length
    assert late_status.log_repaired >= 2 * CATEGORIES and late_status.log_forks == 0
    assert config.history_dir("single", "consortium") == \
        config.state_path.with_name(f"{config.state_path.name}.consortium.history")


async def test_a_restarted_bridge_continues_its_log(net: Net) -> None:
    clock = Clock()
    config = net.bridge_config(settle_seconds=60)
    async with _reader(net, "reader") as reader:
        ids = []
        for days_ago in (1, 0):  # one window per run of the bridge
            async with Bridge(config, clock=clock) as bridge:
                inputs = _inputs(days_ago)
                await publish(net, inputs)
                await wait(bridge, lambda s: s.items_counted >= CATEGORIES * COMPANIES)
                status = await close_window(bridge, clock)
                ids.append(status.log_id)
        length = 4 * CATEGORIES
        await reader.wait_logs(lambda: _verified(reader, length), timeout=WAIT)
        status = reader.status()
    assert ids[0] is not None and ids[0] == ids[1] and status.log_forks == 0
    assert [v.log_id for v in reader.logs()] == [ids[0]]


async def test_a_public_broker_whose_acl_predates_the_log_still_serves_aggregates(
        net: Net) -> None:
    """Upgraded bridge and readers, broker ACL not rendered again: the log's topics are
    refused, everything else works as before."""
    acl = net.public.acl_path
    acl.write_text("".join(line for line in acl.read_text().splitlines(keepends=True)
                           if "/log/" not in line))
    await asyncio.to_thread(net.public.reload_and_wait)
    clock = Clock()
    async with Bridge(net.bridge_config(), clock=clock) as bridge:
        await publish(net, _inputs(0))
        await wait(bridge, lambda s: s.items_counted >= CATEGORIES * COMPANIES)
        await close_window(bridge, clock)
        async with _reader(net, "reader") as reader:
            result = await reader.sync()
            status, views = reader.status(), reader.logs()
    assert len(result.aggregates) == CATEGORIES
    assert status.connected and status.log_forks == 0 and not status.log_refused
    assert all(v.head_length is None for v in views)  # the bridge's head was refused
