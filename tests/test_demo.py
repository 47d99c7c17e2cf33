"""The demo's JSON API over real HTTP: every endpoint, and bad input answered with a
4xx and a JSON error, never a 500."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cached_aside import CacheEngine
from cached_aside.demo.app import DemoApp
from cached_aside.demo.catalogue import Catalogue
from cached_aside.demo.server import build_server


@pytest.fixture
def demo(engine: CacheEngine, tmp_path: Path) -> Iterator[str]:
    """The demo server on a free port, on this test's engine and a fresh SQLite file."""
    app = DemoApp(engine, Catalogue(tmp_path / "shop.db", latency_ms=30), "test redis")
    server = build_server("127.0.0.1", 0, app)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def call(
    base: str, method: str, path: str, body: Any = None, raw: bytes | None = None
) -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(base + path, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_page_and_info(demo: str) -> None:
    with urllib.request.urlopen(demo + "/", timeout=10) as response:
        assert b"@cache_aside" in response.read()
    status, info = call(demo, "GET", "/api/info")
    assert status == 200
    assert info["products"][0] == "p-001"
    assert info["fields"] == ["name", "price", "stock", "colour"]


def test_read_miss_then_hit(demo: str) -> None:
    status, first = call(demo, "GET", "/api/products/p-001")
    assert status == 200
    assert (first["hit"], first["source"]) == (False, "loader")
    assert first["primary_ms"] >= 30
    assert first["record"]["name"] == "Fountain pen"
    status, second = call(demo, "GET", "/api/products/p-001")
    assert (second["hit"], second["source"], second["primary_ms"]) == (True, "cache", None)
    assert 0 < second["ttl_ms"] <= 60_000
    _, ttl = call(demo, "GET", "/api/products/p-001/ttl")
    assert ttl["cached"] is True


def test_missing_id_is_a_404_absorbed_by_the_negative_sentinel(demo: str) -> None:
    status, first = call(demo, "GET", "/api/products/p-404")
    assert status == 404
    assert first["source"] == "loader"
    status, second = call(demo, "GET", "/api/products/p-404")
    assert (status, second["source"], second["negative"]) == (404, "negative", True)
    assert "no product" in second["error"]


def test_write_to_primary_invalidates(demo: str) -> None:
    call(demo, "GET", "/api/products/p-002")
    status, reply = call(
        demo, "POST", "/api/products/p-002/primary", {"field": "stock", "value": "3"}
    )
    assert (status, reply["invalidated"], reply["value"]) == (200, True, 3)
    _, after = call(demo, "GET", "/api/products/p-002")
    assert (after["source"], after["record"]["stock"]) == ("loader", "3")


def test_hot_field_updates_the_cache_only(demo: str) -> None:
    status, reply = call(demo, "POST", "/api/products/p-003/cache", {"field": "stock", "value": 9})
    assert (status, reply["updated"]) == (200, False)  # not cached: nothing written
    call(demo, "GET", "/api/products/p-003")
    _, reply = call(demo, "POST", "/api/products/p-003/cache", {"field": "stock", "value": 9})
    assert reply["updated"] is True
    _, after = call(demo, "GET", "/api/products/p-003")
    assert (after["source"], after["record"]["stock"]) == ("cache", "9")


def test_stampede_reads_the_primary_once(demo: str) -> None:
    status, reply = call(demo, "POST", "/api/stampede", {"id": "p-004", "n": 40})
    assert status == 200
    assert (reply["n"], reply["primary_reads"]) == (40, 1)
    assert sum(reply["sources"].values()) == 40
    assert reply["latency_ms"]["p50"] >= 30


def test_stats_and_reset(demo: str) -> None:
    call(demo, "GET", "/api/products/p-005")
    call(demo, "GET", "/api/products/p-005")
    _, stats = call(demo, "GET", "/api/stats")
    assert (stats["hits"], stats["misses"], stats["primary_reads"]) == (1, 1, 1)
    _, reset = call(demo, "POST", "/api/stats/reset")
    assert (reset["hits"], reset["primary_reads"]) == (0, 0)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("GET", "/api/products/bad%20id", None, 400, "ids are"),
        ("POST", "/api/products/p-001/primary", {"field": "colour"}, 400, "send a JSON object"),
        (
            "POST",
            "/api/products/p-001/primary",
            {"field": "bogus", "value": 1},
            400,
            "unknown field",
        ),
        (
            "POST",
            "/api/products/p-001/primary",
            {"field": "stock", "value": "-2"},
            400,
            "whole number",
        ),
        ("POST", "/api/products/p-001/primary", {"field": "price", "value": "abc"}, 400, "price"),
        ("POST", "/api/products/p-999/primary", {"field": "stock", "value": 1}, 404, "no product"),
        ("POST", "/api/products/p-001/cache", {"field": "sku", "value": 1}, 400, "unknown field"),
        ("POST", "/api/stampede", {"n": "abc"}, 400, "whole number"),
        ("POST", "/api/stampede", {"n": 501}, 400, "from 1 to 500"),
        ("POST", "/api/stampede", {"n": 0}, 400, "from 1 to 500"),
        ("POST", "/api/stampede", [1, 2], 400, "JSON object"),
        ("GET", "/api/stampede", None, 405, "takes POST"),
        ("GET", "/api/nothing", None, 404, "no such endpoint"),
    ],
)
def test_bad_input_is_a_4xx_with_a_json_error(
    demo: str, method: str, path: str, body: Any, status: int, message: str
) -> None:
    code, reply = call(demo, method, path, body)
    assert code == status
    assert message in reply["error"]


def test_body_that_is_not_json(demo: str) -> None:
    code, reply = call(demo, "POST", "/api/stampede", raw=b"{not json")
    assert (code, reply["error"]) == (400, "the request body must be JSON")


def test_demo_falls_back_to_fakeredis_when_no_redis_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cached_aside.demo import server

    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setattr(server, "DEFAULT_URL", "redis://127.0.0.1:1/0")  # nothing listens
    engine, label = server.choose_engine(None)
    assert label.startswith("embedded fakeredis")
    assert engine.sync_side().client.ping()


def test_demo_uses_the_named_redis_or_says_it_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    from cached_aside.demo import server

    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(SystemExit, match=r"cannot reach the Redis at redis://127\.0\.0\.1:1/0"):
        server.choose_engine(None)
