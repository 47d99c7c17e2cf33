"""cached_aside.integrations.django against Django's ORM on real SQLite files (two
database aliases), on real Redis and fakeredis: commit, rollback, an inner atomic
block rolled back, autocommit, `using=`, the lease race, failures after the commit,
and the default engine built from settings.CACHED_ASIDE by the app.

Django is set up once, for this module, outside its test runner: no test database
wraps each test in a transaction, so on_commit callbacks run as in production.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import django
import pytest
import redis
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, models, transaction
from django.db.transaction import TransactionManagementError

from cached_aside import (
    CacheEngine,
    CacheUnavailableError,
    Outcome,
    Source,
    cache_aside,
    default_engine,
)
from cached_aside import _defaults as defaults_module
from cached_aside.integrations.django import invalidate_many_on_commit, invalidate_on_commit
from cached_aside.integrations.django.apps import configure_from_settings

from .conftest import REDIS_URL, delete_prefix, needs_real_redis, unique_prefix
from .databases import DATABASE, POSTGRES_URL, postgres_missing, postgres_schema
from .documented import fenced, marked, run_documented

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_PREFIX = unique_prefix()  # the default engine's, from CACHED_ASIDE
WAIT_SECONDS = 30.0  # a bound on a hang, for a loaded machine


class Names:
    """What a test needs from Django's side: the model, made after setup."""

    product: Any = None


@pytest.fixture(scope="module", autouse=True)
def django_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    if settings.configured:
        pytest.fail("Django settings were configured by something else in this process")
    folder = tmp_path_factory.mktemp("django")
    previous = defaults_module._default_engine
    with contextlib.ExitStack() as schemas:
        yield from _configured(folder, previous, schemas)


def _databases(folder: Path, schemas: contextlib.ExitStack) -> dict[str, Any]:
    """Both aliases on SQLite files, or (CACHED_ASIDE_TEST_DATABASE=postgresql) each
    in a PostgreSQL schema of its own."""
    if DATABASE == "postgresql":
        missing = postgres_missing()
        if missing is not None:
            pytest.fail(f"CACHED_ASIDE_TEST_DATABASE=postgresql: {missing}")
        address = urlsplit(POSTGRES_URL)
        return {
            alias: {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": address.path.lstrip("/"),
                "HOST": address.hostname,
                "PORT": address.port or 5432,
                "USER": address.username or "",
                "PASSWORD": address.password or "",
                "OPTIONS": {"options": f"-csearch_path={schemas.enter_context(postgres_schema())}"},
            }
            for alias in ("default", "other")
        }
    return {
        alias: {"ENGINE": "django.db.backends.sqlite3", "NAME": str(folder / f"{alias}.db")}
        for alias in ("default", "other")
    }


def _configured(folder: Path, previous: Any, schemas: contextlib.ExitStack) -> Iterator[None]:
    settings.configure(
        DATABASES=_databases(folder, schemas),
        INSTALLED_APPS=["cached_aside.integrations.django"],
        CACHED_ASIDE={
            "URL": REDIS_URL or "redis://127.0.0.1:6379/0",
            "PREFIX": SETTINGS_PREFIX,
            "OPTIONS": {"socket_timeout": 0.5},
        },
        USE_TZ=True,
        LOGGING_CONFIG=None,  # leave the process's logging as pytest set it
    )
    django.setup()  # the app's ready(): the default engine, from CACHED_ASIDE
    configured = default_engine()
    atexit.unregister(configured.close)  # closed here, not at the end of the test run

    class Product(models.Model):
        id = models.CharField(primary_key=True, max_length=20)
        name = models.CharField(max_length=100)
        stock = models.IntegerField()

        class Meta:
            app_label = "cached_aside"

    for alias in ("default", "other"):
        with connections[alias].schema_editor() as editor:
            editor.create_model(Product)
    Names.product = Product
    yield
    connections.close_all()
    defaults_module._default_engine = previous
    if REDIS_URL is not None:
        delete_prefix(configured.client(), SETTINGS_PREFIX)
    configured.close()


class Gate:
    """Holds a loader between its read of the primary and its store."""

    def __init__(self) -> None:
        self.read, self.release = threading.Event(), threading.Event()

    def passed_read(self) -> None:
        self.read.set()
        assert self.release.wait(WAIT_SECONDS), "the test never released the loader"


