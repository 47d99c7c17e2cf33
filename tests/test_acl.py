"""The least-privilege ACL of docs/security.md, read from the page: the scenario suite
(hits, misses, invalidation, hashes, tags, many()) and the near cache run as a user with
exactly that grant against a redis-server of our own, and Redis refuses nothing; another
prefix is refused (and fails open); the start-up check names a missing permission."""

from __future__ import annotations

import inspect
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from cached_aside import CacheEngine, ConfigurationError, NearCache, Source, cache_aside
from cached_aside._check import PROBE, SCRIPT_CALLS
from cached_aside._cli import main as cli
from cached_aside._scripts import ScriptName

from . import test_batches, test_cache_aside, test_tags, test_typed
from .documented import fenced, marked
from .servers import REDIS_SERVER, RedisProcess

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH")

PAGE = Path(__file__).resolve().parent.parent / "docs" / "security.md"
PASSWORD = "s3cret"
# The page's grant is for the prefix "shop"; the tests' prefixes are t-<hex>.
TEST_PREFIXES = "t-*"


def grant(user: str) -> list[list[str]]:
    """The page's ACL SETUSER lines for `user` (shop_app or shop_ops), as arguments."""
    lines = fenced(marked(PAGE, "acl"), "text").splitlines()
    commands = []
    for line in lines:
        words = line.split()
        if words[:3] == ["ACL", "SETUSER", user]:
            commands.append(
                [
                    {"~shop:*": f"~{TEST_PREFIXES}:*", ">PASSWORD": f">{PASSWORD}"}.get(w, w)
                    for w in words[1:]
                ]
            )
    assert commands, f"security.md grants nothing to {user}"
    return commands


@pytest.fixture(scope="module")
def server() -> Iterator[RedisProcess]:
    process = RedisProcess().start()
    with process.admin() as admin:
        for user in ("shop_app", "shop_ops"):
            for command in grant(user):
                admin.execute_command("ACL", *command)
    yield process
    process.stop()


def url(server: RedisProcess, user: str = "shop_app") -> str:
    return f"redis://{user}:{PASSWORD}@127.0.0.1:{server.port}/0"


def refusals(server: RedisProcess) -> list[str]:
    """What Redis refused since the last call (ACL LOG), then forgotten."""
    with server.admin() as admin:
        entries = admin.acl_log()
        admin.acl_log_reset()
    return [f"{e['username']}: {e['reason']} {e['object']} ({e['context']})" for e in entries]


@pytest.fixture
def backend() -> str:
    return "redis"  # a real server: the scenarios take their real-Redis branches


@pytest.fixture
async def clients(server: RedisProcess) -> AsyncIterator[tuple[Any, Any, redis.Redis]]:
    """The engine's clients log in as the page's user; the raw client (the tests' look
    behind the cache) as the server's default user."""
    sync_pool = redis.BlockingConnectionPool.from_url(url(server), max_connections=300)
    async_pool = redis.asyncio.BlockingConnectionPool.from_url(url(server), max_connections=300)
    sync_client = redis.Redis.from_pool(sync_pool)
    async_client = redis.asyncio.Redis.from_pool(async_pool)
    refusals(server)
    yield sync_client, async_client, server.admin()
    sync_client.close()
    await async_client.aclose()
    assert refusals(server) == []


def _scenarios() -> dict[str, Any]:
    """The scenario tests that need nothing but the harness (`h`), under new names."""
    chosen = {}
    for module in (test_cache_aside, test_tags, test_batches, test_typed):
        short = module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
        for name, function in vars(module).items():
            if not name.startswith("test_") or not callable(function):
                continue
            if list(inspect.signature(function).parameters) != ["h"]:
                continue
            if "busy_tags_set" in name:  # waits on the wall clock; not about permissions
                continue
            chosen[f"test_as_the_acl_user_{short}_{name.removeprefix('test_')}"] = function
    return chosen


SCENARIOS = _scenarios()
globals().update(SCENARIOS)


def test_the_scenarios_cover_each_feature() -> None:
    names = " ".join(SCENARIOS)
    for feature in ("miss_then_hit", "invalidate", "negative", "update_field", "tag", "many"):
        assert feature in names, feature
    assert len(SCENARIOS) >= 40


