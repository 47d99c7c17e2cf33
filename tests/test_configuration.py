"""Every bad option is refused at decoration or construction time, with a message
that says what to change; the options' defaults; engines and the default engine,
configure() in the processes it starts, and the opt-in start-up check."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
import redis.asyncio.retry

import cached_aside
import cached_aside._defaults
from cached_aside import (
    CacheEngine,
    ConfigurationError,
    ConfigurationWarning,
    KeyTemplateError,
    cache_aside,
    configure,
)
from cached_aside._defaults import url_from_environment

from .conftest import (
    Harness,
)
from .servers import free_port

ROOT = Path(__file__).resolve().parent.parent


def get_product(id: str) -> dict[str, str]:
    return {"id": id}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ttl": 0}, "ttl must be > 0"),
        ({"ttl": -1}, "ttl must be > 0"),
        ({"ttl": "30"}, "number of seconds"),
        ({"ttl": True}, "number of seconds"),
        ({"ttl": float("inf")}, "finite"),
        ({"ttl": 0.0001}, "1 ms resolution"),
        ({"ttl": 30, "negative_ttl": -1}, "negative_ttl must be >= 0"),
        ({"ttl": 30, "lock_ttl": 0}, "lock_ttl must be > 0"),
        ({"ttl": 30, "as_hash": "yes"}, "as_hash must be True or False"),
        ({"ttl": 30, "fail_open": None}, "fail_open must be True or False"),
        ({"ttl": 30, "engine": "redis://x"}, "engine must be a CacheEngine"),
    ],
)
def test_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        cache_aside(key="product:<id>", **options)


def test_bad_key_is_reported_at_decoration_time() -> None:
    decorator = cache_aside(key="product:<product_id>", ttl=30)
    with pytest.raises(KeyTemplateError, match=r"get_product.*<product_id>.*use one of <id>"):
        decorator(get_product)
    with pytest.raises(ConfigurationError, match="template string"):
        cache_aside(key=None, ttl=30)  # type: ignore[arg-type]


def test_generators_cannot_be_cached() -> None:
    def rows(id: str) -> Any:
        yield id

    with pytest.raises(ConfigurationError, match="generator"):
        cache_aside(key="rows:<id>", ttl=30)(rows)


def test_timedelta_and_float_ttls() -> None:
    fn = cache_aside(key="p:<id>", ttl=timedelta(minutes=5), negative_ttl=0.5)(get_product)
    assert fn._plan.options.ttl_ms == 300_000
    assert fn._plan.options.negative_ttl_ms == 500


def test_engine_refuses_decoding_clients() -> None:
    with pytest.raises(ConfigurationError, match="decode_responses"):
        CacheEngine(fakeredis.FakeRedis(decode_responses=True))
    with pytest.raises(ConfigurationError, match="decode_responses"):
        CacheEngine.from_url("redis://127.0.0.1:6379/0", decode_responses=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "localhost"}, "redis://"),
        ({"url": "redis://x", "socket_timeout": 0}, "socket_timeout"),
        ({"url": "redis://x", "max_connections": 0}, "max_connections"),
        ({"url": "redis://x", "prefix": "a b"}, "prefix"),
    ],
)
def test_bad_engine_options(kwargs: dict[str, Any], message: str) -> None:
    url = kwargs.pop("url")
    with pytest.raises(ConfigurationError, match=message):
        CacheEngine.from_url(url, **kwargs)


def test_missing_client_kind_is_a_clear_error() -> None:
    engine = CacheEngine(async_client=fakeredis.FakeAsyncRedis())
    fn = cache_aside(key="p:<id>", ttl=30, engine=engine)(get_product)
    with pytest.raises(ConfigurationError, match="no sync client"):
        fn("a")


async def test_missing_async_client_is_a_clear_error() -> None:
    engine = CacheEngine(client=fakeredis.FakeRedis())

    @cache_aside(key="p:<id>", ttl=30, engine=engine)
    async def load(id: str) -> str:
        return id

    with pytest.raises(ConfigurationError, match="no async client"):
        await load("a")


def test_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CACHED_ASIDE_REDIS_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert url_from_environment() == "redis://127.0.0.1:6379/0"
    monkeypatch.setenv("REDIS_URL", "redis://b:6379/1")
    assert url_from_environment() == "redis://b:6379/1"
    monkeypatch.setenv("CACHED_ASIDE_REDIS_URL", "redis://a:6379/2")
    assert url_from_environment() == "redis://a:6379/2"


def test_configure_sets_the_default_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cached_aside._defaults, "_default_engine", None)
    server = fakeredis.FakeServer()
    fn = cache_aside(key="p:<id>", ttl=30)(get_product)  # decorated before configure()
    engine = cached_aside.configure(client=fakeredis.FakeRedis(server=server), prefix="app")
    assert cached_aside.default_engine() is engine
    assert fn("a") == {"id": "a"}
    assert fn.key("a") == "app:{p:a}"
    assert fakeredis.FakeRedis(server=server).exists("app:{p:a}") == 1
    assert engine.stats().loads == 1
    with pytest.raises(ConfigurationError, match="give one of"):
        cached_aside.configure("redis://x", client=fakeredis.FakeRedis())
    other = CacheEngine(fakeredis.FakeRedis(server=server), prefix="other")
    assert cached_aside.configure(engine=other) is cached_aside.default_engine() is other
    assert fn.key("a") == "other:{p:a}"
    # A call's key is remembered per engine: the new default's prefix, not the last one's.
    assert fn("a") == {"id": "a"}
    assert fakeredis.FakeRedis(server=server).exists("other:{p:a}") == 1


def test_default_engine_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cached_aside._defaults, "_default_engine", None)
    monkeypatch.setenv("CACHED_ASIDE_REDIS_URL", "redis://127.0.0.1:1/0")
    engine = cached_aside.default_engine()
    client = engine.client()
    assert client.get_connection_kwargs()["port"] == 1
    assert isinstance(client.connection_pool, redis.BlockingConnectionPool)
    engine.close()


def test_engine_warns_about_a_pool_that_raises_instead_of_waiting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="cached_aside"):
        CacheEngine(redis.Redis(max_connections=10))
    assert "raises MaxConnectionsError past 10 connections" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cached_aside"):
        CacheEngine(redis.Redis(connection_pool=redis.BlockingConnectionPool(max_connections=10)))
    assert caplog.text == ""


# -- URLs and client options: checked when the engine is built ----------------------


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("redis://h?decode_responses=true", {}, "decode_responses must stay off"),
        ("redis://h?socket_timeout=-1", {}, "socket_timeout: give a number of seconds > 0"),
        ("redis://h?socket_timeout=abc", {}, "'abc' for socket_timeout: give a number"),
        ("redis://h?socket_connect_timeout=0", {}, "socket_connect_timeout"),
        ("redis://h?timeout=inf", {}, "inf for timeout"),
        ("redis://h?max_connections=-1", {}, "max_connections: give a whole number >= 1"),
        ("redis://h?db=-2", {}, "db: give a whole number >= 0"),
        ("redis://h?protocol=4", {}, "protocol: give 2 or 3"),
        ("redis://h?socket_keepalive=maybe", {}, "give one of 1/0, t/f, true/false"),
        ("redis://h?retry_on_error=NoSuchError", {}, "retry_on_error"),
        ("redis://h?ssl_cert_reqs=sometimes", {}, "none or optional or required"),
        ("redis://h?sockettimeout=1", {}, "unknown option 'sockettimeout' in the URL"),
        ("http://h:6379", {}, "the scheme must be one of redis://"),
        ("redis://h:70000/0", {}, "a port is a number from 1 to 65535"),
        ("redis://h:0/0", {}, "a port is a number from 1 to 65535"),
        ("redis://[::1]:/0", {}, "no port after the colon"),
        ("redis://h:/0", {}, "no port after the colon"),
        ("redis://h/zero", {}, "the path is the database"),
        ("redis+cluster://h:99999", {}, "a port is a number from 1 to 65535"),
        ("redis+cluster://h:7000?socket_timeout=-1", {}, "socket_timeout"),
        ("redis://h", {"socket_timout": 1}, "unknown client option 'socket_timout'"),
        ("redis://h", {"health_check_interval": -1}, "health_check_interval"),
        ("redis+sentinel://h/m", {"max_conections": 5}, "did you mean max_connections"),
    ],
)
def test_bad_urls_and_client_options_fail_when_the_engine_is_built(
    url: str, options: dict[str, Any], message: str
) -> None:
    """Each was accepted here before and then failed in every call."""
    with pytest.raises(ConfigurationError, match=message):
        CacheEngine.from_url(url, **options)
    with pytest.raises(ConfigurationError, match=message):
        cached_aside.configure(url, **options)


def test_a_password_in_a_refused_url_is_not_shown() -> None:
    with pytest.raises(ConfigurationError) as caught:
        CacheEngine.from_url("redis://user:s3cret@h:6379/0?socket_timeout=never")
    assert "s3cret" not in str(caught.value)
    assert "user:***@h" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("redis://h:6380/2?socket_timeout=1&client_name=app&retry_on_timeout=yes", {}),
        ("rediss://user:pw@h?ssl_cert_reqs=none&protocol=3", {"ssl_ca_certs": "/ca.pem"}),
        ("unix:///tmp/redis.sock?db=1", {}),
        ("redis://[::1]:6379", {"client_name": "app", "socket_keepalive": True}),
        ("REDIS://h", {}),
        ("redis+cluster://h:7000", {"read_from_replicas": True}),
    ],
)
def test_good_urls_and_client_options_are_accepted(url: str, options: dict[str, Any]) -> None:
    engine = CacheEngine.from_url(url, **options)  # nothing connects before the first call
    engine.close()


async def test_negative_ttl_defaults_to_a_fifth_of_ttl_at_most_60_s(h: Harness) -> None:
    """guide.md: `negative_ttl` default: 20% of `ttl`, at most 60 s."""

    def absent(id: str) -> None:
        return None

    short = h.cached(absent, key="absent-short:<id>", ttl=100)
    long = h.cached(absent, key="absent-long:<id>", ttl=1000)
    assert await h.run(short, "a") is None
    assert await h.run(long, "a") is None
    assert 19_000 < h.raw.pttl(short.key("a")) <= 20_000
    assert 59_000 < h.raw.pttl(long.key("a")) <= 60_000


async def test_lock_ttl_defaults_to_1_s(h: Harness) -> None:
    """guide.md: `lock_ttl`: the lease of the single-flight lock, default 1 s."""
    seen: list[int] = []

    def load(id: str) -> str:
        seen.append(h.raw.pttl(fn.key(id) + ":lock"))  # while the load is in flight
        return id

    fn = h.cached(load, key="locked:<id>")
    assert await h.run(fn, "a") == "a"
    assert len(seen) == 1
    assert 500 < seen[0] <= 1_000


def test_durations_redis_cannot_expire_are_refused_at_decoration() -> None:
    with pytest.raises(ConfigurationError, match="longer than Redis can expire"):
        cache_aside(key="k:<id>", ttl=sys.maxsize)
    with pytest.raises(ConfigurationError, match="lock_ttl"):
        cache_aside(key="k:<id>", ttl=1, lock_ttl=1e12)


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
