"""Fixtures for integration tests against real mosquitto processes.

- ``pki`` (session): a :class:`brokers.NetworkPKI` for network ``pki.network`` ("testnet"):
  CA, broker certificate (localhost, 127.0.0.1, ::1), node certificates ``pki.nodes[c]`` for
  acme, globex, initech, umbrella, hooli (node ``store-1``), ``pki.node(member, node)`` for
  more, ``pki.enrolled(company, store)`` for a store enrolled under the pseudonyms the CA
  assigns (an anonymising consortium), the bridge certificate ``pki.bridge`` (username
  ``pki.bridge_user``), and the refused ones: ``pki.expired``, ``pki.not_yet_valid``,
  ``pki.revoked``, ``pki.foreign``.
  ``pki.tls("acme")`` gives a :class:`pear_mqtt.config.models.TLSConfig`.
- ``mosquitto`` (function): a started :class:`brokers.MosquittoBroker`: ``.url`` / ``.port``
  plaintext anonymous, ``.tls_url`` / ``.tls_port`` mutual TLS with the ACL of all three modes
  of ``pki.network``; no persistence. Fresh per test, so nothing retained leaks between tests.
- ``mosquitto_factory`` (function): ``mosquitto_factory(**kwargs)`` starts more brokers
  (``persistence=True``, ``mode=...``, ``network=...``, ``pki=...``); all stop at teardown.
- ``cluster`` (function): the test network's broker as a 2-node aedes cluster on redis.
- ``embedded`` (function): the embedded amqtt broker (consortium mode), on the test's loop.
- ``broker_kind`` (function, parametrised mosquitto / amqtt / cluster): a
  :class:`brokerkinds.BrokerUnderTest`, so one test body runs on every supported broker.
- ``unique_id`` (function): a fresh id valid as network, company or node id.
- ``net`` (function): the bridge tests' two brokers (consortium, public), an aggregator key
  pair and a spy on the public broker (:class:`bridgekit.Net`).
- ``insight`` / ``take`` (function): ``insight(category=..., price=...)`` builds an insight to
  broadcast; ``await take(stream, n)`` reads the next ``n`` items of an ``insights()`` stream.
- ``small_disk`` (function): a 32 MiB tmpfs to fill up (``tmpfs`` of ``tests/conftest.py``).

Every test in this directory is marked ``integration``; without mosquitto they fail.

``PEAR_TEST_BACKEND=container`` runs every broker of these fixtures in the broker image through
testcontainers instead of as a local process (see ``container_backend.py`` and
``deploy/CONTAINERS.md``); the tests themselves do not change. When a test fails, the log of
every broker it started is attached to its report.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from agent_process import AgentProcess
from bridgekit import Net
from brokerkinds import BrokerUnderTest
from brokers import (
    BACKEND,
    GROUP_KEY,
    MosquittoBroker,
    NetworkPKI,
    backend_problem,
    build_pki,
    free_port,
    make_broker,
    new_unique_id,
    probe,
)

from pear_mqtt.config.models import (
    EncryptionConfig,
    NetworkConfig,
    PrivacyConfig,
    ReliabilityConfig,
)
from pear_mqtt.model.insight import MarketInsight, NetworkMode, PriceData, SalesData, TrendData
from pear_mqtt.ops.cluster.render import render_cluster
from pear_mqtt.ops.cluster.run import ClusterProcesses, cluster_problem
from pear_mqtt.ops.embedded.broker import EmbeddedBroker
from pear_mqtt.security.seal import (
    SealOpener,
    generate_x25519_key,
    save_x25519_private_key,
    save_x25519_public_key,
)

_HERE = Path(__file__).resolve().parent


_BROKER_FIXTURES = frozenset({"mosquitto", "mosquitto_factory", "make_config"})


def _starts_mosquitto(item: pytest.Item) -> bool:
    if _BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    callspec = getattr(item, "callspec", None)  # broker_kind asks for mosquitto by name
    return callspec is not None and callspec.params.get("broker_kind") == "mosquitto"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)
            if _starts_mosquitto(item):
                item.add_marker(pytest.mark.uses_broker)


@pytest.fixture(autouse=True)
def _no_agent_left_running() -> Iterator[None]:
    """An agent process a failed test left behind (and its workers) ends with the test."""
    yield
    AgentProcess.kill_leftovers()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> NetworkPKI:
    """The test network's PKI (see the module docstring)."""
    return build_pki(tmp_path_factory.mktemp("pki"))


def _need_brokers() -> None:
    problem = backend_problem()
    if problem is not None:
        pytest.fail(problem)


def pytest_report_header(config: pytest.Config) -> str:
    return f"pear_mqtt brokers: PEAR_TEST_BACKEND={BACKEND}"


