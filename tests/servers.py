"""redis-server processes of the tests' own, on free ports, stopped by PID: for what
fakeredis and a shared server cannot do (kill, pause, restart, clusters)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

REDIS_SERVER = shutil.which("redis-server")


_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never the same twice in one test run (a port just
    released can be handed out again, and a cluster needs several at once)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        # Cluster nodes also listen on port + 10000 (the bus); keep both free.
        if port not in _handed_out and port + 10000 < 65536:
            _handed_out.add(port)
            return port


class RedisProcess:
    """One redis-server we own: start, SIGKILL, SIGSTOP/SIGCONT, restart on its port."""

    def __init__(self, *extra: str, tls: bool = False) -> None:
        assert REDIS_SERVER is not None, "redis-server is not on PATH"
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="cached_aside_redis_"))
        self.extra = extra
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None
        if tls:  # a self-signed certificate for 127.0.0.1, its own CA
            subprocess.run(
                [
                    "openssl",
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "1",
                    "-keyout",
                    str(self.directory / "key.pem"),
                    "-out",
                    str(self.ca_file),
                    "-subj",
                    "/CN=127.0.0.1",
                    "-addext",
                    "subjectAltName=IP:127.0.0.1",
                ],
                check=True,
                capture_output=True,
            )

    @property
    def ca_file(self) -> Path:
        return self.directory / "cert.pem"

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        assert REDIS_SERVER is not None
        ports = ["--port", str(self.port)]
        if self.tls:
            ports = [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-auth-clients",
                "no",
                "--tls-cert-file",
                str(self.ca_file),
                "--tls-key-file",
                str(self.directory / "key.pem"),
                "--tls-ca-cert-file",
                str(self.ca_file),
            ]
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                *ports,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                self.admin().ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.02)

    def admin(self) -> redis.Redis:
        """A plain client for the test itself (over TLS when the server speaks TLS)."""
        if self.tls:
            return redis.Redis(
                host="127.0.0.1",
                port=self.port,
                socket_connect_timeout=0.5,
                ssl=True,
                ssl_ca_certs=str(self.ca_file),
            )
        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)

    def kill(self) -> None:
        """SIGKILL: the server vanishes, with everything it held."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


class RedisClusterProcesses:
    """A Redis Cluster of our own: `masters` masters (and `replicas` each), on free
    ports in temporary directories, joined with redis-cli, stopped by PID."""

    def __init__(self, masters: int = 3, replicas: int = 0) -> None:
        self.nodes = [
            RedisProcess(
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                # A replica that never finished its first sync cannot be promoted.
                "--repl-diskless-sync-delay",
                "0",
            )
            for _ in range(masters * (1 + replicas))
        ]
        self.replicas = replicas

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> RedisClusterProcesses:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while any(
            b"cluster_state:ok" not in node.admin().execute_command("CLUSTER", "INFO")
            for node in self.nodes
        ):
            if time.monotonic() > deadline:
                raise TimeoutError("the cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        while not all(self._in_sync(node) for node in self.nodes):
            if time.monotonic() > deadline:
                raise TimeoutError("the replicas did not finish their first sync")
            time.sleep(0.1)
        return self

    @staticmethod
    def _in_sync(node: RedisProcess) -> bool:
        """A master, or a replica whose link to its master is up."""
        info = node.admin().info("replication")
        return info["role"] == "master" or info.get("master_link_status") == "up"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
