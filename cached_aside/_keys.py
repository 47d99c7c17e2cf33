"""Key templates, compiled once at decoration time and rendered per call.

Rules that keep keys apart: every argument is escaped so it can never contain ':',
'{', '}' or '#'; a string that looks like a number, bool or None gets its first
character escaped, so "1" and 1 never share an entry; adjacent placeholders need a
separator that arguments cannot contain. Every key of one entry shares one hash tag
(the braces), so a Lua script touching them stays in one Redis Cluster slot.
"""

from __future__ import annotations

import enum
import hashlib
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple
from urllib.parse import quote

from ._errors import ConfigurationError, KeyArgumentError, KeyTemplateError

LOCK_SUFFIX = "lock"
WAITERS_SUFFIX = "waiters"
WAKE_SUFFIX = "wake"
# Beside an entry of a function with refresh_ahead=XFetch(): how long its last load took.
LOAD_MS_SUFFIX = "load_ms"
_INTERNAL_SUFFIXES = frozenset(
    f":{s}" for s in (LOCK_SUFFIX, WAITERS_SUFFIX, WAKE_SUFFIX, LOAD_MS_SUFFIX)
)
_WAITER_WAKE = re.compile(rf":{WAKE_SUFFIX}:[0-9a-f]+").fullmatch

# Rendered keys longer than this are shortened to a readable head plus a digest.
MAX_RENDERED_LENGTH = 256
KEPT_HEAD_LENGTH = 200
DIGEST_SEPARATOR = "#"

_PLACEHOLDER = re.compile(r"<([^<>]*)>")
# Characters an escaped argument may contain: exactly what urllib's quote() leaves alone.
_UNESCAPED = re.compile(r"[A-Za-z0-9_.~-]*").fullmatch
# Texts that other types render to; a string equal to one of them is escaped further.
_TYPED_LOOKING = re.compile(
    r"-?(?:[0-9]+(?:\.[0-9]+)?(?:e-[0-9]+)?|inf|nan)|True|False|None|0x[0-9a-f]*"
).fullmatch
_FORBIDDEN_IN_TEMPLATE = frozenset("{}<>#")
# What render_argument can produce: quote()'s safe characters, '%' escapes, and the
# '+' of a float such as 1e+20.
_RENDERED_ARGUMENT = r"[A-Za-z0-9_.~%+-]*"
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
_MEMORY_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class EntryKeys(NamedTuple):
    """The Redis keys of one cache entry; only `value` is touched on a hit. `wake` is
    the prefix of the waiters' own wake-up lists (see `wake_list`)."""

    value: str
    lock: str
    waiters: str
    wake: str

    def wake_list(self, token: str) -> str:
        """The wake-up list of the waiter with this token."""
        return f"{self.wake}:{token}"

    @property
    def load_ms(self) -> str:
        """Where XFetch keeps the entry's last load time (not one of the tuple's keys:
        only the scripts of XFetch functions are given it)."""
        return load_ms_key(self.value)


def load_ms_key(value_key: str) -> str:
    """The key beside an entry that holds how long its last load took (XFetch)."""
    return f"{value_key}:{LOAD_MS_SUFFIX}"


def entry_keys(value_key: str) -> EntryKeys:
    """Derive the internal keys of an entry; they end in a suffix, value keys end in '}'."""
    return EntryKeys(
        value_key,
        f"{value_key}:{LOCK_SUFFIX}",
        f"{value_key}:{WAITERS_SUFFIX}",
        f"{value_key}:{WAKE_SUFFIX}",
    )


TAG_INFIX: Final = "tag:{"  # a tag's version key: "<prefix>:" TAG_INFIX text "}"


def tag_key(entry_key: str, text: str) -> str:
    """The version key of a tag, beside the engine's value keys: "<prefix>:tag:{shop:7}"
    for "<prefix>:{...}" (its own hash tag: one Cluster slot per tag; outside the
    value keys' "<prefix>:{", so bulk invalidation skips it)."""
    return f"{entry_key[: entry_key.index('{')]}{TAG_INFIX}{text}}}"


