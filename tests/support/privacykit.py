"""The privacy attack suite's harness: the `make up` topology, a market with known ground truth,
and everything one member can read of it.

- :data:`POLICIES`: the policies attacked, each mode's defaults first, then explicit ones.
- :func:`market`: seeded hourly observations per (company, store) and category, the ground
  truth: prices on a random walk, sales with known transaction counts, trends against the
  previous hour, ``sample_size`` = transactions (as the simulated agents report it).
- :func:`run_policy`: brings the topology up with :func:`pear_mqtt.ops.up.commands.start`
  (the CAs, certificates, broker configurations with their ACLs, node and bridge
  configurations `make up` writes), runs the bridge from `make up`'s ``bridge.toml`` on a
  test clock, broadcasts the market hour by hour through :class:`PearNetwork` with each
  company's own configuration, lets the attacker re-send and replay, closes the windows and
  returns a :class:`Capture`: the ground truth, the attacker's own configuration files, and
  every message its certificates let it read (decoded with its own keys), live and as a
  late joiner.

The attacker is the consortium's last company. Nothing here sleeps to synchronise: the bridge
is waited on through its status, brokers through marker messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from brokers import MqttProbe, Received, free_port
from cryptography import x509

from pear_mqtt.bridge.config import BridgeConfigManager
from pear_mqtt.bridge.service import Bridge
from pear_mqtt.bridge.status import BridgeStatus
from pear_mqtt.config.manager import NetworkConfigManager
from pear_mqtt.config.models import NetworkConfig, PrivacyConfig
from pear_mqtt.errors import BrokerError, EnvelopeError, TopicError
from pear_mqtt.model.insight import MarketInsight, NetworkMode, SharingLevel
from pear_mqtt.model.topics import TopicScheme, parse_topic
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.ops.up.commands import start, stop
from pear_mqtt.ops.up.state import BrokerEntry, NodeEntry, UpState
from pear_mqtt.ops.up.topology import TOPOLOGY
from pear_mqtt.security.base64url import b64url_decode
from pear_mqtt.security.envelope import EnvelopeCodec
from pear_mqtt.security.identity import Identity, identity_of
from pear_mqtt.security.pki import CertPaths
from pear_mqtt.security.seal import SealOpener, save_x25519_public_key

DAY = 86400
WAIT = 30.0
SEED = 16
HOURS = 12  # per company, from 18:00 two days ago: two daily windows of the bridge
VOLATILITY = 0.04  # standard deviation of an hour's log price step
RESENDS = 3  # how often the attacker re-sends each of its last hour's observations
REPLAYS = 8  # captured envelopes replayed, of others and of its own
FLAT_PCT = 0.5  # |change| below this is "flat", as the simulated agents report it

#: category -> (base price in EUR, units per hour); units stay near their base so the
#: percentage changes (below 100) never share a value with the sales counts (100 and up).
CATEGORIES: dict[str, tuple[float, int]] = {
    "grocery/dairy": (1.89, 420),
    "grocery/bakery": (2.49, 300),
    "household/cleaning": (4.79, 220),
    "electronics/audio": (59.90, 200),
}

#: Retailer and store names in the attacker's dictionary besides the topology's own.
EXTRA_COMPANIES = ("aldi", "lidl", "tesco", "carrefour", "metro", "rewe", "edeka", "spar",
                   "auchan", "ikea")
EXTRA_STORES = ("store-3", "store-4", "main", "berlin-1", "node-localhost")


@dataclass(frozen=True, slots=True)
class Policy:
    """A network's privacy policy: its mode and the sharing levels set explicitly."""

    id: str
    name: str
    mode: NetworkMode
    sharing: tuple[tuple[str, SharingLevel], ...] = ()
    order: int = 0

    @property
    def overrides(self) -> dict[str, str]:
        return {group: level.value for group, level in self.sharing}


_R, _N = SharingLevel.RANGES_ONLY, SharingLevel.NONE
POLICIES: tuple[Policy, ...] = (
    Policy("private", "private (mode defaults)", NetworkMode.PRIVATE, order=0),
    Policy("consortium", "consortium (mode defaults)", NetworkMode.CONSORTIUM, order=1),
    Policy("public", "public (mode defaults)", NetworkMode.PUBLIC, order=2),
    Policy("consortium-trends-ranges", "consortium, trends = ranges_only",
           NetworkMode.CONSORTIUM, (("trends", _R),), order=3),
    Policy("consortium-sales-ranges", "consortium, sales_data = ranges_only",
           NetworkMode.CONSORTIUM, (("sales_data", _R),), order=4),
    Policy("consortium-none", "consortium, every group none", NetworkMode.CONSORTIUM,
           (("price_data", _N), ("sales_data", _N), ("trends", _N)), order=5),
)


