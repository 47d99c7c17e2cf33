"""The engine's parts and their lifecycle: each part alone, and the one fork hook
that walks module state and every engine's parts."""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import cached_aside
from cached_aside import CacheEngine, cache_aside
from cached_aside._catalog import Catalog
from cached_aside._lifecycle import PARTS
from cached_aside._outbox import Outbox
from cached_aside._stats import Stats

from .conftest import PATIENCE, REDIS_URL, needs_real_redis, unique_prefix

PACKAGE = Path(cached_aside.__file__).parent


def test_the_package_has_one_fork_hook() -> None:
    calls = [
        f"{path.name}:{node.lineno}"
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Attribute) and node.attr == "register_at_fork"
    ]
    assert len(calls) == 1, calls
    assert calls[0].startswith("_lifecycle.py:"), calls


def test_every_part_follows_the_lifecycle() -> None:
    for part in PARTS:
        assert inspect.iscoroutinefunction(part.aclose), part
        for name in ("close", "busy", "after_fork"):
            assert callable(getattr(part, name)), (part, name)


def _join(catalog: Catalog, name: str, stats: Stats) -> None:
    covers: Any = None  # no tags: nothing reads what a function covers
    catalog.join(name=name, stats=stats, tags=(), covers=covers, lock_ttl_ms=1000)


def test_the_catalog_keeps_two_functions_of_one_name_apart() -> None:
    catalog = Catalog(Outbox())
    first, second = Stats("fn"), Stats("fn")
    _join(catalog, "fn", first)
    _join(catalog, "fn", second)
    _join(catalog, "fn", first)  # met again (another engine in between): still one
    first.miss()
    second.miss()
    second.miss()
    assert [function.stats for function in catalog] == [first, second]
    assert catalog.total().misses == 3
    catalog.reset()
    assert catalog.total().misses == 0


def _fork_and_report(check: Callable[[], Any]) -> Any:
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(writing, json.dumps(check()).encode())
        finally:
            os._exit(0)
    os.close(writing)
    deadline = time.monotonic() + PATIENCE
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            pytest.fail("the forked child hung")
        time.sleep(0.01)
    report = json.loads(os.read(reading, 10_000) or b"null")
    os.close(reading)
    return report


@needs_real_redis
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_child_resets_every_part_a_parent_thread_held() -> None:
    assert REDIS_URL is not None
    engine = CacheEngine.from_url(REDIS_URL, prefix=unique_prefix())
    row = cache_aside(key="row:<id>", ttl=60, engine=engine)(lambda id: id)
    assert row("a") == "a"
    held = engine.sides.sync_side().held
    assert held is not None
    locks = [engine.catalog._lock, engine.sides._lock, engine.nearby._lock]
    for lock in locks:  # as if threads of the parent were inside them at fork time
        lock.acquire()
    try:

        def child() -> dict[str, Any]:
            parents = held.held  # the parent's connections are not the child's
            other = cache_aside(key="other:<id>", ttl=60, engine=engine)(lambda id: id)
            return {
                "held": parents,
                "served": [row("a"), other("b")],  # joins the catalog: its lock is new
                "functions": len(engine.catalog),
            }

        report = _fork_and_report(child)
    finally:
        for lock in locks:
            lock.release()
    assert held.held == 1  # this thread's connection, kept for its next command
    assert report == {"held": 0, "served": ["a", "b"], "functions": 2}
    engine.invalidate_prefix("")
    engine.close()


def test_an_engine_closes_its_parts_in_order_and_twice_is_harmless() -> None:
    engine = CacheEngine.from_url("redis://127.0.0.1:1/0", prefix=unique_prefix())
    engine.close(timeout=0.01)
    engine.close(timeout=0.01)
    assert engine.near_state() == "off"
    assert engine.pending_invalidations() == []

    async def closing() -> None:
        await engine.aclose(timeout=0.01)

    asyncio.run(closing())
