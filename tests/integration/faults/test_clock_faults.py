"""Clock skew of minutes between a sender and its receivers.

Envelopes carry the sender's timestamp; receivers refuse one that lies more than
``max_clock_skew`` (300 s) in their future, or is older than ``max_message_age`` (30 days).
What the scenarios prove, with the sender's clock injected (``PearNetwork(clock=...)``, the
same hook the codec and the outbox use):

- a sender minutes *behind* or less than the tolerance *ahead* is delivered in full;
- a sender further ahead is refused by every receiver, each envelope counted as ``stale``,
  and nothing crashes or hangs on either side;
- a sender whose clock ran ahead (within tolerance) and is then corrected and restarted
  (an agent with its on-disk outbox) must still be delivered: sequence numbers start from
  the clock, so the corrected sender's new numbers lie below what receivers remember.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from brokers import MosquittoBroker
from faultkit import Collector, stream
from faults_report import record

from pear_mqtt.config.models import NetworkConfig
from pear_mqtt.node.network import PearNetwork

N = 200


def skewed(offset: float) -> Callable[[], float]:
    return lambda: time.time() + offset


@pytest.mark.parametrize("skew", [-600.0, +120.0, +600.0], ids=["behind-10min",
                                                               "ahead-2min", "ahead-10min"])
async def test_sender_clock_minutes_off(
        skew: float, mosquitto: MosquittoBroker, node: Callable[..., NetworkConfig]) -> None:
    tolerance = 300.0  # ReliabilityConfig.max_clock_skew's default
    accepted = skew <= tolerance
    # One insight per envelope, so envelopes refused = insights refused.
    async with PearNetwork(node("globex", mosquitto.tls_url)) as rx:
        got = Collector(rx)
        async with PearNetwork(node("acme", mosquitto.tls_url, batch_max_items=1),
                               clock=skewed(skew)) as tx:
            sent = await stream(tx, N, rate=0)
            await tx.flush(timeout=30)
            # The broker acknowledged everything; the marker below follows it through the
            # receiver's connection, so once it is back every envelope has been judged.
            if accepted:
                await got.wait_ids(set(sent), timeout=30)
            else:
                await rx.sync(timeout=10)
            st = rx.status()
            tx_status = tx.status()
    stale = st.dropped.get("stale", 0)
    if accepted:
        assert set(sent) <= got.ids.keys() and stale == 0
    else:
        assert not got.ids.keys() & set(sent), "an envelope from 10 minutes ahead was accepted"
        assert stale >= N, f"{stale} stale drops counted for {N} refused envelopes"
    assert tx_status.connected and tx_status.outbox_depth == 0
    delivered = len(got.ids.keys() & set(sent))
    label = f"{'+' if skew > 0 else '-'}{abs(skew) / 60:.0f} min"
    record(f"sender clock {label} (tolerance +{tolerance / 60:.0f} min)", group="time",
           sent=N, delivered=delivered, lost=N - delivered if accepted else 0,
           refused=0 if accepted else stale,
           notes="delivered in full" if accepted else
           f"all refused as stale ({stale} counted, presence included); not a loss: the "
           "receiver refused them by rule")


async def test_sender_clock_corrected_backwards_is_still_delivered(
        mosquitto: MosquittoBroker, node: Callable[..., NetworkConfig], tmp_path: Path) -> None:
    ahead = 120.0  # within tolerance: accepted, and sets the receiver's replay high mark
    # An agent as deployed: its on-disk outbox is the state it keeps across restarts.
    sender = node("acme", mosquitto.tls_url, outbox=tmp_path / "acme.sqlite")
    async with PearNetwork(node("globex", mosquitto.tls_url)) as rx:
        got = Collector(rx)
        async with PearNetwork(sender, clock=skewed(ahead)) as fast:
            before = await stream(fast, N, rate=0)
            await got.wait_ids(set(before), timeout=30)
        # The operator fixes the clock (or NTP steps it back) and restarts the agent.
        async with PearNetwork(sender) as fixed:
            after = await stream(fixed, N, rate=0)
            await fixed.flush(timeout=30)
            await rx.sync(timeout=10)  # every envelope before the marker has been judged
        delivered = len(got.ids.keys() & set(after))
        replayed = rx.status().dropped.get("replayed", 0)
    record("sender clock +2 min, then corrected (stepped back)", group="time",
           sent=2 * N, delivered=len(got.ids.keys() & {*before, *after}),
           lost=N - delivered, refused=replayed,
           notes=f"after the correction {N - delivered} of {N} insights dropped as "
           f"'replayed' ({replayed} envelopes)" if delivered < N else
           "delivered in full across the correction")
    assert delivered == N, (f"{N - delivered} of {N} insights sent after the clock was "
                            f"corrected were dropped ({replayed} envelopes as 'replayed')")
