"""The attacks: what one member learns from a :class:`privacykit.Capture`, as numbers.

Each attack derives what it can from what the attacker read (its own configuration files and
the messages its certificates let it read) and returns a :class:`Finding`: one line for the
report, the bound the table allows, whether it held, and the raw numbers. The ground truth in
the capture only *scores* what an attack derived; it never feeds a derivation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import statistics
import tomllib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from itertools import combinations
from typing import Any

from privacykit import EXTRA_COMPANIES, EXTRA_STORES, Capture, Observation, WireMessage

from pear_mqtt.errors import TopicError
from pear_mqtt.model.insight import SharingLevel
from pear_mqtt.model.topics import parse_topic
from pear_mqtt.privacy.aggregate import aggregate_cell
from pear_mqtt.privacy.disclosure import ADDITIVE_FIELDS
from pear_mqtt.privacy.filter import Contribution
from pear_mqtt.privacy.ranges import RangeScheme
from pear_mqtt.security.identity import Identity

EPS = 1e-9
INF = math.inf


@dataclass(frozen=True, slots=True)
class Finding:
    """What one attack learned under one policy."""

    learned: str
    bound: str
    held: bool
    metrics: dict[str, Any]


def _equal(a: float, b: float) -> bool:
    return abs(a - b) <= EPS * max(1.0, abs(a), abs(b))


# -- reading the capture -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Shared:
    """A shared insight as its JSON says it, read without the library's own checks (an
    attacker is not bound by them): ranges as ``(lo, hi)``, everything else as sent."""

    category: str
    region: str
    product_id: str | None
    window_start: datetime
    window_end: datetime
    company: str | None
    store: str | None
    levels: dict[str, str]
    groups: dict[str, dict[str, Any]]
    numbers: dict[str, float]  # numeric fields outside the groups (sample_size ...)

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Shared | None:
        try:
            groups = {str(g): dict(f) for g, f in dict(data.get("groups") or {}).items()}
            return cls(
                category=str(data["category"]), region=str(data.get("region", "global")),
                product_id=data.get("product_id"),
                window_start=datetime.fromisoformat(str(data["window_start"])),
                window_end=datetime.fromisoformat(str(data["window_end"])),
                company=data.get("company"), store=data.get("store"),
                levels={str(g): str(v) for g, v in dict(data.get("levels") or {}).items()},
                groups=groups,
                numbers={k: float(v) for k, v in data.items() if _is_number(v)})
        except (KeyError, TypeError, ValueError):
            return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class Seen:
    """A competitor's shared insight as the attacker read it."""

    signer: Identity
    iid: str
    insight: Shared


def _items(body: Any) -> Iterator[Mapping[str, Any]]:
    """Every ``{"iid", "insight"}`` item anywhere in a body (batches, states, checkpoints)."""
    if isinstance(body, Mapping):
        if isinstance(body.get("iid"), str) and isinstance(body.get("insight"), Mapping):
            yield body
            return
        for value in body.values():
            yield from _items(value)
    elif isinstance(body, list):
        for value in body:
            yield from _items(value)


def seen_insights(capture: Capture) -> list[Seen]:
    """Competitors' shared insights, live and retained, once per (node, item id)."""
    out: dict[tuple[str, str, str], Seen] = {}
    for msg in (*capture.wire, *capture.snapshot):
        if not capture.competitor(msg.signer):
            continue
        assert msg.signer is not None
        for item in _items(msg.body):
            key = (msg.signer.member, msg.signer.node, str(item["iid"]))
            shared = None if key in out else Shared.parse(item["insight"])
            if shared is not None:
                out[key] = Seen(signer=msg.signer, iid=key[2], insight=shared)
    return list(out.values())


def _truth_key(company: str, store: str, category: str, region: str, product: str | None,
               start: datetime) -> tuple[str, str, str, str, str | None, float]:
    return company, store, category, region, product, start.timestamp()


