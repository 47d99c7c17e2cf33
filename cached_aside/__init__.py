"""cached_aside: the cache-aside pattern on Redis as one decorator."""

from . import _lifecycle  # noqa: F401  # the one fork hook, installed on import
from ._breaker import CircuitOpenError
from ._decorator import cache_aside
from ._defaults import configure, default_engine, using_engine
from ._engine import CacheEngine
from ._errors import (
    BatchLoaderError,
    BlockingCallWarning,
    CachedAsideError,
    CacheUnavailableError,
    ConfigurationError,
    ConfigurationWarning,
    KeyArgumentError,
    KeyTemplateError,
    LoaderCircuitOpenError,
    LoaderTimeoutError,
    UnstorableValueError,
)
from ._functions import (
    AsyncCachedFunction,
    BoundAsyncCachedFunction,
    BoundCachedFunction,
    CachedFunction,
)
from ._near import NearCache
from ._options import XFetch
from ._results import BulkOutcome, CacheResult, Outcome, Source, StatsSnapshot

__all__ = [
    "AsyncCachedFunction",
    "BatchLoaderError",
    "BlockingCallWarning",
    "BoundAsyncCachedFunction",
    "BoundCachedFunction",
    "BulkOutcome",
    "CacheEngine",
    "CacheResult",
    "CacheUnavailableError",
    "CachedAsideError",
    "CachedFunction",
    "CircuitOpenError",
    "ConfigurationError",
    "ConfigurationWarning",
    "KeyArgumentError",
    "KeyTemplateError",
    "LoaderCircuitOpenError",
    "LoaderTimeoutError",
    "NearCache",
    "Outcome",
    "Source",
    "StatsSnapshot",
    "UnstorableValueError",
    "XFetch",
    "cache_aside",
    "configure",
    "default_engine",
    "using_engine",
]
