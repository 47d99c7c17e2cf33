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


class BatchLoaderError(CachedAsideError, TypeError):
    """A batch_loader returned something other than one value per item."""
