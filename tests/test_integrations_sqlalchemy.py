"""cached_aside.integrations.sqlalchemy against a real SQLite database, sync Session
and AsyncSession through one scenario suite, on real Redis and fakeredis: invalidations
run after commit, are dropped on rollback (of the transaction or of a savepoint), never
raise out of commit, and fence a load that read the old row before the commit."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from sqlalchemy import String, create_engine, event, select, text
from sqlalchemy.event import registry
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    scoped_session,
    sessionmaker,
)

from cached_aside import CacheEngine, Outcome, Source, cache_aside
from cached_aside.integrations.sqlalchemy import (
    HELD,
    ainvalidate_many_on_commit,
    ainvalidate_on_commit,
    invalidate_many_on_commit,
    invalidate_on_commit,
)

from .conftest import needs_real_redis, unique_prefix
from .databases import postgres_missing, postgres_schema, sqlalchemy_url
from .documented import fenced, marked, run_documented

ROOT = Path(__file__).resolve().parent.parent
GATE_SECONDS = 30.0  # how long a gated loader or the test waits for the other side, at most


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "products"
    id: Mapped[str] = mapped_column(String, primary_key=True)
    name: Mapped[str]
    stock: Mapped[int]


class Gate:
    """Holds a loader between its read of the primary and its store, so a test can
    commit a write in between: the interleaving made deterministic."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.read = threading.Event() if mode == "sync" else asyncio.Event()
        self.release = threading.Event() if mode == "sync" else asyncio.Event()

    def passed_read(self) -> None:
        assert isinstance(self.read, threading.Event)
        assert isinstance(self.release, threading.Event)
        self.read.set()
        assert self.release.wait(GATE_SECONDS), "the test never released the loader"

    async def apassed_read(self) -> None:
        assert isinstance(self.read, asyncio.Event)
        self.read.set()
        await asyncio.wait_for(self.release.wait(), GATE_SECONDS)


class Shop:
    """A products table in a SQLite file, a cached reader of it and writers, in sync
    (Session, plain function) or async (AsyncSession, `async def`) mode: scenarios are
    written once, with `await`, and run in both."""

    def __init__(
        self,
        mode: str,
        engine: CacheEngine,
        raw: redis.Redis,
        path: Path,
        schema: str | None = None,
    ) -> None:
        """On the SQLite file `path`, or with `schema` in PostgreSQL."""
        self.mode, self.engine, self.raw = mode, engine, raw
        if schema is None:
            sync_url, async_url = f"sqlite:///{path}", f"sqlite+aiosqlite:///{path}"
            options: dict[str, Any] = {}
        else:
            sync_url = async_url = sqlalchemy_url()
            options = {"connect_args": {"options": f"-csearch_path={schema}"}}
        self.database = create_engine(sync_url, **options)
        Base.metadata.create_all(self.database)
        with Session(self.database) as session, session.begin():
            for number in (1, 2, 3):
                session.add(Product(id=f"p-{number}", name=f"v1 of p-{number}", stock=10))
        self.loads = 0
        self.gate: Gate | None = None
        self.async_database = create_async_engine(async_url, **options)
        self.sync_sessions = sessionmaker(self.database)
        self.async_sessions = async_sessionmaker(self.async_database)
        self.get_product: Any = cache_aside(key="product:<product_id>", ttl=30, engine=engine)(
            self._load if mode == "sync" else self._aload
        )

    def _load(self, product_id: str) -> dict[str, Any] | None:
        self.loads += 1
        with self.sync_sessions() as session:  # its read ends before the gate holds it
            row = session.get(Product, product_id)
            value = {"name": row.name, "stock": row.stock} if row else None
        if self.gate is not None:
            self.gate.passed_read()
        return value

    async def _aload(self, product_id: str) -> dict[str, Any] | None:
        self.loads += 1
        async with self.async_sessions() as session:
            row = await session.get(Product, product_id)
            value = {"name": row.name, "stock": row.stock} if row else None
        if self.gate is not None:
            await self.gate.apassed_read()
        return value

    async def call(self, result: Any) -> Any:
        return await result if inspect.isawaitable(result) else result

    async def read(self, product_id: str) -> Any:
        """The cached read: (value, source)."""
        result = await self.call(self.get_product.lookup(product_id))
        return result.value, result.source

    def cached(self, product_id: str) -> bool:
        return bool(self.raw.exists(self.get_product.key(product_id)))

    def writer(self) -> Writer:
        session = self.sync_sessions() if self.mode == "sync" else self.async_sessions()
        return Writer(self, session)

    async def read_in_background(self, product_id: str) -> Callable[[], Awaitable[Any]]:
        """Start a cached read whose loader stops after reading the primary; returns
        what finishes it (releases the loader and gives its value)."""
        gate = self.gate = Gate(self.mode)
        if self.mode == "sync":
            answer: list[Any] = []
            thread = threading.Thread(target=lambda: answer.append(self.get_product(product_id)))
            thread.start()
            assert isinstance(gate.read, threading.Event)
            assert gate.read.wait(GATE_SECONDS)

            async def finish() -> Any:
                gate.release.set()
                thread.join(GATE_SECONDS)
                self.gate = None
                return answer[0]

            return finish
        task = asyncio.ensure_future(self.get_product(product_id))
        await asyncio.wait_for(gate.read.wait(), GATE_SECONDS)  # type: ignore[union-attr]

        async def afinish() -> Any:
            gate.release.set()
            self.gate = None
            return await task

        return afinish

    async def close(self) -> None:
        self.database.dispose()
        await self.async_database.dispose()


