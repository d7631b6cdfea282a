# Two commands on a fresh machine: `make run` (the main job end to end) and `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test bench clean

$(BIN)/r2ray: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/r2ray

setup: $(BIN)/r2ray

run: setup
	$(BIN)/r2ray demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs mlruns
