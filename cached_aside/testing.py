"""pytest fixtures for code that uses cached_aside, registered as a pytest plugin.

`cache_engine` gives each test a fresh engine, on fakeredis (Lua enabled) or on the
Redis named by CACHED_ASIDE_TEST_REDIS_URL, under a key prefix of its own, and makes
it the default engine for the test's duration. Nothing happens unless a test asks
for the fixture.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from ._defaults import using_engine
from ._engine import CacheEngine
from ._errors import ConfigurationError

TEST_URL_VARIABLE = "CACHED_ASIDE_TEST_REDIS_URL"


def _fakeredis_engine(prefix: str) -> CacheEngine:
    try:
        import fakeredis
    except ImportError:
        raise ConfigurationError(
            f"the cache_engine fixture needs fakeredis (pip install 'cached_aside[demo]' or "
            f"'fakeredis[lua]'), or set {TEST_URL_VARIABLE} to a Redis you can write to"
        ) from None
    server = fakeredis.FakeServer()
    return CacheEngine(
        fakeredis.FakeRedis(server=server), fakeredis.FakeAsyncRedis(server=server), prefix=prefix
    )


@pytest.fixture
def cache_engine() -> Iterator[CacheEngine]:
    """A fresh engine with its own prefix, installed as the default engine.

    Functions decorated without `engine=` use it during the test; the previous
    default comes back afterwards, and the test's keys are deleted (never FLUSHALL).
    """
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    url = os.environ.get(TEST_URL_VARIABLE)
    engine = CacheEngine.from_url(url, prefix=prefix) if url else _fakeredis_engine(prefix)
    try:
        with using_engine(engine):
            yield engine
    finally:
        client = engine.client()
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.unlink(*keys)
        engine.close()