class Shop:
    """Products in both databases, a cached reader, and a thread to read in: Django's
    connections are per thread, so reads from the test's own thread would see its
    uncommitted writes, as no other process does."""

    def __init__(self, engine: CacheEngine, raw: redis.Redis) -> None:
        self.raw = raw
        self.gate: Gate | None = None
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="reader")
        product = Names.product
        for alias in ("default", "other"):
            product.objects.using(alias).all().delete()
            for number in (1, 2, 3):
                product.objects.using(alias).create(
                    id=f"p-{number}", name=f"v1 of p-{number}", stock=10
                )

        def load(product_id: str) -> dict[str, Any] | None:
            row = product.objects.filter(pk=product_id).values("name", "stock").first()
            if self.gate is not None:
                self.gate.passed_read()
            return row  # type: ignore[no-any-return]

        self.get_product: Any = cache_aside(key="product:<product_id>", ttl=30, engine=engine)(load)

    def read(self, product_id: str) -> tuple[Any, Source]:
        result = self.reader.submit(self.get_product.lookup, product_id).result(WAIT_SECONDS)
        return result.value, result.source

    def cached(self, product_id: str) -> bool:
        return bool(self.raw.exists(self.get_product.key(product_id)))

    def rename(self, product_id: str, name: str, using: str = "default") -> Outcome:
        Names.product.objects.using(using).filter(pk=product_id).update(name=name)
        return invalidate_on_commit(self.get_product, product_id, using=using)

    def close(self) -> None:
        self.reader.submit(connections.close_all).result(WAIT_SECONDS)
        self.reader.shutdown()