def truth_index(capture: Capture) -> dict[tuple[str, str, str, str, str | None, float],
                                          Observation]:
    return {_truth_key(o.company, o.store, o.insight.category, o.insight.region,
                       o.insight.product_id, o.insight.window_start): o for o in capture.truth}


def truth_of(capture: Capture, seen: Seen,
             index: Mapping[tuple[str, str, str, str, str | None, float], Observation]
             ) -> Observation | None:
    company, store = capture.identities[(seen.signer.member, seen.signer.node)]
    s = seen.insight
    return index.get(_truth_key(company, store, s.category, s.region, s.product_id,
                                s.window_start))


def _numbers(obs: Observation) -> dict[tuple[str, str], float]:
    """Every numeric field of an observation: (group, field) -> value."""
    out: dict[tuple[str, str], float] = {}
    for group in ("price_data", "sales_data", "trends"):
        data = getattr(obs.insight, group)
        if data is None:
            continue
        for name, value in vars(data).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[(group, name)] = float(value)
    return out


# -- a. dictionary de-anonymisation -----------------------------------------------------------

_PSEUDONYM_DOMAIN = b"pear_mqtt/pseudonym/v1"


def keyed_pseudonym(key: bytes, network: str, kind: str, value: str) -> str:
    """The keyed pseudonym scheme pear_mqtt documents (HMAC-SHA256 over length-prefixed
    domain, network, kind and value; ``p`` + 24 base32 characters), as an attacker
    re-implements it from the documentation."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in (_PSEUDONYM_DOMAIN, network.encode(), kind.encode(), value.encode()):
        mac.update(len(part).to_bytes(4, "big"))
        mac.update(part)
    return "p" + base64.b32encode(mac.digest()).decode("ascii").lower()[:24]


def _strings(data: Any) -> Iterator[str]:
    if isinstance(data, str):
        yield data
    elif isinstance(data, Mapping):
        for value in data.values():
            yield from _strings(value)
    elif isinstance(data, list):
        for value in data:
            yield from _strings(value)


def dictionary(capture: Capture) -> Finding:
    keys = {s for path in capture.attacker_files
            for s in _strings(tomllib.loads(path.read_text(encoding="utf-8")))}
    companies = (*capture.companies, *EXTRA_COMPANIES)
    stores = (*capture.stores, *EXTRA_STORES)
    # The identities it saw, per competitor node: member, node, and what insights name.
    nodes: dict[tuple[str, str], set[str]] = {}
    networks = {i.network for i in capture.attacker_ids}
    for msg in (*capture.wire, *capture.snapshot):
        if capture.competitor(msg.signer):
            assert msg.signer is not None
            networks.add(msg.signer.network)
            nodes.setdefault((msg.signer.member, msg.signer.node), set()).update(
                (msg.signer.member, msg.signer.node))
    for s in seen_insights(capture):
        nodes.setdefault((s.signer.member, s.signer.node), set()).update(
            i for i in (s.insight.company, s.insight.store) if i is not None)
    book: dict[str, tuple[str, str | None]] = {name: (name, None) for name in companies}
    for key in keys:
        raw = key.encode()
        for network in networks:
            for name in companies:
                book.setdefault(keyed_pseudonym(raw, network, "company", name), (name, None))
                for store in stores:
                    book.setdefault(keyed_pseudonym(raw, network, "store", f"{name}/{store}"),
                                    (name, store))
    own = {i.member for i in capture.attacker_ids}
    calibrated = any(book.get(m, ("", None))[0] == capture.attacker for m in own)
    # Scored against the truth: a company counts as reversed when some identity of its nodes
    # looks up to its own name; a store when its clear store name is recovered with it.
    companies_seen = {capture.identities[n][0] for n in nodes}
    reversed_companies: set[str] = set()
    reversed_stores: set[tuple[str, str]] = set()
    for node, idents in nodes.items():
        company = capture.identities[node][0]
        found = [book[i] for i in idents if i in book and book[i][0] == company]
        if not found:
            continue
        reversed_companies.add(company)
        named = {st for _, st in found if st is not None} | (idents & set(capture.stores))
        if named:
            reversed_stores.add((company, min(named)))
    stores_seen = set(nodes)
    n_c, n_s = len(reversed_companies), len(reversed_stores)
    learned = (f"{n_c}/{len(companies_seen)} competitors' pseudonyms reversed to their names, "
               f"{n_s}/{len(stores_seen)} stores ({len(keys)} strings of its config tried as "
               f"keys over {len(companies)} names x {len(stores)} stores; own pseudonym "
               f"{'reproduced' if calibrated else 'not reproduced'})")
    return Finding(learned=learned, bound="0 pseudonyms reversed", held=n_c == 0 and n_s == 0,
                   metrics={"reversed_companies": sorted(reversed_companies),
                            "reversed_stores": sorted(map(list, reversed_stores)),
                            "competitors_seen": len(companies_seen),
                            "stores_seen": len(stores_seen), "keys_tried": len(keys),
                            "own_reproduced": calibrated})


# -- b. combining fields over time ------------------------------------------------------------

def _range(value: Any) -> tuple[float, float] | None:
    """A published number or bucket (``{"lo", "hi"}``, either end open) as ``(lo, hi)``."""
    if isinstance(value, Mapping) and ("lo" in value or "hi" in value):
        lo, hi = value.get("lo"), value.get("hi")
        if (lo is None or _is_number(lo)) and (hi is None or _is_number(hi)):
            return (-INF if lo is None else float(lo), INF if hi is None else float(hi))
        return None
    if _is_number(value):
        return float(value), float(value)
    return None


def price_bounds(s: Shared) -> tuple[float, float]:
    """What one insight says about its price: its bucket or value, within min/max."""
    lo, hi = 0.0, INF
    group = s.groups.get("price_data", {})
    for name, value in group.items():
        r = _range(value)
        if r is None:
            continue
        if name == "price":
            lo, hi = max(lo, r[0]), min(hi, r[1])
        elif name == "min_price":
            lo = max(lo, r[0])
        elif name == "max_price":
            hi = min(hi, r[1])
    return lo, hi


def ratio_bounds(s: Shared) -> tuple[float, float]:
    """What one insight says about price / previous price (changes are rounded to 0.01)."""
    lo, hi = 0.0, INF
    trends = s.groups.get("trends", {})
    r = _range(trends.get("price_change_pct"))
    if r is not None:
        lo = max(lo, 1 + (r[0] - 0.005) / 100 - EPS)
        hi = min(hi, 1 + (r[1] + 0.005) / 100 + EPS)
    direction = trends.get("direction")
    if direction == "up":
        lo = max(lo, 1.0)
    elif direction == "down":
        hi = min(hi, 1.0)
    return lo, hi


def _width(lo: float, hi: float) -> float:
    return hi - lo if math.isfinite(hi) and math.isfinite(lo) else INF


def price_intervals(capture: Capture) -> list[dict[str, Any]]:
    """Each competitor-hour's current-price interval from everything published up to it."""
    series: dict[tuple[Any, ...], list[Seen]] = {}
    for s in seen_insights(capture):
        i = s.insight
        series.setdefault((s.signer.member, s.signer.node, i.category, i.region, i.product_id),
                          []).append(s)
    index = truth_index(capture)
    scheme = RangeScheme.from_config(capture.scheme)
    rows: list[dict[str, Any]] = []
    for items in series.values():
        items.sort(key=lambda s: s.insight.window_start)
        lo, hi = 0.0, INF
        previous: Shared | None = None
        for s in items:
            i = s.insight
            plo, phi = price_bounds(i)
            if previous is not None and previous.window_end == i.window_start:
                rlo, rhi = ratio_bounds(i)
                lo, hi = max(plo, lo * rlo), min(phi, hi * rhi if rhi < INF else INF)
            else:
                lo, hi = plo, phi
            previous = i
            obs = truth_of(capture, s, index)
            if obs is None or obs.insight.price_data is None or \
                    obs.insight.price_data.price is None:
                continue
            price = obs.insight.price_data.price
            bucket = scheme.bucket(price, category=i.category)
            blo = -INF if bucket.lo is None else bucket.lo
            bhi = INF if bucket.hi is None else bucket.hi
            width = _width(lo, hi)
            rows.append({
                "exact_by_policy": i.levels.get("price_data") == SharingLevel.FULL.value,
                "sound": lo - EPS * price <= price <= hi + EPS * price,
                "pct": width / price * 100 if price else INF,
                "ratio": width / _width(blo, bhi) if _width(blo, bhi) > 0 else INF})
    return rows


