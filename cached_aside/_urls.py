"""Redis URLs and client options, checked when an engine is built: the scheme, the
port, the database, and every query option and keyword by the rules redis-py applies
when it connects, so a bad one fails at start-up, not in every call. Nothing
connects here.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import redis.asyncio.cluster
import redis.asyncio.connection
import redis.cluster
import redis.connection

from ._errors import ConfigurationError

SCHEMES = ("redis", "rediss", "unix", "redis+cluster")
EXAMPLE = "redis://[[user]:password@]host[:port][/db][?option=value]"
_TRUE = ("1", "t", "true", "y", "yes", "on")
_FALSE = ("0", "f", "false", "n", "no", "off")
_BOOLEANS = ", ".join(f"{t}/{f}" for t, f in zip(_TRUE, _FALSE, strict=True))
# Query options redis-py passes on as text.
TEXT_OPTIONS = frozenset(
    {
        "client_name",
        "lib_name",
        "lib_version",
        "username",
        "password",
        "encoding",
        "encoding_errors",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_password",
        "ssl_ciphers",
    }
)
CERT_REQS = ("none", "optional", "required")
DECODE_REFUSED = "decode_responses must stay off: cached_aside reads raw bytes (msgpack is binary)"


def _number(low: float, low_open: bool, what: str) -> Callable[[Any], str | None]:
    """A check of a number's range; returns what is wrong, or None."""

    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return what
        if not math.isfinite(value) or value < low or (low_open and value == low):
            return what
        return None

    return check


_SECONDS = _number(0, True, "a number of seconds > 0, e.g. 0.25")
_POSITIVE = _number(1, False, "a whole number >= 1")
_NATURAL = _number(0, False, "a whole number >= 0")
# What redis-py's parser gives must also pass these: a timeout of -1 or 0, a pool of
# -1 connections parse, and fail only when used.
RULES: dict[str, Callable[[Any], str | None]] = {
    "db": _NATURAL,
    "socket_timeout": _SECONDS,
    "socket_connect_timeout": _SECONDS,
    "timeout": _SECONDS,
    "socket_read_size": _POSITIVE,
    "max_connections": _POSITIVE,
    "health_check_interval": _NATURAL,
    "ssl_min_version": _NATURAL,
    "protocol": lambda value: None if value in (2, 3) else "2 or 3",
    "ssl_cert_reqs": lambda value: (
        None
        if value is None or not isinstance(value, str) or value in CERT_REQS
        else " or ".join(CERT_REQS)
    ),
}


def _parsers() -> dict[str, Callable[[str], Any]]:
    return dict(getattr(redis.connection, "URL_QUERY_ARGUMENT_PARSERS", {}))


def query_option(name: str, text: str) -> Any:
    """A URL query option's value, converted as redis-py converts it and checked;
    ConfigurationError names the option and the values it accepts."""
    if name == "decode_responses":
        raise ConfigurationError(f"{DECODE_REFUSED}; remove ?decode_responses= from the URL")
    parsers = _parsers()
    parse = parsers.get(name)
    if parse is None and name not in TEXT_OPTIONS:
        known = ", ".join(sorted({*parsers, *TEXT_OPTIONS}))
        raise ConfigurationError(
            f"unknown option {name!r} in the URL: redis-py would pass it to every "
            f"connection, which would refuse it; known options: {known}"
        )
    if parse is None:
        return option_value(name, text)
    if getattr(redis.connection, "to_bool", None) is parse:
        if text.lower() not in (*_TRUE, *_FALSE):
            raise ConfigurationError(f"bad value {text!r} for {name}: give one of {_BOOLEANS}")
        return text.lower() in _TRUE
    try:
        value = parse(text)
    except (TypeError, ValueError) as exc:
        rule = RULES.get(name)
        accepted = rule(None) if rule is not None else f"what redis-py's parser takes ({exc})"
        raise ConfigurationError(f"bad value {text!r} for {name}: give {accepted}") from None
    return option_value(name, value)


