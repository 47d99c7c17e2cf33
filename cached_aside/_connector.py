"""Connector: the clients of one deployment (one Redis, a Cluster or a Sentinel
service), given by the user or made from a URL, and the breaker that suits it.
Decided once, when the engine is built; nothing rewires it afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from ._breaker import CircuitBreaker, NodeBreakers
from ._errors import ConfigurationError
from ._sentinel import SentinelClients, is_sentinel_url
from ._urls import check_keywords, check_url
from ._validate import seconds, whole

CLUSTER_SCHEME = "redis+cluster://"
# Redis failures in a row that open the breaker, and how long it then stays open.
DEFAULT_BREAKER_FAILURES = 3
DEFAULT_BREAKER_COOLDOWN_SECONDS = 0.5
# A hung Redis costs a caller this once (a timeout is not retried), and only until
# the breaker opens; a healthy local or same-zone Redis answers in well under 1 ms.
DEFAULT_SOCKET_TIMEOUT = 0.25
DEFAULT_CONNECT_TIMEOUT = 0.25
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_POOL_TIMEOUT = 5.0
# What the clients' one immediate retry is for: a connection the server closed.
RETRIED: tuple[type[Exception], ...] = (redis.exceptions.ConnectionError,)

_CLUSTERS = (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)


class Connector:
    """Where an engine's clients come from: the ones given (`client`, `async_client`),
    or makers that build them on first use (`make_client`, `make_async_client`; the
    engine then owns what they build and closes it)."""

    def __init__(
        self,
        client: Any = None,
        async_client: Any = None,
        *,
        make_client: Callable[[], Any] | None = None,
        make_async_client: Callable[[], Any] | None = None,
        cluster: bool = False,
    ) -> None:
        self.client, self.async_client = client, async_client
        self.make_client, self.make_async_client = make_client, make_async_client
        self.owns_clients = make_client is not None
        self.cluster = cluster  # made from a redis+cluster:// URL

    @property
    def on_cluster(self) -> bool:
        """Whether the clients talk to a Redis Cluster."""
        return self.cluster or isinstance(self.client, _CLUSTERS)

    @property
    def async_on_cluster(self) -> bool:
        """Whether the given async client is an asyncio cluster client."""
        return isinstance(self.async_client, redis.asyncio.cluster.RedisCluster)

    @property
    def has_sync(self) -> bool:
        """Whether sync calls can have a client (given or made)."""
        return self.client is not None or self.make_client is not None

    def breaker(self, failures: int, cooldown: float) -> CircuitBreaker:
        """One breaker for the deployment (its sync and async clients talk to the same
        Redis), and on a Cluster one per node within it: a dead master costs only its
        own slots."""
        whole("breaker_failures", failures)
        seconds("breaker_cooldown", cooldown)
        kind = NodeBreakers if self.on_cluster or self.async_on_cluster else CircuitBreaker
        return kind(failures, float(cooldown))

    def check(
        self, client: Any, prefix: str, tags: bool, listener: Callable[[], Any] | None
    ) -> None:
        """CacheEngine.check(): that the deployment lets the engine do its work (and
        the near cache's listener, when `listener` makes its connection)."""
        from ._check import check  # the check's module is needed only here

        near = listener is not None
        check(client, prefix, tags=tags, near=near, listener_connection=listener)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        socket_timeout: float,
        socket_connect_timeout: float,
        max_connections: int,
        pool_timeout: float,
        client_options: dict[str, Any],
    ) -> Connector:
        """Makers for the deployment `url` names (see CacheEngine.from_url), checked
        now: a bad URL or option fails here, not on first use."""
        if not isinstance(url, str) or "://" not in url:
            raise ConfigurationError(f"url must look like redis://host:6379/0, got {url!r}")
        seconds("socket_timeout", socket_timeout)
        seconds("socket_connect_timeout", socket_connect_timeout)
        seconds("pool_timeout", pool_timeout)
        whole("max_connections", max_connections)
        if client_options.get("decode_responses"):
            raise ConfigurationError("decode_responses must stay off: cached_aside reads raw bytes")
        on_cluster = url.lower().startswith(CLUSTER_SCHEME)
        if not is_sentinel_url(url):
            check_url(url)  # here, not in every call: redis-py reads the URL on connect
            check_keywords(client_options, on_cluster)
        options: dict[str, Any] = {
            "max_connections": max_connections,
            "timeout": pool_timeout,
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_connect_timeout,
            **client_options,
        }
        # One immediate retry heals a pooled connection the server closed (a restart);
        # redis-py's default backs off for seconds, which a cache must not do. A
        # timeout is not retried: a hung server would cost the caller a second one.
        # The asyncio client runs only its own Retry class.
        sync_options = {"retry": Retry(NoBackoff(), 1, RETRIED), **options}
        async_options = {"retry": redis.asyncio.retry.Retry(NoBackoff(), 1, RETRIED), **options}
        if is_sentinel_url(url):
            sentinel = SentinelClients(url, sync_options, async_options)
            check_keywords(client_options, False, extra=("sentinel_kwargs",))
            return cls(make_client=sentinel.client, make_async_client=sentinel.async_client)
        if on_cluster:
            timeouts = {
                "socket_timeout": socket_timeout,
                "socket_connect_timeout": socket_connect_timeout,
                **client_options,
            }
            return cls._cluster(url, timeouts)
        return cls(
            make_client=lambda: redis.Redis.from_pool(
                redis.BlockingConnectionPool.from_url(url, **sync_options)
            ),
            make_async_client=lambda: redis.asyncio.Redis.from_pool(
                redis.asyncio.BlockingConnectionPool.from_url(url, **async_options)
            ),
        )

    @classmethod
    def _cluster(cls, url: str, timeouts: dict[str, Any]) -> Connector:
        # One node's address is enough: the client discovers the others.
        node_url = "redis" + url[len(CLUSTER_SCHEME) - len("://") :]
        # redis-py's cluster default retries a timed-out command for about 7 s
        # (backoff, and a topology refresh that asks the hung node too): a cache
        # must fail open long before; one immediate retry, as for one Redis.
        return cls(
            make_client=lambda: redis.cluster.RedisCluster.from_url(
                node_url, **{"retry": Retry(NoBackoff(), 1, RETRIED), **timeouts}
            ),
            make_async_client=lambda: redis.asyncio.cluster.RedisCluster.from_url(
                node_url,
                **{"retry": redis.asyncio.retry.Retry(NoBackoff(), 1, RETRIED), **timeouts},
            ),
            cluster=True,
        )