class Counting:
    """A decorated function, counting the invalidations that reach it."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.calls = fn, 0

    def key(self, *args: Any) -> str:
        return str(self.fn.key(*args))

    def invalidate(self, *args: Any) -> Outcome:
        self.calls += 1
        return self.fn.invalidate(*args)  # type: ignore[no-any-return]


class Rollback(Exception):
    """Raised in an atomic block to roll it back."""


def rolled_back(body: Callable[[], object], using: str = "default") -> None:
    """Run `body` in an atomic block (a savepoint, inside another), then roll it back."""
    with contextlib.suppress(Rollback), transaction.atomic(using=using):
        body()
        raise Rollback


@pytest.fixture
def shop(engine: CacheEngine, clients: Any) -> Iterator[Shop]:
    made = Shop(engine, clients[2])
    yield made
    made.close()


def test_commit_invalidates_at_the_write_and_after_the_commit(shop: Shop) -> None:
    assert shop.read("p-1") == ({"name": "v1 of p-1", "stock": 10}, Source.LOADER)
    with transaction.atomic():
        assert shop.rename("p-1", "v2") is Outcome.DELETED  # at the write
        assert not shop.cached("p-1")
        # Another connection reads the committed row, v1, and caches it.
        assert shop.read("p-1") == ({"name": "v1 of p-1", "stock": 10}, Source.LOADER)
        assert shop.cached("p-1")
    assert not shop.cached("p-1")  # removed by the invalidation after the commit
    assert shop.read("p-1") == ({"name": "v2", "stock": 10}, Source.LOADER)


def test_a_rollback_drops_the_invalidation_after_commit(shop: Shop) -> None:
    counting = Counting(shop.get_product)

    def write() -> None:
        Names.product.objects.filter(pk="p-1").update(name="v2")
        invalidate_on_commit(counting, "p-1")
        shop.read("p-1")

    rolled_back(write)
    assert counting.calls == 1  # only the one at the write
    assert shop.read("p-1") == ({"name": "v1 of p-1", "stock": 10}, Source.CACHE)


def test_an_inner_atomic_block_rolled_back_drops_its_own_only(shop: Shop) -> None:
    with transaction.atomic():
        shop.rename("p-1", "v2 of p-1")
        rolled_back(lambda: shop.rename("p-2", "v2 of p-2"))  # a savepoint
        with transaction.atomic():  # a savepoint released: kept
            shop.rename("p-3", "v2 of p-3")
        for product_id in ("p-1", "p-2", "p-3"):
            shop.read(product_id)  # the committed rows, cached meanwhile
    assert not shop.cached("p-1")
    assert shop.cached("p-2")  # its rename was rolled back: v1 is still right
    assert not shop.cached("p-3")
    assert shop.read("p-2") == ({"name": "v1 of p-2", "stock": 10}, Source.CACHE)
    assert shop.read("p-3")[0]["name"] == "v2 of p-3"


def test_an_outer_rollback_drops_what_inner_blocks_released(shop: Shop) -> None:
    counting = Counting(shop.get_product)

    def write() -> None:
        with transaction.atomic():  # a savepoint, released
            Names.product.objects.filter(pk="p-1").update(name="v2")
            invalidate_on_commit(counting, "p-1")

    rolled_back(write)
    assert counting.calls == 1


def test_in_autocommit_it_invalidates_once_now(shop: Shop) -> None:
    counting = Counting(shop.get_product)
    shop.read("p-1")
    assert not transaction.get_connection().in_atomic_block
    Names.product.objects.filter(pk="p-1").update(name="v2")  # committed already
    assert invalidate_on_commit(counting, "p-1") is Outcome.DELETED
    assert counting.calls == 1
    assert shop.read("p-1") == ({"name": "v2", "stock": 10}, Source.LOADER)


def test_in_a_transaction_it_invalidates_twice(shop: Shop) -> None:
    counting = Counting(shop.get_product)
    with transaction.atomic():
        invalidate_on_commit(counting, "p-1")
        assert counting.calls == 1
    assert counting.calls == 2


def test_using_follows_the_transaction_of_that_database(shop: Shop) -> None:
    counting = Counting(shop.get_product)
    # "default" is in autocommit: ignoring using= would run it at once, twice.
    rolled_back(lambda: invalidate_on_commit(counting, "p-1", using="other"), using="other")
    assert counting.calls == 1
    with transaction.atomic(using="other"):
        invalidate_on_commit(counting, "p-1", using="other")
    assert counting.calls == 3


def test_manual_transaction_management_is_refused_as_by_django(shop: Shop) -> None:
    transaction.set_autocommit(False)
    try:
        with pytest.raises(TransactionManagementError):
            invalidate_on_commit(shop.get_product, "p-1")
    finally:
        transaction.rollback()
        transaction.set_autocommit(True)


def test_invalidate_many_on_commit(shop: Shop) -> None:
    with transaction.atomic():
        outcome = invalidate_many_on_commit(shop.get_product, ["p-1", "p-2"])
        assert (outcome.deleted, outcome.pending) == (0, 0)
        for product_id in ("p-1", "p-2", "p-3"):
            shop.read(product_id)
    assert not shop.cached("p-1")
    assert not shop.cached("p-2")
    assert shop.cached("p-3")


def test_a_load_that_read_the_old_row_before_the_commit_cannot_store_it(shop: Shop) -> None:
    with transaction.atomic():
        shop.rename("p-1", "v2")
        gate = shop.gate = Gate()
        pending = shop.reader.submit(shop.get_product, "p-1")
        assert gate.read.wait(WAIT_SECONDS)  # the reader has read v1 and holds its lease
    gate.release.set()  # after the commit and its invalidation
    assert pending.result(WAIT_SECONDS) == {"name": "v1 of p-1", "stock": 10}
    shop.gate = None
    assert not shop.cached("p-1")  # its store was refused
    assert shop.read("p-1") == ({"name": "v2", "stock": 10}, Source.LOADER)


def test_without_the_integration_that_load_stores_the_old_row(shop: Shop) -> None:
    """The control: an invalidation before the commit only."""
    with transaction.atomic():
        Names.product.objects.filter(pk="p-1").update(name="v2")
        shop.get_product.invalidate("p-1")
        gate = shop.gate = Gate()
        pending = shop.reader.submit(shop.get_product, "p-1")
        assert gate.read.wait(WAIT_SECONDS)
    gate.release.set()
    pending.result(WAIT_SECONDS)
    shop.gate = None
    assert shop.read("p-1") == ({"name": "v1 of p-1", "stock": 10}, Source.CACHE)


def test_a_failing_invalidation_does_not_fail_the_commit(
    shop: Shop, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(Counting):
        def invalidate(self, *args: Any) -> Outcome:
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("broken after the commit")
            return Outcome.ABSENT

    with caplog.at_level(logging.ERROR, logger="cached_aside.integrations"), transaction.atomic():
        shop.rename("p-1", "v2")
        invalidate_on_commit(Broken(shop.get_product), "p-2")
        shop.rename("p-3", "v2 of p-3")  # registered after the broken one
        shop.read("p-3")
    assert "invalidation after commit of" in caplog.text
    assert "failed; the database committed" in caplog.text
    assert not shop.cached("p-3")  # the next one still ran
    assert Names.product.objects.get(pk="p-1").name == "v2"


def test_with_redis_down_the_commit_succeeds_and_the_outbox_holds_it(
    shop: Shop, caplog: pytest.LogCaptureFixture
) -> None:
    down = CacheEngine.from_url("redis://127.0.0.1:1/0", prefix=unique_prefix())
    shop.get_product = cache_aside(key="product:<product_id>", ttl=30, engine=down)(
        shop.get_product.__wrapped__
    )
    with caplog.at_level(logging.WARNING, logger="cached_aside.integrations"), transaction.atomic():
        assert shop.rename("p-1", "v2") is Outcome.PENDING
    assert "is pending: Redis did not take it" in caplog.text
    assert down.pending_invalidations() == [shop.get_product.key("p-1")]
    assert Names.product.objects.get(pk="p-1").name == "v2"
    down.close(timeout=0.05)


def test_fail_open_false_is_logged_after_the_commit_not_raised(
    shop: Shop, caplog: pytest.LogCaptureFixture
) -> None:
    down = CacheEngine.from_url("redis://127.0.0.1:1/0", prefix=unique_prefix())
    strict = cache_aside(key="product:<product_id>", ttl=30, engine=down, fail_open=False)(
        shop.get_product.__wrapped__
    )
    with caplog.at_level(logging.WARNING, logger="cached_aside.integrations"), transaction.atomic():
        Names.product.objects.filter(pk="p-1").update(name="v2")
        with pytest.raises(CacheUnavailableError):  # at the write: the caller's
            invalidate_on_commit(strict, "p-1")
    assert "is pending (" in caplog.text  # after the commit: logged
    assert Names.product.objects.get(pk="p-1").name == "v2"
    down.close(timeout=0.05)


# -- the app and its settings ------------------------------------------------------


@needs_real_redis
def test_the_app_made_the_default_engine_from_the_settings() -> None:
    engine = default_engine()
    assert engine.prefix == SETTINGS_PREFIX
    calls: list[str] = []

    @cache_aside(key="settings:<name>", ttl=30)  # no engine=: the default
    def lookup(name: str) -> str:
        calls.append(name)
        return name.upper()

    assert lookup("x") == lookup("x") == "X"
    assert calls == ["x"]
    assert lookup.key("x").startswith(f"{SETTINGS_PREFIX}:")
    assert engine.client().exists(lookup.key("x"))


def test_settings_are_checked() -> None:
    previous = defaults_module._default_engine
    try:
        assert configure_from_settings(None) is None
        assert defaults_module._default_engine is previous  # absent: left alone
        with pytest.raises(ImproperlyConfigured, match="unknown keys"):
            configure_from_settings({"LOCATION": "redis://x"})
        with pytest.raises(ImproperlyConfigured, match="OPTIONS"):
            configure_from_settings({"OPTIONS": ["socket_timeout"]})
        with pytest.raises(ImproperlyConfigured, match="url must look like"):
            configure_from_settings({"URL": "localhost"})
        with pytest.raises(ImproperlyConfigured, match="socket_timeout"):
            configure_from_settings({"OPTIONS": {"socket_timeout": -1}})
        made = configure_from_settings({"PREFIX": "elsewhere"})
        assert made is not None
        assert made.prefix == "elsewhere"
        assert default_engine() is made
        atexit.unregister(made.close)
        made.close()
    finally:
        defaults_module._default_engine = previous


START_UP = """
import django
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
settings.configure(INSTALLED_APPS=["cached_aside.integrations.django"], CACHED_ASIDE=%r)
try:
    django.setup()
