# specserve: `make serve` (setup + demo model + serve on 127.0.0.1:8000) and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
# The demo model with Hydra heads (its drafter with the highest acceptance: docs/benchmarks.md), structured
# outputs and tool calls on. `make serve SERVE_ARGS=` serves it without a drafter.
SERVE_ARGS ?= --drafter hydra
PYTEST_ARGS ?=

export VLLM_TARGET_DEVICE ?= cpu
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1

.PHONY: setup tools demo-model serve test test-unit test-integration test-e2e bench clean

setup:
	@bash scripts/setup.sh

# helm, prometheus and docker compose for the deployment tests (idempotent).
tools:
	@bash scripts/install-tools.sh >/dev/null

demo-model: setup
	$(PY) -m specserve.cli demo-model

serve: setup demo-model
	$(PY) -m specserve.cli serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

test: setup tools demo-model
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-unit: setup tools
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: setup demo-model
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

test-e2e: setup tools demo-model
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

clean:
	rm -rf .pytest_cache .hypothesis build *.egg-info
