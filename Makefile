# hingeloss: build, serve, test. Every target creates .venv when needed.
PYTHON ?= python3
VENV ?= .venv
# The build pip finds first (PyPI's on Linux x86_64 is the CUDA one); pick one with an
# index, e.g. `make install TORCH_SPEC="torch==2.13.0 --index-url .../whl/cpu"` (or cu126).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
PROTO := proto/hingeloss/v1/loss_service.proto

.PHONY: venv install proto config-docs serve test lint bench bench-sdk gpu-check deploy-check soak pressure fuzz docker \
	wheelhouse image-check clean

venv: $(PY)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[dev,examples]"
	touch $(STAMP)

install: $(STAMP)

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=client --pyi_out=client \
		--grpc_python_out=client $(PROTO)

# The flag table of docs/configuration.md, from the fields of config.py (a test checks it).
config-docs: $(STAMP)
	$(PY) -m hingeloss_server.config_table docs/configuration.md

serve: $(STAMP)
	$(BIN)/hingeloss-server --devices auto

lint: $(STAMP)
	$(BIN)/ruff check client server tests examples
	$(BIN)/mypy client/hingeloss client/hingeloss_bench server/hingeloss_server tests

test: $(STAMP) lint
	$(BIN)/pytest

bench: $(STAMP)
	$(PY) tests/tools/bench/run.py --output bench-results.json $(BENCH_ARGS)

# What SDK callers get for large requests, uploaded in parts against one message, each
# measurement in a fresh process (minutes).
bench-sdk: $(STAMP)
	$(PY) tests/tools/bench/sdk_clients.py --output bench-sdk-results.json

gpu-check: $(STAMP)
	bash tests/gpu/gpu_check.sh

deploy-check: $(STAMP)
	$(BIN)/pytest tests/deploy -q

# The long versions of test_soak.py (10 s) and of the overload test (3 s).
soak: $(STAMP)
	$(PY) tests/tools/soak.py --seconds 60
	HINGELOSS_OVERLOAD_SECONDS=20 $(BIN)/pytest -q tests/integration/test_overload.py -k ten_times

# Small-call p99 beside a 512 MiB request (median of five rotating rounds), and RSS
# growth under a flood of 4 MB requests, each as a ratio to the echo floor's in the same
# run (about 4 GiB, minutes).
pressure: $(STAMP)
	$(PY) tests/tools/bench/pressure.py --output pressure-results.json

# atheris is installed here only: `make test` does not need it (its test skips without it).
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	$(BIN)/pip install --quiet "atheris>=2.3"
	$(PY) tests/tools/fuzz/fuzz_decode.py -max_total_time=$(FUZZ_SECONDS)
	HINGELOSS_FUZZ_EXAMPLES=2000 $(BIN)/pytest -q tests/integration/test_fuzz.py

# Both images, where a Docker engine runs. DOCKER_BUILD_ARGS passes e.g.
# --build-arg WHEELHOUSE=wheelhouse/cpu (after `make wheelhouse`); docs/deployment.md.
docker:
	docker build -f docker/Dockerfile --target cpu -t hingeloss:cpu $(DOCKER_BUILD_ARGS) .
	docker build -f docker/Dockerfile --target gpu -t hingeloss:cuda $(DOCKER_BUILD_ARGS) .

# Every wheel an image installs, for offline builds: wheelhouse/cpu (IMAGE_TARGET=gpu: the CUDA
# image's). pip's own configuration (a mirror, find-links) applies.
IMAGE_TARGET ?= cpu
wheelhouse: $(PY)
	PYTHON=$(PY) docker/make-wheelhouse.sh $(IMAGE_TARGET)

# Builds the cpu image with podman (offline, from the wheelhouse) and checks it running:
# tests/deploy/test_image.py. `make test` skips that module; here it must run, so no podman
# is an error.
image-check: $(STAMP)
	@command -v podman >/dev/null 2>&1 || { echo "image-check: podman is not installed;" \
		"it needs podman, runc, catatonit and debootstrap (Debian: apt-get install" \
		"podman runc catatonit debootstrap)" >&2; exit 1; }
	$(MAKE) --no-print-directory wheelhouse IMAGE_TARGET=cpu
	HINGELOSS_IMAGE_CHECK=1 $(BIN)/pytest -q --timeout=3600 tests/deploy/test_image.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
