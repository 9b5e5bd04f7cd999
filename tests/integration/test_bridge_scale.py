"""Bridge scale-out end to end (docs/BRIDGE.md, "Scale-out"): two worker instances and a
merger over real consortium and public mosquitto brokers publish exactly the aggregates one
bridge publishes on the same input, also when a worker and the merger are killed mid-way.

A single bridge and the scaled-out bridge (its own bridge id, sessions and state files) read
the same members' messages side by side and publish to the same public topics; the public
spy sees both. Their envelopes differ (signature, sequence number, time), so the test
compares the envelopes' aggregate bodies, as parsed JSON objects, window by window.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from bridgekit import (
    DAY,
    WAIT,
    Clock,
    Input,
    Net,
    aggregate_bodies,
    companies_by_instance,
    insight,
    instance_of,
    publish,
    wait,
    yesterday,
)
from brokers import GROUP_KEY, probe

from pear_mqtt.bridge.config import BridgeConfig
from pear_mqtt.bridge.service import Bridge
from pear_mqtt.bridge.status import BridgeStatus
from pear_mqtt.config.models import EncryptionConfig, default_sharing
from pear_mqtt.model.insight import NetworkMode
from pear_mqtt.model.topics import TopicScheme
from pear_mqtt.security.envelope import EnvelopeCodec
from pear_mqtt.security.pki import CertPaths
from pear_mqtt.security.signing import Signer
from pear_mqtt.security.trust import TrustStore

INSTANCES = 2
LAG = 2 * DAY  # both windows (yesterday and the day before) wait until the test moves on


def _inputs(groups: Sequence[Sequence[str]], category: str) -> list[Input]:
    """Yesterday: every company, two stores, several fields (some companies in a second
    region). The day before: only instance 0's companies, so instance 1 holds nothing of
    that window and must say so with an empty partial."""
    start = yesterday()
    everyone = [c for g in groups for c in g]
    inputs: list[Input] = []
    for n, company in enumerate(everyone):
        for s in range(2):
            inputs.append(Input(company=company, store=f"store-{s + 1}", insight=insight(
                category, start=start + timedelta(hours=n + s),
                price=1.0 + n / 7 + s / 13, units=100.0 + 3.1 * n + s, revenue=250.0 + n * n,
                change=0.5 + n / 10, region="north" if n % 3 else "south")))
    earlier = start - timedelta(days=1)
    for n, company in enumerate(groups[0] * 2):
        inputs.append(Input(company=company, store="store-1", insight=insight(
            category, start=earlier + timedelta(hours=n), units=40.0 + n * 1.7,
            revenue=90.0 + n)))
    return inputs


def _scaled_config(net: Net, run: str, instance: int, **kw: Any) -> BridgeConfig:
    return net.bridge_config(bridge_id=f"m{run}", state=f"m{run}.sqlite", instances=INSTANCES,
                             instance=instance, **{"publication_lag_seconds": LAG, **kw})


@dataclass
class _Side:
    """One bridge beside the scaled-out one (its workers and its merger), all running."""

    single: Bridge
    scaled: list[Bridge]
    merger: Bridge
    configs: list[BridgeConfig]
    running: list[Bridge] = field(default_factory=list)

    async def start(self, bridge: Bridge) -> Bridge:
        self.running.append(bridge)
        await bridge.start()
        return bridge

    async def restart_worker(self, instance: int, clock: Clock) -> Bridge:
        self.scaled[instance] = await self.start(Bridge(self.configs[instance], clock=clock))
        return self.scaled[instance]

    async def restart_merger(self, clock: Clock) -> Bridge:
        self.merger = await self.start(Bridge(self.configs[0], clock=clock, role="merge"))
        return self.merger


@contextlib.asynccontextmanager
async def _side_by_side(net: Net, run: str, clock: Clock, *, behind: Clock | None = None,
                        **kw: Any) -> AsyncIterator[_Side]:
    """One bridge and the scaled-out bridge on the same input, started and connected;
    instance 1 keeps ``behind`` as its clock when given; all stopped on the way out."""
    configs = [_scaled_config(net, run, i, **kw) for i in range(INSTANCES)]
    single = Bridge(net.bridge_config(bridge_id=f"s{run}", state=f"s{run}.sqlite",
                                      **{"publication_lag_seconds": LAG, **kw}), clock=clock)
    scaled = [Bridge(c, clock=behind if i == 1 and behind else clock)
              for i, c in enumerate(configs)]
    side = _Side(single=single, scaled=scaled, configs=configs,
                 merger=Bridge(configs[0], clock=clock, role="merge"))
    try:
        for b in (single, *scaled, side.merger):
            await side.start(b)
        for b in side.running:
            await _connected(b)
        yield side
    finally:
        for b in side.running:
            await b.stop()


async def _counted_shares(net: Net, inputs: Sequence[Input], side: _Side) -> None:
    """Wait until the single bridge counted every input and each worker its share."""
    await wait(side.single, lambda s: s.items_counted >= len(inputs))
    for i, worker in enumerate(side.scaled):
        share = _share(net, inputs, i)
        assert 0 < share < len(inputs)
        status = await wait(worker, lambda s, n=share: s.items_counted >= n)
        assert status.items_counted == share and status.role == "worker"


def _retained_partials(net: Net, run: str, certs: CertPaths, member: str) -> list[str]:
    """The partial topics a new subscriber with ``certs`` receives, proved complete by a
    marker ``member`` publishes after the subscription."""
    partials = f"pear/v1/consortium/{net.pki.network}/state/bridge/partials/#"
    marker = f"pear/v1/consortium/{net.pki.network}/{member}/state/store-1/m{uuid.uuid4().hex}"
    with probe(net.consortium, certs, subscribe=[partials, marker]) as reader, \
            probe(net.consortium, net.pki.node(member, "store-1")) as writer:
        writer.publish(marker, b"marker")
        _, before = reader.expect(marker, timeout=WAIT)
    return [m.topic for m in before if m.payload and f"/partials/m{run}/" in m.topic]


def _share(net: Net, inputs: Sequence[Input], instance: int) -> int:
    return sum(1 for i in inputs
               if instance_of(net, i.company, i.insight.category, INSTANCES) == instance)


async def _connected(bridge: Bridge) -> BridgeStatus:
    return await wait(bridge, lambda s: bool(s.sources) and all(s.sources.values()))


async def _close_all(clock: Clock, side: _Side, windows: int) -> None:
    clock.advance(LAG + DAY + 1)
    for b in (side.single, *side.scaled, side.merger):
        b.poke()
    for b in (side.single, side.merger):
        # (the merger's consortium outbox: the empty messages clearing the partials)
        await wait(b, lambda s: s.windows_published >= windows and s.outbox_depth == 0
                   and s.consortium_outbox_depth == 0)


def _assert_same_aggregates(net: Net, windows: int) -> None:
    bodies = aggregate_bodies(net, net.marker())
    assert len(bodies) == windows, sorted(bodies)
    for key, pair in bodies.items():
        # One from the single bridge, one from the merger: identical statistics, bit for bit.
        assert len(pair) == 2, (key, len(pair))
        assert pair[0] == pair[1], key
        assert pair[0]["cells"], key


async def test_scale_out_publishes_exactly_what_one_bridge_publishes(net: Net) -> None:
    run = uuid.uuid4().hex[:8]
    category = f"scale/{run}"
    groups = companies_by_instance(net, category, instances=INSTANCES, each=5)
    inputs = _inputs(groups, category)
    clock = Clock()
    async with _side_by_side(net, run, clock) as side:
        await publish(net, inputs)
        await _counted_shares(net, inputs, side)
        for worker in side.scaled:
            assert worker.status().other_instances > 0
        await _close_all(clock, side, windows=2)
        status = side.merger.status()
        assert status.items_counted == len(inputs) and status.partials_missing == {}
        assert status.dropped == {} and side.single.status().dropped == {}
    _assert_same_aggregates(net, windows=2)


async def test_scale_out_takes_its_share_of_envelopes_of_several_categories(net: Net) -> None:
    """Each node sends its few insights of each of four categories in envelopes of several
    categories (docs/DESIGN.md, Batching): each instance counts its partitions' items of
    them, and the merger publishes what the single bridge does."""
    run = uuid.uuid4().hex[:8]
    categories = [f"mix/{run}/c{i}" for i in range(4)]
    groups = companies_by_instance(net, categories[0], instances=INSTANCES, each=5)
    inputs = [i for c in categories for i in _inputs(groups, c)]
    clock = Clock()
    mixed = f"pear/v1/consortium/{net.pki.network}/+/insights/$mixed"
    async with _side_by_side(net, run, clock) as side:
        with probe(net.consortium, subscribe=[mixed]) as spy:
            await publish(net, inputs, many=True)
            marker = f"pear/v1/consortium/{net.pki.network}/spy/{uuid.uuid4().hex}"
            spy.subscribe(marker)
            with probe(net.consortium) as p:
                p.publish(marker, b"marker")
            _, seen = spy.expect(marker, timeout=WAIT)
        # (every node flushed: its envelopes came before the marker)
        assert any(m.topic.endswith("/insights/$mixed") for m in seen)
        await _counted_shares(net, inputs, side)
        await _close_all(clock, side, windows=2)
        status = side.merger.status()
        assert status.items_counted == len(inputs) and status.partials_missing == {}
        assert status.dropped == {} and side.single.status().dropped == {}
    _assert_same_aggregates(net, windows=2 * len(categories))


async def test_a_killed_worker_and_merger_lose_nothing(net: Net) -> None:
    run = uuid.uuid4().hex[:8]
    category = f"crash/{run}"
    groups = companies_by_instance(net, category, instances=INSTANCES, each=5)
    inputs = _inputs(groups, category)
    first, second = inputs[::2], inputs[1::2]
    clock = Clock()
    async with _side_by_side(net, run, clock) as side:
        await publish(net, first)
        await wait(side.single, lambda s: s.items_counted >= len(first))
        await wait(side.scaled[1], lambda s: s.items_counted >= _share(net, first, 1))
        # Killed: connections dropped without DISCONNECT, nothing drained or flushed.
        await side.scaled[1].stop(drain=False)
        await side.merger.stop(drain=False)
        await publish(net, second)  # queued in the killed worker's persistent session
        await wait(side.single, lambda s: s.items_counted >= len(inputs))
        worker = await side.restart_worker(1, clock)
        status = await wait(worker, lambda s: s.open_items >= _share(net, inputs, 1))
        assert status.open_items == _share(net, inputs, 1)
        # The workers close their windows while the merger is down: their partials wait,
        # retained, for it.
        clock.advance(LAG + DAY + 1)
        for b in (side.single, *side.scaled):
            b.poke()
        for w in side.scaled:
            await wait(w, lambda s: s.windows_published >= 2
                       and s.consortium_outbox_depth == 0)
        # Retained, sealed, for bridges only: a member's subscription gets none of them.
        member = net.member(groups[0][0])
        retained = _retained_partials(net, run, net.pki.bridge, member)
        assert len(retained) >= 2 * INSTANCES
        assert _retained_partials(net, run, net.pki.node(member, "store-1"), member) == []
        await side.restart_merger(clock)
        await _close_all(clock, side, windows=2)
        assert side.merger.status().items_counted == len(inputs)
        # Merged and closed: the partials are cleared from the broker.
        assert _retained_partials(net, run, net.pki.bridge, member) == []
    _assert_same_aggregates(net, windows=2)


async def test_the_merger_waits_for_a_missing_instance_and_names_it(net: Net) -> None:
    run = uuid.uuid4().hex[:8]
    category = f"wait/{run}"
    groups = companies_by_instance(net, category, instances=INSTANCES, each=5)
    inputs = _inputs(groups, category)
    clock, behind = Clock(), Clock()  # instance 1 keeps its own clock: it is down for long
    async with _side_by_side(net, run, clock, behind=behind) as side:
        await publish(net, inputs)
        await _counted_shares(net, inputs, side)
        await side.scaled[1].stop(drain=False)  # killed before its windows were due
        clock.advance(LAG + DAY + 1)
        for b in (side.single, side.scaled[0], side.merger):
            b.poke()
        await wait(side.scaled[0], lambda s: s.windows_published >= 2
                   and s.consortium_outbox_depth == 0)
        # Both windows wait for instance 1, and the status says so; nothing is published.
        status = await wait(side.merger, lambda s: len(s.partials_missing) == 2)
        assert all(missing == [1] for missing in status.partials_missing.values())
        assert status.windows_published == 0 and status.messages_published == 0
        worker = await side.restart_worker(1, behind)
        status = await wait(worker, lambda s: s.open_items >= _share(net, inputs, 1))
        assert status.open_items == _share(net, inputs, 1)  # kept in its state file
        behind.advance(LAG + DAY + 1)
        worker.poke()
        for b in (side.single, side.merger):
            await wait(b, lambda s: s.windows_published >= 2 and s.outbox_depth == 0
                       and s.consortium_outbox_depth == 0)
        assert side.merger.status().partials_missing == {}
    _assert_same_aggregates(net, windows=2)


async def test_a_restarted_worker_counts_its_backlog_of_a_window_others_closed(
        net: Net) -> None:
    """Instance 1 is down while its members send and while the window becomes due; instance
    0 closes the window meanwhile. Back, instance 1 sees that partial (retained) and its
    backlog (its session) in either order: it opens the window and settles it as one bridge
    would, so the backlog is counted, not dropped as late."""
    run = uuid.uuid4().hex[:8]
    category = f"backlog/{run}"
    groups = companies_by_instance(net, category, instances=INSTANCES, each=5)
    inputs = [i for i in _inputs(groups, category) if i.insight.window_start >= yesterday()]
    clock = Clock()
    async with _side_by_side(net, run, clock, settle_seconds=3600.0,
                             max_settle_seconds=7200.0) as side:
        await side.scaled[1].stop(drain=False)  # down before its members send anything
        await publish(net, inputs)
        await wait(side.single, lambda s: s.items_counted >= len(inputs))
        await wait(side.scaled[0], lambda s: s.items_counted >= _share(net, inputs, 0))
        clock.advance(LAG + DAY + 3601)  # due, and settled for everyone who is up
        for b in (side.single, side.scaled[0], side.merger):
            b.poke()
        await wait(side.single, lambda s: s.windows_published >= 1 and s.outbox_depth == 0)
        await wait(side.merger, lambda s: list(s.partials_missing.values()) == [[1]])
        worker = await side.restart_worker(1, clock)
        status = await wait(worker, lambda s: s.items_counted >= _share(net, inputs, 1))
        assert status.dropped == {} and status.items_counted == _share(net, inputs, 1)
        clock.advance(3601)  # its own inputs settle
        worker.poke()
        await wait(side.merger, lambda s: s.windows_published >= 1 and s.outbox_depth == 0)
        assert side.merger.status().items_counted == len(inputs)
    _assert_same_aggregates(net, windows=1)


async def test_scale_out_gives_the_consortium_then_the_public_one_bridges_aggregates(
        net: Net) -> None:
    """With consortium_output and the default consortium policy (prices as ranges_only
    buckets, sales sealed): the instances close their windows at the consortium lag, and
    the merger gives the members, then the public, what one bridge gives them: price
    histograms (each company's latest bucket, across both instances) and sales
    statistics."""
    run = uuid.uuid4().hex[:8]
    category = f"hist/{run}"
    levels = default_sharing(NetworkMode.CONSORTIUM)
    groups = companies_by_instance(net, category, instances=INSTANCES, each=3)
    start = yesterday()
    inputs = [Input(company=c, store=f"store-{s + 1}", insight=insight(
        category, start=start + timedelta(hours=n + 3 * s), price=1.05 + n / 9 + s * 0.7,
        units=50.0 + n * 2.3 + s, revenue=80.0 + n))
        for n, c in enumerate(c for g in groups for c in g) for s in range(2)]
    clock = Clock()
    scheme = TopicScheme(mode="consortium", network=net.pki.network, member="x")
    member = EnvelopeCodec(signer=Signer.from_files(key_file=net.pki.bridge.key,
                                                    cert_file=net.pki.bridge.cert),
                           trust=TrustStore.from_files(ca_files=[net.pki.ca],
                                                       network=net.pki.network),
                           encryption=EncryptionConfig(keys={"k1": GROUP_KEY}))
    with probe(net.consortium, subscribe=[scheme.consortium_aggregate(category)]) as cspy:
        async with _side_by_side(net, run, clock, sharing=levels, consortium_output=True,
                                 active="k1", consortium_lag_seconds=DAY,
                                 publication_lag_seconds=3 * DAY) as side:
            await publish(net, inputs, levels=levels)
            await _counted_shares(net, inputs, side)
            clock.advance(2 * DAY + 1)  # past the consortium lag, not the public one
            for b in side.running:
                b.poke()
            bodies = []
            for _ in range(2):  # one from each bridge (the probe blocks: in a thread)
                msg, _ = await asyncio.to_thread(cspy.expect,
                                                 scheme.consortium_aggregate(category), WAIT)
                bodies.append(member.decode(msg.payload, check_replay=False).message.body)
            assert bodies[0] == bodies[1]
            (cell,) = bodies[0]["cells"]
            assert cell["histograms"][0]["companies"] == 6
            assert cell["groups"][0]["fields"]["units"]["companies"] == 6
            assert (side.single.status().windows_published
                    == side.merger.status().windows_published == 0)
            clock.advance(2 * DAY)
            for b in side.running:
                b.poke()
            for b in (side.single, side.merger):
                await wait(b, lambda s: s.windows_published >= 1 and s.outbox_depth == 0
                           and s.consortium_outbox_depth == 0)
    _assert_same_aggregates(net, windows=1)
