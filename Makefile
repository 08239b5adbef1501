# Two commands matter: `make serve` (embedded backend) and `make test` (the whole suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
MODELS := model_repository/.complete
# KServe's unmodified SDK for tests/oip/test_kserve_client.py, in a folder of its own: kserve 0.21 pins
# psutil<6, which the suite outgrew; the test puts this folder on its subprocess's PYTHONPATH only.
KSERVE := .kserve
KSERVE_SDK := kserve==0.21.0 aiohttp_retry==2.9.1 cloudevents==1.13.0 deprecation==2.1.0 durationpy==0.11 \
	grpc_interceptor==0.15.4 grpcio_tools==1.81.1 kubernetes==37.0.1 oauthlib==4.0.1 orjson==3.13.0 \
	pandas==2.3.3 pyjwt==2.15.1 pytz==2026.6 requests_oauthlib==2.0.0 tabulate==0.10.0 timing_asgi==0.3.2

.PHONY: setup models models-gpu serve serve-uvicorn serve-owner test test-inprocess stack bench bench-quick loadtest system-deps clean
HOST ?= http://127.0.0.1:8000
WORKERS ?= 4

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) scripts/install.py --kserve $(KSERVE) $(KSERVE_SDK)
	touch $@

## setup: create the virtual environment with every dependency
setup: $(INSTALLED)

## models: train the demo models if needed (cached), export both Triton repositories
# Edited code that decides the models or their repository (a pull, a checkout) reruns both: training
# reuses the cache when its key (code, config, libraries, CPU) is unchanged, export takes seconds.
$(MODELS): $(INSTALLED) $(wildcard training/*.py export/*.py tasks/*.py) service/buckets.py service/model_config.py
	$(PY) -m training
	$(PY) -m export all --weights demo
	touch $@
models: $(MODELS)

## models-gpu: the same models exported for a GPU host (docker-compose.yml): fp16, batch buckets up to each
## model's GPU batch, two instances per GPU (python -m export --gpu); make models restores the CPU export
models-gpu: $(MODELS)
	$(PY) -m export all --weights demo --gpu
	rm -f $(MODELS)

## system-deps: Debian packages the tests and the stack run (prometheus, chromium)
system-deps:
	scripts/system-deps.sh

## serve: start the gateway with the embedded backend on http://127.0.0.1:8000
serve: $(MODELS)
	$(PY) -m service

## serve-uvicorn: the same app under plain uvicorn, no Ray (one process; metrics at /metrics)
serve-uvicorn: $(MODELS)
	$(PY) -m uvicorn --factory service.app:from_environment --host 127.0.0.1 --port 8000

## serve-owner: one process owns the models (a GPU's: CVSERVE_DEVICE=cuda), WORKERS uvicorn processes serve
## HTTP in front of it on http://127.0.0.1:8000, no Ray (JPEGs decoded on the GPU: CVSERVE_DEVICE_DECODE)
serve-owner: $(MODELS)
	$(PY) -m service.owner_app --workers $(WORKERS)

## test: the whole suite against real servers (durations: docs/TEST_DURATIONS.md)
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
