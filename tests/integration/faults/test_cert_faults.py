"""A node certificate that expires while the node is connected.

The sender (acme) connects through a :class:`faultproxy.FaultProxy` with a certificate valid
for a few seconds; its TLS session outlives the certificate, because TLS checks validity only
at the handshake. What the scenario proves:

- before expiry everything is delivered;
- after expiry every receiver refuses the envelopes it still signs, each counted as
  ``bad_signature`` ("certificate ... expired at ..."), and delivers none of them;
- when the connection is lost (the proxy resets it) the broker refuses the reconnect, the
  node says why in ``status().last_error`` (the certificate expired) and keeps retrying with
  backoff instead of crashing or hanging; ``disconnect()`` returns promptly.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path

from brokers import MosquittoBroker, NetworkPKI
from faultkit import Collector, stream, wait_until
from faultproxy import FaultProxy
from faults_report import record

from pear_mqtt.config.models import NetworkConfig
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.security import pki as pkimod

LIFETIME = 6.0  # seconds the certificate is valid after it is issued


async def test_certificate_expiring_while_connected(
        mosquitto: MosquittoBroker, proxy_factory: Callable[[MosquittoBroker], FaultProxy],
        node: Callable[..., NetworkConfig], pki: NetworkPKI, tmp_path: Path) -> None:
    n = 100
    now = dt.datetime.now(dt.UTC)
    cert = pkimod.issue(ca_dir=pki.ca_dir, out_dir=tmp_path / "short", role="node",
                        member="acme", node="store-short", key_type=pki.key_type,
                        not_before=now - dt.timedelta(minutes=1),
                        not_after=now + dt.timedelta(seconds=LIFETIME))
    # X.509 stores whole seconds: the certificate is dead one second after this instant.
    expires = now.replace(microsecond=0).timestamp() + LIFETIME + 1
    proxy = proxy_factory(mosquitto)
    async with PearNetwork(node("globex", mosquitto.tls_url)) as rx:
        got = Collector(rx)
        tx = PearNetwork(node("acme", proxy.url, node="store-short", cert=cert,
                              outbox=tmp_path / "outbox.sqlite"))
        await tx.connect(timeout=5)
        try:
            before = await stream(tx, n, rate=0)
            await got.wait_ids(set(before), timeout=20)
            assert time.time() < expires, "the certificate expired before the test began"

            # Waiting for a wall-clock instant (certificate expiry), bounded.
            await wait_until(lambda: time.time() > expires + 0.5, LIFETIME + 5,
                             "the certificate to expire")
            refused_before = rx.status().dropped.get("bad_signature", 0)
            after = await stream(tx, n, rate=0, start=n)
            await tx.flush(timeout=20)  # the broker still takes them: TLS was checked once
            await rx.sync(timeout=10)  # every envelope before the marker has been judged
            refused = rx.status().dropped.get("bad_signature", 0) - refused_before
            assert refused >= 1, "envelopes signed with an expired certificate were accepted"
            assert not got.ids.keys() & set(after)

            # The connection drops; the reconnect must fail with a reason, and keep trying.
            await asyncio.to_thread(proxy.drop)
            await tx.wait_disconnected(timeout=5)
            await wait_until(lambda: bool(tx.status().last_error), 15,
                             "the refused reconnect to be reported")
            error = tx.status().last_error or ""
            st = tx.status()
            # Degraded, not down: the supervisor keeps trying with backoff (a renewed
            # certificate file is read at the next attempt).
            assert not st.connected and st.health.value == "degraded"
        finally:
            began = time.monotonic()
            await asyncio.wait_for(tx.disconnect(), 10)
            closed_in = time.monotonic() - began
    record("node certificate expires while connected", group="certificates", sent=2 * n,
           delivered=len(got.ids.keys() & {*before, *after}), lost=0, refused=refused,
           notes=f"{n} before expiry delivered; {n} after expiry refused in {refused} "
           f"envelope(s) as bad_signature; reconnect refused: {error[:120]!r}; disconnect "
           f"took {closed_in:.2f} s")
    assert "expired" in error.lower() and "certificate" in error.lower(), error
    assert str(cert.cert) in error, f"the error should name the certificate file: {error}"
