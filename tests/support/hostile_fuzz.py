"""Hostile input for the fault tests: a seeded payload mutator, structured fuzz drawn from
hypothesis strategies, an attacker's MQTT client, and an RSS sampler.

Used by ``test_hostile_node.py`` and ``test_hostile_bridge.py``. Nothing here asserts a
guarantee; it produces the input and counts what the broker did with it.

Every generated message is built so that it is worth exactly **one unit** at a receiver that
gets it: one drop under some reason, or (for a validly signed attacker message with one item)
one delivered / ignored / duplicate item. That is what lets the tests check that *every*
hostile message was counted: the sum of the receiver's counters grows by exactly the number of
hostile messages that reached it. The rules that keep it so:

- no empty payloads in the bulk (an empty payload clears a retained message; the tests cover
  it on its own);
- a mutation always changes its base (an unchanged valid envelope would be legitimate);
- signed attacker bodies that look like insight batches hold exactly one item;
- oversized payloads stay below the broker's packet limit, so they reach the receiver.

``PEAR_FUZZ_N`` sets how many hostile payloads each bulk test sends (default 10,000; ``make
faults`` sets 100,000).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import secrets
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from pear_mqtt.config.models import EncryptionConfig
from pear_mqtt.security.envelope import EnvelopeCodec
from pear_mqtt.security.pki import CertPaths
from pear_mqtt.security.signing import Signer
from pear_mqtt.security.trust import TrustStore
from pear_mqtt.security.wirelayout import signed_bytes

FUZZ_N = int(os.environ.get("PEAR_FUZZ_N", "10000"))
"""Hostile payloads per bulk test (``make faults``: ``PEAR_FUZZ_N=100000``)."""

MAX_BYTES = 1024 * 1024  # the envelope limit of the test network (ReliabilityConfig default)
PACKET_SLACK = 60 * 1024  # the broker allows max_message_bytes + 64 KiB per packet


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# -- memory ------------------------------------------------------------------------------------

def rss_mb() -> float:
    """Resident memory of this process right now."""
    with open("/proc/self/statm", encoding="ascii") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


class RssSampler:
    """Samples this process's RSS every ``interval`` s on a thread; ``peak`` is the maximum."""

    def __init__(self, interval: float = 0.02) -> None:
        self.baseline = rss_mb()
        self.peak = self.baseline
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            now = rss_mb()
            self.samples.append(now)
            self.peak = max(self.peak, now)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def growth(self) -> float:
        return self.peak - self.baseline


# -- topics ------------------------------------------------------------------------------------

class Progress:
    """The attacker's progress, seen from the event loop: ``wait_for(k)`` returns once ``k``
    messages are out (or the attack ended), without polling."""

    def __init__(self, attacker: Attacker, loop: asyncio.AbstractEventLoop) -> None:
        self.attacker, self.loop = attacker, loop
        self.done = False
        self._event = asyncio.Event()

    def __call__(self, i: int) -> None:  # the attacker's thread
        if i < 0:
            self.done = True
        self.loop.call_soon_threadsafe(self._event.set)

    async def wait_for(self, k: int) -> None:
        while self.attacker.sent < k and not self.done:
            self._event.clear()
            with contextlib.suppress(TimeoutError):  # re-check even if a wake-up was missed
                await asyncio.wait_for(self._event.wait(), 1.0)


def rss_bound_mb(sent_bytes: int) -> float:
    """The memory growth allowed while receiving ``sent_bytes`` of hostile payloads.

    150 MB of working room plus at most one copy of what was sent: a receiver that kept
    messages after handling them (a leak) or copied them needlessly exceeds it. It is loose
    because the transport bounds its inbox by message count, not bytes (see
    ``test_memory_stays_bounded_under_a_flood_of_large_messages``, which asserts the tight
    bound and is expected to fail until that is fixed).
    """
    return 150.0 + sent_bytes / 1e6


# -- the attacker's client -------------------------------------------------------------------