def option_value(name: str, value: Any) -> Any:
    """`value`, checked against the rule of option `name` (if it has one)."""
    if name == "decode_responses" and value:
        raise ConfigurationError(DECODE_REFUSED)
    rule = RULES.get(name)
    wrong = rule(value) if rule is not None else None
    if wrong is not None:
        raise ConfigurationError(f"bad value {value!r} for {name}: give {wrong}")
    return value


def _parameters(*functions: Any) -> set[str]:
    names: set[str] = set()
    for function in functions:
        try:
            names.update(inspect.signature(function).parameters)
        except (TypeError, ValueError):
            continue
    return names - {"self", "kwargs", "args", "connection_kwargs"}


def known_keywords(cluster: bool) -> frozenset[str]:
    """The keywords redis-py's pools and connections (and clusters) take, read from
    the installed redis-py, so a redis-py upgrade brings its new options along."""
    modules = (redis.connection, redis.asyncio.connection)
    classes = [
        getattr(module, name, None)
        for module in modules
        for name in (
            "AbstractConnection",
            "Connection",
            "SSLConnection",
            "UnixDomainSocketConnection",
            "BlockingConnectionPool",
            "ConnectionPool",
        )
    ]
    names = _parameters(*(cls.__init__ for cls in classes if cls is not None))
    if cluster:
        names |= _parameters(
            redis.cluster.RedisCluster.__init__, redis.asyncio.cluster.RedisCluster.__init__
        )
        names |= set(getattr(redis.cluster, "REDIS_ALLOWED_KEYS", ()))
    return frozenset(names)


def check_keywords(options: Mapping[str, Any], cluster: bool, extra: Iterable[str] = ()) -> None:
    """Refuse a keyword redis-py does not take (a misspelling: every call would fail
    with TypeError), and check the values of those with a rule."""
    known = known_keywords(cluster) | set(extra)
    for name, value in options.items():
        if name not in known:
            close = [k for k in sorted(known) if _alike(name, k)]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigurationError(
                f"unknown client option {name!r}{hint}: CacheEngine.from_url passes its "
                "other keywords to redis-py's connection pool, which does not take this one"
            )
        if value is not None:  # None: redis-py's default
            option_value(name, value)


def _alike(given: str, known: str) -> bool:
    """A likely misspelling: one edit apart, or one inside the other."""
    if given in known or known in given:
        return len(given) > 3
    if abs(len(given) - len(known)) > 1:
        return False
    if len(given) == len(known):
        return sum(a != b for a, b in zip(given, known, strict=True)) <= 1
    short, long = sorted((given, known), key=len)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def check_url(url: str) -> None:
    """Check a redis://, rediss://, unix:// or redis+cluster:// URL as redis-py will
    read it (Sentinel URLs have their own parser); raises ConfigurationError."""
    scheme = url.partition("://")[0].lower()
    if scheme not in SCHEMES:
        raise ConfigurationError(
            f"bad url {_shown(url)!r}: the scheme must be one of "
            f"{', '.join(s + '://' for s in SCHEMES)}, redis+sentinel:// or "
            f"rediss+sentinel://; expected {EXAMPLE}"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(
            f"bad url {_shown(url)!r}: {exc}; a port is a number from 1 to 65535"
        ) from None
    if scheme != "unix":
        host_and_port = parts.netloc.rpartition("@")[2]
        if host_and_port.endswith(":"):
            raise ConfigurationError(
                f"bad url {_shown(url)!r}: no port after the colon; give one from 1 to 65535 "
                "or leave the colon out (6379)"
            )
        if port == 0:
            raise ConfigurationError(f"bad url {_shown(url)!r}: a port is a number from 1 to 65535")
        path = parts.path.strip("/")
        if path and not (path.isascii() and path.isdigit()):
            raise ConfigurationError(
                f"bad url {_shown(url)!r}: the path is the database, a whole number >= 0; "
                f"got {path!r}"
            )
    for name, text in parse_qsl(parts.query, keep_blank_values=True):
        try:
            query_option(name, text)
        except ConfigurationError as exc:
            raise ConfigurationError(f"bad url {_shown(url)!r}: {exc}") from None


def _shown(url: str) -> str:
    """The URL without its password, for error messages."""
    head, sep, rest = url.partition("://")
    userinfo, at, tail = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{head}{sep}{user}{':***' if colon else ''}@{tail}"
