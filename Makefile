# The habits: make test, make lint, make docs, make bench.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The demo needs only the library and the demo extra (fakeredis, for when no Redis
# answers): `make demo` on a fresh machine installs that much, not every extra.
DEMO_STAMP := $(VENV)/.installed-demo
# Material for MkDocs prints a banner about MkDocs 2.0 on every build; it is not ours.
export NO_MKDOCS_2_WARNING := 1

.PHONY: venv lint format test matrix docs docs-serve bench bench-quick instructions demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,demo,bench,prometheus,docs]'
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict cached_aside tests/typing_checks.py

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# --strict: a broken link, anchor or API reference fails the build.
docs: venv
	$(BIN)/python -m mkdocs build --strict --site-dir site

docs-serve: venv
	$(BIN)/python -m mkdocs serve --dev-addr 127.0.0.1:8001

# The suite on PYTEST_WORKERS processes (pytest-xdist), one test file per worker at a
# time: a file's servers (a cluster, Sentinels) stay in one process.
PYTEST_WORKERS ?= 2

test: lint docs
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[demo]'
	touch $(DEMO_STAMP)

# The compatibility matrix (noxfile.py): each cell, its pytest summary, and at the end
# every cell with its result. Cells' virtualenvs live in .nox and are reused.
matrix: venv
	$(BIN)/nox --no-color

demo: $(DEMO_STAMP)
	$(BIN)/python examples/demo_server.py $(DEMO_ARGS)

# bench: results.json, benchmarks/hit_path.png, and beside it concurrency.png and fleet.png;
# then the cost meter's check.
bench: venv
	$(BIN)/python -m benchmarks --chart benchmarks/hit_path.png
	$(BIN)/python -m benchmarks.instructions --check

# The cost meter (needs valgrind): instructions per call counted by callgrind, failing on
# a rise of more than 5% over benchmarks/results/instructions.json (--record rewrites it).
instructions: venv
	$(BIN)/python -m benchmarks.instructions --check

bench-quick: venv
	$(BIN)/python -m benchmarks --quick