@dataclass
class Outcome:
    """What the broker said to each publish, by the tag the test gave it."""

    accepted: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)  # PUBACK with a failure code
    refused_codes: Counter[str] = field(default_factory=Counter)


class Attacker:
    """A raw paho client with a consortium member's valid certificate.

    ``publish_all`` pipelines QoS 1 publishes with a bounded window (so neither side holds an
    unbounded backlog) and records every PUBACK reason code per tag. It runs on the caller's
    thread (the tests run it in a worker thread while the receiver runs on the event loop).
    """

    def __init__(self, *, host: str, port: int, certs: CertPaths, window: int = 256,
                 client_id: str | None = None) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"attacker-{secrets.token_hex(4)}",
                                  protocol=MQTTProtocolVersion.MQTTv5,
                                  reconnect_on_failure=False)
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        ctx.load_cert_chain(str(certs.cert), str(certs.key))
        self.client.tls_set_context(ctx)
        self.client.max_inflight_messages_set(0)  # our own window below bounds it
        self.client.max_queued_messages_set(0)
        self.host, self.port, self.window = host, port, window
        self.outcome = Outcome()
        self.sent = 0
        self.bytes_sent = 0
        self.disconnects: list[str] = []
        self._cond = threading.Condition()
        self._pending: dict[int, str] = {}
        self._early: dict[int, ReasonCode] = {}
        self._connected = threading.Event()
        self._connack: ReasonCode | None = None
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode,
                    props: Any) -> None:
        self._connack = rc
        self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode,
                       props: Any) -> None:
        with self._cond:
            self.disconnects.append(str(rc))
            self._cond.notify_all()
        self._connected.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: ReasonCode,
                    props: Any) -> None:
        with self._cond:
            tag = self._pending.pop(mid, None)
            if tag is None:
                self._early[mid] = rc  # acknowledged before publish() registered the mid
            else:
                self._count(tag, rc)
            self._cond.notify_all()

    def _count(self, tag: str, rc: ReasonCode) -> None:
        if rc.is_failure:
            self.outcome.refused[tag] += 1
            self.outcome.refused_codes[str(rc)] += 1
        else:
            self.outcome.accepted[tag] += 1

    def connect(self, timeout: float = 10.0) -> Attacker:
        self.client.connect(self.host, self.port, keepalive=60)
        self.client.loop_start()
        if not self._connected.wait(timeout) or self._connack is None \
                or self._connack.is_failure:
            raise ConnectionError(f"attacker could not connect: {self._connack}")
        return self

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    def publish(self, topic: str, payload: bytes, tag: str, *, timeout: float = 60.0) -> None:
        """Queue one QoS 1 publish, waiting while ``window`` are unacknowledged."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._pending) >= self.window:
                if self.disconnects:
                    raise ConnectionError(f"the broker dropped the attacker: {self.disconnects}")
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"{len(self._pending)} publishes unacknowledged for "
                                       f"{timeout} s")
        # Not under our lock: paho calls on_publish holding its own, so holding ours here
        # would invert the lock order.
        info = self.client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"publish failed: {mqtt.error_string(info.rc)}")
        with self._cond:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._pending[info.mid] = tag
            else:
                self._count(tag, early)
            self.sent += 1
            self.bytes_sent += len(payload)

    def drain(self, timeout: float = 60.0) -> None:
        """Wait until every publish so far is acknowledged."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending:
                if self.disconnects:
                    raise ConnectionError(f"the broker dropped the attacker: {self.disconnects}")
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"{len(self._pending)} publishes never acknowledged")

    def publish_all(self, messages: Iterable[Hostile], *,
                    progress: Callable[[int], None] | None = None) -> None:
        for i, m in enumerate(messages):
            self.publish(m.topic, m.payload, m.tag)
            if progress is not None and i % 64 == 0:
                progress(i)
        self.drain()
        if progress is not None:
            progress(-1)  # done

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


