"""Fault scenarios: markers and fixtures.

Every test in this directory is marked ``faults`` (``make faults`` runs them and renders
docs/RELIABILITY.md; ``.ci/containers.sh`` leaves them out). Tests marked ``soak`` are the
long variants: they are *deselected*, not skipped, unless ``PEAR_SOAK=1`` (``make soak``), so
a CI run lists no skipped tests.

Fixtures (on top of ``tests/integration/conftest.py``'s ``pki``, ``mosquitto``,
``mosquitto_factory`` and ``aggregator``):

- ``proxy_factory``: ``proxy_factory(broker)`` starts a :class:`faultproxy.FaultProxy` in
  front of the broker's mutual-TLS listener; every proxy stops at teardown.
- ``node``: ``node(member, url, **kwargs)`` is :func:`faultkit.node_config` with this test's
  PKI and aggregator key.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from brokers import MosquittoBroker, NetworkPKI
from faultkit import node_config
from faultproxy import FaultProxy

from pear_mqtt.config.models import NetworkConfig

_HERE = Path(__file__).resolve().parent


def _soak_enabled() -> bool:
    return os.environ.get("PEAR_SOAK", "").strip() in ("1", "true", "yes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep: list[pytest.Item] = []
    deselected: list[pytest.Item] = []
    soak = _soak_enabled()
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.faults)
            if item.get_closest_marker("soak") is not None and not soak:
                deselected.append(item)
                continue
        keep.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = keep


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Run the finalizers of the dead connections a scenario leaves behind now.

    Otherwise a collection can fire them inside a later ``ast.parse`` (pytest rewriting a
    lazily imported module), where CPython 3.11.7 aborts the whole run with "SystemError: AST
    constructor recursion depth mismatch" (a bug in its AST recursion-depth check).
    """
    yield
    gc.collect()


@pytest.fixture(autouse=True)
def _no_unhandled_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail a scenario in which asyncio logged an exception nobody handled.

    "Never a crash" includes the errors asyncio survives: an exception escaping a callback or
    a task nobody awaited is a traceback in an operator's log and a code path that stopped
    half-way.
    """
    yield
    unhandled = [r for r in caplog.get_records("call")
                 if r.name == "asyncio" and r.levelno >= logging.ERROR]
    if unhandled:
        first = unhandled[0]
        detail = first.getMessage()
        if first.exc_info and first.exc_info[1] is not None:
            detail += f": {type(first.exc_info[1]).__name__}: {first.exc_info[1]}"
        pytest.fail(f"asyncio logged {len(unhandled)} unhandled exception(s); first: {detail}",
                    pytrace=False)


@pytest.fixture
def proxy_factory(request: pytest.FixtureRequest) -> Iterator[Callable[[MosquittoBroker],
                                                                      FaultProxy]]:
    proxies: list[FaultProxy] = []

    def make(broker: MosquittoBroker) -> FaultProxy:
        proxy = FaultProxy(broker.host, broker.tls_port).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def node(pki: NetworkPKI, aggregator: tuple[Path, Any]) -> Callable[..., NetworkConfig]:
    def make(member: str, url: str, **kwargs: Any) -> NetworkConfig:
        return node_config(pki, aggregator[0], member, url, **kwargs)
    return make