def interval(capture: Capture) -> Finding:
    everything = price_intervals(capture)
    rows = [r for r in everything if not r["exact_by_policy"]]
    exact = len(everything) - len(rows)
    unsound = sum(1 for r in rows if not r["sound"])
    narrow = [r for r in rows if r["ratio"] < 1 - 1e-9]
    bounded = [r for r in rows if math.isfinite(r["pct"])]
    bound = "every competitor's current price no narrower than its bucket (>= 1 x bucket)"
    if not bounded:
        learned = (f"no competitor's price bounded ({len(rows)} competitor-hours seen"
                   + (f", {exact} exact by policy" if exact else "") + ")")
    else:
        pcts = [r["pct"] for r in bounded]
        learned = (f"tightest current-price interval {min(pcts):.2f} % of the price (median "
                   f"{statistics.median(pcts):.1f} %); {len(narrow)}/{len(rows)} "
                   f"competitor-hours narrower than their bucket, down to "
                   f"{min(r['ratio'] for r in bounded):.3f} x the bucket")
    return Finding(learned=learned, bound=bound, held=not narrow,
                   metrics={"competitor_hours": len(rows), "narrower": len(narrow),
                            "bounded": len(bounded), "unsound": unsound, "exact": exact,
                            "min_pct": min((r["pct"] for r in bounded), default=None),
                            "min_ratio": min((r["ratio"] for r in bounded), default=None)})


