# make run  - set up, seed demo data, serve the API + worker on 127.0.0.1:8080
# make test - set up, install Azurite, run ruff, mypy and the whole pytest suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PATIENTS ?= 200
HOST ?= 127.0.0.1
PORT ?= 8080
SIZE ?= 100000
BENCH_ARGS ?=

.PHONY: run test setup lint typecheck pytest clean bench

$(BIN)/exportsvc: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=25.1"
	$(BIN)/pip install -q -e . --group dev
	touch $@

node_modules/.package-lock.json: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

setup: $(BIN)/exportsvc

run: setup
	$(BIN)/exportsvc seed --patients $(PATIENTS) --if-empty
	EXPORTSVC_AUTH=$${EXPORTSVC_AUTH:-off} $(BIN)/exportsvc serve --host $(HOST) --port $(PORT)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup node_modules/.package-lock.json
	$(BIN)/pytest

test: lint typecheck pytest

bench: setup node_modules/.package-lock.json
	$(BIN)/python bench/run.py --size $(SIZE) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) node_modules .exportsvc .pytest_cache .mypy_cache .ruff_cache
