"""The dashboard ``make up`` starts, in a real headless chromium: the page loads, shows the
three brokers healthy and draws charts from the aggregates the real bridge published; ``up
stop`` stops it."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from browser import headless_chromium
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from upkit import Up

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The page redraws its tables and charts on every poll: an element found a moment ago may be
# gone when read, and the next poll of the wait looks again.
_REDRAWN = (StaleElementReferenceException,)


def _api(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _healthy_brokers(driver: WebDriver) -> int:
    rows = driver.find_elements(By.CSS_SELECTOR, "#health tr[data-kind='broker']")
    return sum(1 for r in rows if r.get_attribute("data-ok") == "true")


def _drawn_charts(driver: WebDriver) -> list[tuple[str, int]]:
    """(category, points) of each chart whose line is drawn."""
    found = []
    for fig in driver.find_elements(By.CSS_SELECTOR, "figure.chart"):
        lines = fig.find_elements(By.CSS_SELECTOR, "svg.chart path.line")
        if lines and (lines[0].get_attribute("d") or "").startswith("M"):
            svg = fig.find_element(By.CSS_SELECTOR, "svg.chart")
            found.append((fig.get_attribute("data-category") or "",
                          int(svg.get_attribute("data-points") or 0)))
    return found


def test_the_page_shows_healthy_brokers_and_charts_of_real_aggregates(tmp_path: Path) -> None:
    up = Up(tmp_path)
    began = time.monotonic()
    # 100 insights/s per store: the simulated week of history in ~10 s; each day is published
    # once it settled (20 s without input).
    started = up.start("--rate", "100", backend="local")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        url = up.state()["dashboard_url"]
        assert url and url.startswith("http://127.0.0.1:"), up.state()
        assert f"dashboard: {url}" in started.stdout
        with headless_chromium() as driver:
            driver.get(url)
            assert driver.title == "pear_mqtt dashboard"
            WebDriverWait(driver, 30, poll_frequency=0.2, ignored_exceptions=_REDRAWN).until(
                lambda d: _healthy_brokers(d) == 3)
            assert driver.find_element(By.ID, "brokers-healthy") \
                .get_attribute("data-healthy") == "3"
            charts = WebDriverWait(driver, 60, poll_frequency=0.5,
                                   ignored_exceptions=_REDRAWN).until(_drawn_charts)
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        # the charts are the aggregates the bridge published, as the JSON endpoint has them
        market = _api(url + "api/market")
        published = {c["category"] for c in market["categories"]}
        assert charts and {c for c, _ in charts} <= published
        assert all(points >= 1 for _, points in charts)
        assert all(p["band"]["companies"] >= 5 for c in market["categories"]
                   for r in c["regions"] for p in r["points"] if p["band"])
        print(f"dashboard: {len(charts)} charts drawn "
              f"{time.monotonic() - began:.1f}s after `up start` began")
    finally:
        stopped = up.run("stop", "--grace", "4")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "stopped dashboard" in stopped.stdout
    assert up.state()["dashboard_url"] is None
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)