def is_tag_key(key: str) -> bool:
    """Whether a key Redis reports changed is a tag's version key (value keys hold
    no braces but their hash tag's, so none has ":tag:{" in it)."""
    return ":" + TAG_INFIX in key


def glob_escape(text: str) -> str:
    """Text for a SCAN MATCH pattern that matches itself literally."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


def split_entry_key(key: str, key_head: str) -> tuple[str, str] | None:
    """(rendered, suffix) of one of an engine's keys, or None for a foreign key; the
    suffix is '' for a value key, else ':lock', ':waiters', ':load_ms' or a waiter's
    ':wake:<token>'."""
    if not key.startswith(key_head):
        return None
    end = key.find("}", len(key_head))
    if end < 0:
        return None
    suffix = key[end + 1 :]
    if suffix and suffix not in _INTERNAL_SUFFIXES and _WAITER_WAKE(suffix) is None:
        return None
    return key[len(key_head) : end], suffix


def validate_prefix(prefix: object) -> str:
    """Check an engine's key prefix: non-empty text free of hash-tag braces and spaces."""
    if not isinstance(prefix, str) or not prefix:
        raise ConfigurationError(f"prefix must be a non-empty string, got {prefix!r}")
    bad = sorted({c for c in prefix if c in "{}" or c.isspace() or not c.isprintable()})
    if bad:
        raise ConfigurationError(
            f"prefix {prefix!r} contains {bad!r}; use letters, digits and ':' '-' '_' '.'"
        )
    return prefix


# Escaped texts of recent arguments: ids repeat, and escaping costs two regex scans.
_escaped: dict[str, str] = {}
_ESCAPED_CACHE_SIZE = 4096
_ESCAPED_CACHE_MAX_TEXT = 128


def _escape_text(text: str) -> str:
    escaped = _escaped.get(text)
    if escaped is not None:
        return escaped
    escaped = _quoted(text)
    if _TYPED_LOOKING(escaped) is not None:
        escaped = f"%{ord(escaped[0]):02X}{escaped[1:]}"
    if len(text) <= _ESCAPED_CACHE_MAX_TEXT:
        if len(_escaped) >= _ESCAPED_CACHE_SIZE:
            _escaped.clear()
        _escaped[text] = escaped
    return escaped


def _quoted(text: str) -> str:
    """Text with every character outside A-Za-z0-9_.~- percent-encoded (UTF-8)."""
    try:
        return text if _UNESCAPED(text) is not None else quote(text, safe="")
    except UnicodeEncodeError as exc:
        raise KeyArgumentError(
            f"cannot build a cache key from {text!r:.60}: it is not valid text "
            f"({exc.reason}, as os.fsdecode makes of undecodable bytes); decode the "
            "bytes it came from with errors='replace', or pass the bytes themselves"
        ) from None


def render_argument(value: object, *, typed: bool = True) -> str:
    """Turn one argument value into key text; equal inputs of one type give equal text.

    Not `typed` (a tag's text): a string that looks like a number, bool or None is
    not marked, so "7" and 7 give the same text. Two entries sharing a tag are only
    ever invalidated together, so a tag need not tell them apart; and a tag is then
    the text a caller writes ("shop:7"), whatever type its id had.
    """
    if type(value) is str:  # exactly str: subclasses and enums are reduced below
        return _escape_text(value) if typed else _quoted(value)
    kind = type(value)
    if kind is int:
        return str(value)
    if value is None or kind is bool:
        return repr(value)
    if kind is float:
        return repr(value)
    if isinstance(value, enum.Enum):
        return render_argument(value.value, typed=typed)
    if isinstance(value, bool | int | float | str):
        plain = kind.__mro__[1](value) if kind is not bool else bool(value)
        return render_argument(plain, typed=typed)
    if isinstance(value, bytes | bytearray | memoryview):
        return "0x" + bytes(value).hex()
    if kind.__str__ is object.__str__ and kind.__repr__ is object.__repr__:
        raise KeyArgumentError(
            f"cannot build a cache key from {kind.__qualname__} instance {value!r}: its text "
            "holds a memory address, so equal calls would never share an entry. Give the "
            "class a __str__ that names its identity, or pass an id instead"
        )
    text = str(value)
    if _MEMORY_ADDRESS.search(text):
        raise KeyArgumentError(
            f"cannot build a cache key from {text!r}: it contains a memory address, so "
            "equal calls would never share an entry. Pass plain ids or give the objects a "
            "__str__ that names their identity"
        )
    return _escape_text(text) if typed else _quoted(text)


