"""Running the code the documentation shows: the text between a page's snippet
markers, its fenced blocks, and a script made from one, run as a reader would run it
against the test Redis under a key prefix of its own (deleted afterwards)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import redis

from .conftest import REDIS_URL, delete_prefix


def marked(path: Path, name: str) -> str:
    """The text between `path`'s snippet markers of that name."""
    found = re.search(
        rf"<!-- --8<-- \[start:{name}\] -->\n(.*?)<!-- --8<-- \[end:{name}\] -->",
        path.read_text(encoding="utf-8"),
        re.DOTALL,
    )
    assert found, f"{path.name} has no section marked {name!r}"
    return found.group(1)


def fenced(text: str, language: str) -> str:
    """The body of the one fenced code block of that language in `text`."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```$", text, re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1, f"expected one ```{language} block, found {len(blocks)}"
    return str(blocks[0])


def run_documented(
    tmp_path: Path,
    code: str,
    placeholder: str,
    with_prefix: Callable[[str], str],
    inspect: Callable[[redis.Redis, str], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `code` with its one `placeholder` (the example's own prefix) replaced by
    `with_prefix(prefix)`, a prefix of the test's own, against REDIS_URL. `inspect`
    looks at Redis (client, prefix) before the prefix's keys are deleted."""
    assert code.count(placeholder) == 1, f"the example should hold {placeholder!r} once"
    prefix = f"t-doc-{uuid.uuid4().hex[:12]}"
    script = tmp_path / "example.py"
    script.write_text(code.replace(placeholder, with_prefix(prefix)), encoding="utf-8")
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("CACHED_ASIDE_REDIS_URL", "DJANGO_SETTINGS_MODULE")
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
        if inspect is not None and completed.returncode == 0:
            inspect(client, prefix)
        return completed
    finally:
        delete_prefix(client, prefix)
        client.close()
