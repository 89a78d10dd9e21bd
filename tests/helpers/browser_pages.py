"""Browser helpers for the page tests: Debian's chromium under Playwright, and a page opener
that records console messages, page errors and requests.

Where chromium or Playwright is missing the tests are skipped, unless
``INFLUENCEKIT_REQUIRE_BROWSER=1`` (as in CI), where that is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("INFLUENCEKIT_REQUIRE_BROWSER") == "1"
# Without the background-networking flags chromium keeps dialling out of this closed network.
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# The XSS payloads every page test plants in ids, texts, themes, queries and titles.
XSS = [
    "<script>window.__xss = 'script'</script>",
    '<img src="x" onerror="window.__xss = \'img\'">',
    "</script><script>window.__xss = 'close'</script>",
    '" onmouseover="window.__xss=\'attr\'" x="',
]


@contextlib.contextmanager
def launch() -> Iterator:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or CHROMIUM is None:
        if REQUIRED:
            pytest.fail("browser tests required but chromium or playwright is missing")
        pytest.skip("needs Debian's chromium (apt-get install chromium) and playwright")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url: str, *, allowed: tuple[str, ...] = ()):
    """Open ``url`` in a new page; returns ``(page, events)``. ``events["requests"]`` lists
    every request except ``url`` itself and those starting with an ``allowed`` prefix."""
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    events = {"console": [], "errors": [], "requests": []}
    page.on("console", lambda m: events["console"].append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: events["errors"].append(str(e)))

    def record(request) -> None:
        if request.url != url and not request.url.startswith(allowed):
            events["requests"].append(request.url)

    page.on("request", record)
    page.goto(url)
    page.wait_for_load_state("load")
    return page, events


def problems(events: dict) -> list[str]:
    """Page errors, console errors and warnings, and stray requests: all should be empty."""
    console = [m for m in events["console"] if m.startswith(("error", "warning"))]
    return events["errors"] + console + events["requests"]


def page_data(text: str) -> dict:
    """The JSON an exported page carries (its component states)."""
    found = re.search(r'<script type="application/json" id="ik-data">(.*?)</script>', text, re.S)
    assert found, "no ik-data script in the page"
    return json.loads(found.group(1))


def map_spread(themes_view) -> tuple[float, float]:
    """The spread of a Themes map's points as drawn: per axis, the middle half of the points'
    extent as a share of the map's side (a map squeezed into a line has one near 0)."""
    import numpy as np

    side = float(themes_view.locator("svg.ik-map").get_attribute("viewBox").split()[2])
    centres = themes_view.locator("circle").evaluate_all(
        "dots => dots.map(d => [Number(d.getAttribute('cx')), Number(d.getAttribute('cy'))])"
    )
    xy = np.array(centres)
    assert ((xy >= 0) & (xy <= side)).all(), "a point is drawn off the map"
    low, high = np.percentile(xy, [25, 75], axis=0)
    return tuple(((high - low) / side).tolist())
