"""The tests' map (tests/README.md) cannot rot: every test file is listed in it, and
every file it lists exists."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_every_test_file_is_on_the_map_and_every_file_on_it_exists() -> None:
    listed = set(re.findall(r"\b(test_\w+\.py)\b", (TESTS / "README.md").read_text("utf-8")))
    present = {path.name for path in TESTS.glob("test_*.py")}
    assert present - listed == set(), "test files missing from tests/README.md"
    assert listed - present == set(), "tests/README.md lists files that do not exist"
