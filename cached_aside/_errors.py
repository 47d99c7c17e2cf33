"""The exceptions cached_aside raises; every one derives from CachedAsideError.

Errors about how the decorator was used are also ValueError or TypeError, so code
that already catches those keeps working.
"""

from __future__ import annotations


class CachedAsideError(Exception):
    """Base class of every error raised by cached_aside itself."""


class ConfigurationError(CachedAsideError, ValueError):
    """A decorator or engine option is invalid; the message says what to change."""


class KeyTemplateError(ConfigurationError):
    """A key template cannot be compiled against the loader's signature."""


class KeyArgumentError(CachedAsideError, TypeError):
    """An argument value cannot be turned into a stable cache key."""


class UnstorableValueError(CachedAsideError, TypeError):
    """The loader returned a value its storage mode cannot hold; nothing was cached."""


class CacheUnavailableError(CachedAsideError):
    """Redis failed and the function was configured with fail_open=False."""


class LoaderTimeoutError(CachedAsideError, TimeoutError):
    """The loader ran past the function's loader_timeout (and no stale value was
    left to serve instead)."""


class LoaderCircuitOpenError(CachedAsideError):
    """The loader was skipped: it failed repeatedly, and no stale value was left to
    serve. The function's loader breaker lets one call probe it again after a pause."""


class BatchLoaderError(CachedAsideError, TypeError):
    """A batch_loader returned something other than one value per item."""


class BlockingCallWarning(UserWarning):
    """A plain (sync) cached function ran on a thread whose event loop is running:
    its Redis round trip and its loader block every other task of that loop."""


class ConfigurationWarning(UserWarning):
    """A setting that works but is probably not what was meant, such as a worker
    process using the default engine while the process that started it configured
    another one."""
