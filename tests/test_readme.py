"""The README's quick start runs as written and prints what the README says it prints;
the README's links lead to files in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis

from .conftest import REDIS_URL
from .documented import fenced, marked, run_documented

ROOT = Path(__file__).resolve().parent.parent
README_PATH = ROOT / "README.md"
README = README_PATH.read_text(encoding="utf-8")
# The quick start's own configure() call: the test swaps in a prefix of its own.
CONFIGURE = 'configure(prefix="quickstart")'


def section(name: str) -> str:
    """The text between the README's snippet markers of that name (the docs include
    the same sections, so what is tested here is also what the docs show)."""
    return marked(README_PATH, name)


def test_the_quick_start_comes_right_after_its_heading() -> None:
    after_heading = README.split("\n## Quick start\n", 1)[1]
    first_block = fenced(after_heading.split("\n## ", 1)[0], "python")
    assert first_block == fenced(section("quickstart"), "python")


@pytest.mark.skipif(REDIS_URL is None, reason="no Redis server reachable")
def test_the_quick_start_runs_as_written(tmp_path: Path) -> None:
    def went_through_redis(client: redis.Redis, prefix: str) -> None:
        # The values went through Redis: the entries are there, under the given prefix.
        product = client.hgetall(f"{prefix}:{{product:p-001}}")
        assert product[b"stock"] == b"40"
        assert client.exists(f"{prefix}:{{user:7:orders}}")

    completed = run_documented(
        tmp_path,
        fenced(section("quickstart"), "python"),
        CONFIGURE,
        lambda prefix: f'configure(prefix="{prefix}")',
        inspect=went_through_redis,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == fenced(section("quickstart-output"), "text")
    assert completed.stderr == ""  # no Redis error was logged (nothing failed open)


def test_the_readme_links_stay_in_the_repository() -> None:
    targets = re.findall(r"\]\(([^)\s]+)\)", README)
    assert targets, "the README links into docs/"
    for target in targets:
        assert "://" not in target, f"{target}: link to a file of the repository instead"
        path = target.split("#", 1)[0]
        assert (ROOT / path).exists(), f"README.md links to {target}, which does not exist"
