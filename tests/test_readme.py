"""The README's quick start runs as written and prints what the README says it prints;
the README's links lead to files in the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from .conftest import REDIS_URL

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
# The quick start's own configure() call: the test swaps in a prefix of its own.
CONFIGURE = 'configure(prefix="quickstart")'


def section(name: str) -> str:
    """The text between the README's snippet markers of that name (the docs include
    the same sections, so what is tested here is also what the docs show)."""
    found = re.search(
        rf"<!-- --8<-- \[start:{name}\] -->\n(.*?)<!-- --8<-- \[end:{name}\] -->",
        README,
        re.DOTALL,
    )
    assert found, f"README.md has no section marked {name!r}"
    return found.group(1)


def fenced(text: str, language: str) -> str:
    """The body of the one fenced code block of that language in `text`."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```$", text, re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1, f"expected one ```{language} block, found {len(blocks)}"
    return str(blocks[0])


def test_the_quick_start_comes_right_after_its_heading() -> None:
    after_heading = README.split("\n## Quick start\n", 1)[1]
    first_block = fenced(after_heading.split("\n## ", 1)[0], "python")
    assert first_block == fenced(section("quickstart"), "python")


@pytest.mark.skipif(REDIS_URL is None, reason="no Redis server reachable")
def test_the_quick_start_runs_as_written(tmp_path: Path) -> None:
    code = fenced(section("quickstart"), "python")
    expected = fenced(section("quickstart-output"), "text")
    assert code.count(CONFIGURE) == 1, "the quick start should call configure() once"
    prefix = f"t-readme-{uuid.uuid4().hex[:12]}"
    script = tmp_path / "quickstart.py"
    script.write_text(code.replace(CONFIGURE, f'configure(prefix="{prefix}")'))
    environment = {
        key: value for key, value in os.environ.items() if key != "CACHED_ASIDE_REDIS_URL"
    }
    environment["REDIS_URL"] = REDIS_URL or ""
    client = redis.Redis.from_url(REDIS_URL or "")
    try:
        completed = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=60,
            env=environment,
            cwd=tmp_path,
            check=False,
        )
        assert completed.returncode == 0, completed.stderr
        assert completed.stdout == expected
        assert completed.stderr == ""  # no Redis error was logged (nothing failed open)
        # The values went through Redis: the entries are there, under the given prefix.
        product = client.hgetall(f"{prefix}:{{product:p-001}}")
        assert product[b"stock"] == b"40"
        assert client.exists(f"{prefix}:{{user:7:orders}}")
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.unlink(*keys)
        client.close()


def test_the_readme_links_stay_in_the_repository() -> None:
    targets = re.findall(r"\]\(([^)\s]+)\)", README)
    assert targets, "the README links into docs/"
    for target in targets:
        assert "://" not in target, f"{target}: link to a file of the repository instead"
        path = target.split("#", 1)[0]
        assert (ROOT / path).exists(), f"README.md links to {target}, which does not exist"
