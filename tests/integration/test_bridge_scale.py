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
import uuid
from collections.abc import Sequence
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
    return net.bridge_config(bridge_id=f"m{run}", state=f"m{run}.sqlite",
                             publication_lag_seconds=LAG, instances=INSTANCES,
                             instance=instance, **kw)


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


async def _close_all(clock: Clock, single: Bridge, scaled: Sequence[Bridge],
                     merger: Bridge, windows: int) -> None:
    clock.advance(LAG + DAY + 1)
    for b in (single, *scaled, merger):
        b.poke()
    for b in (single, merger):
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
    single = Bridge(net.bridge_config(bridge_id=f"s{run}", state=f"s{run}.sqlite",
                                        publication_lag_seconds=LAG), clock=clock)
    scaled = [Bridge(_scaled_config(net, run, i), clock=clock) for i in range(INSTANCES)]
    merger = Bridge(_scaled_config(net, run, 0), clock=clock, role="merge")
    everyone = (single, *scaled, merger)
    for b in everyone:
        await b.start()
    try:
        for b in everyone:
            await _connected(b)
        await publish(net, inputs)
        await wait(single, lambda s: s.items_counted >= len(inputs))
        for i, worker in enumerate(scaled):
            share = _share(net, inputs, i)
            assert 0 < share < len(inputs)
            status = await wait(worker, lambda s, n=share: s.items_counted >= n)
            assert status.items_counted == share and status.role == "worker"
            assert status.other_instances > 0
        await _close_all(clock, single, scaled, merger, windows=2)
        status = merger.status()
        assert status.items_counted == len(inputs) and status.partials_missing == {}
        assert status.dropped == {} and single.status().dropped == {}
    finally:
        for b in everyone:
            await b.stop()
    _assert_same_aggregates(net, windows=2)


async def test_a_killed_worker_and_merger_lose_nothing(net: Net) -> None:
    run = uuid.uuid4().hex[:8]
    category = f"crash/{run}"
    groups = companies_by_instance(net, category, instances=INSTANCES, each=5)
    inputs = _inputs(groups, category)
    first, second = inputs[::2], inputs[1::2]
    clock = Clock()
    scale_cfg = [_scaled_config(net, run, i) for i in range(INSTANCES)]
    single = Bridge(net.bridge_config(bridge_id=f"s{run}", state=f"s{run}.sqlite",
                                        publication_lag_seconds=LAG), clock=clock)
    scaled = [Bridge(c, clock=clock) for c in scale_cfg]
    merger = Bridge(scale_cfg[0], clock=clock, role="merge")
    running = [single, *scaled, merger]
    for b in running:
        await b.start()
    try:
        for b in running:
            await _connected(b)
        await publish(net, first)
        await wait(single, lambda s: s.items_counted >= len(first))
        await wait(scaled[1], lambda s: s.items_counted >= _share(net, first, 1))
        # Killed: connections dropped without DISCONNECT, nothing drained or flushed.
        await scaled[1].stop(drain=False)
        await merger.stop(drain=False)
        running.remove(merger)
        await publish(net, second)  # queued in the killed worker's persistent session
        await wait(single, lambda s: s.items_counted >= len(inputs))
        scaled[1] = Bridge(scale_cfg[1], clock=clock)
        await scaled[1].start()
        status = await wait(scaled[1], lambda s: s.open_items >= _share(net, inputs, 1))
        assert status.open_items == _share(net, inputs, 1)
        # The workers close their windows while the merger is down: their partials wait,
        # retained, for it.
        clock.advance(LAG + DAY + 1)
        for b in (single, *scaled):
            b.poke()
        for w in scaled:
            await wait(w, lambda s: s.windows_published >= 2
                       and s.consortium_outbox_depth == 0)
        # Retained, sealed, for bridges only: a member's subscription gets none of them.
        member = net.member(groups[0][0])
        retained = _retained_partials(net, run, net.pki.bridge, member)
        assert len(retained) >= 2 * INSTANCES
        assert _retained_partials(net, run, net.pki.node(member, "store-1"), member) == []
        merger = Bridge(scale_cfg[0], clock=clock, role="merge")
        running.append(merger)
        await merger.start()
        await _close_all(clock, single, scaled, merger, windows=2)
        assert merger.status().items_counted == len(inputs)
        # Merged and closed: the partials are cleared from the broker.
        assert _retained_partials(net, run, net.pki.bridge, member) == []
    finally:
        for b in (*running, *scaled):
            await b.stop()
    _assert_same_aggregates(net, windows=2)