class Writer:
    """One session that renames products; sync or async as its Shop."""

    def __init__(self, shop: Shop, session: Any) -> None:
        self.shop, self.session = shop, session

    async def rename(self, product_id: str, name: str) -> Outcome:
        product = await self.shop.call(self.session.get(Product, product_id))
        product.name = name
        await self.shop.call(self.session.flush())
        if self.shop.mode == "sync":
            return invalidate_on_commit(self.session, self.shop.get_product, product_id)
        return await ainvalidate_on_commit(self.session, self.shop.get_product, product_id)

    async def rename_many(self, names: dict[str, str]) -> Any:
        for product_id, name in names.items():
            product = await self.shop.call(self.session.get(Product, product_id))
            product.name = name
        if self.shop.mode == "sync":
            return invalidate_many_on_commit(self.session, self.shop.get_product, list(names))
        return await ainvalidate_many_on_commit(self.session, self.shop.get_product, list(names))

    async def savepoint(self) -> Any:
        return await self.shop.call(self.session.begin_nested())

    async def commit(self, transaction: Any = None) -> None:
        await self.shop.call((transaction or self.session).commit())

    async def rollback(self, transaction: Any = None) -> None:
        await self.shop.call((transaction or self.session).rollback())

    async def close(self) -> None:
        await self.shop.call(self.session.close())

    def held(self) -> dict[Any, Any]:
        sync_session = self.session if self.shop.mode == "sync" else self.session.sync_session
        held = sync_session.info.get(HELD)
        return held.by_transaction if held is not None else {}


