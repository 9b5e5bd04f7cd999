"""Verified history's repair rate (issue #17): a node that was never there fetches and
verifies a sender's whole log over loopback. Both nodes run in this process (one core for
the two of them), on the round's broker."""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path
from typing import Any

from .env import BenchEnv
from .workers import make_insights, pear_config

__all__ = ["run_repair"]


def run_repair(env: BenchEnv, workdir: Path, n: int, timeout: float = 300.0) -> dict[str, Any]:
    """The sender broadcasts ``n`` insights and flushes (its log on disk); then a late
    joiner connects and the clock runs until it holds and verified the sender's log up to
    its signed head. ``item_rate`` counts the items (insights) in the log entries fetched,
    proven against the head and held, ``rate`` the entries (an entry is an envelope, a batch
    of items), ``mb_rate`` the same in MB of log; ``insight_rate`` the insights in them
    delivered to the application, which runs behind the repair (same clock start)."""
    from pear_mqtt.config.models import MarketConfig
    from pear_mqtt.node.network import PearNetwork

    workdir.mkdir(parents=True, exist_ok=True)
    insights = make_insights(n, 16)

    async def main() -> dict[str, Any]:
        tx = PearNetwork(pear_config(env, "acme", outbox=workdir / "acme.sqlite"))
        await tx.connect(timeout=30)
        try:
            for at in range(0, n, 64):  # several envelopes, as a busy store sends them
                await tx.broadcast_many(insights[at:at + 64])
            await tx.flush(timeout=timeout)
            base = pear_config(env, "globex")
            late_config = base.model_copy(update={
                "reliability": base.reliability.model_copy(update={"session_expiry": 0}),
                "market": MarketConfig(enabled=False)})
            late = PearNetwork(late_config)
            delivered = 0
            all_in = asyncio.Event()

            def count(_item: Any) -> None:
                nonlocal delivered
                delivered += 1
                if delivered >= n:
                    all_in.set()
            late.on_insight(count)
            # Both nodes share this process: without it, the full collection the sender's
            # 20,000 broadcasts made due often fell inside the clock (~0.15 s of a ~0.3 s run),
            # which a late joiner of its own would not pay. The repair's own garbage counts.
            gc.collect()
            t0 = time.monotonic()
            await late.connect(timeout=30)
            try:
                def done() -> bool:
                    views = late.logs()
                    return bool(views) and all(v.head_length is not None and v.head_length > 0
                                               and v.verified == v.head_length for v in views)
                await late.wait_logs(done, timeout=timeout)
                elapsed = time.monotonic() - t0
                entries = sum(v.verified for v in late.logs())
                repaired = late.status().log_repaired
                # Their items reach the application behind the repair.
                await asyncio.wait_for(all_in.wait(), timeout)
                delivered_s = time.monotonic() - t0
            finally:
                await late.disconnect()
        finally:
            await tx.disconnect()
        log_bytes = (workdir / "acme.sqlite.history" / "entries.bin").stat().st_size
        return {"entries": entries, "insights": n, "seconds": elapsed, "repaired": repaired,
                "item_rate": n / elapsed, "rate": entries / elapsed,
                "mb_rate": log_bytes / 1e6 / elapsed,
                "delivered": delivered, "delivered_seconds": delivered_s,
                "insight_rate": delivered / delivered_s}

    return asyncio.run(main())
