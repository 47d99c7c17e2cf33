"""cached_aside: the cache-aside pattern on Redis as one decorator."""

from .decorator import CacheAside, cache_aside
from .defaults import configure, default_engine
from .engine import CacheEngine
from .errors import (
    BatchLoaderError,
    CachedAsideError,
    CacheUnavailableError,
    ConfigurationError,
    KeyArgumentError,
    KeyTemplateError,
    UnstorableValueError,
)
from .flows import Source
from .functions import AsyncCachedFunction, BoundCachedFunction, CachedFunction, CacheResult
from .near import NearCache
from .stats import StatsSnapshot

__all__ = [
    "AsyncCachedFunction",
    "BatchLoaderError",
    "BoundCachedFunction",
    "CacheAside",
    "CacheEngine",
    "CacheResult",
    "CacheUnavailableError",
    "CachedAsideError",
    "CachedFunction",
    "ConfigurationError",
    "KeyArgumentError",
    "KeyTemplateError",
    "NearCache",
    "Source",
    "StatsSnapshot",
    "UnstorableValueError",
    "cache_aside",
    "configure",
    "default_engine",
]
