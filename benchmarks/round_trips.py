"""Round trips and bytes: what each operation sends and what a record costs in memory.

Round trips are counted at the client (requests sent); the commands Redis executed
come from INFO commandstats on a private server, and include the commands a Lua
script runs inside the server.
"""

from __future__ import annotations

from typing import Any

import msgpack
import redis
from redis.connection import Connection

from cached_aside import CacheEngine, cache_aside
from tests.servers import REDIS_SERVER, RedisProcess

from .hit_path import RECORD
from .runner import Settings, Table


class CountingConnection(Connection):
    """A connection that counts the requests it sends: a command, or a whole pipeline."""

    sent = 0

    def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
        CountingConnection.sent += 1
        super().send_packed_command(*args, **kwargs)


def executed(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def measure(client: redis.Redis, action: Any) -> tuple[int, str]:
    client.config_resetstat()
    before = CountingConnection.sent
    action()
    sent = CountingConnection.sent - before
    ran = {k: v for k, v in executed(client).items() if k not in ("info", "config|resetstat")}
    return sent, ", ".join(f"{name} {calls}" for name, calls in sorted(ran.items()))


def run(settings: Settings) -> list[Table]:
    server = RedisProcess().start() if REDIS_SERVER is not None else None
    url, note = (
        (server.url, "private redis-server")
        if server is not None
        else (
            settings.url,
            "shared server (redis-server not found): counts may include others",
        )
    )
    pool = redis.BlockingConnectionPool.from_url(url, connection_class=CountingConnection)
    client = redis.Redis.from_pool(pool)
    try:
        return _measure(client, note)
    finally:
        client.close()
        if server is not None:
            server.stop()


def _measure(client: redis.Redis, note: str) -> list[Table]:
    engine = CacheEngine(client, prefix="bench")
    loads = 0

    def load(id: str) -> dict[str, str]:
        nonlocal loads
        loads += 1
        return dict(RECORD)

    packed = cache_aside(key="packed:<id>", ttl=300, engine=engine)(load)
    batched = cache_aside(
        key="batched:<id>",
        ttl=300,
        engine=engine,
        batch_loader=lambda ids: [dict(RECORD) for _ in ids],
    )(load)
    hundred = [f"p-{n:03d}" for n in range(100)]
    hashed = cache_aside(key="product:<id>", ttl=300, as_hash=True, engine=engine)(load)
    ahead = cache_aside(key="ahead:<id>", ttl=300, refresh_ahead=5, engine=engine)(load)
    for function in (packed, hashed, ahead):  # load every script once, outside the counts
        function("warm")
        function.invalidate("warm")
    batched.many(["warm"])
    batched.invalidate_many(["warm"])
    hashed("warm")
    hashed.update_field("warm", "stock", "1")
    hashed.invalidate("warm")
    table = Table("round trips per operation", ["operation", "round trips", "executed by Redis"])
    nothing: Any = lambda: None  # noqa: E731
    for label, prepare, action in [
        ("cold miss, msgpack", nothing, lambda: packed("p-001")),
        ("hit, msgpack", nothing, lambda: packed("p-001")),
        ("cold miss, hash", nothing, lambda: hashed("p-001")),
        ("hit, hash", nothing, lambda: hashed("p-001")),
        ("update_field", nothing, lambda: hashed.update_field("p-001", "stock", "40")),
        ("invalidate", nothing, lambda: hashed.invalidate("p-001")),
        ("hit, refresh_ahead", lambda: ahead("p-001"), lambda: ahead("p-001")),
        ("negative hit", lambda: packed("missing"), lambda: packed("missing")),
        ("many() of 100, cold, batch_loader", nothing, lambda: batched.many(hundred)),
        ("many() of 100, all hits", nothing, lambda: batched.many(hundred)),
        ("invalidate_many() of 100", nothing, lambda: batched.invalidate_many(hundred)),
        ("invalidate_all(), 100 entries", lambda: batched.many(hundred), batched.invalidate_all),
    ]:
        prepare()
        sent, ran = measure(client, action)
        table.rows.append([label, sent, ran])
    table.notes = [note, "a cold miss is: lookup, lock-and-look script, store script"]
    memory = Table("bytes per cached record (MEMORY USAGE)", ["storage", "bytes", "payload bytes"])
    memory.rows.append(
        [
            "cached_aside msgpack",
            client.memory_usage(packed.key("p-001")),
            len(client.get(packed.key("p-001")) or b""),
        ]
    )
    hashed("p-001")
    memory.rows.append(
        [
            "cached_aside hash (8 fields + 1 reserved)",
            client.memory_usage(hashed.key("p-001")),
            sum(len(k) + len(v) for k, v in client.hgetall(hashed.key("p-001")).items()),
        ]
    )
    plain_key = "bench:{plain:p-001}"  # as long as the others, so only the value differs
    client.set(plain_key, msgpack.packb(RECORD))
    memory.rows.append(
        ["plain msgpack string, no ttl", client.memory_usage(plain_key), len(msgpack.packb(RECORD))]
    )
    memory.notes = [f"record: {len(RECORD)} short str fields"]
    return [table, memory]
