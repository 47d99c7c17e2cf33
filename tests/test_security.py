"""TLS and ACL users through the URL, against a redis-server of our own; and no
pickle anywhere in the package."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import cached_aside
from cached_aside import CacheEngine, Source, cache_aside

from .servers import REDIS_SERVER, RedisProcess, server_speaks_tls

pytestmark = pytest.mark.skipif(
    not server_speaks_tls() or shutil.which("openssl") is None,
    reason=f"needs a server built with TLS (not {REDIS_SERVER}) and openssl on PATH",
)


@pytest.fixture
def tls_server() -> Iterator[RedisProcess]:
    server = RedisProcess(tls=True).start()
    server.admin().execute_command("ACL", "SETUSER", "app", "on", ">s3cret", "~*", "+@all")
    yield server
    server.stop()


def url_with_user(server: RedisProcess, password: str) -> str:
    return server.url.replace("rediss://", f"rediss://app:{password}@")


async def test_rediss_url_with_an_acl_user(tls_server: RedisProcess) -> None:
    engine = CacheEngine.from_url(
        url_with_user(tls_server, "s3cret"), prefix="tls", ssl_ca_certs=str(tls_server.ca_file)
    )
    loads: list[str] = []

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    def read(id: str) -> str:
        loads.append(id)
        return id.upper()

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    async def read_async(id: str) -> str:
        loads.append(id)
        return id.upper()

    assert read("a") == "A"
    assert (await read_async.lookup("a")).source is Source.CACHE  # same entry, over TLS
    assert loads == ["a"]
    whoami = tls_server.admin().execute_command("CLIENT", "LIST")
    assert b"user=app" in whoami
    await engine.aclose()


def test_a_wrong_password_fails_open_and_is_counted(tls_server: RedisProcess) -> None:
    engine = CacheEngine.from_url(
        url_with_user(tls_server, "wrong"), prefix="tls", ssl_ca_certs=str(tls_server.ca_file)
    )

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    def read(id: str) -> str:
        return id.upper()

    assert read("a") == "A"  # answered by the loader
    assert read.stats().errors == 1
    assert "AuthenticationError" in read.error_kinds()
    engine.close()


def test_no_pickle_in_the_package() -> None:
    package = Path(cached_aside.__file__).parent
    sources = [path.read_text() for path in package.rglob("*.py")]
    assert not any("import pickle" in text or "pickle." in text for text in sources)
