"""The documentation site builds strictly: a broken link, anchor or API reference (a
renamed method, a removed class) fails the suite, not only `make docs`. And every
Python snippet of the docs and README runs as written in a test, or says it is a
fragment."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from .conftest import REDIS_URL, delete_prefix

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")


@pytest.mark.slow
def test_the_docs_build_strictly(tmp_path: Path) -> None:
    site = tmp_path / "site"
    completed = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,  # the README snippets are included relative to the repository root
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    # The overview includes the README's quick start (the one tests/test_readme.py runs).
    overview = (site / "index.html").read_text(encoding="utf-8")
    assert "save_product" in overview
    assert "primary reads: 1" in overview
    # The API reference was rendered from the docstrings, not left as ::: directives.
    engine = (site / "reference" / "engine" / "index.html").read_text(encoding="utf-8")
    for method in ("client", "async_client", "settle", "asettle", "pending_invalidations"):
        assert f'id="cached_aside.CacheEngine.{method}"' in engine, method
    assert ":::" not in engine
    functions = (site / "reference" / "functions" / "index.html").read_text(encoding="utf-8")
    assert 'id="cached_aside.CachedFunction.update_field"' in functions
    assert 'id="cached_aside.BoundAsyncCachedFunction.invalidate"' in functions


# Every ```python block of the README and docs/ says what checks it, on the line(s)
# before its fence: `<!-- snippet: run -->` (run below, as written, against Redis under
# a prefix of its own), `<!-- snippet: tests/test_x.py -->` (run by that test, which
# names the page), or `<!-- snippet: fragment -->` (needs names from the text around it).
SNIPPET_MARK = re.compile(r"<!-- snippet: (run|fragment|tests/[\w/]+\.py)\b[^>]*-->")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(path: Path) -> list[tuple[int, str | None, str]]:
    """(line, mark or None, code) of each ```python block of a page."""
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks = []
    for number, line in enumerate(lines):
        if line != "```python":
            continue
        mark = None
        before = number - 1
        while before >= 0 and (not lines[before].strip() or lines[before].startswith("<!--")):
            found = SNIPPET_MARK.search(lines[before])
            mark = mark or (found.group(1) if found else None)
            before -= 1
        end = lines.index("```", number + 1)
        blocks.append((number + 1, mark, "\n".join(lines[number + 1 : end]) + "\n"))
    return blocks


SNIPPETS = [(path, *block) for path in PAGES for block in python_blocks(path)]
RUN = [(path, line, code) for path, line, mark, code in SNIPPETS if mark == "run"]


def test_every_python_block_is_run_or_marked_as_a_fragment() -> None:
    unmarked = [f"{p.relative_to(ROOT)}:{line}" for p, line, mark, _ in SNIPPETS if mark is None]
    assert not unmarked, f"mark these with <!-- snippet: run|fragment|tests/... -->: {unmarked}"
    assert len(RUN) >= 8  # the checker found the blocks (a broken regex finds none)
    for path, line, mark, _ in SNIPPETS:
        if mark not in (None, "run", "fragment"):
            test = ROOT / str(mark)
            assert test.is_file(), f"{path.name}:{line} names {mark}, which does not exist"
            page = path.relative_to(ROOT)
            text = test.read_text(encoding="utf-8")
            assert path.name in text or path.stem in text or str(page) in text, (
                f"{mark} should run {page}:{line} but does not name the page"
            )


@pytest.mark.parametrize(
    ("path", "line", "code"),
    RUN,
    ids=[f"{path.relative_to(ROOT)}:{line}" for path, line, _ in RUN],
)
def test_a_runnable_snippet_runs_as_written(
    path: Path, line: int, code: str, tmp_path: Path
) -> None:
    if REDIS_URL is None:
        pytest.skip("no Redis server reachable at REDIS_URL or 127.0.0.1:6379")
    prefix = f"t-doc-{uuid.uuid4().hex[:12]}"
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("CACHED_ASIDE_REDIS_URL", "CACHED_ASIDE_PREFIX")
    }
    environment.update(REDIS_URL=REDIS_URL, CACHED_ASIDE_PREFIX=prefix, PYTHONPATH=str(ROOT))
    client = redis.Redis.from_url(REDIS_URL)
    try:
        completed = subprocess.run(
            [sys.executable, "-W", "error", str(script)],
            capture_output=True,
            text=True,
            timeout=60,
            env=environment,
            cwd=tmp_path,
            check=False,
        )
        assert completed.returncode == 0, completed.stdout + completed.stderr
    finally:
        delete_prefix(client, prefix)
        client.close()
