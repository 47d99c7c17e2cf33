"""The maps cannot rot: every test file is listed in tests/README.md and every file it
lists exists; every package module is in a layer of docs/architecture.md, every module
named there exists, and no module imports from a layer above its own."""

from __future__ import annotations

import re
from pathlib import Path

from .test_imports import import_graph

TESTS = Path(__file__).resolve().parent
ARCHITECTURE = TESTS.parent / "docs" / "architecture.md"
LAYER_ROW = re.compile(r"^\| (\d+)\. [^|]+\| ([^|]+) \|", re.MULTILINE)


def test_every_test_file_is_on_the_map_and_every_file_on_it_exists() -> None:
    listed = set(re.findall(r"\b(test_\w+\.py)\b", (TESTS / "README.md").read_text("utf-8")))
    present = {path.name for path in TESTS.glob("test_*.py")}
    assert present - listed == set(), "test files missing from tests/README.md"
    assert listed - present == set(), "tests/README.md lists files that do not exist"


def _unit(module: str) -> str:
    """How the architecture page names a module: `_flows`, `__init__`, `integrations/`."""
    parts = module.split(".")[1:]
    if not parts:
        return "__init__"
    return f"{parts[0]}/" if len(parts) > 1 or parts[0] in ("integrations", "demo") else parts[0]


def layers() -> dict[str, int]:
    """Each module the architecture page's layer table names, and its layer."""
    found: dict[str, int] = {}
    for number, modules in LAYER_ROW.findall(ARCHITECTURE.read_text("utf-8")):
        for name in re.findall(r"`([^`]+)`", modules):
            assert name not in found, f"{name} is in two layers of docs/architecture.md"
            found[name] = int(number)
    return found


def test_the_architecture_page_names_every_module_and_only_modules_that_exist() -> None:
    named = layers()
    present = {_unit(module) for module in import_graph()}
    assert len(named) > 40  # the table was found (a broken regex finds nothing)
    assert present - set(named) == set(), "modules missing from docs/architecture.md"
    assert set(named) - present == set(), "docs/architecture.md names modules that do not exist"


def test_imports_run_one_way_through_the_layers() -> None:
    layer = layers()
    upward = sorted(
        f"{module} (layer {layer[_unit(module)]}) imports {target} (layer {layer[_unit(target)]})"
        for module, targets in import_graph().items()
        for target in targets
        if layer[_unit(target)] > layer[_unit(module)]
    )
    assert upward == [], "docs/architecture.md: an import runs up a layer"
