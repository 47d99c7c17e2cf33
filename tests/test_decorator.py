"""Decorating functions and methods: the whole API on a bound method, arity errors that name
the function, decorators in the wrong order, and a sync function called on a running event
loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cached_aside import (
    BlockingCallWarning,
    BulkOutcome,
    CacheEngine,
    ConfigurationError,
    KeyArgumentError,
    Outcome,
    Source,
    cache_aside,
)


class Repository:
    """A repository whose reads are cached methods."""

    def __init__(self, engine: CacheEngine) -> None:
        self.engine = engine

    @cache_aside(key="repo:<id>", ttl=30)
    def find(self, id: str) -> dict[str, str]:
        """Find one row."""
        return {"id": id}


def test_a_bound_method_has_the_whole_api(cache_engine: CacheEngine) -> None:
    repo = Repository(cache_engine)
    bound = repo.find
    assert (bound.__name__, bound.__doc__) == ("find", "Find one row.")
    assert bound("x") == {"id": "x"}
    assert bound.lookup("x").source is Source.CACHE
    assert bound.error_kinds() == {}
    assert bound.stats().hits == 1
    assert bound.invalidate("x") is Outcome.DELETED
    assert bound.many(["x", "y"]) == [{"id": "x"}, {"id": "y"}]
    assert bound.invalidate_many(["x"]) == BulkOutcome(1)
    assert bound.invalidate_all() == BulkOutcome(1)


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
