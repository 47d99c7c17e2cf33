"""Figures in the README and docs come from the committed benchmark results
(benchmarks/results/reference.json): a figure that differs from the file, a
placeholder the file cannot fill, or an absolute time typed by hand fails here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from benchmarks import figures

ROOT = Path(__file__).resolve().parent.parent
# The README and every page of the docs, the integrations' included.
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
# A time per call or a rate typed into the text: "33 µs", "61,306/s".
TYPED_FIGURE = re.compile(r"\d[\d.,]*\s?µs\b|\d,\d{3}/s\b")


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    return figures.load()


def test_the_results_file_records_where_and_with_what_it_was_measured(
    results: dict[str, Any],
) -> None:
    about = results["environment"]
    for name in ("python", "redis_py", "hiredis", "msgpack", "server", "server_version", "cpu"):
        assert about.get(name), name
    line = figures.machine(results)
    assert f"redis-py {about['redis_py']}" in line
    assert f"{about['server']} {about['server_version']}" in line


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_figure_of_a_page_is_the_results_files(page: Path, results: dict[str, Any]) -> None:
    text = page.read_text(encoding="utf-8")
    assert not figures.stale(text, results), "run python -m benchmarks.figures --write"
    rendered = figures.render(text, results)  # raises on a bad one
    assert "{{" not in rendered
    unrendered = figures.SPAN.sub("", figures.PLACEHOLDER.sub("", text))
    typed = TYPED_FIGURE.findall(unrendered)
    assert not typed, f"absolute figures typed by hand in {page.name}: {typed}"


def test_a_stale_figure_is_caught(results: dict[str, Any]) -> None:
    spec = "sync hit, msgpack record | contender=cached_aside (msgpack) | ratio"
    fresh = f"<!-- value: {spec} -->{figures.value(results, spec)}<!-- /value -->"
    assert figures.stale(fresh, results) == []
    assert figures.stale(fresh.replace("-->", "-->9", 1), results)
    with pytest.raises(figures.FigureError):
        figures.render("{{ table: no such section }}", results)


def test_the_performance_page_is_rendered_from_the_results(results: dict[str, Any]) -> None:
    text = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    rendered = figures.render(text, results)
    hit = figures.value(
        results, "sync hit, msgpack record | contender=cached_aside (msgpack) | ratio"
    )
    assert "| cached_aside (msgpack) | " in rendered
    assert f" | {hit} |" in rendered
    assert figures.machine(results) in rendered


def test_a_section_merged_from_another_run_names_that_run(results: dict[str, Any]) -> None:
    merged = {
        **results,
        "sections": [*results["sections"], "elsewhere"],
        "runs": {
            "elsewhere": {
                "machine": "x",
                "environment": {**results["environment"], "date": "1999-01-01"},
                "quick": True,
            }
        },
        "tables": [
            *results["tables"],
            {"title": "merged table", "rows": [{"a": 1}], "notes": [], "section": "elsewhere"},
        ],
    }
    line = figures.machine(merged, "elsewhere")
    assert line.startswith("1999-01-01, a quick run")
    assert figures.render("{{ machine: elsewhere }}", merged) == line
    assert line in figures.table(merged, "merged table")  # the table says where it came from
    assert figures.machine(merged) == figures.machine(results)  # the rest: the file's run
    with pytest.raises(figures.FigureError):
        figures.machine(merged, "never run")