except ImproperlyConfigured as exc:
    print("ImproperlyConfigured:", exc)
else:
    print("started")
"""


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"URL": "redis://127.0.0.1:6379/0", "OPTIONS": {"socket_timout": 0.5}}, "socket_timout"),
        ({"URL": "http://127.0.0.1:6379/0"}, "the scheme must be one of redis://"),
        ({"URL": "redis://127.0.0.1:6379/0?socket_timeout=abc"}, "'abc' for socket_timeout"),
        ({"URL": "redis://127.0.0.1:70000/0"}, "a port is a number from 1 to 65535"),
    ],
)
def test_bad_settings_stop_django_setup(config: dict[str, Any], message: str) -> None:
    """As the Django page promises: ImproperlyConfigured at start-up, not a 500 from
    every cached view (each of these passed django.setup() before)."""
    completed = subprocess.run(
        [sys.executable, "-c", START_UP % (config,)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("ImproperlyConfigured: CACHED_ASIDE: "), completed.stdout
    assert message in completed.stdout


# -- the documentation's example runs as written ------------------------------------

DOC = ROOT / "docs" / "integrations" / "django.md"


@needs_real_redis
def test_the_documented_example_runs(tmp_path: Path) -> None:
    completed = run_documented(
        tmp_path,
        fenced(marked(DOC, "example"), "python"),
        '"PREFIX": "django_example"',
        lambda prefix: f'"PREFIX": "{prefix}"',
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == (
        "before: {'name': 'Fountain pen', 'stock': 41}\n"
        "rolled back: {'name': 'Fountain pen', 'stock': 41}\n"
        "committed: {'name': 'Fountain pen, blue', 'stock': 41}\n"
    )
    assert completed.stderr == ""


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
