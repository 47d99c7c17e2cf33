"""The demo page in a real browser: Debian's Chromium driven by Playwright. Reads a
product twice (miss, then hit), runs the stampede and checks what is displayed."""

from __future__ import annotations

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