def shorten(rendered: str, template_tag: str) -> str:
    """Bound a rendered key's length, keeping its readable head and adding a digest.

    The digest part starts with the template's tag: two templates can share a head
    (`doc:<url>` and `doc:<url>:reviews` with a long url), and invalidate_all must
    tell whose a shortened key is.
    """
    if len(rendered) <= MAX_RENDERED_LENGTH:
        return rendered
    digest = hashlib.sha256(rendered.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{rendered[:KEPT_HEAD_LENGTH]}{DIGEST_SEPARATOR}{template_tag}.{digest}"


def template_tag(text: str) -> str:
    """A short fingerprint of a key template, kept in its shortened keys."""
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class _Slot:
    name: str
    position: int | None  # index in positional arguments, None for keyword-only


class KeyTemplate:
    """A compiled key template bound to one loader's signature."""

    __slots__ = (
        "_fast_arity",
        "_format",
        "_head",
        "_name",
        "_owned_head",
        "_owned_text",
        "_positions",
        "_signature",
        "_single",
        "_slots",
        "_tag",
        "_tail",
        "by_text",
        "text",
    )

    def __init__(self, text: object, function: Callable[..., Any]) -> None:
        name = getattr(function, "__qualname__", repr(function))
        if not isinstance(text, str) or not text:
            raise KeyTemplateError(f"key for {name} must be a non-empty string, got {text!r}")
        self.text = text
        self._name = name
        self._tag = template_tag(text)
        self._signature = inspect.signature(function)
        parameters = self._signature.parameters
        literals = _PLACEHOLDER.split(text)[0::2]
        names = _PLACEHOLDER.findall(text)
        _check_literals(text, name, literals, names)
        positional = [
            p.name
            for p in parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        slots = []
        for placeholder in names:
            parameter = parameters.get(placeholder)
            if parameter is None or parameter.kind in (
                parameter.VAR_POSITIONAL,
                parameter.VAR_KEYWORD,
            ):
                raise KeyTemplateError(
                    f"key {text!r} of {name} names <{placeholder}>, which is not a named "
                    f"parameter of {name}{self._signature}; use one of "
                    f"{', '.join(f'<{p}>' for p in _named(parameters)) or '(none)'}"
                )
            position = positional.index(placeholder) if placeholder in positional else None
            slots.append(_Slot(placeholder, position))
        self._slots = tuple(slots)
        self._positions = tuple(slot.position or 0 for slot in slots)
        self._format = "{}".join(literals)
        # Most templates have one placeholder: "product:<id>" renders as head + id + tail.
        self._single = self._positions[0] if len(slots) == 1 else -1
        # A one-parameter function called with a str: rendered keys by that str, so
        # that the hit path can skip render() (a third of a near hit).
        self.by_text: dict[str, str] = {}
        self._head, self._tail = literals[0], literals[-1]
        required_keyword_only = any(
            p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in parameters.values()
        )
        all_positional = all(slot.position is not None for slot in slots)
        # Calls that pass exactly the positional parameters skip inspect's binding.
        self._fast_arity = -1 if required_keyword_only or not all_positional else len(positional)
        tokens = [re.escape(c) for c in literals[0]]
        for literal in literals[1:]:
            tokens.append(_RENDERED_ARGUMENT)
            tokens.extend(re.escape(c) for c in literal)
        self._owned_text = re.compile("".join(tokens)).fullmatch
        # A shortened key keeps only a head: accept any head a full rendering could have.
        nested = ""
        for token in reversed(tokens):
            nested = f"{token}(?:{nested})?" if nested else token
        self._owned_head = re.compile(nested).fullmatch

    def owns(self, rendered: str) -> bool:
        """True if `rendered` (a key without prefix and braces) is one this template
        can produce: how invalidate_all tells its entries from other functions'."""
        head, separator, digest = rendered.partition(DIGEST_SEPARATOR)
        if not separator:
            return self._owned_text(rendered) is not None
        return (
            digest.startswith(self._tag + ".")
            and len(head) == KEPT_HEAD_LENGTH
            and self._owned_head(head) is not None
        )

    @property
    def literal_head(self) -> str:
        """The template's text before its first placeholder: every key starts with it."""
        return self._head

    @staticmethod
    def placeholders(text: str) -> list[str]:
        """The placeholder names of a template, in order."""
        return _PLACEHOLDER.findall(text)

    def render(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
        """Render the key text (without prefix) for one call's arguments; a long one is
        shortened to a head and a digest."""
        if not kwargs and len(args) == self._fast_arity:
            if self._single >= 0:
                value = args[self._single]
                kind = type(value)
                if kind is str:
                    text = _escaped.get(value) or _escape_text(value)
                elif kind is int:
                    text = str(value)
                else:
                    text = render_argument(value)
                rendered = self._head + text + self._tail
                if kind is str and self._fast_arity == 1 and len(rendered) <= MAX_RENDERED_LENGTH:
                    if len(self.by_text) >= _ESCAPED_CACHE_SIZE:
                        self.by_text.clear()
                    self.by_text[value] = rendered
            else:
                rendered = self._format.format(*[render_argument(args[i]) for i in self._positions])
        else:
            rendered = self._format.format(
                *[render_argument(v) for v in self._values(args, kwargs)]
            )
        if len(rendered) <= MAX_RENDERED_LENGTH:
            return rendered
        return shorten(rendered, self._tag)

    def render_tag(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
        """Render a tag's text for one call's arguments: as a key, but with text
        arguments not marked as text (see render_argument), and never shortened."""
        values = self._values(args, kwargs)
        return self._format.format(*[render_argument(value, typed=False) for value in values])

    def _values(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[Any]:
        """The placeholders' values, in order, for one call's arguments."""
        if not kwargs and len(args) == self._fast_arity:
            return [args[i] for i in self._positions]
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:  # inspect's text names no function: name it
            parameters = ", ".join(
                str(p.replace(annotation=p.empty)) for p in self._signature.parameters.values()
            )
            raise KeyArgumentError(f"{self._name}({parameters}): {exc}") from None
        bound.apply_defaults()
        return [bound.arguments[slot.name] for slot in self._slots]


def _named(parameters: Mapping[str, inspect.Parameter]) -> list[str]:
    return [p.name for p in parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _check_literals(text: str, name: str, literals: list[str], names: list[str]) -> None:
    for literal in literals:
        bad = sorted({c for c in literal if c in _FORBIDDEN_IN_TEMPLATE or not c.isprintable()})
        if bad:
            raise KeyTemplateError(
                f"key {text!r} of {name} contains {bad!r} outside a placeholder; "
                "placeholders are written <param>, and '{' '}' '#' are reserved for the "
                "engine's hash tags and digests"
            )
    for placeholder in names:
        if not placeholder.isidentifier():
            raise KeyTemplateError(
                f"key {text!r} of {name} has placeholder <{placeholder}>; "
                "a placeholder must be a parameter name such as <id>"
            )
    for index, separator in enumerate(literals[1:-1], start=1):
        if _UNESCAPED(separator) is not None:
            raise KeyTemplateError(
                f"key {text!r} of {name}: <{names[index - 1]}> and <{names[index]}> need a "
                f"separator such as ':' or '/' between them (got {separator!r}), otherwise "
                "different arguments could render the same key"
            )