# -- c. linking published numbers to sealed values --------------------------------------------

#: What a number measures: only numbers of the same kind are compared.
KINDS = {"price": "unit price", "min_price": "unit price", "max_price": "unit price",
         "revenue": "money", "units": "count", "transactions": "count",
         "sample_size": "count", "price_change_pct": "percent",
         "demand_change_pct": "percent"}


def _published_numbers(s: Shared) -> list[tuple[str, float]]:
    """Every exact number an insight publishes (bucket edges are the scheme's, not data)."""
    out = list(s.numbers.items())
    for fields in s.groups.values():
        out += [(name, float(v)) for name, v in fields.items() if _is_number(v)]
    return out


#: A published field is linked to a withheld one when they are equal at least this often
#: (and more than once): the mark of a derivation, not of integers that happen to meet.
LINK_SHARE = 0.25


@dataclass(slots=True)
class _Pairs:
    """How often a published field met a withheld one of the same kind, and how often they
    were equal; ``numbers`` keeps, per published number, the pairs it was equal through."""

    comparable: Counter[tuple[str, str]]
    equal: Counter[tuple[str, str]]
    numbers: list[set[tuple[str, str]]]

    def compare(self, published: str, value: float,
                withheld: Iterable[tuple[str, float]]) -> None:
        hits: set[tuple[str, str]] = set()
        for name, v in withheld:
            pair = (published, name)
            self.comparable[pair] += 1
            if _equal(v, value) and pair not in hits:
                self.equal[pair] += 1
                hits.add(pair)
        self.numbers.append(hits)

    def links(self) -> set[tuple[str, str]]:
        return {p for p, n in self.equal.items()
                if n >= 2 and n >= LINK_SHARE * self.comparable[p]}


