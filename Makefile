# The habits: make test, make lint, make bench.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv lint format test bench bench-quick demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,demo,bench,prometheus]'
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict cached_aside tests/typing_checks.py

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest

demo: venv
	$(BIN)/python examples/demo_server.py $(DEMO_ARGS)

bench: venv
	$(BIN)/python -m benchmarks --chart benchmarks/hit_path.png

bench-quick: venv
	$(BIN)/python -m benchmarks --quick
