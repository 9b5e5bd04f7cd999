"""A headless Debian chromium driven by selenium through Debian's chromium-driver (no
download: both paths are given, so Selenium Manager stays out of it)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM_HINT = "apt-get install chromium chromium-driver (.ci/run installs them)"


def _which(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(f"none of {', '.join(names)} found; {CHROMIUM_HINT}")


@contextlib.contextmanager
def headless_chromium(*, width: int = 1280, height: int = 1600) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = _which("chromium", "chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", f"--window-size={width},{height}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options,
                              service=Service(_which("chromedriver", "chromium-driver")))
    try:
        yield driver
    finally:
        driver.quit()