def linking(capture: Capture) -> Finding:
    index = truth_index(capture)
    pairs = _Pairs(Counter(), Counter(), [])
    for s in seen_insights(capture):
        obs = truth_of(capture, s, index)
        if obs is None:
            continue
        withheld = [(name, v) for (group, name), v in _numbers(obs).items()
                    if s.insight.levels.get(group) != SharingLevel.FULL.value]
        for name, value in _published_numbers(s.insight):
            pairs.compare(name, value, [(w, v) for w, v in withheld
                                        if KINDS.get(w) == KINDS.get(name)])
    aggregates = _aggregate_numbers(capture, pairs)
    links = pairs.links()
    linked = sum(1 for hits in pairs.numbers if hits & links)
    coincidences = sum(1 for hits in pairs.numbers if hits and not hits & links)
    detail = ", ".join(f"{p} = {w} {pairs.equal[(p, w)]}/{pairs.comparable[(p, w)]}"
                       for p, w in sorted(links))
    learned = (f"{linked}/{len(pairs.numbers)} published numbers equal a competitor's "
               f"withheld value" + (f" ({detail})" if detail else "")
               + (f"; {coincidences} isolated coincidences of integers"
                  if coincidences else ""))
    return Finding(learned=learned, bound="0 equal through a link", held=linked == 0,
                   metrics={"published": len(pairs.numbers), "linked": linked,
                            "coincidences": coincidences, "aggregate_numbers": aggregates,
                            "links": sorted(f"{p}={w}" for p, w in links)})


def _aggregate_numbers(capture: Capture, pairs: _Pairs) -> int:
    """Aggregate statistics against each competitor's own values in that cell."""
    count = 0
    for cell, stats in aggregate_versions(capture):
        per_company: dict[str, list[Observation]] = {}
        for o in capture.truth:
            if o.company != capture.attacker and _in_cell(o, cell):
                per_company.setdefault(o.company, []).append(o)
        for (group, name), values in stats.items():
            mine: list[tuple[str, float]] = []
            for obs in per_company.values():
                vals = [v for o in obs if (v := _numbers(o).get((group, name))) is not None]
                if vals:
                    mine.append((name, math.fsum(vals) if name in ADDITIVE_FIELDS
                                 else math.fsum(vals) / len(vals)))
                    mine += [(name, v) for v in vals]
            for stat in ("sum", "mean", "stddev"):
                if stat in values:
                    count += 1
                    pairs.compare(f"aggregate {name}.{stat}", values[stat], mine)
    return count


# -- d. names, presence and timing -------------------------------------------------------------

def _texts(msg: WireMessage) -> Iterator[tuple[str, str]]:
    """(where, text) of everything readable in one message."""
    yield "topic", msg.topic
    if msg.signer is not None:
        yield "signer", f"{msg.signer.member}/{msg.signer.node}"
    for name in msg.cert_names:
        yield "certificate", name
    for text in _strings(msg.body):
        yield "body", text
    if isinstance(msg.body, Mapping):
        for key in _keys(msg.body):
            yield "body", key


def _keys(data: Any) -> Iterator[str]:
    if isinstance(data, Mapping):
        for key, value in data.items():
            yield str(key)
            yield from _keys(value)
    elif isinstance(data, list):
        for value in data:
            yield from _keys(value)


def own_message(capture: Capture, msg: WireMessage) -> bool:
    if msg.signer is not None:
        return msg.signer in capture.attacker_ids
    try:
        company = parse_topic(msg.topic).company
    except TopicError:
        return False
    return company in {i.member for i in capture.attacker_ids}


def _owner(capture: Capture, msg: WireMessage) -> str | None:
    """The competitor a message is about (its signer's company, else its topic's), or None."""
    if capture.competitor(msg.signer):
        assert msg.signer is not None
        return capture.identities[(msg.signer.member, msg.signer.node)][0]
    try:
        member = parse_topic(msg.topic).company
    except TopicError:
        return None
    return next((company for (m, _), (company, _) in capture.identities.items()
                 if m == member and company != capture.attacker), None)


