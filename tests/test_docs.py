"""The documentation site builds strictly: a broken link, anchor or API reference (a
renamed method, a removed class) fails the suite, not only `make docs`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
