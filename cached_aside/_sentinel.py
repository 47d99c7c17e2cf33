"""Redis Sentinel: `redis+sentinel://` and `rediss+sentinel://` URLs, parsed with the
standard library and checked before anything connects, and the sync and asyncio
clients of the service's master that redis-py's Sentinel makes from them, lazily,
with blocking pools. No command is sent here: clients ask the sentinels on connect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.exceptions import ConnectionError

from ._errors import ConfigurationError
from ._urls import query_option

SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme: TLS
DEFAULT_SENTINEL_PORT = 26379
EXAMPLE = "redis+sentinel://[:password@]host1:26379,host2:26379/mymaster[/0]"
# Query options that configure the sentinels, not the master's connections.
SENTINEL_QUERY: dict[str, Callable[[str], Any]] = {
    "sentinel_username": str,
    "sentinel_password": str,
    "min_other_sentinels": int,
}


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() in SCHEMES


@dataclass
class SentinelURL:
    """What a Sentinel URL says: where the sentinels are, the service, TLS, and the
    options of the master's connections (db, credentials, query) and of the
    sentinels' (credentials, `min_other_sentinels`)."""

    sentinels: list[tuple[str, int]]
    service: str
    tls: bool
    options: dict[str, Any] = field(default_factory=dict)
    sentinel_options: dict[str, Any] = field(default_factory=dict)
    min_other_sentinels: int = 0


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse `url`, raising ConfigurationError with what to change."""
    userinfo = _userinfo(url)
    if any(mark in userinfo for mark in "@/?#"):
        # Unencoded, these cut the URL inside the password: any part quoted from it
        # could be the secret, so say what is wrong without quoting anything.
        raise _bad(
            url,
            "the user or password holds an unencoded '@', '/', '?' or '#': "
            "percent-encode them (%40, %2F, %3F, %23)",
        )
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise _bad(url, str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise _bad(url, "the scheme must be redis+sentinel:// or rediss+sentinel:// (TLS)")
    if parts.fragment:
        raise _bad(url, f"unexpected fragment #{parts.fragment}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    parsed = SentinelURL(_addresses(url, hosts), _service(url, parts.path), SCHEMES[scheme])
    if userinfo:
        username, has_password, password = userinfo.partition(":")
        if username:
            parsed.options["username"] = unquote(username)
        if has_password and password:
            parsed.options["password"] = unquote(password)
    segments = parts.path.split("/")[1:]  # ["mymaster"] or ["mymaster", "0"]
    if len(segments) == 2 and segments[1] != "":
        parsed.options["db"] = _db(url, segments[1])
    _query(url, parts.query, parsed)
    return parsed


def _bad(url: str, why: str) -> ConfigurationError:
    return ConfigurationError(f"bad Sentinel URL {_redacted(url)!r}: {why}; expected {EXAMPLE}")


def _userinfo(url: str) -> str:
    """Everything between "://" and the last "@" (the user and password, however they
    are written), or "" when there is no "@"."""
    start = url.find("://") + 3
    at = url.rfind("@")
    return url[start:at] if start >= 3 and at >= start else ""


def _redacted(url: str) -> str:
    """The URL without its password, for error messages: all that can be the password,
    up to the last "@", however the password is written."""
    userinfo = _userinfo(url)
    if not userinfo:
        return url
    start = url.find("://") + 3
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***" if colon and not any(mark in user for mark in "@/?#") else "***"
    return url[:start] + shown + url[start + len(userinfo) :]


def _addresses(url: str, hosts: str) -> list[tuple[str, int]]:
    if not hosts:
        raise _bad(url, "no sentinel address")
    addresses = []
    for item in hosts.split(","):
        if item.startswith("["):  # [::1]:26379
            host, bracket, tail = item[1:].partition("]")
            if not bracket or (tail and not tail.startswith(":")):
                raise _bad(url, f"bad IPv6 address {item!r}")
            if tail == ":":
                raise _bad(url, f"no port after the colon in {item!r}")
            port_text = tail[1:]
        else:
            host, colon, port_text = item.partition(":")
            if ":" in port_text:
                raise _bad(url, f"bad address {item!r} (write an IPv6 address as [::1]:26379)")
            if colon and not port_text:
                raise _bad(url, f"no port after the colon in {item!r}")
        if not host:
            raise _bad(url, f"an empty sentinel address in {hosts!r}")
        port = DEFAULT_SENTINEL_PORT
        if port_text:
            digits = port_text.isascii() and port_text.isdigit()
            if not digits or not 0 < int(port_text) < 65536:
                raise _bad(url, f"bad port in {item!r}: a port is a number from 1 to 65535")
            port = int(port_text)
        addresses.append((unquote(host), port))
    return addresses


def _service(url: str, path: str) -> str:
    segments = path.split("/")[1:] if path.startswith("/") else []
    if not segments or not segments[0]:
        raise _bad(url, "no service name: put the master's name after the addresses")
    if len(segments) > 2:
        raise _bad(url, f"too many path segments in {path!r} (only /<service>/<db>)")
    return unquote(segments[0])


def _db(url: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise _bad(url, f"the database must be a whole number >= 0, got {text!r}")
    return int(text)


def _query(url: str, query: str, parsed: SentinelURL) -> None:
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "db" and "db" in parsed.options:
            raise _bad(url, "the database is given twice, in the path and as ?db=")
        if name not in SENTINEL_QUERY:
            try:  # the master's options: redis-py's parsers, and our rules on top
                parsed.options[name] = query_option(name, value)
            except ConfigurationError as exc:
                raise _bad(url, str(exc)) from None
            continue
        try:
            converted = SENTINEL_QUERY[name](value)
        except (TypeError, ValueError):
            converted = None
        if converted is None or (name == "min_other_sentinels" and converted < 0):
            raise _bad(url, f"bad value {value!r} for {name}")
        if name == "min_other_sentinels":
            parsed.min_other_sentinels = converted
        else:
            parsed.sentinel_options[name.removeprefix("sentinel_")] = converted


class SentinelClients:
    """Makes the sync client and, per event loop, the asyncio client of a Sentinel
    URL's master. The URL and options are checked when this is built.

    `sync_options` and `async_options` are the master's pool options (timeouts, pool
    size and wait, retry, and the caller's keywords); what the URL says wins, as
    redis-py's from_url has it. A `sentinel_kwargs` keyword among them configures
    the sentinels' connections, on top of ours: the engine's timeouts, TLS for
    rediss+sentinel://, and no retry (a failed sentinel is skipped for the next).
    """

    def __init__(
        self, url: str, sync_options: dict[str, Any], async_options: dict[str, Any]
    ) -> None:
        self.url = parse_sentinel_url(url)
        sync_options, async_options = dict(sync_options), dict(async_options)
        extra = sync_options.pop("sentinel_kwargs", None) or {}
        async_options.pop("sentinel_kwargs", None)
        if not isinstance(extra, dict):
            raise ConfigurationError(f"sentinel_kwargs must be a dict, got {extra!r}")
        for forbidden in ("connection_class", "host", "port", "path"):
            if forbidden in sync_options:
                raise ConfigurationError(
                    f"{forbidden}= cannot be set for a Sentinel URL: the sentinels say "
                    "where the master is"
                )
        tls_options = sorted(name for name in {*sync_options, *self.url.options} if "ssl" in name)
        if "ssl" in tls_options or (tls_options and not self.url.tls):
            raise ConfigurationError(
                f"{', '.join(tls_options)}: TLS is chosen by the scheme; use "
                "rediss+sentinel:// for TLS (its options, such as ssl_ca_certs, then apply)"
            )
        self.sync_options = {**sync_options, **self.url.options, "ssl": self.url.tls}
        self.async_options = {**async_options, **self.url.options, "ssl": self.url.tls}
        sentinel_options: dict[str, Any] = {
            name: value
            for name, value in self.sync_options.items()
            if name in ("socket_timeout", "socket_connect_timeout", "socket_keepalive")
            or (self.url.tls and name.startswith("ssl_"))
        }
        if self.url.tls:
            sentinel_options["ssl"] = True
        self.sentinel_options = {**sentinel_options, **self.url.sentinel_options, **extra}

    def client(self) -> redis.Redis:
        sentinel = redis.sentinel.Sentinel(
            self.url.sentinels,
            min_other_sentinels=self.url.min_other_sentinels,
            sentinel_kwargs=self.sentinel_options,
        )
        client: redis.Redis = sentinel.master_for(
            self.url.service, connection_pool_class=BlockingSentinelPool, **self.sync_options
        )
        return client

    def async_client(self) -> redis.asyncio.Redis:
        sentinel = redis.asyncio.sentinel.Sentinel(
            self.url.sentinels,
            min_other_sentinels=self.url.min_other_sentinels,
            sentinel_kwargs=self.sentinel_options,
        )
        client: redis.asyncio.Redis = sentinel.master_for(
            self.url.service, connection_pool_class=AsyncBlockingSentinelPool, **self.async_options
        )
        return client


def _moved(connection: Any) -> bool:
    """The connection is to a server its pool no longer knows as the master: the
    sentinels named another since (to a connection of the pool that reconnected)."""
    pool = connection.connection_pool
    known = pool.master_address
    return bool(
        pool.is_master and known is not None and known != (connection.host, connection.port)
    )


def _moved_error(connection: Any) -> ConnectionError:
    host, port = connection.connection_pool.master_address
    return ConnectionError(f"the master moved to {host}:{port} (Sentinel failover)")


class _AsksTheSentinels(redis.sentinel.SentinelManagedConnection):
    """A Sentinel-managed connection that asks the sentinels where the master is
    whenever it connects, and drops its socket once its pool has learnt of another
    master.

    redis-py's asks only in connect(), which its pools call; a command sent on a
    closed connection reconnects it, without connect(), to the address it had. And a
    failover closes only the pool's idle connections. cached_aside's hot path keeps a
    thread's connection across failures, checked out: after a failover it would
    reconnect to the dead master, or, a master that was paused rather than killed,
    go on talking to it until the sentinels demote it (seconds of writes then lost).
    The drop raises ConnectionError, so nothing resumes on the new master unawares
    (the near cache's listener re-subscribes; a command is retried).

    It can also be made without its pool's proxy (the near cache's listener copies a
    pool's settings, not its machinery): it then takes its pool's, so the listener
    follows the master too.
    """

    pool_proxy: ClassVar[Any] = None

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("connection_pool", self.pool_proxy)
        base: Any = super()  # redis-py's sync connections carry no annotations
        base.__init__(**kwargs)

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        connection: Any = self  # as above: typed as redis-py leaves them
        if not connection.is_connected:
            connection.connect()
        elif _moved(connection):
            connection.disconnect()
            raise _moved_error(connection)
        base: Any = super()
        base.send_packed_command(command, check_health)


class _AsyncAsksTheSentinels(redis.asyncio.sentinel.SentinelManagedConnection):
    """_AsksTheSentinels for redis.asyncio's Sentinel-managed connections."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self.is_connected:
            connect: Any = self.connect  # redis-py leaves it unannotated
            await connect()
        elif _moved(self):
            await self.disconnect()
            raise _moved_error(self)
        await super().send_packed_command(command, check_health)


class _Connection(_AsyncAsksTheSentinels, redis.asyncio.sentinel.SentinelManagedConnection):
    pass


class _SSLConnection(_AsyncAsksTheSentinels, redis.asyncio.sentinel.SentinelManagedSSLConnection):
    pass


class BlockingSentinelPool(redis.sentinel.SentinelConnectionPool, redis.BlockingConnectionPool):
    """redis-py's Sentinel pool, waiting up to `timeout` for a free connection rather
    than raising past `max_connections` (it has no blocking one of its own), with
    connections that find the master however they reconnect; closing it closes the
    sentinels' connections too."""

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        base: type[redis.sentinel.SentinelManagedConnection] = (
            redis.sentinel.SentinelManagedSSLConnection
            if kwargs.pop("ssl", False)
            else redis.sentinel.SentinelManagedConnection
        )
        # A class of this pool's own, so a connection made from its settings alone
        # (by the listener) finds the pool.
        kind: Any = type(base.__name__, (_AsksTheSentinels, base), {})
        kwargs["connection_class"] = kind
        parent: Any = super()  # redis-py's Sentinel pools carry no annotations
        parent.__init__(service_name, sentinel_manager, **kwargs)
        kind.pool_proxy = self.proxy

    def disconnect(self, inuse_connections: bool = True) -> None:
        super().disconnect(inuse_connections)
        if inuse_connections:  # closing, not a failover's dropping of idle connections
            self.sentinel_manager.close()


class AsyncBlockingSentinelPool(
    redis.asyncio.sentinel.SentinelConnectionPool, redis.asyncio.BlockingConnectionPool
):
    """The asyncio twin of BlockingSentinelPool."""

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        kwargs["connection_class"] = _SSLConnection if kwargs.pop("ssl", False) else _Connection
        parent: Any = super()  # redis-py's Sentinel pools carry no annotations
        parent.__init__(service_name, sentinel_manager, **kwargs)

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:
            await self.sentinel_manager.aclose()