def names(capture: Capture) -> Finding:
    clear = [c for c in capture.companies if c != capture.attacker] + list(capture.stores)
    patterns = {n: re.compile(rf"(?<![a-z0-9]){re.escape(n)}(?![a-z0-9])") for n in clear}
    named: dict[str, set[str]] = {}  # competitor (or "bridge output") -> clear names
    where: set[str] = set()
    for msg in (*capture.wire, *capture.snapshot):
        if own_message(capture, msg):
            continue
        owner = _owner(capture, msg) or "other"
        for place, text in _texts(msg):
            low = text.lower()
            for name, pattern in patterns.items():
                if pattern.search(low):
                    named.setdefault(owner, set()).add(name)
                    where.add(place)
    members: dict[str, set[str]] = {}
    presence: set[tuple[str, str]] = set()
    for msg in (*capture.wire, *capture.snapshot):
        if capture.competitor(msg.signer):
            assert msg.signer is not None
            members.setdefault(msg.signer.member, set()).add(msg.signer.network)
            if msg.kind == "presence":
                presence.add((msg.signer.member, msg.signer.node))
    linked = sum(1 for nets in members.values() if len(nets) > 1)
    private_read = capture.private_attempts is not None and \
        "accepted" in capture.private_attempts
    competitors = {c for c, _ in capture.identities.values() if c != capture.attacker}
    found = sorted({n for ns in named.values() for n in ns})
    learned = (f"clear names of {len(named)}/{len(competitors)} competitors on the wire"
               + (f" ({', '.join(found)}; in {', '.join(sorted(where))})" if found else "")
               + f"; {linked} identities linked across networks; presence of "
               f"{len(presence)} competitor nodes readable")
    if capture.private_attempts is not None:
        learned += f"; the private broker: {capture.private_attempts}"
    return Finding(learned=learned, bound="0 clear names, 0 linked across networks",
                   held=not named and linked == 0 and not private_read,
                   metrics={"named": {k: sorted(v) for k, v in named.items()},
                            "where": sorted(where), "linked": linked,
                            "presence": len(presence),
                            "private_attempts": capture.private_attempts})


# -- aggregates as published --------------------------------------------------------------------

Cell = tuple[str, str, float, float]  # category, region, window start, window end (epoch s)


def aggregate_versions(capture: Capture
                       ) -> list[tuple[Cell, dict[tuple[str, str], dict[str, float]]]]:
    """Every aggregate cell the attacker read, in order (a cell may come more than once)."""
    out: list[tuple[Cell, dict[tuple[str, str], dict[str, float]]]] = []
    for msg in capture.wire:
        body = msg.body
        if msg.kind != "aggregate" or not isinstance(body, Mapping):
            continue
        try:
            start = datetime.fromisoformat(str(body["window_start"])).timestamp()
            end = datetime.fromisoformat(str(body["window_end"])).timestamp()
            category = str(body["category"])
            cells = list(body["cells"])
        except (KeyError, TypeError, ValueError):
            continue
        for cell in cells:
            stats: dict[tuple[str, str], dict[str, float]] = {}
            for group in cell.get("groups", []):
                for name, values in (group.get("fields") or {}).items():
                    if isinstance(values, Mapping):
                        stats[(str(group.get("group")), str(name))] = {
                            k: float(v) for k, v in values.items()
                            if isinstance(v, int | float) and not isinstance(v, bool)}
            out.append(((category, str(cell.get("region")), start, end), stats))
    return out


def histogram_versions(capture: Capture) -> list[tuple[Cell, str, int, int]]:
    """Every bucket histogram of a published cell: (cell, field, companies it says it
    counts, the sum of its buckets' counts)."""
    out: list[tuple[Cell, str, int, int]] = []
    for msg in capture.wire:
        body = msg.body
        if msg.kind != "aggregate" or not isinstance(body, Mapping):
            continue
        try:
            start = datetime.fromisoformat(str(body["window_start"])).timestamp()
            end = datetime.fromisoformat(str(body["window_end"])).timestamp()
            for cell in body["cells"]:
                key: Cell = (str(body["category"]), str(cell.get("region")), start, end)
                for h in cell.get("histograms") or []:
                    counted = sum(int(b["companies"]) for b in h["buckets"])
                    out.append((key, str(h["field"]), int(h["companies"]), counted))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _in_cell(o: Observation, cell: Cell) -> bool:
    i = o.insight
    return (i.category == cell[0] and i.region == cell[1]
            and cell[2] <= i.window_start.timestamp() < cell[3])


