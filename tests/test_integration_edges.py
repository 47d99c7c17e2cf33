"""Edges of the integrations and Sentinel found by an adversarial review of issue 16:
async functions given to the sync after-commit helpers, async_scoped_session,
lifespans ending out of order, passwords in Sentinel URL errors; and behaviour that
held under review (listeners that do not pile up, savepoints inside begin(), a
cancelled async commit, encoded passwords, all sentinels down)."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import create_engine, text
from sqlalchemy.event import registry
from sqlalchemy.ext.asyncio import (
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session

from cached_aside import CacheEngine, ConfigurationError, Outcome, cache_aside, default_engine
from cached_aside import _defaults as defaults_module
from cached_aside.integrations.fastapi import lifespan
from cached_aside.integrations.sqlalchemy import (
    HELD,
    ainvalidate_on_commit,
    invalidate_on_commit,
)

from .conftest import fake_engine, unique_prefix
from .servers import free_port

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t"  # a password fragment that must never reach an error message


class Recording:
    """Stands for a decorated function: counts the invalidations that reach it."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def key(self, item: Any) -> str:
        return f"recording:{item}"

    def invalidate(self, item: Any) -> Outcome:
        self.calls.append(item)
        return Outcome.DELETED


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Any]:
    made = create_engine(f"sqlite:///{tmp_path / 'review.db'}")
    with made.begin() as connection:
        connection.execute(text("create table t (x integer)"))
    yield made
    made.dispose()


# -- SQLAlchemy --------------------------------------------------------------------


