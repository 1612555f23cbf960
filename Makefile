# tiergate — `make run` and `make test` set everything up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8000

.DEFAULT_GOAL := help
.PHONY: help install lock run test lint typecheck check bench-overhead bench-sim bench-affinity bench-routing bench-failover \
	bench-accounting bench-reload bench-hardening bench-windows bench-peers clean

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  %-16s %s\n", $$1, $$2}'

LOCK := requirements.lock

# Python and PyPI only. The dashboard's browser test finds or installs its own chromium.
# Every dependency (with the dev and tracing extras) comes pinned, with hashes, from $(LOCK): a fresh
# machine gets the versions the suite passed with. `make lock` re-resolves them from pyproject.toml.
$(STAMP): pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r $(LOCK)
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP) ## create .venv and install tiergate with dev tools, from the lock

lock: ## re-resolve every dependency (dev and tracing extras) into requirements.lock, pinned with hashes
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q pip-tools
	$(BIN)/pip-compile -q --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links --extra dev --extra tracing \
		-o $(LOCK) pyproject.toml

run: $(STAMP) ## start tiergate on http://127.0.0.1:$(PORT) with embedded valkey and simulated Qwen3 tiers
	$(BIN)/tiergate serve --port $(PORT)

test: $(STAMP) ## run the whole test suite (real valkey/redis, simulator over sockets)
	$(BIN)/python -m pytest

lint: $(STAMP) ## ruff
	$(BIN)/ruff check router backends policies tests bench

typecheck: $(STAMP) ## mypy --strict on router, backends, policies
	$(BIN)/mypy

check: lint typecheck test ## lint, typecheck and test

bench-overhead: $(STAMP) ## router overhead vs direct (bench/overhead.py)
	$(BIN)/python bench/overhead.py

bench-peers: $(STAMP) ## tiergate vs sglang-router, vllm-router, aiohttp pass-through, nginx, direct (bench/peers.py)
	$(BIN)/pip install -q -e ".[dev,bench]"
	$(BIN)/python bench/peers.py

bench-affinity: $(STAMP) ## prefix affinity vs round robin, least-loaded, sglang-router (bench/affinity.py)
	$(BIN)/pip install -q -e ".[dev,bench]"
	$(BIN)/python bench/affinity.py
	$(BIN)/python bench/affinity_memory.py

bench-sim: $(STAMP) ## simulator calibration table (bench/sim_calibration.py)
	$(BIN)/python bench/sim_calibration.py

bench-routing: $(STAMP) ## routing quality: cost and SLO attainment per policy (bench/routing_quality.py)
	$(BIN)/python bench/routing_quality.py --seconds 60

bench-failover: $(STAMP) ## kill 1 of 2 instances under 64 clients (bench/failover.py)
	$(BIN)/python bench/failover.py --seconds 20

bench-accounting: $(STAMP) ## admission exactness and admit/settle cost (bench/accounting.py)
	$(BIN)/python bench/accounting.py

bench-reload: $(STAMP) ## policy hot reload under load (bench/policy_reload.py)
	$(BIN)/python bench/policy_reload.py --seconds 20

bench-hardening: $(STAMP) ## hostile clients and broken backends against tiergate serve (bench/hardening.py)
	$(BIN)/python bench/hardening.py

bench-windows: $(STAMP) ## admission windows off vs on by replay: mixed load, fairness (bench/windows_replay.py)
	$(BIN)/python bench/windows_replay.py --requests 20000 --rate 160 --only mixed
	$(BIN)/python bench/windows_replay.py --only fairness --fair-requests 11000 --fair-rate 400

clean: ## remove the venv and local data
	rm -rf $(VENV) .tiergate .pytest_cache .mypy_cache .ruff_cache
