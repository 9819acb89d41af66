# Longhaul — every command a user or CI runs. The venv is built once and reused; the stamp
# file makes a second `make test` skip installation unless pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STORE ?= models
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv test lint fmt models serve bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, exact version: anything looser pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

fmt: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint
	$(PY) -m pytest

# The demo store: checkpoints are trained once (cached in checkpoints/), exports are skipped when
# already published, so a second `make models` only verifies.
models: $(STAMP)
	$(PY) -m exporters demo-store --checkpoints checkpoints --store $(STORE)
	$(PY) -m model_store verify $(STORE)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
