"""FastAPI and Starlette (the `fastapi` extra): a lifespan that opens the engine with the
app and closes it with the app, composed with the app's own lifespan, and the engine
handed to endpoints by dependency injection (`CacheEngineDep`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Annotated, Any, TypeVar

from fastapi import Depends
from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from .._defaults import default_engine, using_engine
from .._engine import CacheEngine
from .._errors import ConfigurationError

__all__ = ["STATE_ATTRIBUTE", "CacheEngineDep", "cache_engine", "engine_of", "lifespan"]

STATE_ATTRIBUTE = "cached_aside_engine"  # app.state.cached_aside_engine

App = TypeVar("App", bound=Starlette)
AppLifespan = Callable[[App], AbstractAsyncContextManager[Any]]


def lifespan(
    engine_factory: Callable[[], CacheEngine] | None = None,
    *,
    inner: AppLifespan[App] | None = None,
    make_default: bool = True,
) -> AppLifespan[App]:
    """A lifespan for `FastAPI(lifespan=...)` or `Starlette(lifespan=...)`: the engine
    opens with the app and is closed (`aclose()`) when the app shuts down.

    Args:
        engine_factory: makes the app's engine at start-up, e.g.
            `lambda: CacheEngine.from_url(url, prefix="shop")`. None: the default
            engine (`configure()`'s, else one made from the environment).
        inner: the app's own lifespan, entered once the engine is ready and left
            before it closes, so its start-up and shutdown can use the cache. What it
            yields (lifespan state) is yielded on.
        make_default: make the factory's engine the default engine while the app
            runs, so functions decorated without `engine=` use it; the previous
            default comes back at shutdown.

    Returns:
        The lifespan function. The engine is `app.state.cached_aside_engine`, also
        given by `engine_of(app)` and, in endpoints, by `CacheEngineDep`.
    """

    @asynccontextmanager
    async def cache_lifespan(app: App) -> AsyncIterator[Any]:
        engine = engine_factory() if engine_factory is not None else default_engine()
        setattr(app.state, STATE_ATTRIBUTE, engine)
        try:
            with (
                using_engine(engine)
                if engine_factory is not None and make_default
                else nullcontext()
            ):
                if inner is None:
                    yield None
                else:
                    async with inner(app) as state:
                        yield state
        finally:
            await engine.aclose()  # delivers what its outbox holds, closes its clients

    return cache_lifespan


def engine_of(app: Starlette) -> CacheEngine:
    """The engine `lifespan()` opened for `app`.

    Raises:
        ConfigurationError: the app was not given `lifespan()`, or has not started
            (a test client that does not run the lifespan, say).
    """
    engine = getattr(app.state, STATE_ATTRIBUTE, None)
    if not isinstance(engine, CacheEngine):
        raise ConfigurationError(
            "this app has no cache engine: pass lifespan=cached_aside.integrations.fastapi"
            ".lifespan(...) to FastAPI(...), and let the app start (its lifespan must run)"
        )
    return engine


def cache_engine(connection: HTTPConnection) -> CacheEngine:
    """The app's engine, for `Depends(cache_engine)` in an HTTP or WebSocket endpoint."""
    return engine_of(connection.app)


CacheEngineDep = Annotated[CacheEngine, Depends(cache_engine)]
"""An endpoint parameter typed `CacheEngineDep` receives the app's engine."""