_BROKERS = pytest.StashKey[list[MosquittoBroker]]()
_CLUSTER = pytest.StashKey[ClusterProcesses]()
_LOG_TAIL = 60


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    # The broker's side of a failure (refused certificates, denied publishes, a crash) is in
    # its log, not in the test's output.
    if report.failed and report.when in ("call", "setup"):
        for i, broker in enumerate(item.stash.get(_BROKERS, [])):
            lines = broker.log_text().splitlines()[-_LOG_TAIL:]
            where = getattr(broker, "container_name", None) or broker.workdir
            report.sections.append(
                (f"broker {i} ({broker.backend}: {where}) log, last {len(lines)} lines",
                 "\n".join(lines) or "(empty)"))
            output = broker.output_text().strip()
            if output:
                report.sections.append((f"broker {i} output", output[-4000:]))
        cluster = item.stash.get(_CLUSTER, None)
        if cluster is not None:
            report.sections.append(("cluster broker logs", cluster.log_text()))
    return report


@pytest.fixture
def mosquitto_factory(pki: NetworkPKI, tmp_path: Path, request: pytest.FixtureRequest
                      ) -> Iterator[Callable[..., MosquittoBroker]]:
    """Start extra brokers: ``mosquitto_factory(persistence=True, ...)``."""
    _need_brokers()
    started: list[MosquittoBroker] = []
    request.node.stash[_BROKERS] = started

    def make(**kwargs: Any) -> MosquittoBroker:
        kwargs.setdefault("pki", pki)
        kwargs.setdefault("workdir", tmp_path / f"mosquitto-{len(started)}")
        broker = make_broker(**kwargs)
        started.append(broker)
        return broker.start()

    yield make
    for broker in reversed(started):
        try:
            # Without persistence there is nothing to save: skip mosquitto's ~0.1 s shutdown.
            broker.stop() if broker.persistence else broker.kill()
        finally:
            broker.close()


@pytest.fixture
def cluster(pki: NetworkPKI, tmp_path: Path, request: pytest.FixtureRequest
            ) -> Iterator[ClusterProcesses]:
    """The test network's broker as a 2-node aedes cluster on redis (consortium and public
    rules, the test PKI's broker certificate); ``cluster.files.urls`` names both nodes."""
    problem = cluster_problem()
    if problem is not None:
        pytest.fail(f"cluster broker: {problem}")
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    node_ports, redis_port = sorted(ports)[:2], sorted(ports)[2]
    files = render_cluster(
        mode="consortium", acl_modes=("public",), network=pki.network,
        out_dir=tmp_path / "cluster", ca_file=pki.ca, cert_file=pki.broker.cert,
        key_file=pki.broker.key, crl_file=pki.crl, ports=node_ports, redis_port=redis_port,
        bridge_users=(pki.bridge_user,), host="127.0.0.1")
    procs = ClusterProcesses(files, log_dir=tmp_path / "cluster" / "logs")
    request.node.stash[_CLUSTER] = procs
    try:
        yield procs.start()
    finally:
        procs.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., MosquittoBroker]) -> MosquittoBroker:
    """A fresh broker for this test (plaintext ``.port`` and mutual-TLS ``.tls_port``)."""
    return mosquitto_factory()


@pytest.fixture
def unique_id() -> str:
    """A fresh identifier, valid as a network, company or node id."""
    return new_unique_id()


# -- pear_mqtt node configs for the test network ------------------------------------------------



@pytest.fixture
def aggregator(tmp_path: Path) -> tuple[Path, SealOpener]:
    key = generate_x25519_key()
    path = tmp_path / "aggregator.pub"
    save_x25519_public_key(key.public_key(), path)
    return path, SealOpener(key)


def _node_config(pki: NetworkPKI, aggregator_key: Path, member: str, *, broker_url: str,
                 mode: NetworkMode = NetworkMode.CONSORTIUM, node: str = "store-1",
                 outbox: Path | None = None, pseudonymous: bool = False,
                 **reliability: Any) -> NetworkConfig:
    """``member``'s ``node``; ``pseudonymous``: enrolled under the CA's pseudonyms (the config
    keeps the company's own id; node_id is the store's pseudonym)."""
    if pseudonymous:
        certs, enrolment = pki.enrolled(member, node)
        node = enrolment.node
    else:
        certs = pki.node(member, node)
    return NetworkConfig(
        mode=mode, company_id=member, network_id=pki.network, node_id=node,
        broker_url=broker_url, tls=pki.tls(certs),
        privacy=PrivacyConfig(aggregator_key_file=aggregator_key),
        encryption=EncryptionConfig(keys={"k1": GROUP_KEY}, active="k1"),
        reliability=ReliabilityConfig(**{"outbox_path": outbox, "reconnect_min_delay": 0.05,
                                         "reconnect_max_delay": 0.5, **reliability}))


@pytest.fixture
def make_config(pki: NetworkPKI, mosquitto: MosquittoBroker, aggregator: tuple[Path, Any]
                ) -> Callable[..., NetworkConfig]:
    """``make_config(member, *, mode=, node=, broker_url=, outbox=, pseudonymous=,
    **reliability)``: a node config on the ``mosquitto`` fixture's TLS port by default."""
    def make(member: str, *, broker_url: str | None = None, **kwargs: Any) -> NetworkConfig:
        return _node_config(pki, aggregator[0], member,
                            broker_url=broker_url or mosquitto.tls_url, **kwargs)
    return make


