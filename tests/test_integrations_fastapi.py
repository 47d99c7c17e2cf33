"""cached_aside.integrations.fastapi: the example service (examples/fastapi_service.py)
served by a real uvicorn process on a free port, driven over HTTP with httpx; and the
lifespan helper's composition, default engine and closing, without a server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakeredis
import httpx
import pytest
import redis
from fastapi import FastAPI

from cached_aside import CacheEngine, ConfigurationError, default_engine, using_engine
from cached_aside import _defaults as defaults_module
from cached_aside.integrations.fastapi import CacheEngineDep, engine_of, lifespan

from .conftest import REDIS_URL, delete_prefix, needs_real_redis, unique_prefix

ROOT = Path(__file__).resolve().parent.parent
START_SECONDS = 30.0


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    base_url: str
    prefix: str
    log: Path

    def stop(self) -> int:
        """SIGTERM to the server's PID: uvicorn shuts down gracefully (lifespan
        shutdown included), then re-raises the signal, so it exits with -SIGTERM; a
        server that does not stop is killed."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                return self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
                raise
        return self.process.returncode


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_service(tmp_path: Path, prefix: str) -> Service:
    """uvicorn examples.fastapi_service:app, as the example's docstring says, with a
    prefix and a database of the test's own; returns once it answers over HTTP."""
    environment = {
        **os.environ,
        "REDIS_URL": REDIS_URL or "",
        "CACHED_ASIDE_PREFIX": prefix,
        "PRODUCTS_DATABASE": str(tmp_path / "products.db"),
    }
    environment.pop("CACHED_ASIDE_REDIS_URL", None)
    for attempt in range(2):  # another process may take the free port before uvicorn
        port = free_port()
        log = tmp_path / f"uvicorn-{attempt}.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "uvicorn", "examples.fastapi_service:app"),
                    *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
                ],
                cwd=ROOT,
                env=environment,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        service = Service(process, f"http://127.0.0.1:{port}", prefix, log)
        deadline = time.monotonic() + START_SECONDS
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"{service.base_url}/stats", timeout=1.0).status_code == 200:
                    return service
            except httpx.TransportError:
                time.sleep(0.05)
        service.stop() if process.poll() is None else None
        if "address already in use" not in log.read_text().lower():
            break
    pytest.fail(f"uvicorn did not start:\n{log.read_text()}")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    prefix = unique_prefix()
    started = start_service(tmp_path, prefix)
    try:
        yield started
    finally:
        started.stop()
        client = redis.Redis.from_url(REDIS_URL or "")
        delete_prefix(client, prefix)
        client.close()


def counters(client: httpx.Client) -> dict[str, float]:
    answer = client.get("/stats")
    assert answer.status_code == 200
    body = answer.json()
    assert set(body["functions"]) == {"get_product"}
    return dict(body["functions"]["get_product"])


@needs_real_redis
def test_a_read_misses_then_hits_and_the_stats_show_it(service: Service) -> None:
    raw = redis.Redis.from_url(REDIS_URL or "")
    with httpx.Client(base_url=service.base_url, timeout=5.0) as client:
        first = client.get("/products/p-001")
        assert first.status_code == 200
        assert first.json() == {"id": "p-001", "name": "Fountain pen", "stock": 41}
        assert first.headers["X-Cache"] == "loader"
        assert raw.exists(f"{service.prefix}:{{product:p-001}}")  # stored in Redis
        second = client.get("/products/p-001")
        assert second.json() == first.json()
        assert second.headers["X-Cache"] == "cache"
        stats = counters(client)
        assert (stats["misses"], stats["loads"], stats["hits"]) == (1, 1, 1)
        assert stats["hit_rate_pct"] == 50.0
        missing = client.get("/products/p-404")
        assert missing.status_code == 404
        assert client.get("/products/p-404").headers["X-Cache"] == "negative"
    raw.close()


@needs_real_redis
def test_a_write_then_a_read_returns_the_new_row(service: Service) -> None:
    with httpx.Client(base_url=service.base_url, timeout=5.0) as client:
        assert client.get("/products/p-001").headers["X-Cache"] == "loader"
        change = {"name": "Fountain pen, blue", "stock": 40}
        written = client.put("/products/p-001", json=change)
        assert written.status_code == 200
        assert written.json() == {"id": "p-001", **change}
        assert written.headers["X-Cache"] == "loader"  # invalidated after the commit
        again = client.get("/products/p-001")
        assert again.json() == {"id": "p-001", **change}
        assert again.headers["X-Cache"] == "cache"
        assert client.put("/products/p-404", json=change).status_code == 404  # rolled back
        assert client.put("/products/p-001", json={"name": "x"}).status_code == 422
        assert client.get("/products/p-001").json()["name"] == "Fountain pen, blue"
        assert counters(client)["loads"] == 2


