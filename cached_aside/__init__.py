"""cached_aside: the cache-aside pattern on Redis as one decorator."""

from .breaker import CircuitOpenError
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
from .functions import (
    AsyncCachedFunction,
    BoundAsyncCachedFunction,
    BoundCachedFunction,
    CachedFunction,
)
from .near import NearCache
from .results import BulkOutcome, CacheResult, Outcome, Source
from .stats import StatsSnapshot

__all__ = [
    "AsyncCachedFunction",
    "BatchLoaderError",
    "BoundAsyncCachedFunction",
    "BoundCachedFunction",
    "BulkOutcome",
    "CacheAside",
    "CacheEngine",
    "CacheResult",
    "CacheUnavailableError",
    "CachedAsideError",
    "CachedFunction",
    "CircuitOpenError",
    "ConfigurationError",
    "KeyArgumentError",
    "KeyTemplateError",
    "NearCache",
    "Outcome",
    "Source",
    "StatsSnapshot",
    "UnstorableValueError",
    "cache_aside",
    "configure",
    "default_engine",
]
