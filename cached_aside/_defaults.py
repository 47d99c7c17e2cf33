"""The process-wide default engine: set by configure(), else made from the
environment on first use, for functions decorated without `engine=`.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ._engine import DEFAULT_PREFIX, CacheEngine
from ._errors import ConfigurationError, ConfigurationWarning

DEFAULT_URL = "redis://127.0.0.1:6379/0"
URL_VARIABLES = ("CACHED_ASIDE_REDIS_URL", "REDIS_URL")
PREFIX_VARIABLE = "CACHED_ASIDE_PREFIX"
# Set by configure() for the processes this one starts (multiprocessing's spawn,
# subprocess): the prefix and a digest of the URL (never the URL: it may hold a
# password). A child that makes its default engine from its environment instead, with
# other settings, warns: its invalidations and the parent's would never meet.
CONFIGURED_VARIABLE = "CACHED_ASIDE_CONFIGURED"


def _digest(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def _tell_children(prefix: str, url: str | None) -> None:
    os.environ[CONFIGURED_VARIABLE] = json.dumps(
        {"prefix": prefix, "url": None if url is None else _digest(url)}
    )


def _warn_if_the_parent_configured_another(url: str, prefix: str) -> None:
    try:
        parent = json.loads(os.environ.get(CONFIGURED_VARIABLE) or "null")
    except ValueError:
        return
    if not isinstance(parent, dict):
        return
    if parent.get("prefix") == prefix and parent.get("url") in (None, _digest(url)):
        return
    differs = "prefix" if parent.get("prefix") != prefix else "Redis URL"
    warnings.warn(
        ConfigurationWarning(
            f"this process made its default engine from the environment (prefix "
            f"{prefix!r}), but the process that started it called configure() with "
            f"another {differs} (prefix {parent.get('prefix')!r}): their invalidations "
            "never meet. Call configure() in this process too (for multiprocessing, in "
            f"the pool's initializer), or set {URL_VARIABLES[0]} and {PREFIX_VARIABLE} "
            "for both"
        ),
        stacklevel=4,
    )


def url_from_environment() -> str:
    """CACHED_ASIDE_REDIS_URL, else REDIS_URL, else the local default."""
    for name in URL_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return DEFAULT_URL


def prefix_from_environment() -> str:
    """CACHED_ASIDE_PREFIX, else the library's default prefix ("cache")."""
    return os.environ.get(PREFIX_VARIABLE) or DEFAULT_PREFIX


_default_engine: CacheEngine | None = None
_default_lock = threading.Lock()


def reset_lock_after_fork() -> None:
    """A thread inside configure() at fork() time stays behind, holding the lock."""
    global _default_lock
    _default_lock = threading.Lock()


def configure(
    url: str | None = None,
    *,
    client: Any = None,
    async_client: Any = None,
    engine: CacheEngine | None = None,
    prefix: str | None = None,
    check: bool = False,
    **options: Any,
) -> CacheEngine:
    """Set the default engine used by functions decorated without `engine=`.

    Args:
        url: the Redis URL; default: CACHED_ASIDE_REDIS_URL, else REDIS_URL, else
            redis://127.0.0.1:6379/0.
        client: a ready `redis.Redis` (instead of a URL).
        async_client: a ready `redis.asyncio.Redis` (instead of a URL).
        engine: a CacheEngine you built (instead of all of the above).
        prefix: the key prefix; default: CACHED_ASIDE_PREFIX, else "cache".
        check: run `engine.check()` first, so that a bad URL, a server down or a
            missing ACL permission raises here instead of failing open call after
            call; the default engine is left as it was when the check fails.
        **options: with a URL, the options of `CacheEngine.from_url`.

    Returns:
        The new default engine.

    Raises:
        ConfigurationError: more than one of url, clients and engine, or options
            that only a URL takes; with check=True, what the check found.

    Processes this one starts afterwards (multiprocessing's spawn, subprocess) that
    use the default engine without calling configure() warn with a
    ConfigurationWarning when their environment gives another prefix or URL.
    """
    global _default_engine, _before_overrides
    given = [name for name, value in (("url", url), ("engine", engine)) if value is not None]
    if client is not None or async_client is not None:
        given.append("clients")
    if len(given) > 1 or (options and "url" not in given and given):
        raise ConfigurationError(f"give one of url (with options), clients or engine, not {given}")
    chosen_url: str | None = None
    if engine is not None:
        if not isinstance(engine, CacheEngine):
            raise ConfigurationError(f"engine must be a CacheEngine, got {engine!r}")
        chosen = engine
    elif client is not None or async_client is not None:
        chosen = CacheEngine(client, async_client, prefix=prefix or prefix_from_environment())
    else:
        chosen_url = url or url_from_environment()
        chosen = CacheEngine.from_url(
            chosen_url, prefix=prefix or prefix_from_environment(), **options
        )
    if check:
        try:
            chosen.check()
        except BaseException:
            if chosen_url is not None:  # made here: nobody else will close it
                chosen.close()
            raise
    _tell_children(chosen.prefix, chosen_url)
    with _default_lock:
        _default_engine = chosen
        if _overrides:  # inside using_engine() blocks: the default after them all
            _before_overrides = chosen
    return chosen


def default_engine() -> CacheEngine:
    """The engine set by `configure()`, else one made on first use from the
    environment (CACHED_ASIDE_REDIS_URL or REDIS_URL, and CACHED_ASIDE_PREFIX)."""
    global _default_engine
    engine = _default_engine
    if engine is not None:
        return engine
    with _default_lock:
        if _default_engine is None:
            url, prefix = url_from_environment(), prefix_from_environment()
            _warn_if_the_parent_configured_another(url, prefix)
            _default_engine = CacheEngine.from_url(url, prefix=prefix)
        return _default_engine


class _Override:
    """One open using_engine() block (compared by identity: one engine may be in two)."""

    __slots__ = ("engine",)

    def __init__(self, engine: CacheEngine) -> None:
        self.engine = engine


# using_engine() blocks still open, oldest first, and the default engine from before
# the first of them.
_overrides: list[_Override] = []
_before_overrides: CacheEngine | None = None


@contextmanager
def using_engine(engine: CacheEngine) -> Iterator[CacheEngine]:
    """Make `engine` the default engine inside a `with` block; the previous default
    (or none yet, then made from the environment on next use) comes back after it.

    For a framework's lifespan or a test's fixture: functions decorated without
    `engine=` use `engine` meanwhile. Blocks may end in any order (two apps' lifespans
    in one process): the default is always the engine of the newest block still
    open, else the one from before them all. The engine is not closed here.

    Raises:
        ConfigurationError: `engine` is not a CacheEngine.
    """
    global _default_engine, _before_overrides
    if not isinstance(engine, CacheEngine):
        raise ConfigurationError(f"engine must be a CacheEngine, got {engine!r}")
    token = _Override(engine)
    with _default_lock:
        if not _overrides:
            _before_overrides = _default_engine
        _overrides.append(token)
        _default_engine = engine
    try:
        yield engine
    finally:
        with _default_lock:
            _overrides.remove(token)  # identity: _Override has no __eq__ of its own
            _default_engine = _overrides[-1].engine if _overrides else _before_overrides
            if not _overrides:
                _before_overrides = None
