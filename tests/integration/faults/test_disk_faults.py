"""The outbox's disk fills up while the node is offline, then space comes back.

The outbox lives on a small tmpfs (we run as root, as CI does); a filler file eats the room
while the sender cannot reach the broker (its proxy refuses connections), so every insight
piles up on disk until a write fails. What the scenario proves:

- every insight the node accepted before the disk filled is delivered once the link heals
  (zero loss), nothing it had stored is damaged by the failed writes;
- every refused insight raises an :class:`OutboxError` that says "disk full" and names the
  outbox, and is counted in ``status().dropped`` (``outbox_refused``);
- the node neither crashes nor hangs, and accepts insights again by itself once space is
  free (the outbox re-creates its reserve file), with the time that takes reported.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

from brokers import MosquittoBroker
from faultkit import Collector, PeakRSS, insight
from faultproxy import FaultProxy
from faults_report import record

from pear_mqtt.config.models import NetworkConfig
from pear_mqtt.errors import OutboxError
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.node.outbox import RECOVER_INTERVAL


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def disk_mib(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize // (1 << 20)


async def test_outbox_disk_full_refuses_counts_and_recovers(
        mosquitto: MosquittoBroker, proxy_factory: Callable[[MosquittoBroker], FaultProxy],
        node: Callable[..., NetworkConfig], small_disk: Path) -> None:
    proxy = proxy_factory(mosquitto)
    proxy.partition("refuse")  # the sender is offline: everything stays in its outbox
    outbox = small_disk / "outbox.sqlite"
    mem = PeakRSS()
    sent: list[str] = []
    errors: list[str] = []
    async with PearNetwork(node("globex", mosquitto.tls_url)) as rx:
        got = Collector(rx)
        tx = PearNetwork(node("acme", proxy.url, outbox=outbox))
        await tx.connect(wait=False)
        try:
            # Leave ~600 KB: a few thousand insights, then SQLITE_FULL.
            filler = small_disk / "filler"
            # In chunks: one buffer the size of the disk would count in the memory growth.
            left = max(0, free_bytes(small_disk) - 600 * 1024)
            with filler.open("wb") as fh:
                while left > 0:
                    left -= fh.write(bytes(min(left, 1 << 20)))
            i = 0
            while len(errors) < 20:
                assert i < 50_000, "the disk never filled up"
                try:
                    sent.append(await tx.broadcast_market_insight(insight(i)))
                except OutboxError as exc:
                    errors.append(str(exc))
                i += 1
            refused = len(errors)
            st = tx.status()
            assert st.outbox_depth >= len(sent)  # what was accepted is still on disk
            # Space comes back: the node takes insights again without being restarted.
            filler.unlink()
            freed = time.monotonic()
            deadline = freed + RECOVER_INTERVAL * 3
            while True:
                try:
                    sent.append(await tx.broadcast_market_insight(insight(i)))
                    break
                except OutboxError as exc:
                    errors.append(str(exc))
                    assert time.monotonic() < deadline, f"still refused after space freed: {exc}"
                    await asyncio.sleep(0.1)  # polling a condition with no event (disk space)
            recovery = time.monotonic() - freed
            refused = len(errors)
            for j in range(1, 100):
                sent.append(await tx.broadcast_market_insight(insight(i + j)))
            # The link heals: everything accepted reaches the receiver.
            proxy.heal()
            await tx.wait_connected(timeout=20)
            await tx.flush(timeout=60)
            await got.wait_ids(set(sent), timeout=60)
            counted = tx.status().dropped.get("outbox_refused", 0)
        finally:
            await asyncio.wait_for(tx.disconnect(), 20)
    lost = len(set(sent) - got.ids.keys())
    record("outbox disk full while offline, then space freed", group="disk", sent=len(sent),
           delivered=len(got.ids.keys() & set(sent)), lost=lost, refused=refused,
           duplicated=got.duplicates, recovery_s=recovery, peak_rss_mb=mem.peak,
           notes=f"{disk_mib(small_disk)} MiB tmpfs; {refused} broadcasts refused with "
           "OutboxError (disk full); "
           f"status().dropped['outbox_refused'] = {counted}; recovery: space freed → "
           "accepted again" + f"; memory +{mem.growth:.0f} MB")
    assert lost == 0
    assert all("disk full" in e and str(outbox) in e for e in errors), errors[0]
    assert counted == refused, (
        f"{refused} insights were refused but status().dropped['outbox_refused'] is "
        f"{counted}: a refused broadcast must be counted, not only raised")
