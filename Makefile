# pear_mqtt — developer and operator commands. `make help` lists them.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help venv needs cluster-deps test test-standalone unit integration lint up status logs down bench \
	bench-quick images container-test faults soak privacy clean

help:
	@echo "make up        bring up the topology (brokers, bridge, simulated agents)"
	@echo "make status    exit 0 only when everything is healthy"
	@echo "make logs      tail the logs of the running topology"
	@echo "make down      stop everything make up started"
	@echo "make test      create .venv, install (mosquitto too, when root/sudo), run the whole suite"
	@echo "make test-standalone  unit tests + the embedded amqtt broker tests: Python only"
	@echo "make lint      ruff + mypy --strict"
	@echo "make bench     benchmarks vs raw paho and mosquitto's C clients (bench-quick: ~1 min)"
	@echo "make container-test  the suite against brokers in containers (starts dockerd)"
	@echo "make faults    fault injection (CI subset, ~3 min) -> docs/RELIABILITY.md"
	@echo "make soak      fault injection incl. the long scenarios (~10 min) -> docs/RELIABILITY.md"
	@echo "make privacy   a member's attacks on every privacy policy (~1 min) -> docs/PRIVACY.md"

# A half-made .venv (an interrupted install, a Python that moved) is made again, not fatal.
$(STAMP): pyproject.toml
	@$(BIN)/python -c 'import pip' >/dev/null 2>&1 || { rm -rf $(VENV); \
		$(PY) -m venv $(VENV) || { echo "cannot create $(VENV): install Python >= 3.11 with venv (Debian: apt-get install python3-venv)" >&2; rm -rf $(VENV); exit 1; }; }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,dev,market,broker,cluster]'
	@touch $(STAMP)

venv: $(STAMP)

# System packages (Debian's mosquitto): installed when missing and allowed, else one line.
needs:
	@bash deploy/bootstrap.sh

# The clustered broker's npm packages, pinned by deploy/cluster/package-lock.json.
CLUSTER_STAMP := deploy/cluster/node_modules/.package-lock.json

$(CLUSTER_STAMP): deploy/cluster/package-lock.json $(STAMP)
	$(BIN)/pear-mqtt cluster install

cluster-deps: $(CLUSTER_STAMP)

# The suite also drives Debian's chromium (the dashboard's browser test) and runs the
# clustered broker (redis-server, and aedes on the Node.js of the `cluster` extra).
test: $(STAMP) $(CLUSTER_STAMP)
	@PEAR_NEEDS="chromium chromium-driver" bash deploy/bootstrap.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# No system package needed: unit tests and the broker tests on the embedded amqtt broker.
STANDALONE_TESTS := tests/unit tests/integration/test_embedded.py \
	tests/integration/test_network_embedded.py

test-standalone: $(STAMP)
	$(BIN)/python -m pytest $(STANDALONE_TESTS) -m "not uses_broker" $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: needs $(STAMP) $(CLUSTER_STAMP)
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check pear_mqtt tests bench
	$(BIN)/mypy pear_mqtt bench

up: needs $(STAMP)
	$(BIN)/pear-mqtt up start

status: $(STAMP)
	$(BIN)/pear-mqtt up status

logs: $(STAMP)
	$(BIN)/pear-mqtt up logs

down: $(STAMP)
	$(BIN)/pear-mqtt up stop

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m bench --quick

images:
	bash deploy/images/build.sh

container-test: $(STAMP)
	bash .ci/containers.sh

# Fault scenarios (tests/integration/faults): counted results go to a fresh results file,
# rendered into docs/RELIABILITY.md. `make faults` is the CI subset (a few minutes); `make
# soak` adds the long scenarios (PEAR_SOAK=1, bounded to ~10 min). The report is rendered
# even when a scenario fails, so its figures show what went wrong; the exit status is the
# tests'.
FAULTS_RESULTS := .pear/faults/results.jsonl
# Fuzzed payloads per bulk hostile-input test (make test runs 10,000; the issue asks >= 100,000).
FUZZ_N ?= 100000

faults soak: needs $(STAMP)
	@mkdir -p $(dir $(FAULTS_RESULTS)) && rm -f $(FAULTS_RESULTS)
	@status=0; \
	PEAR_FAULTS_RESULTS=$(FAULTS_RESULTS) PEAR_FUZZ_N=$(FUZZ_N) $(if $(filter soak,$@),PEAR_SOAK=1) \
		$(BIN)/python -m pytest tests/integration/faults -p no:cacheprovider \
		--durations=10 $(PYTEST_ARGS) || status=$$?; \
	$(BIN)/python tests/support/faults_report.py $(FAULTS_RESULTS) \
		docs/RELIABILITY.md || status=$${status:-1}; \
	exit $$status

# Privacy attacks (tests/integration/privacy, also part of `make test`): what one member learns
# under every policy goes to a fresh results file, rendered into docs/PRIVACY.md even when an
# attack learns more than allowed (so the table shows it); the exit status is the tests'.
PRIVACY_RESULTS := .pear/privacy/results.jsonl

privacy: needs $(STAMP)
	@mkdir -p $(dir $(PRIVACY_RESULTS)) && rm -f $(PRIVACY_RESULTS)
	@status=0; \
	PEAR_PRIVACY_RESULTS=$(PRIVACY_RESULTS) $(BIN)/python -m pytest tests/integration/privacy \
		-p no:cacheprovider $(PYTEST_ARGS) || status=$$?; \
	$(BIN)/python tests/support/privacy_report.py $(PRIVACY_RESULTS) \
		docs/PRIVACY.md || status=$${status:-1}; \
	exit $$status

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