async def test_sqlalchemy_sync_helper_refuses_an_async_function_at_the_write(
    database: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Was a defect: `invalidate_on_commit(session, async_fn, ...)` is accepted. The
    invalidation at the write comes back as an un-awaited coroutine, and the one after
    the commit, the one correctness rests on, is dropped with only a log line
    (`run_all` closes the coroutine). The key is rendered at registration precisely so
    that mistakes raise where the caller sees them; the function's kind should too.

    Fix: in `invalidate_on_commit`/`invalidate_many_on_commit` (and Django's), raise
    TypeError when `fn` is an AsyncCachedFunction / BoundAsyncCachedFunction (or its
    `invalidate` is a coroutine function), naming `ainvalidate_on_commit`.
    """
    engine = fake_engine()

    @cache_aside(key="review:<item>", ttl=30, engine=engine)
    async def load(item: str) -> str:
        return item

    session = Session(database)
    session.execute(text("insert into t values (1)"))
    try:
        returned = invalidate_on_commit(session, load, "a")  # type: ignore[arg-type]
    except TypeError:
        session.rollback()
        return
    finally:
        await engine.aclose()
    if inspect.iscoroutine(returned):
        returned.close()
    with caplog.at_level(logging.ERROR, logger="cached_aside.integrations"):
        session.commit()
    session.close()
    pytest.fail(
        "an async function was registered with the sync helper: the invalidation after "
        f"the commit never ran; the log only says {caplog.messages!r}"
    )


async def test_sqlalchemy_async_helper_takes_an_async_scoped_session(tmp_path: Path) -> None:
    """Was a defect: the sync helper takes a `scoped_session` (its current session),
    but `ainvalidate_on_commit` reads `session.sync_session`, which
    `async_scoped_session` does not proxy: AttributeError, and not even the
    invalidation at the write happens.

    Fix: in the async helpers, `session = session() if isinstance(session,
    async_scoped_session) else session`, as `_current` does for `scoped_session`.
    """
    database = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'scoped.db'}")
    scoped = async_scoped_session(async_sessionmaker(database), scopefunc=asyncio.current_task)
    recording = Recording()

    class AsyncRecording:
        key = staticmethod(recording.key)

        async def invalidate(self, item: Any) -> Outcome:
            return recording.invalidate(item)

    try:
        await scoped.execute(text("select 1"))
        await ainvalidate_on_commit(scoped, AsyncRecording(), "a")  # type: ignore[arg-type]
        await scoped.commit()
        assert recording.calls == ["a", "a"]
    finally:
        await scoped.remove()
        await database.dispose()


def test_sqlalchemy_listeners_and_state_do_not_pile_up(database: Any) -> None:
    """Per-session listeners are registered once per session and go with it: 200
    sessions that each register, commit and close leave SQLAlchemy's event registry
    as it was, and one session reused for many transactions keeps one listener set
    and an empty holding."""
    recording = Recording()

    def sessions(count: int) -> tuple[int, int]:
        for number in range(count):
            with Session(database) as session:
                session.execute(text("insert into t values (:x)"), {"x": number})
                invalidate_on_commit(session, recording, number)  # type: ignore[arg-type]
                session.commit()
        gc.collect()
        return len(registry._key_to_collection), len(registry._collection_to_key)

    before = sessions(5)  # SQLAlchemy's own first-use listeners are in place by now
    assert sessions(200) == before
    assert len(recording.calls) == 410
    with Session(database) as session:
        for number in range(50):
            session.execute(text("insert into t values (:x)"), {"x": number})
            invalidate_on_commit(session, recording, number)  # type: ignore[arg-type]
            session.commit()
        assert session.info[HELD].by_transaction == {}


def test_sqlalchemy_savepoints_inside_begin(database: Any) -> None:
    """`begin_nested` inside `begin`: a released savepoint's invalidation runs with the
    commit; `session.commit()` with a savepoint still open releases it and runs it;
    a savepoint rolled back inside a released one drops only its own; a released
    savepoint dies with an outer rollback."""
    recording = Recording()
    session = Session(database)
    with session.begin():
        savepoint = session.begin_nested()
        invalidate_on_commit(session, recording, "released")  # type: ignore[arg-type]
        savepoint.commit()
    assert recording.calls == ["released", "released"]

    recording.calls.clear()
    session.begin()
    session.begin_nested()
    invalidate_on_commit(session, recording, "open")  # type: ignore[arg-type]
    session.commit()
    assert recording.calls == ["open", "open"]

    recording.calls.clear()
    session.begin()
    outer = session.begin_nested()
    invalidate_on_commit(session, recording, "kept")  # type: ignore[arg-type]
    inner = session.begin_nested()
    invalidate_on_commit(session, recording, "dropped")  # type: ignore[arg-type]
    inner.rollback()
    outer.commit()
    session.commit()
    assert recording.calls == ["kept", "dropped", "kept"]

    recording.calls.clear()
    session.begin()
    savepoint = session.begin_nested()
    invalidate_on_commit(session, recording, "gone")  # type: ignore[arg-type]
    savepoint.commit()
    session.rollback()
    assert recording.calls == ["gone"]
    assert session.info[HELD].by_transaction == {}
    session.close()


async def test_a_cancelled_async_commit_leaves_the_session_usable(tmp_path: Path) -> None:
    """A task cancelled while its commit awaits the invalidations after it: they
    complete once (not again at the session's next commit), and the session is not
    left in a committed-but-open state: the next statement and commit work."""
    database = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'cancel.db'}")
    async with database.begin() as connection:
        await connection.execute(text("create table t (x integer)"))
    started, proceed = asyncio.Event(), asyncio.Event()

    class Slow:
        calls = 0

        def key(self, item: Any) -> str:
            return f"slow:{item}"

        async def invalidate(self, item: Any) -> Outcome:
            self.calls += 1
            if self.calls == 2:
                started.set()
                await proceed.wait()
            return Outcome.DELETED

    slow = Slow()
    session = AsyncSession(database)

    async def write() -> None:
        await session.execute(text("insert into t values (1)"))
        await ainvalidate_on_commit(session, slow, 1)  # type: ignore[arg-type]
        await session.commit()

    task = asyncio.ensure_future(write())
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    proceed.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert slow.calls == 2
    assert not session.in_transaction()
    assert (await session.execute(text("select count(*) from t"))).scalar() == 1
    await session.commit()
    assert slow.calls == 2
    await session.close()
    await database.dispose()


# -- Django ------------------------------------------------------------------------

DJANGO_ASYNC_SCRIPT = """
import asyncio, inspect, logging, sys
import django, fakeredis
from django.conf import settings
settings.configure(
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    INSTALLED_APPS=[], LOGGING_CONFIG=None,
)
django.setup()
from django.db import transaction
from cached_aside import CacheEngine, cache_aside
from cached_aside.integrations.django import invalidate_on_commit

logging.basicConfig(level=logging.ERROR, stream=sys.stdout, format="LOG %(message)s")
server = fakeredis.FakeServer()
engine = CacheEngine(fakeredis.FakeRedis(server=server), fakeredis.FakeAsyncRedis(server=server),
                     prefix="review")

@cache_aside(key="review:<item>", ttl=30, engine=engine)
async def load(item):
    return item

try:
    with transaction.atomic():
        returned = invalidate_on_commit(load, "a")
        if inspect.iscoroutine(returned):
            returned.close()
except TypeError as exc:
    print("REFUSED", exc)
else:
    print("ACCEPTED")
engine.close()
"""


def test_django_helper_refuses_an_async_function_at_the_write(tmp_path: Path) -> None:
    """Was a defect: Django's `invalidate_on_commit(async_fn, ...)` is accepted
    inside `atomic()`; the invalidation after the commit is then dropped with only an
    error log, which points to an `ainvalidate_on_commit` that the Django module does
    not have. A Django (ASGI) project with `async def` loaders has no
    invalidate-after-commit at all, and learns it only from the logs.

    Fix: raise TypeError at registration for an async function (as for SQLAlchemy),
    and either offer a Django variant that schedules the async invalidation on the
    loop (`asgiref.sync.async_to_sync` in the on_commit callback) or say in the docs
    and the message that Django's helper takes plain functions only.
    """
    script = tmp_path / "django_async.py"
    script.write_text(textwrap.dedent(DJANGO_ASYNC_SCRIPT), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "REFUSED" in done.stdout, (
        "registered an async function with Django's helper; after the commit: "
        + done.stdout.strip()
    )


# -- FastAPI lifespan --------------------------------------------------------------


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


# -- Sentinel ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        # "@" in a password is accepted by the parser (the last "@" ends the userinfo)
        # but the redaction stops at the first: the rest of the password shows.
        f"redis+sentinel://:p@{SECRET}@127.0.0.1:26379/mymaster/0/extra",
        # A "/" in a password (base64 secrets have them) ends the netloc: nothing is
        # redacted and the whole URL, password included, is in the message.
        f"redis+sentinel://:ab/{SECRET}@127.0.0.1:26379/mymaster",
        # A "#" starts a fragment, which the message quotes.
        f"redis+sentinel://:ab#{SECRET}@127.0.0.1:26379/mymaster",
        # "?" starts the query: the password is then read as a port, and quoted.
        f"redis+sentinel://user:{SECRET}?x@127.0.0.1:26379/mymaster",
    ],
)
def test_sentinel_url_errors_never_show_the_password(url: str) -> None:
    """Was a defect: a Sentinel URL with an unencoded
    `@ / # ?` in its password is refused (fine), but the ConfigurationError quotes
    the URL or the part of it where the password went, unredacted: exceptions end up
    in logs and crash reports.

    Fix: redact by the same split the parser uses (everything before the last "@" of
    the text after "://", up to the first "/" after that "@"), and never quote
    fragments, query names or addresses from a URL whose userinfo may be mangled:
    say what is wrong without echoing it.
    """
    with pytest.raises(ConfigurationError) as caught:
        CacheEngine.from_url(url)
    assert SECRET not in str(caught.value)


def test_sentinel_urls_with_encoded_passwords_ipv6_and_options() -> None:
    """Percent-encoded `@ : / # ?` in a password, an IPv6 sentinel with and without
    a port, a username, a db in the path and typed query options all parse."""
    from cached_aside._sentinel import parse_sentinel_url

    parsed = parse_sentinel_url(
        "redis+sentinel://me:p%40s%3As%2Fw%23d%3F@[::1]:26380,[fe80::1],host/svc/3"
        "?socket_timeout=0.5&sentinel_password=x&min_other_sentinels=1"
    )
    assert parsed.sentinels == [("::1", 26380), ("fe80::1", 26379), ("host", 26379)]
    assert parsed.service == "svc"
    assert parsed.options == {
        "username": "me",
        "password": "p@s:s/w#d?",
        "db": 3,
        "socket_timeout": 0.5,
    }
    assert parsed.sentinel_options == {"password": "x"}
    assert parsed.min_other_sentinels == 1


async def test_all_sentinels_down_fails_open_and_counts_the_error() -> None:
    """Every sentinel refusing connections: calls are answered by the loader (sync
    and async), the error is counted as MasterNotFoundError until the breaker opens,
    and closing the engine leaks no socket (the suite's filterwarnings=error and gc
    would say so)."""
    engine = CacheEngine.from_url(
        f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/mymaster",
        prefix=unique_prefix(),
    )

    @cache_aside(key="down:<item>", ttl=5, engine=engine)
    def load(item: int) -> int:
        return item * 2

    @cache_aside(key="adown:<item>", ttl=5, engine=engine)
    async def aload(item: int) -> int:
        return item * 3

    try:
        assert [load(number) for number in range(4)] == [0, 2, 4, 6]
        assert [await aload(number) for number in range(3)] == [0, 3, 6]
        assert load.error_kinds().get("MasterNotFoundError", 0) >= 1
        assert load.stats().errors == 4
    finally:
        await engine.aclose()
