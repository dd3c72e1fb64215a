# inferq: `make up` runs the whole stack, `make test` the test suite (embedded servers where
# INFERQ_TEST_DATABASE_URL / INFERQ_TEST_REDIS_URL are unset).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,dev]'
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/inferq up

# Lint first, so CI (which runs make test) holds the code to it.
test: lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy api workers shared

clean:
	rm -rf var .pytest_cache