# -- ground truth ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Observation:
    """One store's true observation of one category for one hour."""

    company: str
    store: str
    insight: MarketInsight


def first_hour(now: float | None = None) -> datetime:
    """18:00 UTC two days ago: the market's hours fill the last six of that day and the
    first six of yesterday."""
    today = int((time.time() if now is None else now) // DAY) * DAY
    return datetime.fromtimestamp(today - DAY - 6 * 3600, UTC)


def market(outlets: Mapping[tuple[str, str], str], *, start: datetime, early: str | None,
           seed: int = SEED) -> list[Observation]:
    """:data:`HOURS` hourly observations per outlet (company, store) and category from
    ``start``; company ``early`` opens an hour before the others. ``outlets`` maps each
    outlet to the clear name its data is seeded by (its node id may be a fresh pseudonym)."""
    out: list[Observation] = []
    for (company, store), label in sorted(outlets.items()):
        extra = 1 if company == early else 0
        for category, (base, base_units) in CATEGORIES.items():
            rng = random.Random(f"{seed}/{label}/{category}")
            price = round(base * rng.uniform(0.9, 1.1), 2)
            scale = base_units * rng.uniform(0.9, 1.1)
            last_price: float | None = None
            last_units: int | None = None
            for h in range(HOURS + extra):
                hour = start + timedelta(hours=h - extra)
                if last_price is not None:
                    price = max(0.05, round(price * math.exp(rng.gauss(0.0, VOLATILITY)), 2))
                units = round(scale * rng.uniform(0.85, 1.15))
                transactions = max(100, min(units - 1, round(units / rng.uniform(1.1, 1.6))))
                change = demand = None
                direction = None
                if last_price is not None and last_units is not None:
                    change = round((price / last_price - 1.0) * 100.0, 2)
                    demand = round((units / last_units - 1.0) * 100.0, 2)
                    direction = ("up" if change > FLAT_PCT else
                                 "down" if change < -FLAT_PCT else "flat")
                insight = MarketInsight.model_validate({
                    "category": category, "region": "global",
                    "window_start": hour, "window_end": hour + timedelta(hours=1),
                    "price_data": {"currency": "EUR", "price": price,
                                   "min_price": max(0.01, round(price * rng.uniform(0.6, 0.8),
                                                                2)),
                                   "max_price": round(price * rng.uniform(1.3, 1.6), 2)},
                    "sales_data": {"units": float(units),
                                   "revenue": round(units * price, 2),
                                   "transactions": float(transactions)},
                    "trends": {"price_change_pct": change, "demand_change_pct": demand,
                               "direction": direction},
                    "sample_size": transactions})
                out.append(Observation(company=company, store=store, insight=insight))
                last_price, last_units = price, units
    return out


# -- what the attacker reads ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class WireMessage:
    """One message the attacker received, opened with its own keys where they open it."""

    network: str
    topic: str
    payload: bytes
    snapshot: bool  # from the late joiner's retained snapshot, not the live capture
    signer: Identity | None
    kind: str | None
    body: Any
    cert_names: tuple[str, ...]  # attribute values and names of the embedded certificate
    error: str | None  # why its keys did not open it


def _cert_names(payload: bytes) -> tuple[str, ...]:
    try:
        envelope = json.loads(payload)
        cert = x509.load_der_x509_certificate(b64url_decode(envelope["cert"].encode(), "cert"))
    except (ValueError, KeyError, TypeError, EnvelopeError):
        return ()
    names = [str(a.value) for a in (*cert.subject, *cert.issuer)]
    with contextlib.suppress(x509.ExtensionNotFound):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += [str(n.value) for n in san]
    return tuple(names)


def open_message(network: str, codec: EnvelopeCodec, msg: Received, *,
                 snapshot: bool) -> WireMessage:
    signer = kind = body = error = None
    if msg.payload:
        try:
            decoded = codec.decode(msg.payload, check_replay=False)
            signer, kind, body = decoded.signer, decoded.message.kind, decoded.message.body
        except EnvelopeError as exc:
            error = exc.reason
    return WireMessage(network=network, topic=msg.topic, payload=msg.payload,
                       snapshot=snapshot, signer=signer, kind=kind, body=body,
                       cert_names=_cert_names(msg.payload), error=error)


class Spy:
    """Everything one certificate may read on one broker, from :meth:`open` on.

    ``marker`` is a topic the certificate may both write and read: :meth:`collect` publishes
    a marker there and returns what arrived before it (a broker forwards what it accepted
    before the marker first).
    """

    def __init__(self, *, broker: BrokerEntry, certs: CertPaths, marker: str) -> None:
        self.broker = broker
        self.probe = MqttProbe(host=broker.host, port=broker.port, certs=certs)
        self.marker = marker
        self.seen: list[Received] = []

    def open(self) -> Spy:
        rc = self.probe.connect()
        if rc.is_failure:
            raise ConnectionError(f"{self.broker.name} broker refused the attacker: {rc}")
        self.probe.subscribe("#")
        return self

    def collect(self) -> list[Received]:
        token = f"marker-{uuid.uuid4().hex}".encode()
        self.probe.publish(self.marker, token)
        _, before = self.probe.expect(lambda m: m.payload == token, timeout=WAIT)
        self.seen += [m for m in before if not m.payload.startswith(b"marker-")]
        return list(self.seen)

    def close(self) -> None:
        self.probe.close()


# -- the run ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Capture:
    """One policy's run, as the attacker saw it and as it really was."""

    policy: Policy
    levels: dict[str, str]  # the members' effective sharing levels
    attacker: str
    attacker_ids: frozenset[Identity]  # the identities its own certificates name
    attacker_files: tuple[Path, ...]  # its own configuration files
    scheme: PrivacyConfig  # the members' range scheme (range_ratio, range_edges)
    companies: tuple[str, ...]  # the topology's companies and stores: the clear names
    stores: tuple[str, ...]
    truth: tuple[Observation, ...]
    identities: dict[tuple[str, str], tuple[str, str]]  # (member, node) -> (company, store)
    wire: tuple[WireMessage, ...]
    snapshot: tuple[WireMessage, ...]
    resent: tuple[Observation, ...]
    replays: dict[str, int]
    barriers: int  # empty messages the bridge counted as malformed, to know it read all
    bridge: BridgeStatus
    min_companies: int
    dominance_cap: float
    window_seconds: int
    private_attempts: str | None  # private policy: what the private broker said to it
    seconds: float

    def competitor(self, signer: Identity | None) -> bool:
        """Whether ``signer`` is another company's node (not the attacker, not a bridge)."""
        return (signer is not None and signer not in self.attacker_ids
                and (signer.member, signer.node) in self.identities
                and self.identities[(signer.member, signer.node)][0] != self.attacker)


class Clock:
    """The bridge's clock: real time until the run moves it."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def set(self, now: float) -> None:
        self.offset = now - time.time()


@contextlib.contextmanager
def topology(directory: Path) -> Iterator[UpState]:
    """``pear-mqtt up start --no-agents --backend local`` in ``directory``, stopped after.

    Ports are picked free and released before the brokers bind them; another process on the
    machine may take one in between, so a start that found a port taken is tried afresh.
    """
    for attempt in range(3):
        ports = {free_port() for _ in TOPOLOGY}
        if len(ports) < len(TOPOLOGY):
            continue
        try:
            state = start(directory=directory, ports=sorted(ports), backend="local",
                          with_agents=False, out=lambda _line: None)
            break
        except BrokerError as exc:
            if attempt == 2 or not any(s in str(exc) for s in ("listener", "in use")):
                raise
    else:
        raise BrokerError("no three distinct free ports")
    try:
        yield state
    finally:
        stop(directory=directory, grace=3.0, out=lambda _line: None)


def _load(path: Path, **overrides: Any) -> NetworkConfig:
    return NetworkConfigManager.load(file=path, env={}, **overrides)


def _public_config(state: UpState, entry: NodeEntry, *, work: Path,
                   aggregator: Path) -> Path:
    """A public participant's configuration: `make up` writes none (no agents run there), so
    the library's writer writes the least a participant needs: its certificate, the
    network's broker and the aggregator's public key."""
    broker = next(b for b in state.brokers if b.network == entry.network)
    config = NetworkConfigManager.default_config(
        NetworkMode.PUBLIC, company_id=entry.company, network_id=entry.network,
        node_id=entry.node, broker_url=broker.url,
        tls={"ca_file": entry.ca, "cert_file": entry.cert, "key_file": entry.key},
        privacy={"aggregator_key_file": aggregator},
        reliability={"outbox_path": work / "outbox" / f"{entry.name}.db"})
    path = work / "nodes" / f"{entry.name}.toml"
    for directory in (path.parent, work / "outbox"):
        directory.mkdir(parents=True, exist_ok=True)
    NetworkConfigManager.save(config, path, include_secrets=True)
    return path


def _certs(config: NetworkConfig) -> CertPaths:
    tls = config.tls
    assert tls.cert_file and tls.key_file and tls.ca_file
    return CertPaths(cert=tls.cert_file, key=tls.key_file, ca=tls.ca_file)


def _identity(config: NetworkConfig) -> Identity:
    return identity_of(x509.load_pem_x509_certificate(_certs(config).cert.read_bytes()))


def _marker_topic(config: NetworkConfig, me: Identity) -> str:
    scheme = TopicScheme(mode=config.mode.value, network=config.network_id, member=me.member)
    if config.mode is NetworkMode.PUBLIC:
        return scheme.sync_marker(me.node)  # a participant may write only its presence
    return f"{scheme.member_root}/spy"


def run_policy(policy: Policy, work: Path) -> Capture:
    """Run the market under ``policy`` in a fresh topology under ``work``."""
    began = time.monotonic()
    with topology(work / "up") as state:
        capture = asyncio.run(_Run(policy, state, work).run())
    return dataclasses.replace(capture, seconds=time.monotonic() - began)


class _Run:
    """One policy's run over a topology `make up` started."""

    def __init__(self, policy: Policy, state: UpState, work: Path) -> None:
        self.policy, self.state, self.work = policy, state, work
        spec = next(s for s in TOPOLOGY if s.mode == "consortium")
        self.companies = spec.companies
        self.attacker = spec.companies[-1]
        self.stores = tuple(sorted({s for sp in TOPOLOGY for s in sp.stores}))
        bridge_file = Path(state.bridge["config"])
        source = ({"consortium": {"data_sharing": policy.overrides}}
                  if policy.mode is NetworkMode.CONSORTIUM and policy.sharing else {})
        self.bridge_config = BridgeConfigManager.load(
            file=bridge_file, env={}, state_path=str(work / "bridge.sqlite"),
            settle_seconds=0.0, tick_seconds=0.05, **source)
        pub_key = self.bridge_config.public.aggregator_key_file
        assert pub_key is not None
        aggregator = work / "market-aggregator.pub.pem"
        save_x25519_public_key(SealOpener.from_file(pub_key).public_key, aggregator,
                               overwrite=True)
        entries = {(n.mode, n.company, n.node): n for n in state.nodes}
        sharing = {"privacy": {"data_sharing": policy.overrides}} if policy.sharing else {}
        mode = policy.mode.value
        # The outlets: the stores whose market the run broadcasts, with their own configs.
        self.outlets: dict[tuple[str, str], NetworkConfig] = {}
        labels: dict[tuple[str, str], str] = {}
        for (m, company, node), entry in entries.items():
            if m != mode:
                continue
            labels[(company, node)] = entry.name.removeprefix(f"{m}-")
            if entry.config is not None:
                self.outlets[(company, node)] = _load(Path(entry.config), **sharing)
            elif policy.mode is NetworkMode.PUBLIC:
                path = _public_config(state, entry, work=work, aggregator=aggregator)
                self.outlets[(company, node)] = _load(path, **sharing)
        # The attacker's own configs: every network of make up it belongs to, except that a
        # public participant (the public policy) is nothing but one.
        self.attacker_configs: dict[str, tuple[NetworkConfig, Path]] = {}
        for (m, company, _), entry in entries.items():
            if company != self.attacker or m == "private":
                continue
            if policy.mode is NetworkMode.PUBLIC and m != "public":
                continue
            if entry.config is not None:
                path = Path(entry.config)
                config = _load(path, **(sharing if m == mode else {}))
            else:
                path = self.work / "nodes" / f"{entry.name}.toml"
                if not path.exists():
                    path = _public_config(state, entry, work=work, aggregator=aggregator)
                config = _load(path)
            self.attacker_configs[entry.network] = (config, path)
        start = first_hour()
        early = next(c for c, _ in sorted(self.outlets) if c != self.attacker)
        self.truth = market({o: labels[o] for o in self.outlets}, start=start, early=early)
        # The bridge lives in the market's time: each hour is reported as it ends, so a window
        # becomes due (for a lag as short as an hour) only after everything in it was read.
        self.barriers = 0
        self.clock = Clock()
        self.clock.set(min(o.insight.window_end for o in self.truth).timestamp())

    # -- the run ------------------------------------------------------------------------------
    async def run(self) -> Capture:
        spies: dict[str, Spy] = {}
        for network, (config, _) in self.attacker_configs.items():
            broker = next(b for b in self.state.brokers if b.network == network)
            spies[network] = Spy(broker=broker, certs=_certs(config),
                                 marker=_marker_topic(config, _identity(config)))
        nodes = {outlet: PearNetwork(config) for outlet, config in self.outlets.items()}
        async with Bridge(self.bridge_config, clock=self.clock) as bridge:
            try:
                for spy in spies.values():
                    await asyncio.to_thread(spy.open)
                await asyncio.gather(*(n.connect(timeout=WAIT) for n in nodes.values()))
                identities = {(n.identity.member, n.identity.node): outlet
                              for outlet, n in nodes.items()}
                await self._broadcast(nodes, spies, bridge)
                resent, replays = await self._attack_traffic(nodes, spies, bridge)
                await self._close_windows(bridge)
                live = {net: await asyncio.to_thread(spy.collect)
                        for net, spy in spies.items()}
                snapshot = await asyncio.to_thread(self._snapshot)
            finally:
                await asyncio.gather(*(n.disconnect() for n in nodes.values()))
                for spy in spies.values():
                    spy.close()
            status = bridge.status()
        codecs = {net: EnvelopeCodec.from_config(cfg)
                  for net, (cfg, _) in self.attacker_configs.items()}
        wire = tuple(open_message(net, codecs[net], m, snapshot=False)
                     for net, msgs in live.items() for m in msgs)
        retained = tuple(open_message(net, codecs[net], m, snapshot=True)
                         for net, msgs in snapshot.items() for m in msgs)
        some = next(iter(self.outlets.values()))
        return Capture(
            policy=self.policy,
            levels={g: lvl.value
                    for g, lvl in NetworkConfigManager.effective_sharing(some).items()},
            attacker=self.attacker,
            attacker_ids=frozenset(_identity(cfg) for cfg, _ in
                                   self.attacker_configs.values()),
            attacker_files=tuple(p for _, p in self.attacker_configs.values()),
            scheme=some.privacy, companies=self.companies, stores=self.stores,
            truth=tuple(self.truth), identities=identities, wire=wire, snapshot=retained,
            resent=tuple(resent), replays=replays, barriers=self.barriers, bridge=status,
            min_companies=self.bridge_config.min_companies,
            dominance_cap=self.bridge_config.dominance_cap,
            window_seconds=self.bridge_config.window_seconds,
            private_attempts=(await asyncio.to_thread(self._try_private)
                             if self.policy.mode is NetworkMode.PRIVATE else None),
            seconds=0.0)

    async def _broadcast(self, nodes: Mapping[tuple[str, str], PearNetwork],
                         spies: Mapping[str, Spy], bridge: Bridge) -> None:
        """Hour by hour, every outlet its observations as the hour ends; each hour
        acknowledged by the broker and read by the bridge before the next, as stores
        reporting over time would."""
        hours: dict[datetime, list[Observation]] = {}
        for obs in self.truth:
            hours.setdefault(obs.insight.window_start, []).append(obs)

        async def one(outlet: tuple[str, str], items: list[Observation]) -> None:
            for obs in items:
                await nodes[outlet].broadcast_market_insight(obs.insight)

        for hour in sorted(hours):
            self.clock.set((hour + timedelta(hours=1)).timestamp())
            by_outlet: dict[tuple[str, str], list[Observation]] = {}
            for obs in hours[hour]:
                by_outlet.setdefault((obs.company, obs.store), []).append(obs)
            await asyncio.gather(*(one(o, items) for o, items in by_outlet.items()))
            await asyncio.gather(*(nodes[o].flush(timeout=WAIT) for o in by_outlet))
            await self._barrier(spies, bridge)

    async def _barrier(self, spies: Mapping[str, Spy], bridge: Bridge) -> None:
        """Wait until the bridge read everything published so far: the attacker sends an
        empty message on its own insights topic, which the bridge counts as malformed after
        everything the broker accepted before it. (No bridge input reads a private network.)"""
        network = next(iter(self.outlets.values())).network_id
        if self.policy.mode is NetworkMode.PRIVATE or network not in self.attacker_configs:
            return
        config, _ = self.attacker_configs[network]
        scheme = TopicScheme(mode=config.mode.value, network=network,
                             member=_identity(config).member)
        self.barriers += 1
        before = bridge.status().dropped.get("malformed", 0)
        await asyncio.to_thread(spies[network].probe.publish, scheme.insights("zz-barrier/x"),
                                b"")
        await bridge.wait_for(lambda s: s.dropped.get("malformed", 0) > before, timeout=WAIT)

    async def _attack_traffic(self, nodes: Mapping[tuple[str, str], PearNetwork],
                              spies: Mapping[str, Spy], bridge: Bridge
                              ) -> tuple[list[Observation], dict[str, int]]:
        """The attacker re-sends its last hour's observations and replays captured envelopes
        (others' on its own topics and on theirs, its own verbatim), all read by the bridge
        before this returns."""
        replays: Counter[str] = Counter()
        resent: list[Observation] = []
        mine = [o for o in nodes if o[0] == self.attacker]
        if not mine:
            return resent, dict(replays)
        node = nodes[mine[0]]
        last = max(o.insight.window_start for o in self.truth if o.company == self.attacker)
        for _ in range(RESENDS):
            for obs in self.truth:
                if obs.company == self.attacker and obs.insight.window_start == last:
                    await node.broadcast_market_insight(obs.insight)
                    resent.append(obs)
        await node.flush(timeout=WAIT)
        network = node.config.network_id
        spy = spies[network]
        me = node.identity
        scheme = TopicScheme(mode=node.config.mode.value, network=network, member=me.member)
        captured = await asyncio.to_thread(spy.collect)
        others: list[Received] = []
        own: list[Received] = []
        for msg in captured:
            try:
                parsed = parse_topic(msg.topic)
            except TopicError:
                continue
            if parsed.kind not in ("insights", "contrib") or not msg.payload:
                continue
            (own if parsed.company == me.member else others).append(msg)

        def replay() -> None:
            for msg in others[:REPLAYS]:
                category = parse_topic(msg.topic).category
                own_topic = (scheme.mixed_insights() if category is None
                             else scheme.insights(category))
                for topic, what in ((own_topic, "others_on_own_topic"),
                                    (msg.topic, "others_on_their_topic")):
                    rc = spy.probe.publish(topic, msg.payload)
                    replays[what] += 1
                    if rc is not None and rc.is_failure:
                        replays[f"{what}_refused_by_broker"] += 1
            for msg in own[:REPLAYS]:
                spy.probe.publish(msg.topic, msg.payload)
                replays["own_verbatim"] += 1

        await asyncio.to_thread(replay)
        await self._barrier(spies, bridge)
        return resent, dict(replays)

    async def _close_windows(self, bridge: Bridge) -> None:
        ticks = bridge.status().ticks
        self.clock.offset += 3 * DAY + 1
        bridge.poke()
        await bridge.wait_for(lambda s: s.ticks > ticks and s.windows_open == 0
                              and s.outbox_depth == 0, timeout=WAIT)

    def _snapshot(self) -> dict[str, list[Received]]:
        """What a late joiner with the attacker's certificates reads: the retained state."""
        out: dict[str, list[Received]] = {}
        for network, (config, _) in self.attacker_configs.items():
            broker = next(b for b in self.state.brokers if b.network == network)
            spy = Spy(broker=broker, certs=_certs(config),
                      marker=_marker_topic(config, _identity(config))).open()
            try:
                out[network] = spy.collect()
            finally:
                spy.close()
        return out

    def _try_private(self) -> str:
        """What the private broker says to each of the attacker's certificates (with the
        private network's CA generously given to verify the broker)."""
        broker = next(b for b in self.state.brokers if b.mode == "private")
        outcomes: list[str] = []
        for config, _ in self.attacker_configs.values():
            certs = _certs(config)
            probe = MqttProbe(host=broker.host, port=broker.port,
                              certs=CertPaths(cert=certs.cert, key=certs.key,
                                              ca=Path(broker.ca)))
            try:
                rc = probe.connect()
                outcomes.append("accepted" if not rc.is_failure else f"refused ({rc})")
            except (OSError, ConnectionError, TimeoutError) as exc:
                outcomes.append(f"refused ({type(exc).__name__})")
            finally:
                probe.close()
        return ", ".join(outcomes)