@pytest.fixture(params=["sqlite", "postgresql"])
def schema(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None for a SQLite file; a PostgreSQL schema of the test's own."""
    if request.param == "sqlite":
        yield None
        return
    missing = postgres_missing()
    if missing is not None:
        pytest.skip(missing)
    with postgres_schema() as name:
        yield name


@pytest.fixture(params=["sync", "async"])
async def shop(
    request: pytest.FixtureRequest,
    engine: CacheEngine,
    clients: Any,
    tmp_path: Path,
    schema: str | None,
) -> AsyncIterator[Shop]:
    made = Shop(str(request.param), engine, clients[2], tmp_path / "shop.db", schema)
    yield made
    await made.close()


async def test_the_entry_is_invalidated_at_the_write_and_again_after_commit(shop: Shop) -> None:
    assert await shop.read("p-1") == ({"name": "v1 of p-1", "stock": 10}, Source.LOADER)
    writer = shop.writer()
    assert await writer.rename("p-1", "v2") is Outcome.DELETED  # at the write
    assert not shop.cached("p-1")
    # A reader between the write and the commit reads the committed row, v1, and
    # caches it: correct until the commit, stale after it.
    assert await shop.read("p-1") == ({"name": "v1 of p-1", "stock": 10}, Source.LOADER)
    assert shop.cached("p-1")
    await writer.commit()
    assert not shop.cached("p-1")  # removed by the invalidation after the commit
    assert await shop.read("p-1") == ({"name": "v2", "stock": 10}, Source.LOADER)
    assert writer.held() == {}
    await writer.close()


async def test_a_rollback_drops_the_invalidation_after_commit(shop: Shop) -> None:
    writer = shop.writer()
    await writer.rename("p-1", "v2")
    assert await shop.read("p-1") == ({"name": "v1 of p-1", "stock": 10}, Source.LOADER)
    await writer.rollback()
    assert writer.held() == {}  # nothing kept for a later transaction of this session
    await writer.commit()  # a later, empty transaction runs nothing
    # The entry cached from the committed row stays: it is still right.
    assert await shop.read("p-1") == ({"name": "v1 of p-1", "stock": 10}, Source.CACHE)
    await writer.close()


async def test_closing_the_session_without_commit_drops_them(shop: Shop) -> None:
    writer = shop.writer()
    await writer.rename("p-1", "v2")
    await shop.read("p-1")
    await writer.close()  # rolls back
    assert writer.held() == {}
    assert shop.cached("p-1")


async def test_a_rolled_back_savepoint_drops_its_own_the_commit_runs_the_others(
    shop: Shop,
) -> None:
    writer = shop.writer()
    await writer.rename("p-1", "v2 of p-1")
    savepoint = await writer.savepoint()
    await writer.rename("p-2", "v2 of p-2")
    await writer.rollback(savepoint)
    released = await writer.savepoint()
    await writer.rename("p-3", "v2 of p-3")
    await writer.commit(released)  # released: lives or dies with the transaction
    for product_id in ("p-1", "p-2", "p-3"):  # readers cache the committed rows meanwhile
        await shop.read(product_id)
    await writer.commit()
    assert not shop.cached("p-1")
    assert shop.cached("p-2")  # its rename was rolled back: v1 is still right
    assert not shop.cached("p-3")
    assert (await shop.read("p-1"))[0]["name"] == "v2 of p-1"
    assert (await shop.read("p-2")) == ({"name": "v1 of p-2", "stock": 10}, Source.CACHE)
    assert (await shop.read("p-3"))[0]["name"] == "v2 of p-3"
    await writer.close()


async def test_a_released_savepoint_is_dropped_with_its_rolled_back_transaction(
    shop: Shop,
) -> None:
    writer = shop.writer()
    savepoint = await writer.savepoint()
    await writer.rename("p-1", "v2")
    await writer.commit(savepoint)
    await shop.read("p-1")
    await writer.rollback()
    assert shop.cached("p-1")
    assert writer.held() == {}
    await writer.close()


async def test_a_failed_commit_runs_nothing(shop: Shop) -> None:
    writer = shop.writer()
    await writer.rename("p-1", "v2")
    writer.session.add(Product(id="p-2", name="a duplicate", stock=0))
    await shop.read("p-1")
    with pytest.raises(IntegrityError):
        await writer.commit()
    await writer.rollback()
    assert shop.cached("p-1")  # the database kept v1, and so does the cache
    assert (await shop.read("p-1"))[0]["name"] == "v1 of p-1"
    await writer.close()


async def test_invalidate_many_on_commit(shop: Shop) -> None:
    for product_id in ("p-1", "p-2", "p-3"):
        await shop.read(product_id)
    writer = shop.writer()
    outcome = await writer.rename_many({"p-1": "v2 of p-1", "p-2": "v2 of p-2"})
    assert (outcome.deleted, outcome.pending) == (2, 0)
    for product_id in ("p-1", "p-2"):
        await shop.read(product_id)  # the committed v1, cached again
    await writer.commit()
    assert not shop.cached("p-1")
    assert not shop.cached("p-2")
    assert shop.cached("p-3")
    await writer.close()


async def test_a_load_that_read_the_old_row_during_the_transaction_cannot_store_it(
    shop: Shop,
) -> None:
    """The race the invalidation after the commit exists for: a reader misses after
    the write-time invalidation, reads the old committed row, and is held there while
    the writer commits. Its lease was revoked by the invalidation after the commit, so
    its old row is not stored."""
    writer = shop.writer()
    await writer.rename("p-1", "v2")
    finish = await shop.read_in_background("p-1")  # has read v1, holds the lease
    await writer.commit()
    assert await finish() == {"name": "v1 of p-1", "stock": 10}  # it returns what it read
    assert not shop.cached("p-1")  # but could not store it
    assert await shop.read("p-1") == ({"name": "v2", "stock": 10}, Source.LOADER)
    await writer.close()


async def test_a_load_that_read_the_old_row_before_the_write_cannot_store_it(
    shop: Shop,
) -> None:
    finish = await shop.read_in_background("p-1")  # read v1 before the write began
    writer = shop.writer()
    await writer.rename("p-1", "v2")
    await writer.commit()
    assert await finish() == {"name": "v1 of p-1", "stock": 10}
    assert not shop.cached("p-1")
    assert await shop.read("p-1") == ({"name": "v2", "stock": 10}, Source.LOADER)
    await writer.close()


async def test_without_the_integration_that_load_stores_the_old_row(shop: Shop) -> None:
    """The control: invalidating only before the commit (what a hand-written
    repository often does) lets the held load store v1, stale until the ttl."""
    writer = shop.writer()
    product = await shop.call(writer.session.get(Product, "p-1"))
    product.name = "v2"
    await shop.call(shop.get_product.invalidate("p-1"))
    finish = await shop.read_in_background("p-1")
    await writer.commit()
    await finish()
    assert await shop.read("p-1") == ({"name": "v1 of p-1", "stock": 10}, Source.CACHE)
    await writer.close()


async def test_a_failing_invalidation_after_commit_does_not_fail_the_commit(
    shop: Shop, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        """Takes the invalidation at the write, fails the one after the commit."""

        calls = 0

        def key(self, product_id: str) -> str:
            return f"broken:{product_id}"

        def invalidate(self, product_id: str) -> Any:
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("the invalidation after the commit broke")
            return Outcome.ABSENT if shop.mode == "sync" else _value(Outcome.ABSENT)

    writer = shop.writer()
    await shop.read("p-2")
    product = await shop.call(writer.session.get(Product, "p-1"))
    product.name = "v2"
    if shop.mode == "sync":
        invalidate_on_commit(writer.session, Broken(), "p-1")
    else:
        await ainvalidate_on_commit(writer.session, Broken(), "p-1")
    await writer.rename("p-2", "v2 of p-2")  # registered after the broken one
    await shop.read("p-2")
    with caplog.at_level(logging.ERROR, logger="cached_aside.integrations"):
        await writer.commit()
    assert "invalidation after commit of broken:p-1 failed" in caplog.text
    assert not shop.cached("p-2")  # the next one still ran
    with shop.sync_sessions() as session:
        assert session.scalar(select(Product.name).where(Product.id == "p-1")) == "v2"
    await writer.close()


async def _value(outcome: Outcome) -> Outcome:
    return outcome


async def test_with_redis_down_the_commit_succeeds_and_the_outbox_holds_it(
    shop: Shop, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    down = CacheEngine.from_url("redis://127.0.0.1:1/0", prefix=f"t-{uuid.uuid4().hex[:8]}")
    shop.get_product = cache_aside(key="product:<product_id>", ttl=30, engine=down)(
        shop.get_product.__wrapped__
    )
    writer = shop.writer()
    assert await writer.rename("p-1", "v2") is Outcome.PENDING  # at the write
    with caplog.at_level(logging.WARNING, logger="cached_aside.integrations"):
        await writer.commit()
    assert "invalidation after commit of" in caplog.text
    assert "is pending: Redis did not take it" in caplog.text
    assert down.pending_invalidations() == [shop.get_product.key("p-1")]
    with shop.sync_sessions() as session:
        assert session.scalar(select(Product.name).where(Product.id == "p-1")) == "v2"
    await writer.close()
    if shop.mode == "async":
        await down.aclose(timeout=0.05)
    else:
        down.close(timeout=0.05)


async def test_bad_arguments_raise_at_the_write_and_hold_nothing(shop: Shop) -> None:
    writer = shop.writer()
    await writer.rename("p-1", "v2")
    held_before = sum(len(each) for each in writer.held().values())
    register = invalidate_on_commit if shop.mode == "sync" else ainvalidate_on_commit
    with pytest.raises(TypeError):
        await shop.call(register(writer.session, shop.get_product, object()))
    assert sum(len(each) for each in writer.held().values()) == held_before
    await writer.rollback()
    await writer.close()


def test_held_before_any_transaction_begins_it_joins_the_next(
    engine: CacheEngine, clients: Any, tmp_path: Path
) -> None:
    shop = Shop("sync", engine, clients[2], tmp_path / "shop.db")
    session = Session(shop.database)
    assert session.get_transaction() is None
    session.add(Product(id="p-9", name="new", stock=1))  # no transaction yet
    assert shop.get_product("p-9") is None  # cached as "no such product"
    invalidate_on_commit(session, shop.get_product, "p-9")
    shop.get_product("p-9")
    session.commit()
    assert shop.get_product("p-9") == {"name": "new", "stock": 1}
    session.close()
    shop.database.dispose()


def test_an_after_flush_handler_can_register_for_the_rows_it_sees(
    engine: CacheEngine, clients: Any, tmp_path: Path
) -> None:
    shop = Shop("sync", engine, clients[2], tmp_path / "shop.db")
    session = Session(shop.database)

    @event.listens_for(session, "after_flush")
    def invalidate_changed(flushing: Session, context: Any) -> None:
        for changed in [*flushing.dirty, *flushing.new]:
            if isinstance(changed, Product):
                invalidate_on_commit(flushing, shop.get_product, changed.id)

    shop.get_product("p-1")
    session.get(Product, "p-1").name = "v2"  # type: ignore[union-attr]
    session.flush()  # the handler registers, inside the flush's subtransaction
    assert not shop.cached("p-1")
    shop.get_product("p-1")  # v1, the committed row, cached again
    session.commit()
    assert not shop.cached("p-1")
    assert shop.get_product("p-1") == {"name": "v2", "stock": 10}
    session.close()
    shop.database.dispose()


def test_a_scoped_session_means_its_current_session(
    engine: CacheEngine, clients: Any, tmp_path: Path
) -> None:
    shop = Shop("sync", engine, clients[2], tmp_path / "shop.db")
    scoped = scoped_session(shop.sync_sessions)
    scoped.get(Product, "p-1").name = "v2"  # type: ignore[union-attr]
    invalidate_on_commit(scoped, shop.get_product, "p-1")
    shop.get_product("p-1")
    scoped.commit()
    assert shop.get_product("p-1") == {"name": "v2", "stock": 10}
    scoped.remove()
    shop.database.dispose()


async def test_a_cancelled_commit_still_completes_its_invalidations(
    engine: CacheEngine, clients: Any, tmp_path: Path
) -> None:
    shop = Shop("async", engine, clients[2], tmp_path / "shop.db")
    started, proceed, done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    class Slow:
        calls = 0

        def key(self, product_id: str) -> str:
            return f"slow:{product_id}"

        async def invalidate(self, product_id: str) -> Outcome:
            self.calls += 1
            if self.calls == 2:  # the one after the commit
                started.set()
                await proceed.wait()
                done.set()
            return Outcome.DELETED

    async def write() -> None:
        async with shop.async_sessions() as session:
            (await session.get(Product, "p-1")).name = "v2"  # type: ignore[union-attr]
            await ainvalidate_on_commit(session, Slow(), "p-1")
            await session.commit()

    task = asyncio.ensure_future(write())
    await asyncio.wait_for(started.wait(), GATE_SECONDS)  # the commit is waiting on it
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    proceed.set()
    await asyncio.wait_for(done.wait(), GATE_SECONDS)
    async with shop.async_sessions() as session:  # the database did commit
        assert (await session.get(Product, "p-1")).name == "v2"  # type: ignore[union-attr]
    await shop.close()


def test_a_sync_commit_of_an_async_registration_is_reported(
    engine: CacheEngine, clients: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class AsyncLooking:
        """Handed to the sync helper by mistake: its invalidation after the commit is a
        coroutine, which is logged and closed rather than left unawaited."""

        calls = 0

        def key(self, product_id: str) -> str:
            return f"async-looking:{product_id}"

        def invalidate(self, product_id: str) -> Any:
            self.calls += 1
            return Outcome.ABSENT if self.calls == 1 else _value(Outcome.ABSENT)

    shop = Shop("sync", engine, clients[2], tmp_path / "shop.db")
    session = Session(shop.database)
    session.get(Product, "p-1").name = "v2"  # type: ignore[union-attr]
    invalidate_on_commit(session, AsyncLooking(), "p-1")
    with caplog.at_level(logging.ERROR, logger="cached_aside.integrations"):
        session.commit()
    assert "an async function's invalidation cannot run after a sync commit" in caplog.text
    session.close()
    shop.database.dispose()


# -- the documentation's example runs as written ------------------------------------

DOC = ROOT / "docs" / "integrations" / "sqlalchemy.md"


@needs_real_redis
def test_the_documented_example_runs(tmp_path: Path) -> None:
    completed = run_documented(
        tmp_path,
        fenced(marked(DOC, "example"), "python"),
        'configure(prefix="sqlalchemy_example")',
        lambda prefix: f'configure(prefix="{prefix}")',
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == (
        "before: {'name': 'Fountain pen', 'stock': 41}\n"
        "rolled back: {'name': 'Fountain pen', 'stock': 41}\n"
        "committed: {'name': 'Fountain pen, blue', 'stock': 41}\n"
    )
    assert completed.stderr == ""


def fake_engine(prefix: str | None = None) -> CacheEngine:
    server = fakeredis.FakeServer()
    return CacheEngine(
        fakeredis.FakeRedis(server=server),
        fakeredis.FakeAsyncRedis(server=server),
        prefix=prefix or unique_prefix(),
    )


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