# -- forging -------------------------------------------------------------------------------------

def sign_raw(signer: Signer, members: Sequence[tuple[str, bytes]]) -> bytes:
    """An envelope with arbitrary member values (JSON bytes) and a *valid* signature by
    ``signer``: what a member with a valid key can put on the wire, however hostile."""
    head = b"{" + b",".join(json.dumps(k).encode() + b":" + v for k, v in members)
    head += b',"cert":"' + b64(signer.certificate_der).encode() + b'"'
    # Signed under the rule of the version it names (v1: the bytes; else v2's digest).
    version = 1 if dict(members).get("v") == b"1" else 2
    sig = signer.sign(signed_bytes(version, head))
    return head + b',"sig":"' + b64(sig).encode() + b'"}'


def envelope_members(*, kind: Any = "insights", msg_id: Any = None, sender: Any,
                     seq: Any, ts: Any, body: Any, version: int = 2
                     ) -> list[tuple[str, bytes]]:
    def enc(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()

    return [("v", enc(version)), ("kind", enc(kind)),
            ("id", enc(msg_id if msg_id is not None else secrets.token_urlsafe(16))),
            ("from", enc(sender)), ("seq", enc(seq)), ("ts", enc(ts)), ("body", enc(body))]


def codec_for(certs: CertPaths, ca: Any, *, keys: dict[str, str] | None = None,
              active: str | None = None) -> EnvelopeCodec:
    return EnvelopeCodec(
        signer=Signer.from_files(key_file=certs.key, cert_file=certs.cert),
        trust=TrustStore.from_files(ca_files=[ca]),
        encryption=EncryptionConfig(keys=keys or {}, active=active) if keys else None)


# -- the bulk mutator ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hostile:
    topic: str
    payload: bytes
    tag: str  # the generator that made it (drop reasons are checked per tag family)


_HOSTILE_VALUES: tuple[Any, ...] = (
    None, True, 0, -1, 1.5, 2**64, -(2**63), 10**30, 1e308, -1e-308, "", "x" * 300, "1", [],
    {}, [[[]]], {"a": {"b": None}}, "\u202e\u0000", "acme/store-1", "../../etc",
)


class Mutator:
    """Deterministic (seeded) hostile payloads around a corpus of real envelopes.

    ``bases``: envelopes to mutate (captured honest ones, the attacker's own valid ones, and
    pre-signed hostile ones). ``replays``: captured envelopes the receiver has already
    accepted, re-sent verbatim. ``presigned``: validly signed envelopes that must be refused
    as they are (wrong group key, foreign CA, expired, impersonation...), by tag.
    """

    OPS = ("bitflip", "truncate", "splice", "field", "nesting", "number", "base64", "forged_sig",
           "garbage", "json_value", "replay", "presigned", "oversized")
    WEIGHTS = (14, 10, 8, 16, 3, 4, 8, 8, 6, 5, 6, 12, 0)  # oversized is drawn separately

    def __init__(self, seed: int, *, bases: Sequence[bytes], replays: Sequence[bytes],
                 presigned: dict[str, Sequence[bytes]], oversized_every: int = 2000) -> None:
        self.rng = random.Random(seed)
        self.bases = list(bases)
        self.replays = list(replays)
        self.presigned = {k: list(v) for k, v in presigned.items() if v}
        self.oversized_every = oversized_every
        self.counts: Counter[str] = Counter()

    def payloads(self, n: int) -> Iterator[tuple[str, bytes]]:
        rng = self.rng
        for i in range(n):
            if self.oversized_every and i % self.oversized_every == self.oversized_every // 2:
                op = "oversized"
            else:
                op = rng.choices(self.OPS, self.WEIGHTS)[0]
            tag, payload = getattr(self, f"_{op}")()
            self.counts[tag] += 1
            yield tag, payload

    def _base(self) -> bytes:
        return self.rng.choice(self.bases)

    @staticmethod
    def _changed(base: bytes, out: bytes) -> bytes:
        # A no-op mutation of a valid envelope would be legitimate traffic: force a change.
        if out == base or not out:
            return base + b" "
        return out

    def _bitflip(self) -> tuple[str, bytes]:
        base = self._base()
        data = bytearray(base)
        for _ in range(self.rng.randint(1, 8)):
            pos = self.rng.randrange(len(data))
            data[pos] ^= 1 << self.rng.randrange(8)
        return "bitflip", self._changed(base, bytes(data))

    def _truncate(self) -> tuple[str, bytes]:
        base = self._base()
        return "truncate", self._changed(base, base[:self.rng.randrange(1, len(base))])

    def _splice(self) -> tuple[str, bytes]:
        a, b = self._base(), self._base()
        out = a[:self.rng.randrange(1, len(a))] + b[self.rng.randrange(len(b)):]
        return "splice", self._changed(a, out)

    def _field(self) -> tuple[str, bytes]:
        """Swap, retype, drop, duplicate or add one member of a real envelope."""
        base = self._base()
        obj = json.loads(base)
        keys = list(obj)
        rng = self.rng
        action = rng.randrange(6)
        if action == 0:  # a member gets a hostile value of another type
            obj[rng.choice(keys)] = rng.choice(_HOSTILE_VALUES)
        elif action == 1:  # two members swap places
            i, j = rng.sample(range(len(keys)), 2)
            keys[i], keys[j] = keys[j], keys[i]
            obj = {k: obj[k] for k in keys}
        elif action == 2:  # a member is missing
            del obj[rng.choice(keys)]
        elif action == 3:  # an extra member
            obj[rng.choice(("x", "sig2", "body", "v", "\u0000"))] = rng.choice(_HOSTILE_VALUES)
        elif action == 4:  # a duplicated key, second value wins in naive parsers
            key = rng.choice(keys)
            text = json.dumps(obj, separators=(",", ":"))[:-1]
            dup = json.dumps(rng.choice(_HOSTILE_VALUES))
            return "field", self._changed(base, f"{text},{json.dumps(key)}:{dup}}}".encode())
        else:  # schema version games
            obj["v"] = rng.choice((0, 3, 99, "1", 1.0, None, -1))
            obj = {"v": obj.pop("v"), **obj}
        out = json.dumps(obj, separators=(",", ":"), ensure_ascii=rng.random() < 0.5).encode()
        return "field", self._changed(base, out)

    def _nesting(self) -> tuple[str, bytes]:
        depth = self.rng.choice((100, 1000, 10_000, 50_000, 150_000))
        opener, closer = self.rng.choice(((b"[", b"]"), (b'{"a":', b"}")))
        depth = min(depth, MAX_BYTES // (len(opener) + len(closer)) - 100)  # under the limit
        closed = self.rng.random() < 0.5
        inner = opener * depth + b"0" + (closer * depth if closed else b"")
        where = self.rng.randrange(3)
        if where == 0:
            return "nesting", inner
        if where == 1:
            return "nesting", b'{"v":1,"body":' + inner + b"}"
        return "nesting", b'{"v":1,"kind":"insights","body":' + inner + b',"sig":"AAAA"}'

    def _number(self) -> tuple[str, bytes]:
        rng = self.rng
        digits = rng.choice((20, 400, 5000, 100_000))
        number = rng.choice((b"9" * digits, b"-" + b"1" * digits, b"1e" + b"9" * min(digits, 50),
                             b"NaN", b"Infinity", b"-Infinity", b"1" + b"0" * digits + b".5"))
        slot = rng.choice((b"v", b"seq", b"ts"))
        if slot == b"v":
            return "number", b'{"v":' + number + b"}"
        obj = json.loads(self._base())
        obj[slot.decode()] = "@@"
        text = json.dumps(obj, separators=(",", ":")).encode()
        return "number", text.replace(b'"@@"', number, 1)

    def _base64(self) -> tuple[str, bytes]:
        base = self._base()
        obj = json.loads(base)
        targets = [k for k in ("sig", "cert", "sk", "enc", "nonce") if k in obj]
        key = self.rng.choice(targets)
        value: str = obj[key]
        rng = self.rng
        choice = rng.randrange(5)
        if choice == 0:
            value = value + "="
        elif choice == 1:
            pos = rng.randrange(len(value))
            value = value[:pos] + rng.choice("+/=!*. é\u0000") + value[pos + 1:]
        elif choice == 2:
            value = value[:-1] if len(value) > 1 else "A"
        elif choice == 3:
            value = base64.b64encode(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
                                     ).decode()  # padded standard alphabet
        else:
            value = b64(rng.randbytes(rng.choice((0, 1, 31, 63, 65, 500))))
        obj[key] = value
        out = json.dumps(obj, separators=(",", ":")).encode()
        return "base64", self._changed(base, out)

    def _forged_sig(self) -> tuple[str, bytes]:
        base = self._base()
        head = base[:base.rfind(b',"sig":"')]
        rng = self.rng
        sig = rng.randbytes(rng.choice((64, 64, 64, 72, 32)))
        return "forged_sig", self._changed(base, head + b',"sig":"' + b64(sig).encode() + b'"}')

    def _garbage(self) -> tuple[str, bytes]:
        rng = self.rng
        size = rng.choice((1, 2, 16, 300, 4096, 65_000))
        kind = rng.randrange(3)
        if kind == 0:
            return "garbage", rng.randbytes(size)
        if kind == 1:
            return "garbage", "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(size)
                                      ).encode("utf-8", "surrogatepass")
        return "garbage", b"\xef\xbb\xbf" + self._base()  # BOM in front of a real envelope

    def _json_value(self) -> tuple[str, bytes]:
        value = self.rng.choice((*_HOSTILE_VALUES, {"v": 1}, {"v": 1, "sig": "x"},
                                 {"v": 3, "kind": "insights"}, {"v": "1"}, {"v": None}))
        return "json_value", json.dumps(value).encode()

    def _replay(self) -> tuple[str, bytes]:
        return "replay", self.rng.choice(self.replays)

    def _presigned(self) -> tuple[str, bytes]:
        tag = self.rng.choice(sorted(self.presigned))
        return f"presigned:{tag}", self.rng.choice(self.presigned[tag])

    def _oversized(self) -> tuple[str, bytes]:
        # Over the envelope limit but under the broker's packet limit: it reaches the
        # receiver, which must refuse it before parsing.
        extra = self.rng.randrange(1, PACKET_SLACK - 4096)
        base = self._base()
        return "oversized", base[:-2] + b" " * (MAX_BYTES - len(base) + extra) + base[-2:]


# -- topics -------------------------------------------------------------------------------------

_LEVELS: tuple[str, ...] = (
    "insights", "state", "nodes", "sync", "aggregates", "contrib", "grocery", "dairy", "x",
    "", " ", "$SYS", "$x", "a" * 65, "b" * 64, "é", "\u202e", "日本", "..", "pear", "v1", "store-1",
    "\ufeff", "a b", "%u", "mallory/../acme",
)


def fuzz_suffix(rng: random.Random) -> str:
    """A topic suffix of 0-12 hostile levels (printable UTF-8, no wildcards or NUL: those
    never leave a standard client library or get past the broker; see the ACL test)."""
    levels = [rng.choice(_LEVELS) for _ in range(rng.randint(0, 12))]
    if rng.random() < 0.5:
        levels.insert(0, rng.choice(("insights", "nodes", "insights")))
    return "/".join(levels)


# -- structure from hypothesis ---------------------------------------------------------------

json_leaf = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)


