"""The databases the integrations' tests run on: a SQLite file, and PostgreSQL
(CACHED_ASIDE_TEST_POSTGRES_URL, by default the local server's database `test`),
each test in a schema of its own, created and dropped here; no database is ever
created or dropped."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

POSTGRES_URL = os.environ.get("CACHED_ASIDE_TEST_POSTGRES_URL", "postgresql://127.0.0.1:5432/test")
# The integrations' test files run on this one unless a test is parametrized over
# both (Django's settings are configured once per process): sqlite or postgresql.
DATABASE = os.environ.get("CACHED_ASIDE_TEST_DATABASE", "sqlite")


@cache
def postgres_missing() -> str | None:
    """Why PostgreSQL cannot be used here (None: it can)."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]')"
    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return f"no PostgreSQL at {POSTGRES_URL}: {exc}"


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A schema of a random name in the test database, dropped afterwards with all
    it holds."""
    import psycopg
    from psycopg import sql

    name = f"cached_aside_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as connection:
            connection.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def sqlalchemy_url() -> str:
    """POSTGRES_URL for SQLAlchemy's psycopg dialect (sync and async alike)."""
    return POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1)