def reference_cells(capture: Capture) -> dict[Cell, dict[tuple[str, str], dict[str, float]]]:
    """What the aggregates should say: each observation counted once, by the library's own
    k-anonymous aggregation (companies by clear name)."""
    w = capture.window_seconds
    cells: dict[Cell, list[Contribution]] = {}
    for o in capture.truth:
        i = o.insight
        start = float(int(i.window_start.timestamp() // w) * w)
        values: dict[str, dict[str, float]] = {}
        for (group, name), v in _numbers(o).items():
            values.setdefault(group, {})[name] = v
        cells.setdefault((i.category, i.region, start, start + w), []).append(Contribution(
            company=o.company, category=i.category, region=i.region,
            window_start=i.window_start, window_end=i.window_end,
            currency="EUR", values=values))
    out: dict[Cell, dict[tuple[str, str], dict[str, float]]] = {}
    for cell, contributions in cells.items():
        outcomes = aggregate_cell(contributions, min_companies=capture.min_companies,
                                  dominance_cap=capture.dominance_cap)
        out[cell] = {(g, n): s.model_dump(exclude_none=True) for g, o in outcomes.items()
                     for n, s in o.statistics.items()}
    return out


# -- e. re-sending and replaying ----------------------------------------------------------------

def skew(capture: Capture) -> Finding:
    """Published statistics against the truth. Fields of ``aggregated`` groups are computed
    from sealed exact values, so every statistic must match; others (e.g. from buckets) are
    checked by how many companies they count."""
    reference = reference_cells(capture)
    versions = aggregate_versions(capture)
    sealed = {g for g, level in capture.levels.items() if level == SharingLevel.AGGREGATED}
    fields = {f for _, stats in versions for f in stats}
    compared = moved = missing = extra = 0
    worst = 0.0
    for cell, got in versions:
        want = reference.get(cell, {})
        for field, values in got.items():
            if field not in want:
                extra += 1
                continue
            compared += 1
            keys = want[field].keys() if field[0] in sealed else {"companies"}
            deviations = {k: abs(values[k] - want[field][k]) / max(abs(want[field][k]), EPS)
                          for k in keys if k in values}
            if any(d > 1e-9 for d in deviations.values()):
                moved += 1
                worst = max(worst, deviations.get("sum", 0.0))
    published: dict[Cell, set[tuple[str, str]]] = {}
    for cell, got in versions:
        published.setdefault(cell, set()).update(got)
    for cell, want in reference.items():
        missing += sum(1 for f in want if f in fields and f[0] in sealed
                       and f not in published.get(cell, set()))
    histograms = histogram_versions(capture)
    for cell, name, companies, counted in histograms:
        # Each company once per cell: as many as report the field, and every bucket's count
        # adds up to that.
        truth = {o.company for o in capture.truth if _in_cell(o, cell)
                 and any(f == name for _, f in _numbers(o))}
        compared += 1
        if companies != len(truth) or counted != companies:
            moved += 1
    r = capture.replays
    refused = sum(v for k, v in r.items() if k.endswith("_refused_by_broker"))
    replayed = sum(v for k, v in r.items() if not k.endswith("_refused_by_broker"))
    drops = Counter(capture.bridge.dropped)
    drops["malformed"] -= capture.barriers
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(drops.items()) if v > 0)
    changed = moved + missing + extra
    learned = (f"re-sent {len(capture.resent)} observations, replayed {replayed} envelopes "
               f"({refused} refused by the broker; the bridge dropped {dropped or 'none'}); "
               f"{changed}/{compared + missing} published statistics off the ground truth"
               + (f", sums by up to {worst:.1%}" if worst else "")
               + (f", {missing} suppressed" if missing else ""))
    return Finding(learned=learned, bound="0 statistics moved (each company once per cell)",
                   held=changed == 0,
                   metrics={"compared": compared, "moved": moved, "missing": missing,
                            "extra": extra, "worst_sum": worst, "histograms": len(histograms),
                            "resent": len(capture.resent),
                            "replays": dict(r), "bridge_dropped": dict(capture.bridge.dropped),
                            "items_counted": capture.bridge.items_counted})


# -- f. differencing ------------------------------------------------------------------------------

def _company_value(obs: Iterable[Observation], field: tuple[str, str]) -> float | None:
    vals = [v for o in obs if (v := _numbers(o).get(field)) is not None]
    if not vals:
        return None
    return math.fsum(vals) if field[1] in ADDITIVE_FIELDS else math.fsum(vals) / len(vals)


@dataclass(frozen=True, slots=True)
class Residue:
    """A value differencing isolates, and what it structurally is: one company's value in a
    cell (``company_cell``) or one contribution (``contribution``)."""

    value: float
    what: str
    cell: Cell


def residues(capture: Capture) -> list[Residue]:
    """Every value differencing isolates by the published counts alone: two versions of a
    cell one company apart; a window minus the published windows inside it, one
    contribution apart; a cell minus the attacker's own value, one company left."""
    versions = aggregate_versions(capture)
    by_field: dict[tuple[str, str, tuple[str, str]], list[tuple[Cell, dict[str, float]]]] = {}
    for cell, stats in versions:
        for field, values in stats.items():
            by_field.setdefault((cell[0], cell[1], field), []).append((cell, values))

    def total(values: Mapping[str, float]) -> float | None:
        if "sum" in values:
            return values["sum"]
        if "mean" in values and "companies" in values:
            return values["mean"] * values["companies"]
        return None

    def mine(cell: Cell, field: tuple[str, str]) -> set[float]:
        # What it knows it contributed: honestly, or with its re-sends counted.
        out: set[float] = set()
        for pool in (capture.truth, (*capture.truth, *capture.resent)):
            v = _company_value([o for o in pool if o.company == capture.attacker
                                and _in_cell(o, cell)], field)
            if v is not None:
                out.add(v)
        return out

    out: list[Residue] = []
    for (_, _, field), entries in by_field.items():
        additive = field[1] in ADDITIVE_FIELDS
        for (a, va), (b, vb) in combinations(entries, 2):
            ta, tb = total(va), total(vb)
            if a == b and ta is not None and tb is not None and \
                    abs(va.get("companies", 0) - vb.get("companies", 0)) == 1:
                out.append(Residue(abs(ta - tb), "company_cell", a))
        for a, va in entries:
            ta = total(va)
            if ta is None:
                continue
            inner = [(b, vb) for b, vb in entries
                     if b != a and a[2] <= b[2] and b[3] <= a[3]]
            if additive and inner and "count" in va:
                covered = math.fsum(vb.get("count", 0) for _, vb in inner)
                rest = ta - math.fsum(total(vb) or 0.0 for _, vb in inner)
                if va["count"] - covered == 1:
                    out.append(Residue(rest, "contribution", a))
            if va.get("companies") == 2:
                out += [Residue(ta - m, "company_cell", a) for m in mine(a, field)]
    return out


def differencing(capture: Capture) -> Finding:
    found = residues(capture)
    derived = 0
    for r in found:
        for company in {o.company for o in capture.truth if o.company != capture.attacker}:
            obs = [o for o in capture.truth if o.company == company and _in_cell(o, r.cell)]
            fields = {f for o in obs for f in _numbers(o)}
            values = [v for f in fields for v in
                      ([_company_value(obs, f)] if r.what == "company_cell" else
                       [_numbers(o).get(f) for o in obs]) if v is not None]
            if any(_equal(r.value, v) for v in values):
                derived += 1
                break
    cells = len(aggregate_versions(capture))
    learned = (f"{derived} single-company values derived ({len(found)} residues that isolate "
               f"one company or contribution, from {cells} published cells)")
    return Finding(learned=learned, bound="0 single-company values derived", held=derived == 0,
                   metrics={"cells": cells, "residues": len(found), "derived": derived})