async def test_the_merger_waits_for_a_missing_instance_and_names_it(net: Net) -> None:
    run = uuid.uuid4().hex[:8]
    category = f"wait/{run}"
    groups = companies_by_instance(net, category, instances=INSTANCES, each=5)
    inputs = _inputs(groups, category)
    clock, behind = Clock(), Clock()  # instance 1 keeps its own clock: it is down for long
    configs = [_scaled_config(net, run, i) for i in range(INSTANCES)]
    single = Bridge(net.bridge_config(bridge_id=f"s{run}", state=f"s{run}.sqlite",
                                      publication_lag_seconds=LAG), clock=clock)
    scaled = [Bridge(configs[0], clock=clock), Bridge(configs[1], clock=behind)]
    merger = Bridge(configs[0], clock=clock, role="merge")
    everyone = [single, *scaled, merger]
    for b in everyone:
        await b.start()
    try:
        for b in everyone:
            await _connected(b)
        await publish(net, inputs)
        await wait(single, lambda s: s.items_counted >= len(inputs))
        for i, worker in enumerate(scaled):
            share = _share(net, inputs, i)
            await wait(worker, lambda s, n=share: s.items_counted >= n)
        await scaled[1].stop(drain=False)  # killed before its windows were due
        clock.advance(LAG + DAY + 1)
        for b in (single, scaled[0], merger):
            b.poke()
        await wait(scaled[0], lambda s: s.windows_published >= 2
                   and s.consortium_outbox_depth == 0)
        # Both windows wait for instance 1, and the status says so; nothing is published.
        status = await wait(merger, lambda s: len(s.partials_missing) == 2)
        assert all(missing == [1] for missing in status.partials_missing.values())
        assert status.windows_published == 0 and status.messages_published == 0
        scaled[1] = Bridge(configs[1], clock=behind)
        everyone.append(scaled[1])
        await scaled[1].start()
        status = await wait(scaled[1], lambda s: s.open_items >= _share(net, inputs, 1))
        assert status.open_items == _share(net, inputs, 1)  # kept in its state file
        behind.advance(LAG + DAY + 1)
        scaled[1].poke()
        for b in (single, merger):
            await wait(b, lambda s: s.windows_published >= 2 and s.outbox_depth == 0
                       and s.consortium_outbox_depth == 0)
        assert merger.status().partials_missing == {}
    finally:
        for b in everyone:
            await b.stop()
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
    settle = {"settle_seconds": 3600.0, "max_settle_seconds": 7200.0}
    clock = Clock()
    configs = [_scaled_config(net, run, i, **settle) for i in range(INSTANCES)]
    single = Bridge(net.bridge_config(bridge_id=f"s{run}", state=f"s{run}.sqlite",
                                      publication_lag_seconds=LAG, **settle), clock=clock)
    scaled = [Bridge(c, clock=clock) for c in configs]
    merger = Bridge(configs[0], clock=clock, role="merge")
    everyone = [single, *scaled, merger]
    for b in everyone:
        await b.start()
    try:
        for b in everyone:
            await _connected(b)
        await scaled[1].stop(drain=False)  # down before its members send anything
        await publish(net, inputs)
        await wait(single, lambda s: s.items_counted >= len(inputs))
        await wait(scaled[0], lambda s: s.items_counted >= _share(net, inputs, 0))
        clock.advance(LAG + DAY + 3601)  # due, and settled for everyone who is up
        for b in (single, scaled[0], merger):
            b.poke()
        await wait(single, lambda s: s.windows_published >= 1 and s.outbox_depth == 0)
        await wait(merger, lambda s: list(s.partials_missing.values()) == [[1]])
        scaled[1] = Bridge(configs[1], clock=clock)
        everyone.append(scaled[1])
        await scaled[1].start()
        status = await wait(scaled[1], lambda s: s.items_counted >= _share(net, inputs, 1))
        assert status.dropped == {} and status.items_counted == _share(net, inputs, 1)
        clock.advance(3601)  # its own inputs settle
        scaled[1].poke()
        await wait(merger, lambda s: s.windows_published >= 1 and s.outbox_depth == 0)
        assert merger.status().items_counted == len(inputs)
    finally:
        for b in everyone:
            await b.stop()
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
    kw: dict[str, Any] = {"sharing": levels, "consortium_output": True, "active": "k1",
                          "consortium_lag_seconds": DAY, "publication_lag_seconds": 3 * DAY}
    clock = Clock()
    single = Bridge(net.bridge_config(bridge_id=f"s{run}", state=f"s{run}.sqlite", **kw),
                    clock=clock)
    scaled = [Bridge(net.bridge_config(bridge_id=f"m{run}", state=f"m{run}.sqlite",
                                       instances=INSTANCES, instance=i, **kw), clock=clock)
              for i in range(INSTANCES)]
    merger = Bridge(net.bridge_config(bridge_id=f"m{run}", state=f"m{run}.sqlite",
                                      instances=INSTANCES, **kw), clock=clock, role="merge")
    everyone = (single, *scaled, merger)
    scheme = TopicScheme(mode="consortium", network=net.pki.network, member="x")
    member = EnvelopeCodec(signer=Signer.from_files(key_file=net.pki.bridge.key,
                                                    cert_file=net.pki.bridge.cert),
                           trust=TrustStore.from_files(ca_files=[net.pki.ca],
                                                       network=net.pki.network),
                           encryption=EncryptionConfig(keys={"k1": GROUP_KEY}))
    with probe(net.consortium, subscribe=[scheme.consortium_aggregate(category)]) as cspy:
        for b in everyone:
            await b.start()
        try:
            for b in everyone:
                await _connected(b)
            await publish(net, inputs, levels=levels)
            await wait(single, lambda s: s.items_counted >= len(inputs))
            for i, worker in enumerate(scaled):
                share = _share(net, inputs, i)
                await wait(worker, lambda s, n=share: s.items_counted >= n)
            clock.advance(2 * DAY + 1)  # past the consortium lag, not the public one
            for b in everyone:
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
            assert single.status().windows_published == merger.status().windows_published == 0
            clock.advance(2 * DAY)
            for b in everyone:
                b.poke()
            for b in (single, merger):
                await wait(b, lambda s: s.windows_published >= 1 and s.outbox_depth == 0
                           and s.consortium_outbox_depth == 0)
        finally:
            for b in everyone:
                await b.stop()
    _assert_same_aggregates(net, windows=1)
