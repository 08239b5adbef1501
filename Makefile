# Two commands matter: `make serve` (embedded backend) and `make test` (the whole suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
MODELS := model_repository/.complete

.PHONY: setup models serve test test-inprocess stack bench bench-quick loadtest system-deps clean
HOST ?= http://127.0.0.1:8000

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

## setup: create the virtual environment with every dependency
setup: $(INSTALLED)

## models: train the demo models if needed (cached), export both Triton repositories
$(MODELS): $(INSTALLED)
	$(PY) -m training
	$(PY) -m export all --weights demo
	touch $@
models: $(MODELS)

## system-deps: Debian packages the tests and the stack run (prometheus, chromium)
system-deps:
	scripts/system-deps.sh

## serve: start the gateway with the embedded backend on http://127.0.0.1:8000
serve: $(MODELS)
	$(PY) -m service

## test: the whole suite against real servers
test: $(MODELS) system-deps
	$(PY) -m pytest

## test-inprocess: only the in-process tier (no Ray, Triton, Prometheus or browser; see tests/conftest.py)
test-inprocess: $(MODELS)
	$(PY) -m pytest -m "not live"

## stack: the compose services without Docker (tritonserver on CPU, gateway in Triton mode, Prometheus)
stack: $(MODELS) system-deps
	$(PY) -m stack

## bench: throughput/latency against baselines, written to loadtests/out/
bench: $(MODELS)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m loadtests.bench

## bench-quick: every system and model at one load level (a few minutes), to compare a change side by side
bench-quick: $(MODELS)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m loadtests.bench --quick --systems embedded,embedded-proxy,embedded-deployments,embedded-onnxruntime,triton,handwritten,litserve,litserve-onnxruntime

## loadtest: 60 s of headless Locust against a running gateway (HOST=...), reports in loadtests/out/
loadtest: $(INSTALLED)
	mkdir -p loadtests/out
	$(PY) -m locust -f loadtests/locustfile.py --host $(HOST) --headless -u 8 -r 4 --run-time 60s \
		--csv loadtests/out/locust --html loadtests/out/locust.html

clean:
	rm -rf build model_repository/*/ $(MODELS)
