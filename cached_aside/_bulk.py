"""Bulk: invalidations that span an engine's functions (by key prefix, by tag), run
on a side, then read-your-writes in this process (flights forgotten, near caches
emptied). The flows decide; this only picks their arguments and runs them.
"""

from __future__ import annotations

from ._catalog import Catalog
from ._drivers import arun, no_seal, run
from ._effects import PendingPattern
from ._errors import ConfigurationError
from ._invalidations import invalidate_pattern, invalidate_tags
from ._keys import glob_escape, split_entry_key, validate_prefix
from ._loads import NO_LOADS
from ._nearby import Nearby
from ._results import BulkOutcome
from ._runtime import AsyncRuntime, SyncRuntime


def key_head(prefix: object) -> str:
    """The start of every value key of an engine with `prefix` (checked)."""
    return f"{validate_prefix(prefix)}:{{"  # value keys are key_head + rendered + "}"


class Bulk:
    """An engine's bulk invalidations: its key head, its catalog (which functions can
    carry a tag), its near caches (emptied after)."""

    def __init__(self, key_head: str, catalog: Catalog, nearby: Nearby) -> None:
        self._key_head, self._catalog, self._nearby = key_head, catalog, nearby

    def by_prefix(self, runtime: SyncRuntime, text: str) -> BulkOutcome:
        """CacheEngine.invalidate_prefix()."""
        try:
            return run(invalidate_pattern(self._matching(text)), runtime, NO_LOADS, no_seal)[0]
        finally:
            self._forget(runtime)

    async def aby_prefix(self, runtime: AsyncRuntime, text: str) -> BulkOutcome:
        """CacheEngine.ainvalidate_prefix()."""
        flow = invalidate_pattern(self._matching(text))
        try:
            return (await arun(flow, runtime, NO_LOADS, no_seal))[0]
        finally:
            self._forget(runtime)

    def by_tags(self, runtime: SyncRuntime, tags: tuple[object, ...]) -> BulkOutcome:
        """CacheEngine.invalidate_tags()."""
        flow = invalidate_tags(self._key_head, tag_texts(tags), self._catalog.wake_ttl_ms())
        try:
            return run(flow, runtime, NO_LOADS, no_seal)[0]
        finally:
            self._forget(runtime)

    async def aby_tags(self, runtime: AsyncRuntime, tags: tuple[object, ...]) -> BulkOutcome:
        """CacheEngine.ainvalidate_tags()."""
        flow = invalidate_tags(self._key_head, tag_texts(tags), self._catalog.wake_ttl_ms())
        try:
            return (await arun(flow, runtime, NO_LOADS, no_seal))[0]
        finally:
            self._forget(runtime)

    def _forget(self, runtime: SyncRuntime | AsyncRuntime) -> None:
        """Read-your-writes: this process's readers start afresh, and its near tier
        empties (Redis's reports of the deletions come a moment later)."""
        runtime.flights.forget_all()
        self._nearby.clear()

    def _matching(self, text: str) -> PendingPattern:
        if not isinstance(text, str) or any(c in text for c in "{}"):
            raise ConfigurationError(
                f"invalidate_prefix takes the start of a rendered key such as 'product:', "
                f"without the engine prefix or braces; got {text!r}"
            )
        head = self._key_head

        def belongs(key: str) -> bool:
            parts = split_entry_key(key, head)
            return parts is not None and parts[0].startswith(text)

        start = head + text
        return PendingPattern(start, glob_escape(start) + "*", belongs, f"{start}*")


def tag_texts(tags: tuple[object, ...]) -> list[str]:
    """The tags of an invalidate_tags() call, checked: rendered text, no braces."""
    if not tags:
        raise ConfigurationError("invalidate_tags needs at least one tag, e.g. 'shop:7'")
    texts: list[str] = []
    for tag in tags:
        if not isinstance(tag, str) or not tag or "{" in tag or "}" in tag:
            raise ConfigurationError(
                f"invalidate_tags takes tags as their templates render them, e.g. "
                f"'shop:7' for tags=('shop:<shop_id>',); got {tag!r}"
            )
        texts.append(tag)
    return list(dict.fromkeys(texts))