def _one_item(body: Any) -> bool:
    """True unless ``body`` is a batch of other than one item (see the module docstring)."""
    items = body.get("items") if isinstance(body, dict) else None
    return not isinstance(items, list) or len(items) == 1


@dataclass(frozen=True, slots=True)
class Structured:
    """One validly signed, structurally hostile envelope's fields (signed later)."""

    kind: Any
    msg_id: Any
    sender_ok: bool
    seq: Any
    ts_offset: Any  # seconds added to "now" at signing, or a literal hostile value
    body: Any


def item_strategy(template: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Items near a real one: some fields dropped, retyped or replaced, some extra."""
    insight: dict[str, Any] = template["insight"]

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        fuzzed = dict(insight)
        for key in draw(st.lists(st.sampled_from(sorted(insight)), max_size=3, unique=True)):
            fuzzed[key] = draw(json_values | st.just(None))
        for key in draw(st.lists(st.sampled_from(sorted(insight)), max_size=2, unique=True)):
            fuzzed.pop(key, None)
        if draw(st.booleans()):
            fuzzed[draw(st.text(max_size=6))] = draw(json_values)
        item: dict[str, Any] = {"iid": draw(st.uuids().map(lambda u: u.hex) | json_leaf),
                                "insight": fuzzed}
        sealed = draw(st.sampled_from(("keep", "drop", "garbage", "type")))
        if sealed == "keep" and "sealed" in template:
            item["sealed"] = template["sealed"]
        elif sealed == "garbage":
            item["sealed"] = draw(st.text(max_size=200) | st.binary(min_size=40, max_size=120)
                                  .map(b64))
        elif sealed == "type":
            item["sealed"] = draw(json_values)
        return item

    return build()


def structured_cases(n: int, template_item: dict[str, Any]) -> list[Structured]:
    """``n`` (or fewer) cases drawn by hypothesis, deterministically (``derandomize``)."""
    if n <= 0:
        return []
    bodies = (st.fixed_dictionaries({"items": st.lists(item_strategy(template_item),
                                                       min_size=1, max_size=1)})
              | json_values.filter(_one_item))
    cases: list[Structured] = []
    kinds = st.sampled_from(("insights", "insights", "insights", "state", "presence",
                             "aggregate")) | json_leaf
    seqs = st.just("fresh") | json_leaf
    offsets = st.sampled_from((0.0, 0.0, 0.0, -1e9, 1e6, -31 * 86400.0)) | json_leaf

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(kind=kinds, msg_id=st.just(None) | json_leaf, sender_ok=st.booleans(), seq=seqs,
           ts_offset=offsets, body=bodies)
    def collect(kind: Any, msg_id: Any, sender_ok: bool, seq: Any, ts_offset: Any,
                body: Any) -> None:
        cases.append(Structured(kind, msg_id, sender_ok, seq, ts_offset, body))

    collect()
    return cases[:n]


class StructuredSigner:
    """Signs :class:`Structured` cases with the attacker's key as they are sent.

    Fresh sequence numbers come from a counter above the attacker's real ones; a hostile
    ``seq`` is used as drawn.
    """

    def __init__(self, signer: Signer, *, clock: Callable[[], float] = time.time) -> None:
        self.signer = signer
        self.clock = clock
        self.seq = int(clock() * 1000) * 1000 + 500_000_000

    def sign(self, case: Structured) -> bytes:
        sender = self.signer.sender if case.sender_ok else "acme/store-1"
        if case.seq == "fresh":
            self.seq += 1
            seq: Any = self.seq
        else:
            seq = case.seq
        ts: Any = (self.clock() + case.ts_offset
                   if isinstance(case.ts_offset, float) else case.ts_offset)
        return sign_raw(self.signer, envelope_members(
            kind=case.kind, msg_id=case.msg_id, sender=sender, seq=seq, ts=ts, body=case.body))


def interleave(rng: random.Random, *streams: Iterator[Hostile]) -> Iterator[Hostile]:
    """Merge generators in a seeded random order until all are exhausted."""
    live = list(streams)
    while live:
        i = rng.randrange(len(live))
        try:
            yield next(live[i])
        except StopIteration:
            live.pop(i)