@needs_real_redis
def test_stopping_the_server_closes_the_engine_and_leaves_no_keys(
    service: Service,
) -> None:
    with httpx.Client(base_url=service.base_url, timeout=5.0) as client:
        client.get("/products/p-001")
    raw = redis.Redis.from_url(REDIS_URL or "")
    assert list(raw.scan_iter(match=f"{service.prefix}:*"))
    assert service.stop() in (0, -signal.SIGTERM)  # uvicorn >= 0.29 re-raises the signal
    assert list(raw.scan_iter(match=f"{service.prefix}:*")) == []  # the lifespan's shutdown
    assert "Traceback" not in service.log.read_text()
    raw.close()


# -- the lifespan helper, without a server -----------------------------------------


class RecordingEngine(CacheEngine):
    closed = 0

    async def aclose(self, timeout: float = 1.0) -> None:
        self.closed += 1
        await super().aclose(timeout)


def fake_engine(prefix: str | None = None) -> RecordingEngine:
    server = fakeredis.FakeServer()
    return RecordingEngine(
        fakeredis.FakeRedis(server=server),
        fakeredis.FakeAsyncRedis(server=server),
        prefix=prefix or unique_prefix(),
    )


async def test_the_lifespan_wraps_the_apps_own_and_closes_the_engine() -> None:
    engine = fake_engine()
    steps: list[str] = []

    @asynccontextmanager
    async def own(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        steps.append(f"start, engine ready: {engine_of(app) is engine}")
        yield {"database": "db"}
        steps.append(f"stop, engine still open: {engine.closed == 0}")

    app = FastAPI()
    outer = fake_engine()
    with using_engine(outer):
        async with lifespan(lambda: engine, inner=own)(app) as state:
            assert state == {"database": "db"}  # the app's own lifespan state, passed on
            assert engine_of(app) is engine
            assert default_engine() is engine
        assert default_engine() is outer  # the previous default is back
    assert steps == ["start, engine ready: True", "stop, engine still open: True"]
    assert (engine.closed, outer.closed) == (1, 0)


async def test_the_engine_is_closed_when_the_apps_start_up_fails() -> None:
    engine = fake_engine()

    @asynccontextmanager
    async def broken(app: FastAPI) -> AsyncIterator[None]:
        raise RuntimeError("the database is down")
        yield

    with pytest.raises(RuntimeError, match="database is down"):
        async with lifespan(lambda: engine, inner=broken, make_default=False)(FastAPI()):
            pass
    assert engine.closed == 1


async def test_without_a_factory_the_default_engine_is_used() -> None:
    engine = fake_engine()
    with using_engine(engine):
        app = FastAPI()
        async with lifespan()(app) as state:
            assert state is None
            assert engine_of(app) is engine
        assert engine.closed == 1


async def test_the_dependency_gives_the_engine_and_explains_a_missing_lifespan() -> None:
    engine = fake_engine()
    app = FastAPI(lifespan=lifespan(lambda: engine, make_default=False))

    @app.get("/prefix")
    async def prefix(cache: CacheEngineDep) -> str:
        return cache.prefix

    transport = httpx.ASGITransport(app=app)  # runs no lifespan by itself
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        with pytest.raises(ConfigurationError, match="no cache engine"):
            await client.get("/prefix")  # not started
        async with app.router.lifespan_context(app):
            assert (await client.get("/prefix")).json() == engine.prefix
    assert engine.closed == 1


async def test_lifespans_stopped_out_of_order_leave_the_right_default_engine() -> None:
    """Was a defect: `lifespan(factory)` makes its engine the default through
    `using_engine`, a save-and-restore of one global. Two apps in one process whose
    lifespans do not end in reverse order (two test fixtures, or two servers started
    in one process) corrupt it: when app A stops first, app B's undecorated functions
    go to the engine from before both; when B stops, the default becomes A's engine,
    of an app that has shut down.

    Fix: keep the overrides in a stack (a list of tokens); leaving one removes its
    own entry, and the default is the newest remaining override, else the engine
    configured before any.
    """
    previous = defaults_module._default_engine
    original, first, second = fake_engine("orig"), fake_engine("a"), fake_engine("b")
    defaults_module._default_engine = original
    try:
        app_a = lifespan(lambda: first)(FastAPI())
        app_b = lifespan(lambda: second)(FastAPI())
        await app_a.__aenter__()
        await app_b.__aenter__()
        assert default_engine() is second
        await app_a.__aexit__(None, None, None)
        seen_while_b_runs = default_engine().prefix
        await app_b.__aexit__(None, None, None)
        seen_after = default_engine().prefix
    finally:
        defaults_module._default_engine = previous
        for engine in (original, first, second):
            await engine.aclose()
    assert (seen_while_b_runs, seen_after) == ("b", "orig")
