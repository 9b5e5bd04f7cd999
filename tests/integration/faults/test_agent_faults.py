"""A store agent killed (SIGKILL) while it flushes its outbox, then started again.

A real ``pear-mqtt agent`` process fills its on-disk outbox while its link is partitioned
(a :class:`faultproxy.FaultProxy` refusing connections), the link heals, and the agent is
killed with SIGKILL once the receiver has a third of the insights: acknowledgements were in
flight, SQLite transactions half-way. A second agent on the same outbox (``--drain-only``)
delivers the rest. What the scenario proves: zero loss (every insight the first agent
accepted arrives, counted by item id at a receiving node), redeliveries de-duplicated and
counted, the outbox opens cleanly after the crash, the agent's peak memory is bounded, and
the time from the restart to the first new delivery is reported.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from agent_process import AgentProcess
from brokers import MosquittoBroker
from faultkit import Collector, peak_rss_mb
from faultproxy import FaultProxy
from faults_report import record

from pear_mqtt.config.manager import NetworkConfigManager
from pear_mqtt.config.models import NetworkConfig
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.node.outbox import Outbox

AGENT_MEMORY_BOUND_MB = 200


async def test_agent_killed_while_flushing_loses_nothing(
        mosquitto: MosquittoBroker, proxy_factory: Callable[[MosquittoBroker], FaultProxy],
        node: Callable[..., NetworkConfig], tmp_path: Path) -> None:
    n = 6000
    proxy = proxy_factory(mosquitto)
    proxy.partition("refuse")
    outbox = tmp_path / "agent-outbox.sqlite"
    config_file = tmp_path / "agent.toml"
    # Small batches and a slow link: the flush then takes several round trips of 256
    # envelopes in flight, so the kill lands with some rows acknowledged, some in flight and
    # some not yet sent.
    NetworkConfigManager.save(node("acme", proxy.url, batch_max_items=8), config_file,
                              include_secrets=True)
    async with PearNetwork(node("globex", mosquitto.tls_url)) as rx:
        got = Collector(rx)
        agent = await AgentProcess.start(
            "--config", config_file, "--outbox", outbox, "--simulate", "--count", n,
            "--rate", "0", "--seed", "3", "--status-interval", "0.05",
            "--drain-timeout", "60")
        # Everything is in the outbox and nothing could leave yet.
        await agent.wait_line(lambda s: f"queued={n} " in s and "connected=no" in s, 60)
        proxy.heal()
        proxy.delay(0.1)
        await got.wait_count(n // 3, timeout=60)
        agent_peak = peak_rss_mb(agent.proc.pid)
        await agent.kill(timeout=10)
        killed_at = len(got)
        # The crash left the outbox consistent, with what was not acknowledged still in it.
        with Outbox(path=outbox, max_bytes=64 << 20, max_age=7 * 86400.0) as box:
            left = box.depth
            rows = box.pending(limit=1_000_000)
        assert left > 0, "the kill came after the flush finished: nothing was tested"
        left_ids = {json.loads(r.payload)["iid"] for r in rows if r.kind == "insight"}

        drainer = await AgentProcess.start(
            "--config", config_file, "--outbox", outbox, "--drain-only",
            "--drain-timeout", "60", "--status-interval", "0")
        restarted = time.monotonic()
        # Recovery is the restarted agent's first delivery: of the rows it found, those the
        # broker had not already passed on before the kill.
        only_drainer = left_ids - got.ids.keys()
        await got.wait_count(n, timeout=90)
        code, report = await drainer.finish(timeout=90)
        recovery = (min(got.ids[i] for i in only_drainer) - restarted
                    if only_drainer else None)
        duplicates = got.duplicates
        dropped = {k: v for k, v in rx.status().dropped.items() if k != "replayed"}
    assert code == 0 and report["drained"], drainer.stderr[-20:]
    assert len(got) == n and got.by_member == {"acme": n}
    assert not dropped, dropped
    assert agent_peak is not None and agent_peak < AGENT_MEMORY_BOUND_MB, agent_peak
    record("agent SIGKILLed while flushing its outbox, restarted", group="agent", sent=n,
           delivered=len(got), lost=n - len(got), duplicated=duplicates, recovery_s=recovery,
           peak_rss_mb=agent_peak,
           notes=f"killed with {killed_at} delivered, {left} outbox rows left (insight + "
           "state); a --drain-only run delivered the rest; peak RSS of the killed agent")
