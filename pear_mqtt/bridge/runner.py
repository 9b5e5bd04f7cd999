"""Running the bridge as a process: a one-line summary of a configuration, and
:func:`serve`, which runs a :class:`~.service.Bridge` until SIGTERM or SIGINT and keeps
a status file current (``pear-mqtt bridge``, in :mod:`pear_mqtt.cli.bridge`, calls it)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from ..files import atomic_write
from ..model.insight import Health
from .config import BridgeConfig, BridgeRole
from .service import Bridge
from .status import BridgeStatus

__all__ = ["describe", "serve"]


def describe(config: BridgeConfig) -> str:
    """One line: inputs, output, k, cap, windows, noise, policy version, state file and
    history log."""
    inputs = []
    if config.consortium is not None:
        inputs.append(f"consortium {config.consortium.network_id} "
                      f"({config.consortium.broker_url})")
    inputs += [f"private {s.company_id} ({s.broker_url})" for s in config.private]
    if config.public.contributions:
        inputs.append(f"public contributions of {config.public.network_id}")
    dp = config.dp
    noise = "no noise" if not dp.enabled else (
        f"{dp.mechanism} noise, ε {dp.epsilon_per_cell:g} per cell, budget "
        f"{dp.budget_per_period:g} per {dp.period_seconds} s")
    outputs = f"public {config.public.network_id} ({config.public.broker_url})"
    if config.consortium_output and config.consortium is not None:
        outputs += (f" and consortium {config.consortium.network_id} (lag "
                    f"{config.consortium_lag_seconds} s)")
    return (f"bridge {config.bridge_id}: {', '.join(inputs)} -> {outputs}"
            f"; k={config.min_companies}, dominance cap "
            f"{config.dominance_cap:.0%}, window {config.window_seconds} s, lag "
            f"{config.publication_lag_seconds} s, {noise}; policy {config.policy_version()}; "
            f"state {config.state_path}"
            + (f"; history log {history}" if (history := config.history_dir(
                "merge" if config.instances > 1 else "single")) is not None else "")
            + (f"; instance {config.instance} of {config.instances}"
               if config.instances > 1 else ""))


async def serve(config: BridgeConfig, *, status_file: Path | None,
                status_interval: float, metrics_port: int | None = None,
                roles: Sequence[BridgeRole] = ("single",)) -> BridgeStatus:
    """Run a bridge until SIGTERM or SIGINT, rewriting ``status_file`` (if given) every
    ``status_interval`` seconds; the final status is returned (and written with health
    ``down``).

    ``roles``: one bridge per role in this process (a scale-out instance 0 runs ``worker``
    and ``merge``); the first writes ``status_file`` and serves the metrics, each further
    one writes ``<stem>.<role><suffix>`` next to it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    bridges = [Bridge(config, role=role) for role in roles]
    bridge = bridges[0]
    for b in bridges:
        await b.start(timeout=30.0)
    print(describe(config), file=sys.stderr, flush=True)
    files = [status_file if i == 0 or status_file is None else status_file.with_name(
        f"{status_file.stem}.{b.role}{status_file.suffix}") for i, b in enumerate(bridges)]
    metrics = None
    if metrics_port is not None:
        from ..ops.metrics import BridgeCollector
        from ..ops.metrics import serve as serve_metrics
        metrics = serve_metrics(BridgeCollector(bridge.status,
                                                cert_file=config.public.tls.cert_file),
                                port=metrics_port)
        print(f"bridge: metrics at {metrics.url}", file=sys.stderr, flush=True)
    try:
        while not stop.is_set():
            for b, path in zip(bridges, files, strict=True):
                if path is not None:
                    atomic_write(path, b.status().model_dump_json(indent=2) + "\n",
                                 fsync=False, make_parents=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), status_interval)
    finally:
        if metrics is not None:
            metrics.close()
        final = bridge.status()
        for b, path in zip(bridges, files, strict=True):
            last = b.status()
            await b.stop()
            if path is not None:
                down = last.model_copy(update={"health": Health.DOWN, "connected": False})
                atomic_write(path, down.model_dump_json(indent=2) + "\n", make_parents=True)
    return final
