"""The Django app: with "cached_aside.integrations.django" in INSTALLED_APPS, the
default engine is built from `settings.CACHED_ASIDE` at start-up and closed at exit.

    CACHED_ASIDE = {
        "URL": "redis://cache.internal:6379/0",   # default: $CACHED_ASIDE_REDIS_URL, $REDIS_URL
        "PREFIX": "shop",                          # default: $CACHED_ASIDE_PREFIX, else "cache"
        "OPTIONS": {"socket_timeout": 0.25},       # CacheEngine.from_url's keywords
    }
"""

from __future__ import annotations

import atexit
from collections.abc import Mapping
from typing import Any

# Django ships no type hints (and django-stubs needs a mypy plugin): its names are Any.
from django.apps import AppConfig
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from ..._defaults import configure
from ..._engine import CacheEngine
from ..._errors import ConfigurationError

__all__ = ["SETTING", "CachedAsideConfig", "configure_from_settings"]

SETTING = "CACHED_ASIDE"
KEYS = ("URL", "PREFIX", "OPTIONS")


class CachedAsideConfig(AppConfig):  # type: ignore[misc]  # AppConfig is untyped: Any
    """Builds the default engine from `settings.CACHED_ASIDE`, when it is set."""

    name = "cached_aside.integrations.django"
    label = "cached_aside"
    verbose_name = "cached_aside"
    default = True

    def ready(self) -> None:
        configure_from_settings(getattr(settings, SETTING, None))


def configure_from_settings(config: Mapping[str, Any] | None) -> CacheEngine | None:
    """Make the engine `config` (the CACHED_ASIDE setting) describes the default engine,
    and close it when the process exits. None (the setting is absent): leave the
    default engine alone; it is then made from the environment on first use.

    Raises:
        ImproperlyConfigured: an unknown key, or options the engine refuses.
    """
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise ImproperlyConfigured(f"{SETTING} must be a dict, got {config!r}")
    unknown = sorted(set(config) - set(KEYS))
    if unknown:
        raise ImproperlyConfigured(f"{SETTING}: unknown keys {unknown}; known: {list(KEYS)}")
    options = config.get("OPTIONS") or {}
    if not isinstance(options, Mapping):
        raise ImproperlyConfigured(f"{SETTING}['OPTIONS'] must be a dict, got {options!r}")
    try:
        engine = configure(config.get("URL"), prefix=config.get("PREFIX"), **options)
    except (ConfigurationError, TypeError) as exc:
        raise ImproperlyConfigured(f"{SETTING}: {exc}") from exc
    # Django has no shutdown signal: the last delivery of the outbox happens at exit.
    atexit.register(engine.close)
    return engine
