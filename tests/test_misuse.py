"""Mistakes a newcomer makes get a loud, specific answer instead of a silent one: a
sync function on an event loop, an arity error, decorators in the wrong order, a
worker that never configured, and the opt-in start-up check's bad URL or server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import cached_aside._defaults
from cached_aside import (
    BlockingCallWarning,
    CacheEngine,
    ConfigurationError,
    ConfigurationWarning,
    KeyArgumentError,
    cache_aside,
    configure,
)

from .servers import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_a_sync_function_on_a_running_loop_warns_once_naming_the_async_way(
    fakeredis_engine: Any,
) -> None:
    @cache_aside(key="product:<id>", ttl=30, engine=fakeredis_engine)
    def get_product(id: str) -> dict[str, str]:
        return {"id": id}

    async def handler() -> None:
        with pytest.warns(BlockingCallWarning) as caught:  # noqa: PT031
            get_product("p-1")
            get_product("p-1")
            get_product.invalidate("p-1")
        assert len(caught) == 1  # once per function, not per call
        message = str(caught[0].message)
        assert "get_product" in message
        assert "async def get_product" in message
        assert "asyncio.to_thread" in message
        assert caught[0].filename == __file__  # points at the caller's line

    asyncio.run(handler())


def test_a_sync_function_off_the_loop_does_not_warn(fakeredis_engine: Any) -> None:
    @cache_aside(key="product:<id>", ttl=30, engine=fakeredis_engine)
    def get_product(id: str) -> dict[str, str]:
        return {"id": id}

    async def handler() -> dict[str, str]:
        return await asyncio.to_thread(get_product, "p-1")

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", BlockingCallWarning)
        assert get_product("p-1") == {"id": "p-1"}
        assert asyncio.run(handler()) == {"id": "p-1"}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda f: f("p-1"), r"\.get_offer\(shop, id\): missing a required argument: 'id'"),
        (lambda f: f(1, "p-1", 3), r"\.get_offer\(shop, id\): too many positional arguments"),
        (lambda f: f.invalidate(1), r"\.get_offer\(shop, id\): missing a required argument"),
        (lambda f: f.many([(1,)]), r"\.get_offer\(shop, id\): missing a required argument"),
    ],
)
def test_an_arity_error_names_the_function(fakeredis_engine: Any, call: Any, message: str) -> None:
    @cache_aside(key="offer:<shop>:<id>", ttl=30, engine=fakeredis_engine)
    def get_offer(shop: int, id: str) -> dict[str, str]:
        return {"id": id}

    with pytest.raises(KeyArgumentError, match=message):
        call(get_offer)


@pytest.mark.parametrize("kind", [classmethod, staticmethod])
def test_decorators_in_the_wrong_order_say_how_to_fix_it(kind: Any) -> None:
    with pytest.raises(ConfigurationError) as raised:

        class Repository:
            @cache_aside(key="product:<id>", ttl=30)
            @kind
            def get(id: str) -> None: ...

    text = str(raised.value)
    assert f"@{kind.__name__} on top" in text
    assert "@cache_aside(...) under it" in text
    assert "Repository.get" in text


def test_the_documented_order_works(fakeredis_engine: Any) -> None:
    class Repository:
        @staticmethod
        @cache_aside(key="product:<id>", ttl=30, engine=fakeredis_engine)
        def get(id: str) -> dict[str, str]:
            return {"id": id}

    assert Repository.get("p-1") == {"id": "p-1"}
    assert Repository.get.lookup("p-1").hit


SPAWNED_WORKER = textwrap.dedent(
    """
    import multiprocessing
    import warnings

    import cached_aside
    from cached_aside import default_engine


    def worker(configure_too):
        if configure_too:
            cached_aside.configure(url="redis://127.0.0.1:1/0", prefix="shop")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine = default_engine()
        return engine.prefix, [str(w.message) for w in caught]


    if __name__ == "__main__":
        import sys

        cached_aside.configure(url="redis://127.0.0.1:1/0", prefix="shop")
        context = multiprocessing.get_context("spawn")
        with context.Pool(1) as pool:
            print(repr(pool.apply(worker, (sys.argv[1] == "yes",))))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("configure_too", [False, True])
def test_a_spawned_worker_that_never_configured_warns(tmp_path: Path, configure_too: bool) -> None:
    script = tmp_path / "workers.py"
    script.write_text(SPAWNED_WORKER, encoding="utf-8")
    environment = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "CACHED_ASIDE_REDIS_URL": "redis://127.0.0.1:1/0",
    }
    completed = subprocess.run(
        [sys.executable, str(script), "yes" if configure_too else "no"],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    prefix, warned = eval(completed.stdout)
    if configure_too:
        assert (prefix, warned) == ("shop", [])
    else:
        assert prefix == "cache"
        assert len(warned) == 1
        assert "prefix 'shop'" in warned[0]
        assert "configure()" in warned[0]


def test_configure_tells_the_processes_it_starts_without_the_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = cached_aside._defaults._default_engine
    try:
        configure(url="redis://:s3cret@127.0.0.1:1/0", prefix="told")
        told = json.loads(cached_aside._defaults.os.environ["CACHED_ASIDE_CONFIGURED"])
        assert told["prefix"] == "told"
        assert "s3cret" not in json.dumps(told)
        # The same settings from the environment: no warning.
        monkeypatch.setenv("CACHED_ASIDE_REDIS_URL", "redis://:s3cret@127.0.0.1:1/0")
        monkeypatch.setenv("CACHED_ASIDE_PREFIX", "told")
        cached_aside._defaults._default_engine = None
        cached_aside._defaults.default_engine().close()
        # Another URL, the same prefix: a warning naming the URL.
        monkeypatch.setenv("CACHED_ASIDE_REDIS_URL", "redis://127.0.0.1:2/0")
        cached_aside._defaults._default_engine = None
        with pytest.warns(ConfigurationWarning, match="Redis URL"):
            cached_aside._defaults.default_engine().close()
    finally:
        cached_aside._defaults._default_engine = before


def test_check_names_an_unreachable_server() -> None:
    engine = CacheEngine.from_url(f"redis://127.0.0.1:{free_port()}/0", prefix="checked")
    try:
        with pytest.raises(ConfigurationError, match=r"could not reach Redis.*check the URL"):
            engine.check()
    finally:
        engine.close()


def test_configure_with_check_fails_loudly_and_keeps_the_default() -> None:
    before = cached_aside._defaults._default_engine
    with pytest.raises(ConfigurationError, match="could not reach Redis"):
        configure(url=f"redis://127.0.0.1:{free_port()}/0", prefix="checked", check=True)
    assert cached_aside._defaults._default_engine is before


def test_check_passes_where_everything_is_allowed(fakeredis_engine: Any) -> None:
    fakeredis_engine.check(tags=True)  # fakeredis: every command, every script call
    assert fakeredis_engine.client().keys("misuse:*") == []  # the scratch keys are gone
