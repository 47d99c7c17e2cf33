"""Figures in the docs, read from a committed benchmark results file, never typed.

The docs build (this module is an MkDocs hook, see mkdocs.yml) renders
`{{ table: TITLE }}`, `{{ value: TITLE | ROW | COLUMN }}` and `{{ machine }}` from
benchmarks/results/reference.json (`{{ machine: SECTION }}`: the run a section merged
with `--merge` came from; a table of such a section is rendered with that line); the
README, which GitHub shows unbuilt, holds its figures between `<!-- value: ... -->` and
`<!-- /value -->`, and tests/test_figures.py fails when one differs from the file.
`python -m benchmarks.figures --write README.md docs/*.md` rewrites those after a new
run (`python -m benchmarks --json benchmarks/results/reference.json`). Standard
library only: the docs build imports it.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

REFERENCE = Path(__file__).resolve().parent / "results" / "reference.json"

# {{ table: sync hit, msgpack record }}  /  {{ value: TITLE | contender=x; tasks=200 | ratio }}
PLACEHOLDER = re.compile(r"\{\{\s*(table|value|machine)\s*(?::\s*(.*?))?\s*\}\}", re.DOTALL)
# <!-- value: TITLE | ROW | COLUMN -->0.88<!-- /value --> (the README: shown unbuilt)
SPAN = re.compile(r"<!-- value: (.*?) -->(.*?)<!-- /value -->", re.DOTALL)


class FigureError(LookupError):
    """A placeholder names a table, row or column the results file does not hold."""


def load(path: Path = REFERENCE) -> dict[str, Any]:
    """The results file `python -m benchmarks --json` wrote."""
    results: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return results


def run_of(results: dict[str, Any], section: str | None = None) -> dict[str, Any]:
    """The run `section`'s tables came from: its own when it was merged into the file
    (`python -m benchmarks --merge`), else the file's."""
    runs: dict[str, Any] = results.get("runs", {})
    if section is None or section not in runs:
        if section is not None and section not in results.get("sections", []):
            raise FigureError(f"no section {section!r} in the results file")
        return results
    return dict(runs[section])


def machine(results: dict[str, Any], section: str | None = None) -> str:
    """One line: where and with what the figures (of `section`) were measured."""
    run_ = run_of(results, section)
    about = run_["environment"]
    hiredis = f", hiredis {about['hiredis']}" if about.get("hiredis") else ", no hiredis"
    run = "a quick run (`--quick`)" if run_.get("quick") else "a full run"
    codecs = "".join(
        f"{name} {about[name]}, " for name in ("msgspec", "pydantic") if about.get(name)
    )
    return (
        f"{about['date']}, {run} on {about['cpus']} CPUs ({about['machine']}, "
        f"{about['cpu']}) shared with other work: Python {about['python']}, redis-py "
        f"{about['redis_py']}{hiredis}, msgpack {about['msgpack']}, {codecs}"
        f"{about['server']} {about['server_version']} on the same machine"
    )


def _table(results: dict[str, Any], title: str) -> dict[str, Any]:
    """The table titled `title`, else the one table whose title starts with it (some
    titles name the run's counts, which --quick changes)."""
    tables = results["tables"]
    found = [t for t in tables if t["title"] == title] or [
        t for t in tables if t["title"].startswith(title)
    ]
    if len(found) != 1:
        raise FigureError(f"{len(found)} tables titled {title!r} in the results file, not one")
    return dict(found[0])


def _format(cell: object) -> str:
    if isinstance(cell, bool) or cell is None:
        return "" if cell is None else str(cell)
    if isinstance(cell, int):
        return f"{cell:,}"
    if isinstance(cell, float):
        return f"{cell:,.3f}" if abs(cell) < 10 and cell != int(cell) else f"{cell:,.1f}"
    return str(cell).replace("|", "\\|")


def table(results: dict[str, Any], title: str) -> str:
    """A results table as a Markdown table, its notes below it."""
    found = _table(results, title)
    rows = found["rows"]
    if not rows:
        raise FigureError(f"table {title!r} has no rows")
    columns = list(rows[0])
    lines = [
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    lines += ["| " + " | ".join(_format(row.get(c)) for c in columns) + " |" for row in rows]
    notes = [f"- {note}" for note in found["notes"]]
    if found.get("section") in results.get("runs", {}):
        notes.append(f"- measured in a run of its own: {machine(results, found['section'])}")
    return "\n".join(lines + (["", *notes] if notes else []))


def value(results: dict[str, Any], spec: str) -> str:
    """One cell: `TITLE | column=value; column=value | COLUMN`."""
    try:
        title, where, column = (part.strip() for part in spec.split("|"))
    except ValueError:
        raise FigureError(f"a value is 'TITLE | ROW | COLUMN', got {spec!r}") from None
    wanted = {
        name.strip(): text.strip()
        for name, _, text in (pair.partition("=") for pair in where.split(";") if pair.strip())
    }
    matches = [
        row
        for row in _table(results, title)["rows"]
        if all(str(row.get(name)) == text for name, text in wanted.items())
    ]
    if len(matches) != 1:
        raise FigureError(f"{len(matches)} rows of {title!r} match {where!r}, not one")
    if column not in matches[0]:
        raise FigureError(f"table {title!r} has no column {column!r}")
    return _format(matches[0][column])


def render(text: str, results: dict[str, Any]) -> str:
    """`text` with every placeholder replaced and every span's figure refreshed."""

    def placeholder(match: re.Match[str]) -> str:
        kind, argument = match.group(1), (match.group(2) or "").strip()
        if kind == "machine":
            return machine(results, argument or None)
        if kind == "table":
            return table(results, argument)
        return value(results, argument)

    text = PLACEHOLDER.sub(placeholder, text)
    return SPAN.sub(
        lambda m: f"<!-- value: {m.group(1)} -->{value(results, m.group(1))}<!-- /value -->",
        text,
    )


def stale(text: str, results: dict[str, Any]) -> list[str]:
    """The spans of `text` whose figure differs from the results file."""
    return [
        f"{m.group(1)}: {m.group(2)!r}, the results file says {value(results, m.group(1))!r}"
        for m in SPAN.finditer(text)
        if m.group(2) != value(results, m.group(1))
    ]


def on_page_markdown(markdown: str, **_: Any) -> str:
    """The MkDocs hook (mkdocs.yml `hooks:`): render each page's figures at build; a
    placeholder the results file cannot fill fails the build."""
    return render(markdown, load()) if "{{" in markdown or "<!-- value:" in markdown else markdown


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.figures", description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--results", type=Path, default=REFERENCE)
    parser.add_argument("--write", action="store_true", help="refresh the spans in place")
    args = parser.parse_args()
    results = load(args.results)
    found = False
    for path in args.files:
        text = path.read_text(encoding="utf-8")
        for line in stale(text, results):
            print(f"{path}: {line}")
            found = True
        if args.write:
            refreshed = SPAN.sub(
                lambda m: (
                    f"<!-- value: {m.group(1)} -->{value(results, m.group(1))}<!-- /value -->"
                ),
                text,
            )
            path.write_text(refreshed, encoding="utf-8")
    if found and not args.write:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
