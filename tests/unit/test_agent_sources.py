"""The agent's input side: JSONL/CSV parsing, the watch directory, the simulation, the CLI
front door. Nothing here talks to a broker (see tests/integration/test_agent.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pear_mqtt.agent.records import CSV_COLUMNS, Rejection, input_format, read_insights
from pear_mqtt.agent.runner import AgentReport, default_outbox_path, load_agent_config
from pear_mqtt.agent.simulate import SimulatedSource
from pear_mqtt.agent.sources import FileSource, WatchedFile, WatchSource
from pear_mqtt.cli import main
from pear_mqtt.config.manager import NetworkConfigManager
from pear_mqtt.config.models import (
    EncryptionConfig,
    NetworkConfig,
    ReliabilityConfig,
    TLSConfig,
)
from pear_mqtt.errors import ConfigError
from pear_mqtt.model.insight import (
    MarketInsight,
    NetworkMode,
    NetworkStatus,
    PriceData,
    SalesData,
    TrendData,
)
from pear_mqtt.security import pki as pkimod

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 2, 9, tzinfo=UTC)
TIMEOUT = 5.0


def insight(category: str = "grocery/dairy", price: float = 1.99, **kw: Any) -> MarketInsight:
    return MarketInsight(
        category=category, region="north", window_start=T0, window_end=T0 + timedelta(hours=1),
        price_data=PriceData(price=price, min_price=price * 0.8, max_price=price * 1.2),
        sales_data=SalesData(units=12, revenue=12 * price, transactions=7),
        trends=TrendData(price_change_pct=-1.5, direction="down"), sample_size=7, **kw)


def jsonl(*objs: Any) -> str:
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs)


def good_obj(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = insight().model_dump(mode="json", exclude_none=True)
    data.update(over)
    return data


def split(records: list[MarketInsight | Rejection]
          ) -> tuple[list[MarketInsight], list[Rejection]]:
    return ([r for r in records if isinstance(r, MarketInsight)],
            [r for r in records if isinstance(r, Rejection)])


# -- formats ----------------------------------------------------------------------------------

def test_format_by_suffix() -> None:
    assert input_format(Path("a.jsonl")) == "jsonl"
    assert input_format(Path("a.NDJSON")) == "jsonl"
    assert input_format(Path("x/sales.CSV")) == "csv"
    with pytest.raises(ConfigError, match=r"unsupported input suffix '\.txt'"):
        input_format(Path("a.txt"))


# -- JSONL ------------------------------------------------------------------------------------

def test_jsonl_good_lines_round_trip(tmp_path: Path) -> None:
    items = [insight(price=1.0 + i) for i in range(3)]
    path = tmp_path / "in.jsonl"
    path.write_text("\ufeff" + jsonl(*(i.model_dump(mode="json") for i in items)) + "\n  \n",
                    encoding="utf-8")
    got, bad = split(list(read_insights(path)))
    assert got == items and bad == []


@pytest.mark.parametrize(("line", "error"), [
    ("{not json", r"invalid JSON: .*\(column 2\)"),
    ("[1, 2]", r"expected a JSON object, got list"),
    (json.dumps(good_obj(price_data={"price": -1})), r"price_data\.price: .*greater than or "
                                                      r"equal to 0 \(got -1\)"),
    (json.dumps(good_obj(price_data={"min_price": 3, "max_price": 2})),
     r"price_data: min_price must not exceed max_price"),
    (json.dumps(good_obj(window_start="2026-11-02T09:00:00")), r"window_start: must be "
                                                               r"timezone-aware"),
    (json.dumps(good_obj(window_end="2026-11-01T00:00:00Z")), r"window_end must not be before"),
    (json.dumps(good_obj(colour="red")), r"colour: Extra inputs are not permitted"),
    (json.dumps(good_obj(category="a/+/b")), r"category: .*must not contain '\+'"),
    (json.dumps({k: v for k, v in good_obj().items() if k != "category"}),
     r"category: Field required"),
    ('{"category": "x", "trends": {"price_change_pct": NaN}, "window_start": '
     '"2026-11-02T09:00:00Z", "window_end": "2026-11-02T10:00:00Z"}',
     r"trends\.price_change_pct: Input should be a finite number"),
])
def test_jsonl_bad_line_names_line_and_field(tmp_path: Path, line: str, error: str) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(jsonl(good_obj(), line, good_obj()), encoding="utf-8")
    got, bad = split(list(read_insights(path)))
    assert len(got) == 2
    (rej,) = bad
    assert rej.line == 2 and rej.source == str(path) and rej.text == line
    assert str(rej).startswith(f"{path}:2: ")
    assert re.search(error, rej.error), rej.error
    assert "\n" not in rej.error


def test_jsonl_non_utf8_and_overlong_lines_are_rejected_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    good = json.dumps(good_obj()).encode()
    path.write_bytes(good + b"\n" + b'{"category": "caf\xe9"}\n' + b"x" * (2 * 1024 * 1024)
                     + b"\n" + good + b"\n")
    got, bad = split(list(read_insights(path)))
    assert len(got) == 2
    assert [(r.line, r.error.split(" (")[0]) for r in bad] == [
        (2, "not UTF-8 text"), (3, "line longer than 1048576 bytes")]


# -- CSV --------------------------------------------------------------------------------------

HEADER = ",".join(CSV_COLUMNS)


def csv_row(**cells: Any) -> str:
    base = {"category": "grocery/dairy", "region": "north",
            "window_start": "2026-11-02T09:00:00Z", "window_end": "2026-11-02T10:00:00+00:00",
            "currency": "EUR", "price": "1.99", "min_price": "1.59", "max_price": "2.39",
            "units": "12", "revenue": "23.88", "transactions": "7",
            "price_change_pct": "-1.5", "direction": "down", "sample_size": "7"}
    base.update({k: str(v) for k, v in cells.items()})
    return ",".join(base.get(c, "") for c in CSV_COLUMNS)


def test_csv_good_rows_and_empty_cells(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("\r\n".join([
        "\ufeff" + HEADER,
        csv_row(),
        csv_row(price="", min_price="", max_price="", currency="USD", units="", revenue="",
                transactions="", price_change_pct="", direction="", product_id="sku-1"),
        "",
    ]), encoding="utf-8")
    (full, bare), bad = split(list(read_insights(path)))
    assert bad == []
    assert full.price_data == PriceData(currency="EUR", price=1.99, min_price=1.59,
                                        max_price=2.39)
    assert full.sales_data == SalesData(units=12, revenue=23.88, transactions=7)
    assert full.trends == TrendData(price_change_pct=-1.5, direction="down")
    assert full.window_start == T0 and full.sample_size == 7 and full.product_id is None
    # Empty cells are absent: no groups at all, not groups of None; currency alone shares
    # nothing and does not make a price group.
    assert bare.price_data is None and bare.sales_data is None and bare.trends is None
    assert bare.product_id == "sku-1" and bare.sample_size == 7


def test_csv_subset_and_reordered_columns(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("Window_End, window_start ,category,units\n"
                    "2026-11-02T10:00:00Z,2026-11-02T09:00:00Z,grocery/bakery,40\n")
    ((got,), bad) = split(list(read_insights(path)))
    assert bad == [] and got.category == "grocery/bakery"
    assert got.sales_data == SalesData(units=40) and got.region == "global"


@pytest.mark.parametrize(("row", "error"), [
    (csv_row(price="abc"), r"^price: Input should be a valid number.*\(got 'abc'\)$"),
    (csv_row(min_price="3", max_price="2"), r"^price_data: min_price must not exceed"),
    (csv_row(units="-4"), r"^units: .*greater than or equal to 0"),
    (csv_row(direction="sideways"), r"^direction: Input should be 'up', 'down' or 'flat'"),
    (csv_row(window_start="yesterday"), r"^window_start: Input should be a valid datetime"),
    (csv_row(window_end="2026-11-02T10:00:00"), r"^window_end: must be timezone-aware"),
    (csv_row(category=""), r"^category: Field required"),
    (csv_row(currency="euro"), r"^currency: String should match pattern"),
    (csv_row(sample_size="2.5"), r"^sample_size: Input should be a valid integer"),
    (csv_row() + ",extra", r"^expected 16 cells \(as in the header\), got 17$"),
    ('"unterminated,' + csv_row(), r"expected 16 cells"),
])
def test_csv_bad_row_names_line_and_column(tmp_path: Path, row: str, error: str) -> None:
    path = tmp_path / "in.csv"
    path.write_text("\n".join([HEADER, csv_row(), "", row, csv_row()]) + "\n")
    got, bad = split(list(read_insights(path)))
    assert len(got) == 2
    (rej,) = bad
    assert rej.line == 4 and not rej.fatal and rej.text == row
    assert re.search(error, rej.error), rej.error


@pytest.mark.parametrize(("header", "error"), [
    (HEADER + ",colour", r"unknown column\(s\) \['colour'\]"),
    ("category,window_start,price", r"missing required column\(s\) \['window_end'\]"),
    ("category,window_start,window_end,price,PRICE", r"duplicate column\(s\) \['price'\]"),
])
def test_csv_bad_header_is_fatal(tmp_path: Path, header: str, error: str) -> None:
    path = tmp_path / "in.csv"
    path.write_text(f"\n{header}\n{csv_row()}\n{csv_row()}\n")
    got, bad = split(list(read_insights(path)))
    assert got == []
    (rej,) = bad
    assert rej.fatal and rej.line == 2
    assert re.search(error, rej.error), rej.error


# -- FileSource -------------------------------------------------------------------------------

async def drain(gen: AsyncIterator[list[MarketInsight]], timeout: float = TIMEOUT
                ) -> list[MarketInsight]:
    async def run() -> list[MarketInsight]:
        return [x async for batch in gen for x in batch]
    return await asyncio.wait_for(run(), timeout)


async def test_file_source_yields_good_and_reports_bad(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(jsonl(good_obj(), "{", good_obj(region="south")))
    rejects: list[Rejection] = []
    got = await drain(FileSource(path).batches(
        max_items=64, stop=asyncio.Event(), reject=rejects.append))
    assert [g.region for g in got] == ["north", "south"]
    assert [str(r).split(": ")[0] for r in rejects] == [f"{path}:2"]


async def test_file_source_stops_between_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(jsonl(*(good_obj() for _ in range(10))))
    stop = asyncio.Event()
    gen = FileSource(path).batches(max_items=3, stop=stop, reject=lambda r: None)
    first = await asyncio.wait_for(anext(gen), TIMEOUT)
    stop.set()
    assert [x.category for x in first] == ["grocery/dairy"] * 3
    assert await drain(gen) == []


def test_file_source_check(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        FileSource(tmp_path / "missing.csv").check()
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        FileSource(tmp_path / "d.csv").check()


# -- WatchSource ------------------------------------------------------------------------------

def drop(directory: Path, name: str, text: str) -> Path:
    """Write under a dot-name and rename in, as a well-behaved producer does."""
    tmp = directory / f".{name}.part"
    tmp.write_text(text, encoding="utf-8")
    return tmp.rename(directory / name)


async def take(gen: AsyncIterator[list[MarketInsight]], n: int) -> list[MarketInsight]:
    """Batches until ``n`` insights came (a source batches what it has: maybe more)."""
    out: list[MarketInsight] = []
    while len(out) < n:
        out += await asyncio.wait_for(anext(gen), TIMEOUT)
    return out


async def test_watch_processes_each_file_once_and_files_rejects(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    drop(inbox, "a.jsonl", jsonl(good_obj(region="a1"), "{oops", good_obj(region="a2")))
    (inbox / "notes.txt").write_text("not an input")
    (inbox / ".hidden.csv").write_text("category\n")
    files: list[WatchedFile] = []
    rejects: list[Rejection] = []
    stop = asyncio.Event()
    watch = WatchSource(inbox, poll_interval=0.01, on_file=files.append)
    gen = watch.batches(max_items=64, stop=stop, reject=rejects.append)

    assert [g.region for g in await take(gen, 2)] == ["a1", "a2"]
    drop(inbox, "b.csv", "\n".join([HEADER, csv_row(region="b1"), csv_row(price="x"),
                                    csv_row(region="b2")]) + "\n")
    # Only b's rows come next: a is not read again.
    assert [g.region for g in await take(gen, 2)] == ["b1", "b2"]
    stop.set()
    assert await drain(gen) == []

    assert sorted(p.name for p in inbox.iterdir()) == [".hidden.csv", "done", "notes.txt",
                                                        "processing", "rejected"]
    assert list((inbox / "processing").iterdir()) == []
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["a.jsonl", "b.csv"]
    assert [(f.path.name, f.insights, f.rejections) for f in files] == [
        ("a.jsonl", 2, 1), ("b.csv", 2, 1)]
    assert [str(r).split(": ")[0] for r in rejects] == ["a.jsonl:2", "b.csv:3"]
    rejected = inbox / "rejected"
    assert (rejected / "a.jsonl").read_text() == "{oops\n"
    # The CSV's bad rows keep the header, so the fixed file can be dropped in again.
    assert (rejected / "b.csv").read_text() == f"{HEADER}\n{csv_row(price='x')}\n"
    err = (rejected / "b.csv.err").read_text().splitlines()
    assert err[0].startswith("# b.csv: 1 rejected line(s)")
    assert err[1].startswith("b.csv:3: price: Input should be a valid number")

    # A new agent on the same directory only sees new files.
    stop2 = asyncio.Event()
    gen2 = WatchSource(inbox, poll_interval=0.01).batches(
        max_items=64, stop=stop2, reject=rejects.append)
    drop(inbox, "c.jsonl", jsonl(good_obj(region="c1")))
    assert [g.region for g in await take(gen2, 1)] == ["c1"]
    stop2.set()
    assert await drain(gen2) == []


async def test_watch_finishes_the_file_at_hand_on_stop(tmp_path: Path) -> None:
    drop(tmp_path, "big.jsonl", jsonl(*(good_obj(sample_size=i + 1) for i in range(5))))
    stop = asyncio.Event()
    gen = WatchSource(tmp_path, poll_interval=0.01).batches(max_items=2, stop=stop,
                                                            reject=lambda r: None)
    first = await take(gen, 2)
    stop.set()
    rest = await drain(gen)
    assert [x.sample_size for x in [*first, *rest]] == [1, 2, 3, 4, 5]
    assert [p.name for p in (tmp_path / "done").iterdir()] == ["big.jsonl"]
    assert list((tmp_path / "rejected").iterdir()) == []


async def test_watch_moves_a_file_with_a_bad_header_to_rejected_whole(tmp_path: Path) -> None:
    text = "category,when\nx,y\n"
    drop(tmp_path, "bad.csv", text)
    files: list[WatchedFile] = []
    stop = asyncio.Event()

    def filed(f: WatchedFile) -> None:
        files.append(f)
        stop.set()

    watch = WatchSource(tmp_path, poll_interval=0.01, on_file=filed)
    assert await drain(watch.batches(max_items=64, stop=stop, reject=lambda r: None)) == []
    assert files[0].path == tmp_path / "rejected" / "bad.csv"
    assert (tmp_path / "rejected" / "bad.csv").read_text() == text
    assert "bad.csv:1: CSV header: unknown column(s) ['when']" in (
        tmp_path / "rejected" / "bad.csv.err").read_text()
    assert list((tmp_path / "done").iterdir()) == []


async def test_watch_keeps_both_files_when_a_name_comes_again(tmp_path: Path) -> None:
    stop = asyncio.Event()
    gen = WatchSource(tmp_path, poll_interval=0.01).batches(
        max_items=64, stop=stop, reject=lambda r: None)
    drop(tmp_path, "day.jsonl", jsonl(good_obj(region="first")))
    assert [g.region for g in await take(gen, 1)] == ["first"]
    drop(tmp_path, "day.jsonl", jsonl(good_obj(region="second")))
    assert [g.region for g in await take(gen, 1)] == ["second"]
    stop.set()
    await drain(gen)
    done = sorted(p.name for p in (tmp_path / "done").iterdir())
    assert len(done) == 2 and "day.jsonl" in done
    assert all(n.startswith("day") and n.endswith(".jsonl") for n in done)


async def test_watch_rereads_a_file_an_earlier_run_left_in_processing(tmp_path: Path) -> None:
    (tmp_path / "processing").mkdir()
    drop(tmp_path / "processing", "half.jsonl", jsonl(good_obj(region="left")))
    drop(tmp_path, "new.jsonl", jsonl(good_obj(region="new")))
    stop = asyncio.Event()
    gen = WatchSource(tmp_path, poll_interval=0.01).batches(
        max_items=64, stop=stop, reject=lambda r: None)
    assert [g.region for g in await take(gen, 2)] == ["left", "new"]
    stop.set()
    await drain(gen)
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["half.jsonl", "new.jsonl"]
    assert list((tmp_path / "processing").iterdir()) == []


async def test_watch_leaves_the_file_in_processing_when_the_reader_quits(
        tmp_path: Path) -> None:
    """An outbox that refuses writes until stop closes the source mid-file: nothing is lost."""
    drop(tmp_path, "f.jsonl", jsonl(good_obj(), good_obj()))
    gen = WatchSource(tmp_path, poll_interval=0.01).batches(max_items=64, stop=asyncio.Event(),
                                                             reject=lambda r: None)
    await take(gen, 1)
    await gen.aclose()  # type: ignore[attr-defined]
    assert [p.name for p in (tmp_path / "processing").iterdir()] == ["f.jsonl"]
    assert list((tmp_path / "done").iterdir()) == []


def test_watch_waits_until_a_file_holds_still(tmp_path: Path) -> None:
    watch = WatchSource(tmp_path, poll_interval=0.01)
    path = tmp_path / "growing.jsonl"
    path.write_text(jsonl(good_obj()))
    assert watch.ready_files() == []  # first sighting
    with path.open("a") as fh:
        fh.write(jsonl(good_obj()))
    assert watch.ready_files() == []  # changed since
    assert watch.ready_files() == [path]


def test_watch_check(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        WatchSource(tmp_path / "nope").check()
    with pytest.raises(ConfigError, match="poll interval"):
        WatchSource(tmp_path, poll_interval=0)
    WatchSource(tmp_path).check()
    assert (tmp_path / "done").is_dir() and (tmp_path / "rejected").is_dir()


# -- SimulatedSource --------------------------------------------------------------------------

START = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday


def test_simulation_is_deterministic_per_seed() -> None:
    a = list(SimulatedSource(seed=42, count=500, start=START).generate())
    b = list(SimulatedSource(seed=42, count=500, start=START).generate())
    c = list(SimulatedSource(seed=43, count=500, start=START).generate())
    assert len(a) == 500 and a == b
    assert a != c
    # The seed decides the values; the start only places the windows.
    later = list(SimulatedSource(seed=42, count=500, start=START).generate())
    assert [x.price_data for x in later] == [x.price_data for x in a]


def test_simulation_without_seed_draws_one_to_replay() -> None:
    sim = SimulatedSource(count=20, start=START)
    again = SimulatedSource(seed=sim.seed, count=20, start=START)
    assert list(sim.generate()) == list(again.generate())


def test_simulation_is_plausible() -> None:
    sim = SimulatedSource(seed=7, count=8 * 15 * 28, categories=8, region="north", start=START)
    data = list(sim.generate())
    assert len(data) == 8 * 15 * 28  # four weeks of open hours
    assert {d.category for d in data} == set(sim.categories)
    assert {"grocery/dairy", "grocery/bakery", "household/cleaning",
            "electronics/audio"} <= set(sim.categories)
    by_cat: dict[str, list[MarketInsight]] = {}
    for d in data:
        by_cat.setdefault(d.category, []).append(d)
        p, s, t = d.price_data, d.sales_data, d.trends
        assert p is not None and s is not None and t is not None
        assert p.price is not None and p.min_price is not None and p.max_price is not None
        assert 0 < p.min_price <= p.price <= p.max_price
        assert s.units is not None and s.transactions is not None and s.revenue is not None
        assert s.units >= 0 and s.units == int(s.units)
        assert 0 <= s.transactions <= s.units and (s.transactions > 0) == (s.units > 0)
        assert math.isclose(s.revenue, s.units * p.price, abs_tol=0.01)
        assert d.sample_size >= 1 and d.region == "north" and p.currency == "EUR"
        assert d.window_end - d.window_start == timedelta(hours=1)
        assert 7 <= d.window_start.hour < 22
    for series in by_cat.values():
        prices = [d.price_data.price for d in series if d.price_data and d.price_data.price]
        base = sorted(prices)[len(prices) // 2]
        # A random walk that stays near the base price ...
        assert max(prices) < 1.2 * base
        # ... interrupted by promotions, which cut the price and lift the units.
        starts = [d for d in series if d.trends and (d.trends.price_change_pct or 0) <= -9]
        for promo in starts:
            assert promo.trends is not None and promo.trends.direction == "down"
    promo_hours = [d for d in data if d.price_data and d.price_data.price
                   and d.price_data.price < 0.9 * _median_price(by_cat[d.category])]
    assert promo_hours, "four weeks of eight categories should hold some promotion"
    assert _mean_units(promo_hours, by_cat) > 1.2
    # Daily seasonality: the evening sells more than the first hour of the day.
    dairy = by_cat["grocery/dairy"]
    first = sum(d.sales_data.units or 0 for d in dairy if d.window_start.hour == 7
                and d.sales_data)
    evening = sum(d.sales_data.units or 0 for d in dairy if d.window_start.hour == 17
                  and d.sales_data)
    assert evening > 2 * first


def _median_price(series: list[MarketInsight]) -> float:
    prices = sorted(d.price_data.price for d in series if d.price_data and d.price_data.price)
    return prices[len(prices) // 2]


def _mean_units(promo: list[MarketInsight], by_cat: dict[str, list[MarketInsight]]) -> float:
    """Mean of units in promotion hours relative to the same category and hour otherwise."""
    ratios = []
    in_promo = {id(d) for d in promo}
    for d in promo:
        same = [x.sales_data.units or 0 for x in by_cat[d.category]
                if x.window_start.hour == d.window_start.hour and id(x) not in in_promo
                and x.sales_data]
        if same and d.sales_data and sum(same):
            ratios.append((d.sales_data.units or 0) / (sum(same) / len(same)))
    return sum(ratios) / len(ratios)


def test_simulation_count_zero_and_bad_arguments() -> None:
    assert list(SimulatedSource(seed=1, count=0).generate()) == []
    with pytest.raises(ConfigError, match="--rate"):
        SimulatedSource(rate=-1)
    with pytest.raises(ConfigError, match="--count"):
        SimulatedSource(count=-1)
    with pytest.raises(ConfigError, match="--categories"):
        SimulatedSource(categories=13)
    with pytest.raises(ConfigError, match="region"):
        SimulatedSource(region="a/b", count=0)
    with pytest.raises(ConfigError, match="currency"):
        SimulatedSource(currency="eur")


@pytest.mark.parametrize("count", [1, 200, 5000])
def test_simulated_windows_lie_in_the_past_by_default(count: int) -> None:
    data = list(SimulatedSource(seed=3, count=count).generate())
    assert len(data) == count
    assert max(d.window_end for d in data) <= datetime.now(UTC)


async def test_simulation_paces_and_stops_promptly() -> None:
    stop = asyncio.Event()
    fast = SimulatedSource(seed=1, rate=0, count=50, start=START)
    assert len(await drain(fast.batches(max_items=64, stop=stop, reject=lambda r: None))) == 50
    # At one insight an hour the next is far off: a stop must end the wait at once.
    slow = SimulatedSource(seed=1, rate=1 / 3600, count=5, start=START)
    gen = slow.batches(max_items=64, stop=stop, reject=lambda r: None)
    await asyncio.wait_for(anext(gen), TIMEOUT)
    waiting = asyncio.create_task(drain(gen, timeout=TIMEOUT))
    await asyncio.sleep(0)  # one turn: the task starts its wait, which the stop must end
    stop.set()
    assert await waiting == []


# -- configuration and CLI --------------------------------------------------------------------

def agent_config(tmp_path: Path, **over: Any) -> Path:
    if not (tmp_path / "ca").exists():  # validate(for_connect) parses the TLS material
        pkimod.create_ca(directory=tmp_path / "ca", network="testnet")
        pkimod.issue(ca_dir=tmp_path / "ca", out_dir=tmp_path / "certs", role="node",
                     member="acme", node="till-3")
    certs = tmp_path / "certs"
    tls = {"ca_file": tmp_path / "ca" / pkimod.CA_CERT, "cert_file": certs / "node-acme-till-3.crt",
           "key_file": certs / "node-acme-till-3.key"}
    config = NetworkConfig(
        mode=NetworkMode.CONSORTIUM, company_id="acme", network_id="testnet", node_id="till-3",
        broker_url="mqtts://localhost:1", tls=TLSConfig(**tls),
        encryption=EncryptionConfig(keys={"k1": base64.b64encode(bytes(32)).decode()},
                                    active="k1"), **over)
    path = tmp_path / "agent.toml"
    NetworkConfigManager.save(config, path, include_secrets=True)
    return path


def test_outbox_defaults_next_to_the_config(tmp_path: Path) -> None:
    path = agent_config(tmp_path)
    config = load_agent_config(file=path)
    assert config.reliability.outbox_path == tmp_path.resolve() / ".pear" / "outbox-till-3.sqlite"
    assert default_outbox_path(config=config, config_file=path) == \
        config.reliability.outbox_path
    other = load_agent_config(file=path, outbox=tmp_path / "o.sqlite")
    assert other.reliability.outbox_path == tmp_path / "o.sqlite"
    kept = load_agent_config(file=agent_config(
        tmp_path, reliability=ReliabilityConfig(outbox_path=tmp_path / "set.sqlite")))
    assert kept.reliability.outbox_path == tmp_path / "set.sqlite"


@pytest.mark.parametrize("args", [
    ["--simulate", "--rate", "-1"],
    ["--simulate", "--categories", "0"],
    ["--input", "{missing}"],
    ["--input", "{bad_suffix}"],
    ["--watch", "{missing}"],
    ["--simulate", "--drain-timeout", "-1"],
])
def test_cli_exits_2_on_bad_invocation(tmp_path: Path, args: list[str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    cfg = agent_config(tmp_path)
    (tmp_path / "in.txt").write_text("")
    paths = {"missing": str(tmp_path / "nope.jsonl"), "bad_suffix": str(tmp_path / "in.txt")}
    argv = ["agent", "--config", str(cfg), *(a.format(**paths) for a in args)]
    assert main(argv) == 2
    assert "pear-mqtt agent: " in capsys.readouterr().err


def test_cli_exits_2_on_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("PEAR_")]:
        monkeypatch.delenv(key)
    bad = tmp_path / "bad.toml"
    bad.write_text('mode = "consortium"\ncompany_id = "acme"\nbroker_url = "http://x"\n')
    assert main(["agent", "--config", str(bad), "--simulate"]) == 2
    assert "broker_url" in capsys.readouterr().err
    missing_tls = tmp_path / "nocert.toml"
    missing_tls.write_text('mode = "consortium"\ncompany_id = "acme"\n')
    assert main(["agent", "--config", str(missing_tls), "--drain-only"]) == 2
    assert "tls.ca_file" in capsys.readouterr().err


def test_cli_requires_one_source(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["agent", "--config", str(agent_config(tmp_path))])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["agent", "--simulate", "--drain-only"])


def test_cli_help_names_the_outbox_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["agent", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ".pear/outbox-<node_id>.sqlite next to the config" in text
    assert "--drain-only" in text and "--status-file" in text


def test_report_as_json() -> None:
    report = AgentReport(read=3, queued=3, sent=2, rejected=1, failed=0, outbox_depth=0,
                         drained=True, stopped=False, duration=1.23456,
                         status=NetworkStatus(connected=False, broker="mqtts://b:8883",
                                              last_error="refused"),
                         rejections=(Rejection("a.csv", 4, "price: bad", text="x"),))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["rejections"] == ["a.csv:4: price: bad"]
    assert data["duration"] == 1.235 and data["status"]["connected"] is False
    assert (data["queued"], data["sent"], data["broker"], data["error"]) == (
        3, 2, "mqtts://b:8883", "refused")


async def test_watch_files_a_file_away_only_once_its_last_batch_was_taken(tmp_path: Path
                                                                        ) -> None:
    # The consumer stores a batch before asking for the next: a file still in processing/
    # when the agent dies is read again, so nothing it held can be lost.
    drop(tmp_path, "f.jsonl", jsonl(*(good_obj(sample_size=i + 1) for i in range(4))))
    gen = WatchSource(tmp_path, poll_interval=0.01).batches(max_items=2, stop=asyncio.Event(),
                                                            reject=lambda r: None)
    assert [x.sample_size for x in await take(gen, 2)] == [1, 2]
    assert [x.sample_size for x in await take(gen, 2)] == [3, 4]
    assert [p.name for p in (tmp_path / "processing").iterdir()] == ["f.jsonl"]
    assert list((tmp_path / "done").iterdir()) == []
    await gen.aclose()  # type: ignore[attr-defined]


async def test_file_source_batches_hold_at_most_max_items(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(jsonl(*(good_obj(sample_size=i + 1) for i in range(7))))
    gen = FileSource(path).batches(max_items=3, stop=asyncio.Event(), reject=lambda r: None)
    sizes = [len(b) async for b in gen]
    assert sizes == [3, 3, 1]
