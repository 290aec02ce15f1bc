# graft: `make serve` sets up and runs the service; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup weights data serve test test-unit lint protos fuzz screenshots bench bento image lock clean

setup: $(STAMP)

# requirements.lock pins every package graft runs on (torch==2.14.1, torchvision==0.29.1 among them); the dev
# venv, the Bento and the image all install exactly those versions. `make lock` regenerates it from pyproject.toml.
# The client (graft-client, the `graft` command) is its own distribution: a second pip run, after the server's,
# so that upgrading a venv whose old graft owned bin/graft does not remove the new one.
$(STAMP): pyproject.toml client/pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[test,bench]'
	$(PY) -m pip install -q -c requirements.lock -e './client[report]'
	touch $@

lock: setup
	$(PY) -m pip install -q pip-tools
	$(VENV)/bin/pip-compile --quiet --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
		--no-emit-trusted-host -o requirements.lock pyproject.toml

weights: setup
	$(PY) -m service.provision --trunks

# Debian packages the tests use: Fashion-MNIST, real PostgreSQL and nginx servers (started by the tests), and
# chromium, the browser Playwright drives in tests/e2e/test_ui.py (Playwright's own browser download needs the internet).
# podman, runc and mmdebstrap build and run graft's image (make image; tests/e2e/test_container_e2e.py).
DEBIAN_TEST_PACKAGES := dataset-fashion-mnist postgresql nginx chromium
DEBIAN_IMAGE_PACKAGES := podman runc mmdebstrap
PG_CTL := /usr/lib/postgresql/15/bin/pg_ctl
NGINX := /usr/sbin/nginx
CHROMIUM := /usr/bin/chromium
PODMAN := /usr/bin/podman
RUNC := /usr/sbin/runc
MMDEBSTRAP := /usr/bin/mmdebstrap

$(FASHION_MNIST) $(PG_CTL) $(NGINX) $(CHROMIUM):
	$(SUDO) apt-get install -y -q $(DEBIAN_TEST_PACKAGES) || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $(DEBIAN_TEST_PACKAGES); }

$(PODMAN) $(RUNC) $(MMDEBSTRAP):
	$(SUDO) apt-get install -y -q $(DEBIAN_IMAGE_PACKAGES) || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $(DEBIAN_IMAGE_PACKAGES); }

data: setup $(FASHION_MNIST) $(PG_CTL) $(NGINX) $(CHROMIUM) $(PODMAN) $(RUNC) $(MMDEBSTRAP)
	$(PY) -m harness.sample_data

# Local development: no API keys unless GRAFT_AUTH=keys is set (the Bento defaults to keys). Without keys
# both doors listen on 127.0.0.1 only (the gRPC door decides that itself); with keys, on every interface.
serve: setup weights
	auth=$${GRAFT_AUTH:-open}; host=0.0.0.0; [ "$$auth" = open ] && host=127.0.0.1; \
	GRAFT_AUTH=$$auth $(VENV)/bin/bentoml serve --host $$host

# Build the Bento (code + verified backbone weights) and check the weights inside it.
bento: setup
	$(PY) scripts/build_bento.py

# The OCI image graft:<version>: a Debian base made by mmdebstrap, the locked wheels, graft, the verified weights
# (scripts/build_image.py; built again only when one of those changed).
image: setup weights $(PODMAN) $(RUNC) $(MMDEBSTRAP)
	$(PY) scripts/build_image.py

# tests/unit: in-process (real backbone, real SQLite and PostgreSQL); tests/e2e: against real `bentoml serve`
# processes, nginx, a Bento, the image as containers and a browser. `make test` runs both: every component is
# exercised by every run.
test: setup weights data
	$(PY) -m pytest -q

test-unit: setup weights data
	$(PY) -m pytest -q tests/unit

# Both generated trees from protos/graft/v1: the server's (service/grpc/gen) and the client's (client/_proto), checked
# in; tests/unit/test_protos.py (server) and tests/unit/test_client.py (client) fail when either differs.
protos: setup
	$(PY) scripts/gen_protos.py
	$(PY) scripts/gen_client_protos.py

# ruff (lint and format) and mypy, configured in pyproject.toml; .ci/run runs this before the tests.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# The OpenAPI document against a running service: schemathesis, every check (FUZZ_EXAMPLES per operation).
FUZZ_EXAMPLES ?= 25
fuzz: setup weights
	GRAFT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/e2e/test_openapi.py

# Refresh the README's screenshots of the web page (taken by its browser test at desktop and phone sizes).
screenshots: setup weights data
	GRAFT_SCREENSHOTS_DIR=docs/screenshots $(PY) -m pytest -q tests/e2e/test_ui.py

bench: setup weights data
	$(PY) benchmarks/accuracy.py
	$(PY) benchmarks/training_cost.py
	$(PY) benchmarks/monitoring.py
	$(PY) benchmarks/batch.py
	$(PY) benchmarks/runtime.py
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/latency.py
	$(PY) benchmarks/http_load.py
	$(PY) benchmarks/grpc_load.py
	$(PY) benchmarks/soak.py
	$(PY) benchmarks/scaleout.py
	$(PY) benchmarks/peers.py
	$(PY) benchmarks/cold.py
	$(PY) benchmarks/container.py

clean:
	rm -rf $(VENV) var .cache