def test_the_near_cache_works_as_the_acl_user(server: RedisProcess) -> None:
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    # Timeouts far above a loaded machine's stalls: a 0.25 s timeout counted as an error.
    slow: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}
    reader = CacheEngine.from_url(url(server), prefix=prefix, near=NearCache(), **slow)
    writer = CacheEngine.from_url(url(server), prefix=prefix, **slow)
    rows = {"p-1": "v1"}

    @cache_aside(key="product:<id>", ttl=60, engine=reader)
    def read(id: str) -> str:
        return rows[id]

    @cache_aside(key="product:<id>", ttl=60, engine=writer)
    def write_side(id: str) -> str:
        return rows[id]

    try:
        refusals(server)
        assert read("p-1") == "v1"
        deadline = time.monotonic() + 30  # a bound on a hang, not a speed claim
        while reader.near_state() != "tracking" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reader.near_state() == "tracking"
        # Our own store's tracking report arrives a moment after it and voids the first
        # fill (see test_near.until_near): read until the near copy serves.
        while read.lookup("p-1").source is not Source.NEAR and time.monotonic() < deadline:
            time.sleep(0.01)
        assert read.lookup("p-1").source is Source.NEAR
        rows["p-1"] = "v2"
        write_side.invalidate("p-1")  # another process's change reaches this one
        while read.lookup("p-1").value != "v2" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert read("p-1") == "v2"
        assert reader.stats().errors == 0
        assert writer.stats().errors == 0
        assert refusals(server) == []
    finally:
        reader.close()
        writer.close()


def test_another_prefix_is_refused_and_fails_open(server: RedisProcess) -> None:
    engine = CacheEngine.from_url(url(server), prefix="other")
    loads = []

    @cache_aside(key="product:<id>", ttl=60, engine=engine)
    def read(id: str) -> str:
        loads.append(id)
        return id.upper()

    try:
        refusals(server)
        assert read("p-1") == "P-1"
        assert read("p-1") == "P-1"
        assert loads == ["p-1", "p-1"]  # nothing cached: every call loads
        assert engine.stats().errors >= 1
        assert "NoPermissionError" in read.error_kinds()
        assert any("other:" in refused for refused in refusals(server))
    finally:
        engine.close()


def test_the_check_passes_with_the_grant_and_names_what_is_missing(
    server: RedisProcess,
) -> None:
    engine = CacheEngine.from_url(url(server), prefix=f"t-{uuid.uuid4().hex[:12]}")
    try:
        engine.check(tags=True, near=True)  # the page's whole grant: nothing missing
    finally:
        engine.close()
    with server.admin() as admin:  # categories, but not +pexpire (TAG_STAMP and RENEW call it)
        admin.execute_command(
            "ACL", "SETUSER", "categories", "on", f">{PASSWORD}", f"~{TEST_PREFIXES}:*",
            "&__redis__:invalidate", "+@read", "+@write", "+@scripting", "+client|id",
            "+client|tracking", "+subscribe", "+ping", "-pexpire",
        )  # fmt: skip
    engine = CacheEngine.from_url(url(server, "categories"), prefix=f"t-{uuid.uuid4().hex[:12]}")
    try:
        with pytest.raises(ConfigurationError) as raised:
            engine.check(tags=True)
        message = str(raised.value)
        assert "'categories'" in message
        assert "+pexpire (the scripts call it" in message
        assert "+set" not in message  # @write has it: only what is missing is named
    finally:
        engine.close()
    other = CacheEngine.from_url(url(server), prefix="other")
    try:
        with pytest.raises(
            ConfigurationError,
            match=r"'other': ~other:\* \(keys under the prefix: .*no permissions",
        ):
            other.check()
    finally:
        other.close()


def test_the_check_names_a_wrong_password(server: RedisProcess) -> None:
    engine = CacheEngine.from_url(url(server).replace(PASSWORD, "wrong"), prefix="t-x")
    try:
        with pytest.raises(ConfigurationError, match="could not log in as 'shop_app'"):
            engine.check()
    finally:
        engine.close()


def test_the_cli_works_as_its_own_acl_user(
    server: RedisProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    app = CacheEngine.from_url(url(server), prefix=prefix)

    @cache_aside(key="product:<id>", ttl=60, engine=app, as_hash=True)
    def read(id: str) -> dict[str, str]:
        return {"id": id}

    try:
        read("p-1")
        refusals(server)
        ops = ["--url", url(server, "shop_ops"), "--prefix", prefix]
        assert cli([*ops, "ping"]) == 0
        assert cli([*ops, "inspect", "product:<id>", "p-1"]) == 0
        assert re.search(r"p-1", capsys.readouterr().out)
        assert cli([*ops, "invalidate", "product:<id>", "p-1"]) == 0
        assert read.lookup("p-1").source is Source.LOADER
        assert refusals(server) == []
    finally:
        app.close()


def test_the_check_probes_exactly_what_the_scripts_call() -> None:
    """The check tries a list of commands, not the scripts: the list outlived the
    sorted-set tags (TIME, ZADD...), so check(tags=True) refused a user granted just
    what the version tags (TAG_STAMP) and the lease renewal (RENEW) call."""
    called = set()
    for script in ScriptName:
        called |= set(re.findall(r"redis\.call\('([A-Z]+)'", script.value))
    probed = {name for names in SCRIPT_CALLS.values() for name in names}
    assert called == probed
    assert {"TYPE", "GET", "SET", "PTTL", "PEXPIRE"} <= called  # TAG_STAMP's, RENEW's
    for name in probed:
        assert f"{name} = function()" in PROBE, name