# -- the same tests on every broker kind (test_conformance.py) ----------------------------------

@pytest.fixture
async def embedded(pki: NetworkPKI) -> AsyncIterator[EmbeddedBroker]:
    """The embedded amqtt broker (consortium mode, the test PKI), on this test's event loop:
    a test that blocks the loop (a synchronous client's wait) stalls it."""
    async with EmbeddedBroker(mode="consortium", network=pki.network, ca_file=pki.ca,
                              cert_file=pki.broker.cert, key_file=pki.broker.key,
                              crl_file=pki.crl, bridge_users=[pki.bridge_user]) as broker:
        yield broker


@pytest.fixture(params=["mosquitto", "amqtt", "cluster"])
def broker_kind(request: pytest.FixtureRequest, pki: NetworkPKI,
                aggregator: tuple[Path, Any]) -> BrokerUnderTest:
    """A started broker of each supported kind in turn (test ids: mosquitto, amqtt, cluster);
    a cluster's senders use node 0 and its receivers node 1."""
    kind: str = request.param
    fixed: dict[str, Any] = {}
    if kind == "mosquitto":
        broker: MosquittoBroker = request.getfixturevalue("mosquitto")
        ports = (broker.tls_port, broker.tls_port)
    elif kind == "amqtt":
        amqtt: EmbeddedBroker = request.getfixturevalue("embedded")
        assert amqtt.tls_port is not None
        ports = (amqtt.tls_port, amqtt.tls_port)
        # amqtt leaves an MQTT 5 CONNECT unanswered: "auto" would spend its MQTT 5 share of
        # the connect timeout on every new connection (test_network_embedded covers "auto").
        fixed["mqtt_version"] = "3.1.1"
    else:
        cluster: ClusterProcesses = request.getfixturevalue("cluster")
        ports = (cluster.files.ports[0], cluster.files.ports[1])

    def build(member: str, **kwargs: Any) -> NetworkConfig:
        return _node_config(pki, aggregator[0], member, **{**kwargs, **fixed})
    return BrokerUnderTest(kind=kind, send_port=ports[0], receive_port=ports[1], build=build)


# -- node tests: an insight to broadcast, and the next items of a stream -------------------------

_T0 = datetime(2026, 11, 1, tzinfo=UTC)


def _make_insight(category: str = "grocery/dairy", price: float = 2.4567,
                  units: float = 1234.0, change: float = 3.21,
                  product: str | None = None) -> MarketInsight:
    return MarketInsight(
        category=category, product_id=product, region="north", window_start=_T0,
        window_end=_T0 + timedelta(hours=1), price_data=PriceData(currency="EUR", price=price),
        sales_data=SalesData(units=units, revenue=units * price),
        trends=TrendData(price_change_pct=change, direction="up"), sample_size=17)


async def _take(it: AsyncIterator[Any], n: int, timeout: float = 20.0) -> list[Any]:
    out: list[Any] = []

    async def run() -> None:
        async for r in it:
            out.append(r)
            if len(out) >= n:
                return

    await asyncio.wait_for(run(), timeout)
    return out


@pytest.fixture
def insight() -> Callable[..., MarketInsight]:
    """``insight(category=, price=, units=, change=, product=)``: an hour's insight (from
    2026-11-01, region north) with price, sales and trend data. Insights that differ only in
    their values are the same observation (same item id: receivers take a repeat for a
    duplicate); give each its own ``product`` (or category) to send distinct ones."""
    return _make_insight


@pytest.fixture
def take() -> Callable[..., Awaitable[list[Any]]]:
    """``await take(stream, n, timeout=20.0)``: the next ``n`` items of an async iterator
    (:class:`TimeoutError` after ``timeout`` s)."""
    return _take


@pytest.fixture
def net(pki: NetworkPKI, mosquitto_factory: Callable[..., MosquittoBroker],
        tmp_path: Path) -> Iterator[Net]:
    consortium = mosquitto_factory(mode="consortium")
    public = mosquitto_factory(mode="public")
    key = generate_x25519_key()
    key_file, pub_file = tmp_path / "aggregator.key", tmp_path / "aggregator.pub"
    save_x25519_private_key(key, key_file)
    save_x25519_public_key(key.public_key(), pub_file)
    with probe(public, subscribe=["#"]) as spy:
        yield Net(pki=pki, consortium=consortium, public=public, key_file=key_file,
                  pub_file=pub_file, root=tmp_path, spy=spy)


@pytest.fixture
def small_disk(tmpfs: Callable[[int], Path]) -> Path:
    """A 32 MiB tmpfs (an outbox keeps an 8 MiB reserve on it)."""
    return tmpfs(32)
