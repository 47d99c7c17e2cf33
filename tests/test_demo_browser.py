"""The demo page in a real browser: Debian's Chromium driven by Playwright. Reads a
product twice (miss, then hit), runs the stampede and checks what is displayed; a
failed read clears the record card, Invalidate says what it did, and the stampede is
drawn as one bar per caller."""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
import redis

from cached_aside import CacheEngine
from cached_aside.demo.app import DemoApp
from cached_aside.demo.catalogue import Catalogue
from cached_aside.demo.server import build_server

from .conftest import REDIS_URL, delete_prefix, unique_prefix

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"
)
# Flags for a closed network and a root user; no browser download, ever.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def page_url(tmp_path: Path) -> Iterator[str]:
    """One server, on real Redis when reachable (as the demo would choose), else fakeredis."""
    prefix = unique_prefix()
    if REDIS_URL is not None:
        client = redis.Redis.from_url(REDIS_URL)
    else:
        client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    app = DemoApp(
        CacheEngine(client, prefix=prefix),
        Catalogue(tmp_path / "shop.db", latency_ms=60),
        "test redis",
    )
    server = build_server("127.0.0.1", 0, app)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()
    delete_prefix(client, prefix)
    client.close()


def test_read_twice_and_stampede_in_a_browser(page_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(page_url)
            expect(page.locator("#info")).to_contain_text("test redis")
            page.fill("#read-id", "p-001")
            page.click("#read-btn")
            expect(page.locator("#badge")).to_have_text("MISS")
            expect(page.locator("#primary-ms")).to_contain_text("ms")
            expect(page.locator("#record")).to_contain_text("Fountain pen")
            page.click("#read-btn")
            expect(page.locator("#badge")).to_have_text("HIT")
            expect(page.locator("#primary-ms")).to_have_text("not read")
            expect(page.locator("#ttl")).to_contain_text("s left")
            page.fill("#stampede-n", "30")
            page.click("#stampede-btn")
            expect(page.locator("#stampede-reads")).to_have_text(
                "primary reads: 1 of 30", timeout=20_000
            )
            # one load for the first read, one for the whole stampede
            expect(page.locator('[data-counter="loads"]')).to_have_text("2")
            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            print(f"screenshot: {shot}")
        finally:
            browser.close()


SCREENSHOT = Path("/tmp/demo_stampede.png")  # for a person to look at


def test_failed_read_invalidate_and_stampede_chart_in_a_browser(page_url: str) -> None:
    from playwright.sync_api import Request, expect, sync_playwright

    def is_ttl_poll(request: Request) -> bool:
        return request.url.endswith("/ttl")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            ttl_polls: list[str] = []

            def note(request: Request) -> None:
                if is_ttl_poll(request):
                    ttl_polls.append(request.url)

            page.on("request", note)
            page.goto(page_url)
            expect(page.locator("#info")).to_contain_text("test redis")
            badge = page.locator("#badge")
            record = page.locator("#record")
            ttl = page.locator("#ttl")
            stock = record.locator("tr", has_text="stock")

            # A record on screen, its ttl counting down and polled.
            page.fill("#read-id", "p-001")
            with page.expect_request(is_ttl_poll, timeout=5_000):
                page.click("#read-btn")
                expect(stock).to_contain_text("41")
            expect(ttl).to_contain_text("s left")

            # An unknown id: the old record goes, the ttl stops and is no longer polled.
            page.fill("#read-id", "p-404")
            page.click("#read-btn")
            expect(page.locator("#source")).to_contain_text("no product 'p-404'")
            expect(record).not_to_contain_text("Fountain pen")
            expect(record).to_contain_text("No such product")
            expect(ttl).to_have_text("—")
            polls = len(ttl_polls)
            page.wait_for_timeout(2_600)  # longer than the poll period
            assert ttl_polls[polls:] == []
            expect(ttl).to_have_text("—")

            # Any failed read does the same, here a malformed id (400).
            page.fill("#read-id", "p-001")
            page.click("#read-btn")
            expect(record).to_contain_text("Fountain pen")
            page.fill("#read-id", "no such id!")
            page.click("#read-btn")
            expect(badge).to_have_text("ERROR")
            expect(record).not_to_contain_text("Fountain pen")
            expect(ttl).to_have_text("—")

            # Invalidate, twice: the outcome in words.
            page.fill("#read-id", "p-001")
            page.click("#read-btn")
            expect(badge).to_have_text("HIT")
            outcome = page.locator("#invalidate-result")
            page.click("#invalidate-btn")
            expect(outcome).to_contain_text("Deleted: the cached entry for p-001 is gone")
            expect(ttl).to_have_text("not cached")
            page.click("#invalidate-btn")
            expect(outcome).to_contain_text("Absent: nothing was cached for p-001")

            # The primary changes; the card, not re-read, still shows the old stock.
            page.select_option("#primary-field", "stock")
            page.fill("#primary-value", "40")
            page.click("#primary-btn")
            expect(page.locator("#primary-result")).to_contain_text("stock = 40")
            expect(stock).to_contain_text("41")
            expect(ttl).to_have_text("not cached")
            # From here on only the stampede's own answer can refresh the card's ttl.
            page.route("**/ttl", lambda route: route.abort())

            page.fill("#stampede-n", "30")
            page.click("#stampede-btn")
            expect(page.locator("#stampede-reads")).to_have_text(
                "primary reads: 1 of 30", timeout=20_000
            )
            bars = page.locator("#stampede-chart rect.bar")
            expect(bars).to_have_count(30)
            load = page.locator('#stampede-chart rect.bar[data-source="loader"]')
            expect(load).to_have_count(1)
            others = page.locator('#stampede-chart rect.bar:not([data-source="loader"])')
            fill = "bar => getComputedStyle(bar).fill"
            assert load.evaluate(fill) not in {bar.evaluate(fill) for bar in others.all()}
            expect(page.locator("#stampede-chart")).to_contain_text("the one load")
            # The card: the value the readers got, with a fresh ttl.
            expect(stock).to_contain_text("40")
            expect(page.locator("#source")).to_contain_text("stampede")
            expect(ttl).to_have_text(re.compile(r"^(5[0-9]|60)\.\d s left$"))
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            assert SCREENSHOT.stat().st_size > 10_000
            print(f"screenshot: {SCREENSHOT}")
        finally:
            browser.close()
